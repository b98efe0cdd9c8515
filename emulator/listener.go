package emulator

import (
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/mochi-mqtt/server/v2/listeners"
)

// listener is a mochi listener that can be paused and resumed on the same
// address (Stop/Restart) without rebuilding the broker, and that bounds every
// network operation in time: mochi itself sets no deadline before CONNECT and
// no write deadline at all, so a client that stops reading would otherwise
// block a server-side write forever.
type listener struct {
	id             string
	addr           string // the bound address, so Restart reuses the same port
	tlsConfig      *tls.Config
	connectTimeout time.Duration // TLS handshake + CONNECT
	writeTimeout   time.Duration // every single write
	log            *slog.Logger
	ended          func(net.Conn, error) // after mochi is done with a connection
	changed        func()                // a socket was accepted or closed

	mu     sync.Mutex
	cond   *sync.Cond // signalled when ln changes or the listener closes
	ln     net.Listener
	closed bool
	conns  map[*deadlineConn]struct{} // every accepted connection, for Stop and Close
}

var _ listeners.Listener = (*listener)(nil)

func newListener(id, addr string, tlsConfig *tls.Config, connectTimeout, writeTimeout time.Duration, log *slog.Logger, ended func(net.Conn, error), changed func()) (*listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	l := &listener{
		id: id, addr: ln.Addr().String(), tlsConfig: tlsConfig,
		connectTimeout: connectTimeout, writeTimeout: writeTimeout, log: log, ended: ended, changed: changed,
		ln: ln, conns: map[*deadlineConn]struct{}{},
	}
	l.cond = sync.NewCond(&l.mu)
	return l, nil
}

func (l *listener) ID() string       { return l.id }
func (l *listener) Address() string  { return l.addr }
func (l *listener) Protocol() string { return "tcp" }

// Init is a no-op: the socket is bound in newListener so that NewServer knows
// its port before mochi starts serving.
func (l *listener) Init(*slog.Logger) error { return nil }

// Serve accepts until Close. While paused (ln == nil) it waits for resume.
func (l *listener) Serve(establish listeners.EstablishFn) {
	var backoff time.Duration
	for {
		l.mu.Lock()
		for l.ln == nil && !l.closed {
			l.cond.Wait()
		}
		if l.closed {
			l.mu.Unlock()
			return
		}
		ln := l.ln
		l.mu.Unlock()

		raw, err := ln.Accept()
		if err != nil {
			l.mu.Lock()
			current, closed := l.ln == ln, l.closed
			l.mu.Unlock()
			if closed {
				return
			}
			if !current || errors.Is(err, net.ErrClosed) {
				continue // paused or restarted under us
			}
			// A transient error such as EMFILE: back off like net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.log.Warn("accept failed", "listener", l.id, "error", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		dc := &deadlineConn{Conn: raw, writeTimeout: l.writeTimeout}
		if !l.track(dc) {
			_ = raw.Close()
			continue
		}
		_ = dc.SetReadDeadline(time.Now().Add(l.connectTimeout)) // mochi replaces it after CONNECT
		var conn net.Conn = dc
		if l.tlsConfig != nil {
			conn = tls.Server(dc, l.tlsConfig)
		}
		go func() {
			err := establish(l.id, conn)
			if err != nil {
				l.log.Debug("connection ended", "listener", l.id, "remote", raw.RemoteAddr().String(), "error", err)
			}
			_ = conn.Close()
			if l.ended != nil {
				l.ended(conn, err)
			}
		}()
	}
}

func (l *listener) track(dc *deadlineConn) bool {
	l.mu.Lock()
	if l.closed || l.ln == nil {
		l.mu.Unlock()
		return false
	}
	l.conns[dc] = struct{}{}
	dc.onClose = func() {
		l.mu.Lock()
		delete(l.conns, dc)
		l.mu.Unlock()
		l.changed()
	}
	l.mu.Unlock()
	l.changed()
	return true
}

// pause closes the socket; Serve waits for resume.
func (l *listener) pause() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.ln != nil {
		_ = l.ln.Close()
		l.ln = nil
	}
	l.cond.Broadcast()
}

// resume binds the same address again.
func (l *listener) resume() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return errors.New("listener closed")
	}
	if l.ln != nil {
		return nil
	}
	ln, err := net.Listen("tcp", l.addr)
	if err != nil {
		return err
	}
	l.ln = ln
	l.cond.Broadcast()
	return nil
}

// dropAll closes every accepted connection, including ones still in the TLS
// handshake or before CONNECT.
func (l *listener) dropAll() {
	l.mu.Lock()
	conns := make([]*deadlineConn, 0, len(l.conns))
	for c := range l.conns {
		conns = append(conns, c)
	}
	l.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
}

func (l *listener) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.conns)
}

// Close is called by mochi's Server.Close.
func (l *listener) Close(closeClients listeners.CloseFn) {
	l.mu.Lock()
	already := l.closed
	l.closed = true
	if l.ln != nil {
		_ = l.ln.Close()
		l.ln = nil
	}
	l.cond.Broadcast()
	l.mu.Unlock()
	if !already {
		closeClients(l.id)
	}
	l.dropAll()
}

// deadlineConn gives every Write its own deadline and keeps mochi's
// SetDeadline (called with the keep-alive on every read) from clearing it.
type deadlineConn struct {
	net.Conn
	writeTimeout time.Duration
	closeOnce    sync.Once
	onClose      func()
}

func (c *deadlineConn) Write(b []byte) (int, error) {
	if err := c.Conn.SetWriteDeadline(time.Now().Add(c.writeTimeout)); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

// SetDeadline only moves the read deadline; writes have their own.
func (c *deadlineConn) SetDeadline(t time.Time) error { return c.Conn.SetReadDeadline(t) }

func (c *deadlineConn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(func() {
		if c.onClose != nil {
			c.onClose()
		}
	})
	return err
}
