//go:build linux || darwin || freebsd

package share

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// sharingSupported says whether this platform has what cross-process sharing
// needs: flock, Unix sockets and the peer's credentials.
const sharingSupported = true

// tryLock takes an exclusive flock on path without waiting. The lock belongs
// to the open file: it is released when the file is closed or the process
// dies, however it dies, so a crashed owner never leaves a stale lock.
// errLocked means another open file (another process, or another acquirer
// of this one) holds it.
func tryLock(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	var lockErr error
	if err := raw.Control(func(fd uintptr) {
		for {
			lockErr = unix.Flock(int(fd), unix.LOCK_EX|unix.LOCK_NB)
			if !errors.Is(lockErr, unix.EINTR) {
				return
			}
		}
	}); err != nil {
		f.Close()
		return nil, err
	}
	if lockErr != nil {
		f.Close()
		if errors.Is(lockErr, unix.EWOULDBLOCK) {
			return nil, errLocked
		}
		return nil, fmt.Errorf("locking %q: %w", path, lockErr)
	}
	return f, nil
}

// fileOwner returns the uid owning fi.
func fileOwner(fi fs.FileInfo) (int, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(st.Uid), true
}

// connCredentials returns the credentials of the process at the other end
// of c, as the kernel recorded them when the connection was made.
func connCredentials(c *net.UnixConn) (peerCred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return peerCred{}, err
	}
	var cred peerCred
	var credErr error
	if err := raw.Control(func(fd uintptr) { cred, credErr = peerCredentials(int(fd)) }); err != nil {
		return peerCred{}, err
	}
	return cred, credErr
}
