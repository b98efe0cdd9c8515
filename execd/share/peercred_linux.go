package share

import "golang.org/x/sys/unix"

// peerCredentials reads SO_PEERCRED.
func peerCredentials(fd int) (peerCred, error) {
	u, err := unix.GetsockoptUcred(fd, unix.SOL_SOCKET, unix.SO_PEERCRED)
	if err != nil {
		return peerCred{}, err
	}
	return peerCred{UID: int(u.Uid), PID: int(u.Pid)}, nil
}
