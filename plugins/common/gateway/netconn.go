package gateway

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// publishCountingConn counts the PUBLISH packets arriving from the bridge as
// paho reads them off the wire.
//
// Why: paho completes a PUBACK's token on its reader goroutine but hands an
// inbound PUBLISH to its router goroutine, so an error the bridge sent BEFORE
// a PUBACK (e.g. GATEWAY_ATTACHMENT_ERROR, then the attach's PUBACK) can reach
// our handler AFTER the token completed. Comparing this count with the number
// of messages our handler has processed lets the session wait until every
// message that preceded an acknowledgement has been seen, so an attach is
// never reported as successful when the bridge refused it.
type publishCountingConn struct {
	net.Conn
	publishes *atomic.Uint64

	// MQTT fixed-header scanner state.
	state     int // 0: packet type byte, 1: remaining length, 2: body
	remaining int
	mult      int
}

func (c *publishCountingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.scan(p[:n])
	return n, err
}

func (c *publishCountingConn) scan(b []byte) {
	for len(b) > 0 {
		switch c.state {
		case 0:
			if b[0]>>4 == 3 { // PUBLISH
				c.publishes.Add(1)
			}
			c.state, c.remaining, c.mult = 1, 0, 1
			b = b[1:]
		case 1:
			v := b[0]
			b = b[1:]
			c.remaining += int(v&0x7f) * c.mult
			c.mult *= 128
			if v&0x80 == 0 {
				c.state = 2
				if c.remaining == 0 {
					c.state = 0
				}
			}
		case 2:
			k := min(len(b), c.remaining)
			b = b[k:]
			c.remaining -= k
			if c.remaining == 0 {
				c.state = 0
			}
		}
	}
}

// dialer opens the network connection for paho (tcp:// or tls://) and wraps
// it: quick ACKs on the TCP socket (quickack_linux.go), writes coalesced
// above TLS (coalescingConn), reads buffered and PUBLISH packets counted.
// The dial and the TLS handshake end with ctx, and opened receives the TCP
// connection, so that a session being closed can abort a connect in
// progress (paho's own connect cannot be interrupted). writeTimeout bounds
// each write to the socket.
func dialer(ctx context.Context, tlsCfg *tls.Config, timeout, writeTimeout time.Duration, counter *atomic.Uint64, opened func(net.Conn)) mqtt.OpenConnectionFunc {
	return func(uri *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
		var secure bool
		switch uri.Scheme {
		case "tcp", "mqtt":
		case "tls", "ssl", "mqtts":
			secure = true
		default:
			return nil, fmt.Errorf("unsupported scheme %q", uri.Scheme)
		}
		d := &net.Dialer{Timeout: timeout}
		raw, err := d.DialContext(ctx, "tcp", uri.Host)
		if err != nil {
			return nil, err
		}
		opened(raw)
		conn := quickAck(raw)
		if secure {
			cfg := tlsCfg
			if cfg == nil {
				cfg = &tls.Config{MinVersion: tls.VersionTLS12}
			}
			if cfg.ServerName == "" {
				// What tls.Dialer does: verify the host dialled.
				host, _, err := net.SplitHostPort(uri.Host)
				if err != nil {
					host = uri.Host
				}
				cfg = cfg.Clone()
				cfg.ServerName = host
			}
			hctx, cancel := context.WithTimeout(ctx, timeout)
			tc := tls.Client(conn, cfg)
			err := tc.HandshakeContext(hctx)
			cancel()
			if err != nil {
				raw.Close()
				return nil, err
			}
			conn = tc
		}
		return &publishCountingConn{Conn: newBufferedConn(newCoalescingConn(conn, writeTimeout)), publishes: counter}, nil
	}
}

// bufferedConn reads through a buffer. paho reads each packet straight off
// the connection in small pieces (the type byte, each byte of the length,
// then the body: three reads for a 4-byte PUBACK), which on plain TCP is a
// system call each; with a buffer one call takes every PUBACK that has
// arrived. Only paho's single reader goroutine reads; writes, deadlines and
// Close go to the connection itself. (A TLS connection already buffers
// whole records; the buffer costs it only a copy.)
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func newBufferedConn(c net.Conn) *bufferedConn {
	return &bufferedConn{Conn: c, r: bufio.NewReaderSize(c, 32<<10)}
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
