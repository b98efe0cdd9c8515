//go:build linux

package main

import (
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// waitStderrRead waits, at most d, until the reader of this process's
// stderr pipe has read everything written to it, and reports whether it did.
//
// Telegraf's execd reads a child's stderr from a pipe that os/exec closes as
// soon as the child exits (Cmd.Wait), so on a loaded machine the reader can
// lose the last lines: the error that made the child exit. Waiting for the
// pipe to be empty before exiting keeps that error in Telegraf's log. The
// kernel has no event for "the reader consumed the pipe", hence the polling
// of FIONREAD (bytes not yet read), bounded by d.
func waitStderrRead(f *os.File, d time.Duration) bool {
	rc, err := f.SyscallConn()
	if err != nil {
		return false
	}
	// unread is the number of bytes not read yet; reader is false when
	// nobody reads the pipe any more (its read end is closed: POLLERR).
	unread := func() (n int, pipe, reader bool) {
		_ = rc.Control(func(fd uintptr) {
			var st unix.Stat_t
			if unix.Fstat(int(fd), &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFIFO {
				return // not a pipe (a file, a terminal): nothing is lost at exit
			}
			v, err := unix.IoctlGetInt(int(fd), unix.TIOCINQ) // TIOCINQ is FIONREAD
			if err != nil {
				return
			}
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLOUT}}
			_, _ = unix.Poll(pfd, 0)
			n, pipe, reader = v, true, pfd[0].Revents&unix.POLLERR == 0
		})
		return n, pipe, reader
	}
	deadline := time.Now().Add(d)
	for {
		n, pipe, reader := unread()
		if !pipe || n == 0 {
			return true
		}
		if !reader {
			return false // nobody will read it
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
}
