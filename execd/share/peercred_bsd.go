//go:build darwin || freebsd

package share

import "golang.org/x/sys/unix"

// peerCredentials reads LOCAL_PEERCRED (the peer's pid is not part of it).
func peerCredentials(fd int) (peerCred, error) {
	x, err := unix.GetsockoptXucred(fd, unix.SOL_LOCAL, unix.LOCAL_PEERCRED)
	if err != nil {
		return peerCred{}, err
	}
	return peerCred{UID: int(x.Uid), PID: -1}, nil
}
