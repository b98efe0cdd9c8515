package emulator

import (
	"bytes"
	"net"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// instantAckConn is a client socket on a busy server: the client's PUBACK of
// a QoS 1 PUBLISH is read and processed before the server's Write returns.
// That happens for real when the writing goroutine is descheduled right after
// the write; here it happens every time.
type instantAckConn struct {
	net.Conn  // nil: only Write, Close and the addresses are used
	onPublish func(id uint16)
}

func (c *instantAckConn) Write(b []byte) (int, error) {
	r := bytes.NewReader(b)
	first, err := r.ReadByte()
	if err != nil {
		return 0, err
	}
	pk := packets.Packet{ProtocolVersion: 4}
	if err := pk.FixedHeader.Decode(first); err != nil {
		return 0, err
	}
	if pk.FixedHeader.Type == packets.Publish && pk.FixedHeader.Qos == 1 {
		n, _, err := packets.DecodeLength(r)
		if err != nil {
			return 0, err
		}
		rest := make([]byte, n)
		if _, err := r.Read(rest); err != nil {
			return 0, err
		}
		if err := pk.PublishDecode(rest); err != nil {
			return 0, err
		}
		c.onPublish(pk.PacketID)
	}
	return len(b), nil
}

func (c *instantAckConn) Close() error                     { return nil }
func (c *instantAckConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (c *instantAckConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (c *instantAckConn) SetWriteDeadline(time.Time) error { return nil }

// TestConfigAckBeforeWriteReturns: a config PUBACK that is processed before
// the write of the config returns is still recorded as the device's ack (the
// delivery is registered before the write). Issue 14's flaky TestGatewayFlow.
func TestConfigAckBeforeWriteReturns(t *testing.T) {
	t.Parallel()
	s, err := Start(WithTCPAddr(""), WithTLSAddr(""))
	require.NoError(t, err)
	defer s.Close()
	require.NoError(t, s.AddRegistry("r"))
	require.NoError(t, s.AddDevice("r", Device{ID: "d"}))

	nc := &instantAckConn{}
	cl := s.broker.NewClient(nc, "test", s.ClientID("r", "d"), false)
	cl.Properties.ProtocolVersion = 4
	c := newConn(s, cl, "r", "d", false, time.Now().Add(time.Hour))
	acks := 0
	nc.onPublish = func(id uint16) {
		acks++
		s.configAcked(c, id)
	}
	s.mu.Lock()
	s.conns[cl] = c
	c.setSubLocked("d", omnicore.KindConfig, 1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.conns, cl)
		s.mu.Unlock()
	}()

	for want := 1; want <= 3; want++ {
		v, err := s.SetConfig("r", "d", []byte("config"))
		require.NoError(t, err)
		require.Equal(t, want, v)
		require.Equal(t, want, acks, "the config was written at QoS 1")
		var acked int
		for _, d := range s.Devices() {
			if d.ID == "d" {
				acked = d.ConfigAckedVersion
			}
		}
		require.Equal(t, v, acked, "the PUBACK is recorded as the device's ack")
	}
	require.Equal(t, 3, s.Stats().ConfigsDelivered)
}
