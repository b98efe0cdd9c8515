package gateway

import (
	"net"
	"syscall"
)

// quickAckConn re-arms TCP_QUICKACK after every read, so the kernel
// acknowledges what the bridge sent at once instead of delaying the ACK (up
// to 40 ms on Linux) in the hope of piggybacking it on data.
//
// Why: a broker with Nagle's algorithm on (mosquitto's default
// set_tcp_nodelay false) holds each small PUBACK back until its previous
// segment is acknowledged. While we publish, our PUBLISH packets carry those
// ACKs; when a Write's last messages are out and we only wait, the delayed
// ACK holds the last PUBACKs for up to 40 ms, every Write. Linux clears
// TCP_QUICKACK by itself, so it is set again after each read (one setsockopt
// per read; reads are buffered and take every PUBACK that has arrived).
type quickAckConn struct {
	*net.TCPConn
	raw syscall.RawConn
}

func quickAck(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	return &quickAckConn{TCPConn: tc, raw: raw}
}

func (c *quickAckConn) Read(p []byte) (int, error) {
	n, err := c.TCPConn.Read(p)
	if n > 0 {
		// A failure only costs the delayed ACK this option avoids.
		_ = c.raw.Control(func(fd uintptr) {
			_ = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_QUICKACK, 1)
		})
	}
	return n, err
}
