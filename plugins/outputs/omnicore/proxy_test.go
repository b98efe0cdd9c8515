package omnicore

import (
	"net"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
)

// tcpProxy forwards loopback connections to a target. It can stop reading
// from the clients (their writes then pile up in the socket buffers, as on a
// congested link) and cut every connection at once.
type tcpProxy struct {
	t      *testing.T
	ln     net.Listener
	target string

	mu      sync.Mutex
	conns   []net.Conn
	paused  bool
	resumed chan struct{} // closed when a pause ends
}

func newTCPProxy(t *testing.T, target string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &tcpProxy{t: t, ln: ln, target: target, resumed: make(chan struct{})}
	close(p.resumed)
	go p.accept()
	t.Cleanup(func() {
		ln.Close()
		p.cut()
		p.resume()
	})
	return p
}

// URL is the proxy's address for the servers option.
func (p *tcpProxy) URL() string { return "tcp://" + p.ln.Addr().String() }

func (p *tcpProxy) accept() {
	for {
		client, err := p.ln.Accept()
		if err != nil {
			return
		}
		// A fixed, small receive buffer: when paused, the client's writes
		// back up after a few MB instead of being absorbed.
		_ = client.(*net.TCPConn).SetReadBuffer(64 * 1024)
		server, err := net.Dial("tcp", p.target)
		if err != nil {
			client.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, client, server)
		p.mu.Unlock()
		go p.pipe(server, client, true)
		go p.pipe(client, server, false)
	}
}

// pipe copies src to dst; upstream copies (client to server) honour pauses.
func (p *tcpProxy) pipe(dst, src net.Conn, upstream bool) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 32*1024)
	for {
		if upstream {
			p.mu.Lock()
			resumed := p.resumed
			p.mu.Unlock()
			<-resumed
		}
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// pause stops reading from the clients.
func (p *tcpProxy) pause() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.paused {
		p.paused = true
		p.resumed = make(chan struct{})
	}
}

// resume reads from the clients again.
func (p *tcpProxy) resume() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.paused {
		p.paused = false
		close(p.resumed)
	}
}

// cut closes every proxied connection (both sides).
func (p *tcpProxy) cut() {
	p.mu.Lock()
	conns := p.conns
	p.conns = nil
	p.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}
