package gateway

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// hostClaim is a held claim; release gives it up.
type hostClaim struct {
	l *net.UnixListener
}

// claimHost takes the claim of name. When another process holds it and that
// process is trusted (see trustedHolder), it returns a nil claim and the
// holder (a zero holder when it went away meanwhile: try again).
// A holder that is not trusted is ignored (ignored true): another local user
// must not be able to keep this gateway off the bridge by binding the name.
func claimHost(name string) (claim *hostClaim, holder ClaimHolder, ignored bool, err error) {
	addr := &net.UnixAddr{Name: name, Net: "unix"}
	l, err := net.ListenUnix("unix", addr)
	if err == nil {
		c := &hostClaim{l: l}
		go c.serve()
		return c, ClaimHolder{}, false, nil
	}
	if !errors.Is(err, syscall.EADDRINUSE) {
		return nil, ClaimHolder{}, false, err
	}
	h, ok := claimHolder(name)
	if !ok {
		// The holder went away between the bind and the dial: the next
		// attempt takes the claim (a zero holder says so).
		return nil, ClaimHolder{}, false, nil
	}
	if !trustedHolder(h) {
		return nil, h, true, nil
	}
	return nil, h, false, nil
}

// serve accepts and closes at once: a peer connects only to read the
// holder's credentials (SO_PEERCRED), and an unaccepted backlog would fill.
func (c *hostClaim) serve() {
	for {
		conn, err := c.l.Accept()
		if err != nil {
			return
		}
		conn.Close()
	}
}

func (c *hostClaim) release() {
	if c != nil {
		c.l.Close()
	}
}

// claimHolder dials name and reads who listens there.
func claimHolder(name string) (ClaimHolder, bool) {
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: name, Net: "unix"})
	if err != nil {
		return ClaimHolder{}, false
	}
	defer conn.Close()
	raw, err := conn.SyscallConn()
	if err != nil {
		return ClaimHolder{}, false
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return ClaimHolder{}, false
	}
	return ClaimHolder{PID: int(cred.Pid), UID: int(cred.Uid)}, true
}

// trustedHolder says whether a claim's holder is one this process defers
// to: a process of the same user or of root, or, for a process running as
// root, a Telegraf (or telegraf-omnicore) of any user, such as the Telegraf
// service when root runs `telegraf --test`.
func trustedHolder(h ClaimHolder) bool {
	me := os.Getuid()
	if h.UID == me || h.UID == 0 {
		return true
	}
	if me != 0 {
		return false
	}
	exe, err := os.Readlink(filepath.Join("/proc", strconv.Itoa(h.PID), "exe"))
	if err != nil {
		return false
	}
	return strings.HasPrefix(filepath.Base(exe), "telegraf")
}
