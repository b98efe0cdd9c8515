package gateway

import (
	"errors"
	"net"
	"runtime"
	"sync"
	"time"
)

// coalescingConn gathers paho's writes and hands them to the socket in as
// few system calls as the socket allows.
//
// Why: paho's writer goroutine writes every packet with its own call, so a
// window of 100 PUBLISHes is 100 writes (plus 100 TLS records): a quarter
// of the process's CPU in the profile. Here a Write appends to a buffer and
// returns; one flushing goroutine, started when the buffer gets data and
// ended when it is empty, writes whatever has gathered while its previous
// write was in the kernel. Nothing waits for more data, so a lone packet
// leaves at once (no added latency), and under load the batches grow by
// themselves. Delivery does not rest on a write returning: a QoS 1 message
// counts only on its PUBACK, and a failed write closes the connection, which
// paho sees on its reader as a lost connection.
//
// paho's write deadlines are replaced by one per system call (writeTimeout).
// Writes block only while maxCoalesced bytes are waiting (back-pressure).
// A failed write fails the reads too (see flush), so paho reports the
// connection lost.
type coalescingConn struct {
	net.Conn
	writeTimeout time.Duration

	mu       sync.Mutex
	drained  *sync.Cond // signalled when the buffer shrinks or the flusher ends
	buf      []byte     // waiting for the flusher
	spare    []byte     // the flusher's previous buffer, reused
	flushing bool
	err      error
}

const maxCoalesced = 1 << 20

var errCoalescedClosed = errors.New("connection closed")

func newCoalescingConn(c net.Conn, writeTimeout time.Duration) *coalescingConn {
	if writeTimeout <= 0 {
		writeTimeout = 30 * time.Second
	}
	cc := &coalescingConn{Conn: c, writeTimeout: writeTimeout}
	cc.drained = sync.NewCond(&cc.mu)
	return cc
}

func (c *coalescingConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for c.err == nil && len(c.buf) >= maxCoalesced {
		c.drained.Wait()
	}
	if c.err != nil {
		return 0, c.err
	}
	c.buf = append(c.buf, p...)
	if !c.flushing {
		c.flushing = true
		go c.flush()
	}
	return len(p), nil
}

// flush writes the buffer until it is empty, then ends.
func (c *coalescingConn) flush() {
	// Let the goroutines that are ready to run (paho's writer with the
	// next packets, the publishers that feed it) append before the first
	// system call: without it a write carried about 2 packets under load,
	// with it about 7, at no cost when nothing else is ready.
	runtime.Gosched()
	c.mu.Lock()
	for len(c.buf) > 0 && c.err == nil {
		out := c.buf
		c.buf, c.spare = c.spare[:0], nil
		c.drained.Broadcast()
		c.mu.Unlock()

		err := c.Conn.SetWriteDeadline(time.Now().Add(c.writeTimeout))
		if err == nil {
			_, err = c.Conn.Write(out)
		}

		c.mu.Lock()
		if err != nil {
			c.err = err
			// paho must learn of it on its reader, as of any lost
			// connection. Not by closing the socket: paho's reader takes
			// "use of closed network connection" for its own close after a
			// DISCONNECT and reports nothing, so the connection would be
			// lost without paho (or the session) ever knowing. A past
			// read deadline fails the read with a timeout instead, which
			// paho reports as the connection lost (and then closes it).
			_ = c.Conn.SetReadDeadline(time.Unix(1, 0))
			break
		}
		if cap(out) <= 2*maxCoalesced {
			c.spare = out[:0]
		}
	}
	c.flushing = false
	c.drained.Broadcast()
	c.mu.Unlock()
}

// SetWriteDeadline is paho's per-packet deadline; the flusher sets its own
// per system call instead.
func (c *coalescingConn) SetWriteDeadline(time.Time) error { return nil }

// SetDeadline sets the read deadline only, for the same reason.
func (c *coalescingConn) SetDeadline(t time.Time) error { return c.Conn.SetReadDeadline(t) }

// Close lets what is buffered (paho's DISCONNECT, typically) reach the
// socket, for at most a second, then closes it.
func (c *coalescingConn) Close() error {
	c.mu.Lock()
	if c.flushing && c.err == nil {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		stop := time.AfterFunc(time.Second, func() { c.Conn.Close() })
		for c.flushing {
			c.drained.Wait()
		}
		stop.Stop()
	}
	if c.err == nil {
		c.err = errCoalescedClosed
	}
	c.drained.Broadcast()
	c.mu.Unlock()
	return c.Conn.Close()
}
