// Package latencyproxy is a TCP proxy on loopback that delays every byte by
// a fixed time in each direction, so that a client and a server on one
// machine see the round-trip time of a real link (twice the one-way delay).
//
// It preserves order and TCP semantics as far as a proxy can: each direction
// is one FIFO of chunks stamped with the time they were read, written out no
// sooner than stamp + delay; a half-close is forwarded once the data before
// it is delivered. Buffers are bounded: each direction holds at most
// Options.BufferBytes in flight, after which the proxy stops reading and TCP
// flow control pushes back on the sender, as a real link's queue would.
//
//	p, err := latencyproxy.New("127.0.0.1:1883", 10*time.Millisecond)
//	defer p.Close()
//	client connects to p.Addr() and sees a 20 ms round trip
package latencyproxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
)

// Defaults of Options.
const (
	DefaultBufferBytes = 4 << 20  // per direction and connection
	DefaultChunkBytes  = 32 << 10 // largest read
	dialTimeout        = 5 * time.Second
)

// Options tune a Proxy; the zero value means the defaults.
type Options struct {
	// ListenAddr is where the proxy listens (default "127.0.0.1:0").
	ListenAddr string
	// BufferBytes bounds the bytes in flight per direction and connection.
	BufferBytes int64
	// ChunkBytes is the largest single read.
	ChunkBytes int
}

// Proxy forwards connections from its listener to a target, delaying each
// direction by the same one-way delay.
type Proxy struct {
	target string
	delay  time.Duration
	opts   Options
	ln     net.Listener

	mu     sync.Mutex
	conns  map[*link]struct{}
	closed bool
	wg     sync.WaitGroup
	// toServer and toClient count the bytes delivered in each direction,
	// over every connection (TCP payload: what the peers wrote and read).
	toServer, toClient atomic.Int64
}

// New starts a proxy to target ("host:port") that delays each direction by
// oneWay; the round trip seen through it is 2*oneWay plus the real one.
func New(target string, oneWay time.Duration) (*Proxy, error) {
	return NewWithOptions(target, oneWay, Options{})
}

// NewWithOptions is New with tuning.
func NewWithOptions(target string, oneWay time.Duration, opts Options) (*Proxy, error) {
	if oneWay < 0 {
		return nil, fmt.Errorf("latencyproxy: negative delay %s", oneWay)
	}
	if opts.ListenAddr == "" {
		opts.ListenAddr = "127.0.0.1:0"
	}
	if opts.BufferBytes <= 0 {
		opts.BufferBytes = DefaultBufferBytes
	}
	if opts.ChunkBytes <= 0 {
		opts.ChunkBytes = DefaultChunkBytes
	}
	if int64(opts.ChunkBytes) > opts.BufferBytes {
		opts.ChunkBytes = int(opts.BufferBytes)
	}
	ln, err := net.Listen("tcp", opts.ListenAddr)
	if err != nil {
		return nil, fmt.Errorf("latencyproxy: %w", err)
	}
	p := &Proxy{target: target, delay: oneWay, opts: opts, ln: ln, conns: make(map[*link]struct{})}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the proxy's listening address, "127.0.0.1:PORT".
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// Bytes is how many bytes the proxy delivered so far to the target
// (toServer) and back to the clients (toClient), over every connection: the
// TCP payload each way, with a real link's framing (TLS records, MQTT
// packets) but without TCP/IP headers. With no delay it is a counting proxy.
func (p *Proxy) Bytes() (toServer, toClient int64) {
	return p.toServer.Load(), p.toClient.Load()
}

// Delay is the one-way delay.
func (p *Proxy) Delay() time.Duration { return p.delay }

// Close stops listening, cuts every proxied connection and waits for the
// proxy's goroutines.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	err := p.ln.Close()
	p.CutAll()
	p.wg.Wait()
	return err
}

// CutAll closes every proxied connection at once (both sides), as a broken
// link would; the listener keeps accepting new ones.
func (p *Proxy) CutAll() {
	p.mu.Lock()
	links := make([]*link, 0, len(p.conns))
	for l := range p.conns {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links {
		l.cut()
	}
}

// Conns is the number of proxied connections open now.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns)
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Add(1)
		go p.serve(c)
	}
}

// link is one proxied connection.
type link struct {
	client, server net.Conn
	once           sync.Once
	ctx            context.Context
	cancel         context.CancelFunc
}

func (l *link) cut() {
	l.once.Do(func() {
		l.cancel()
		_ = l.client.Close()
		_ = l.server.Close()
	})
}

func (p *Proxy) serve(client net.Conn) {
	defer p.wg.Done()
	server, err := net.DialTimeout("tcp", p.target, dialTimeout)
	if err != nil {
		_ = client.Close()
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	l := &link{client: client, server: server, ctx: ctx, cancel: cancel}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		l.cut()
		return
	}
	p.conns[l] = struct{}{}
	p.mu.Unlock()

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(l, client, server, &p.toServer) }()
	go func() { defer wg.Done(); p.pipe(l, server, client, &p.toClient) }()
	wg.Wait()
	l.cut()
	p.mu.Lock()
	delete(p.conns, l)
	p.mu.Unlock()
}

// chunk is data read at one time, due for writing at due.
type chunk struct {
	data []byte
	due  time.Time
}

// pipe copies src to dst with the delay: a reader stamps chunks into a FIFO
// bounded by BufferBytes, a writer sends each when due. When src ends, dst's
// write side is closed after the data before the end; when writing fails,
// the whole link is cut.
func (p *Proxy) pipe(l *link, src, dst net.Conn, delivered *atomic.Int64) {
	budget := semaphore.NewWeighted(p.opts.BufferBytes)
	// The FIFO never holds more chunks than bytes in the budget, so the
	// channel never blocks before the budget does.
	queue := make(chan chunk, min(p.opts.BufferBytes, 1<<16))
	done := make(chan struct{})
	go func() {
		defer close(done)
		timer := time.NewTimer(time.Hour)
		defer timer.Stop()
		for c := range queue {
			if wait := time.Until(c.due); wait > 0 {
				timer.Reset(wait)
				select {
				case <-timer.C:
				case <-l.ctx.Done():
					return
				}
			}
			n, err := dst.Write(c.data)
			delivered.Add(int64(n))
			budget.Release(int64(len(c.data)))
			if err != nil {
				l.cut()
				return
			}
		}
		// src ended and everything before the end is delivered.
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		} else {
			_ = dst.Close()
		}
	}()
	buf := make([]byte, p.opts.ChunkBytes)
	for {
		if err := budget.Acquire(l.ctx, int64(len(buf))); err != nil {
			break
		}
		n, err := src.Read(buf)
		now := time.Now()
		// Give back the part of the reservation the read did not use.
		budget.Release(int64(len(buf) - n))
		if n > 0 {
			select {
			case queue <- chunk{data: append([]byte(nil), buf[:n]...), due: now.Add(p.delay)}:
			case <-l.ctx.Done():
				budget.Release(int64(n))
			}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				l.cut()
			}
			break
		}
		if l.ctx.Err() != nil {
			break
		}
	}
	close(queue)
	<-done
}
