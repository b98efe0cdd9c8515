package gateway

import (
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
		close(accepted)
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	server = <-accepted
	require.NotNil(t, server)
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestCoalescingConnKeepsEveryByteInOrder(t *testing.T) {
	for _, tc := range []struct {
		name    string
		writers int
		packets int
		size    int
	}{
		{"one writer, small packets", 1, 20000, 60},
		{"one writer, packets over the buffer bound", 1, 8, maxCoalesced + 1000},
		{"writers taking turns", 4, 5000, 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			client, server := tcpPair(t)
			c := newCoalescingConn(quickAck(client), 10*time.Second)
			want := make(chan []byte, 1)
			go func() {
				// paho has one writer goroutine; the writers here take a
				// lock per packet, as paho's sequence does.
				var mu sync.Mutex
				var all bytes.Buffer
				var wg sync.WaitGroup
				for w := range tc.writers {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for i := range tc.packets {
							p := bytes.Repeat([]byte{byte(w*31 + i)}, tc.size)
							mu.Lock()
							n, err := c.Write(p)
							all.Write(p)
							mu.Unlock()
							if err != nil || n != len(p) {
								panic(err)
							}
						}
					}()
				}
				wg.Wait()
				want <- all.Bytes()
				c.Close() // flushes what is buffered, then closes
			}()
			got, err := io.ReadAll(server)
			require.NoError(t, err)
			w := <-want
			require.Equal(t, len(w), len(got))
			require.True(t, bytes.Equal(w, got), "bytes reordered or changed")
		})
	}
}

// A failed write (here: its deadline, against a peer that does not read)
// fails later writes and the reads, with an error paho reports as a lost
// connection: not "use of closed network connection", which paho's reader
// takes for its own close and keeps quiet about.
func TestCoalescingConnWriteErrorFailsTheReads(t *testing.T) {
	client, _ := tcpPair(t)
	c := newCoalescingConn(client, 200*time.Millisecond)
	p := make([]byte, 64<<10)
	var err error
	deadline := time.After(30 * time.Second)
	for err == nil {
		select {
		case <-deadline:
			t.Fatal("writes never failed against a peer that does not read")
		default:
		}
		_, err = c.Write(p)
	}
	require.Error(t, err)
	_, err = c.Write([]byte{1})
	require.Error(t, err)

	_, rerr := c.Read(make([]byte, 1))
	require.Error(t, rerr)
	require.ErrorIs(t, rerr, os.ErrDeadlineExceeded)
	require.NotErrorIs(t, rerr, net.ErrClosed)
	require.NotContains(t, rerr.Error(), "use of closed network connection")
	require.NoError(t, c.Close())
}

func TestCoalescingConnCloseWithNothingBuffered(t *testing.T) {
	client, server := tcpPair(t)
	c := newCoalescingConn(client, time.Second)
	require.NoError(t, c.Close())
	_, err := c.Write([]byte{1})
	require.ErrorIs(t, err, errCoalescedClosed)
	n, err := server.Read(make([]byte, 1))
	require.Equal(t, 0, n)
	require.ErrorIs(t, err, io.EOF)
}

func TestQuickAckWrapsOnlyTCP(t *testing.T) {
	client, server := tcpPair(t)
	q := quickAck(client)
	if _, ok := q.(*quickAckConn); !ok {
		// Not Linux: nothing to wrap.
		require.Same(t, client, q)
	}
	_, err := server.Write([]byte("hello"))
	require.NoError(t, err)
	b := make([]byte, 5)
	_, err = io.ReadFull(q, b)
	require.NoError(t, err)
	require.Equal(t, "hello", string(b))

	p1, p2 := net.Pipe()
	defer p1.Close()
	defer p2.Close()
	require.Same(t, p1, quickAck(p1))
}
