package latencyproxy

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// echoServer echoes every connection until the client half-closes, then
// closes its side.
func echoServer(t *testing.T) string {
	return server(t, func(c net.Conn) { _, _ = io.Copy(c, c) })
}

// server serves every connection with handle, then closes it.
func server(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return ln.Addr().String()
}

func dial(t *testing.T, p *Proxy) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", p.Addr(), 5*time.Second)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	require.NoError(t, c.SetDeadline(time.Now().Add(30*time.Second)))
	return c.(*net.TCPConn)
}

func TestRoundTripIsDelayedAndOrdered(t *testing.T) {
	tests := []struct {
		name  string
		delay time.Duration
		size  int
		write int // bytes per write
	}{
		{name: "no delay", delay: 0, size: 1 << 20, write: 1000},
		{name: "small messages", delay: 10 * time.Millisecond, size: 64 << 10, write: 100},
		{name: "bulk", delay: 5 * time.Millisecond, size: 4 << 20, write: 64 << 10},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New(echoServer(t), tt.delay)
			require.NoError(t, err)
			defer p.Close()
			c := dial(t, p)

			want := make([]byte, tt.size)
			_, err = rand.Read(want)
			require.NoError(t, err)
			got := make([]byte, 0, tt.size)
			readDone := make(chan error, 1)
			go func() {
				b, err := io.ReadAll(c)
				got = append(got, b...)
				readDone <- err
			}()
			start := time.Now()
			for off := 0; off < len(want); off += tt.write {
				_, err := c.Write(want[off:min(off+tt.write, len(want))])
				require.NoError(t, err)
			}
			require.NoError(t, c.CloseWrite())
			require.NoError(t, <-readDone)
			// The echo of the first byte cannot arrive before it crossed
			// the proxy twice, so the whole exchange takes at least that.
			require.GreaterOrEqual(t, time.Since(start), 2*tt.delay)
			require.True(t, bytes.Equal(want, got), "echoed data differs (order or content)")
		})
	}
}

func TestFirstByteWaitsForTheRoundTrip(t *testing.T) {
	const delay = 15 * time.Millisecond
	p, err := New(echoServer(t), delay)
	require.NoError(t, err)
	defer p.Close()
	c := dial(t, p)
	buf := make([]byte, 1)
	for range 3 {
		start := time.Now()
		_, err := c.Write([]byte{'x'})
		require.NoError(t, err)
		_, err = io.ReadFull(c, buf)
		require.NoError(t, err)
		require.GreaterOrEqual(t, time.Since(start), 2*delay)
	}
}

func TestCutAllClosesBothSides(t *testing.T) {
	p, err := New(echoServer(t), time.Millisecond)
	require.NoError(t, err)
	defer p.Close()
	c := dial(t, p)
	_, err = c.Write([]byte("ping"))
	require.NoError(t, err)
	buf := make([]byte, 4)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	require.Equal(t, 1, p.Conns())

	p.CutAll()
	_, err = c.Read(buf)
	require.Error(t, err)
	// The listener still accepts.
	c2 := dial(t, p)
	_, err = c2.Write([]byte("pong"))
	require.NoError(t, err)
	_, err = io.ReadFull(c2, buf)
	require.NoError(t, err)
	require.Equal(t, "pong", string(buf))
}

func TestBufferIsBounded(t *testing.T) {
	// A server that accepts and never reads: the proxy must stop reading
	// once its buffer is full, so the client's writes block.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	p, err := NewWithOptions(ln.Addr().String(), time.Millisecond, Options{BufferBytes: 64 << 10, ChunkBytes: 16 << 10})
	require.NoError(t, err)
	defer p.Close()
	c := dial(t, p)
	select {
	case sc := <-accepted:
		defer sc.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("the proxy did not connect to the server")
	}

	// Far more than the proxy buffer plus any socket buffers on loopback.
	const total = 256 << 20
	require.NoError(t, c.SetWriteDeadline(time.Now().Add(2*time.Second)))
	block := make([]byte, 1<<20)
	written := 0
	for written < total {
		n, err := c.Write(block)
		written += n
		if err != nil {
			require.True(t, errors.Is(err, os.ErrDeadlineExceeded), "unexpected error %v", err)
			break
		}
	}
	require.Less(t, written, total, "writes never blocked: the proxy buffers without bound")
}

func TestNegativeDelay(t *testing.T) {
	_, err := New("127.0.0.1:1", -time.Second)
	require.Error(t, err)
}

func TestUnreachableTargetClosesClient(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	target := ln.Addr().String()
	ln.Close() // nothing listens there now
	p, err := New(target, 0)
	require.NoError(t, err)
	defer p.Close()
	c := dial(t, p)
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err)
}

// replyServer reads each connection until the client half-closes, then
// answers with reply and closes: the two directions carry different sizes.
func replyServer(t *testing.T, reply []byte) string {
	return server(t, func(c net.Conn) {
		_, _ = io.Copy(io.Discard, c)
		_, _ = c.Write(reply)
	})
}

func TestBytesCountsEachDirectionOverEveryConnection(t *testing.T) {
	tests := []struct {
		name          string
		delay         time.Duration
		conns, upload int
		reply         string
	}{
		{name: "one connection, no delay", delay: 0, conns: 1, upload: 1000, reply: "ack"},
		{name: "three connections", delay: 0, conns: 3, upload: 70 << 10, reply: "a longer reply"},
		{name: "delayed", delay: 2 * time.Millisecond, conns: 2, upload: 10, reply: "r"},
		{name: "nothing sent", delay: 0, conns: 1, upload: 0, reply: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New(replyServer(t, []byte(tt.reply)), tt.delay)
			require.NoError(t, err)
			defer p.Close()
			up, down := p.Bytes()
			require.Zero(t, up)
			require.Zero(t, down)
			for range tt.conns {
				c := dial(t, p)
				_, err := c.Write(make([]byte, tt.upload))
				require.NoError(t, err)
				require.NoError(t, c.CloseWrite())
				got, err := io.ReadAll(c)
				require.NoError(t, err)
				require.Equal(t, tt.reply, string(got))
			}
			// The client read the end of each reply, which the proxy
			// forwards only after everything before it was delivered
			// and counted.
			up, down = p.Bytes()
			require.Equal(t, int64(tt.conns*tt.upload), up, "bytes to the server")
			require.Equal(t, int64(tt.conns*len(tt.reply)), down, "bytes to the clients")
		})
	}
}
