package emulator_test

import (
	"bytes"
	"math/rand/v2"
	"net"
	"strings"
	"testing"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"
)

// TestHostileInput throws malformed and abusive packets at the server. The
// server must close those connections, never panic, and keep serving.
func TestHostileInput(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	id := f.srv.ClientID(reg, gw)
	connected := func(t *testing.T) *rawConn {
		r := dialRaw(t, f.srv)
		require.Equal(t, byte(0), r.connect(id, f.gwToken()))
		return r
	}
	tests := []struct {
		name string
		run  func(t *testing.T)
	}{
		{"garbage instead of CONNECT", func(t *testing.T) {
			r := dialRaw(t, f.srv)
			r.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
			r.expectClosed()
		}},
		{"PUBLISH before CONNECT", func(t *testing.T) {
			r := dialRaw(t, f.srv)
			r.send(pub("/reg/gw/events", 0, 0, "x"))
			r.expectClosed()
		}},
		{"second CONNECT", func(t *testing.T) {
			r := connected(t)
			r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
				ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: id, PasswordFlag: true, Password: []byte(f.gwToken()),
			}})
			r.expectClosed()
		}},
		{"remaining length far over the packet limit", func(t *testing.T) {
			r := connected(t)
			r.write([]byte{0x30, 0xff, 0xff, 0xff, 0x7f}) // PUBLISH of 256 MB, never sent
			r.expectClosed()
		}},
		{"invalid UTF-8 topic", func(t *testing.T) {
			r := connected(t)
			r.write([]byte{0x30, 0x07, 0x00, 0x03, '/', 0xff, 0xfe, 'x', 'y'})
			r.expectClosed()
		}},
		{"topic length beyond the packet", func(t *testing.T) {
			r := connected(t)
			r.write([]byte{0x30, 0x03, 0xff, 0xff, '/'})
			r.expectClosed()
		}},
		{"QoS 1 PUBLISH without packet ID", func(t *testing.T) {
			r := connected(t)
			r.write([]byte{0x32, 0x04, 0x00, 0x02, '/', 'x'})
			r.expectClosed()
		}},
		{"QoS 3", func(t *testing.T) {
			r := connected(t)
			r.write([]byte{0x36, 0x06, 0x00, 0x02, '/', 'x', 0x00, 0x01})
			r.expectClosed()
		}},
		{"SUBSCRIBE without filters", func(t *testing.T) {
			r := connected(t)
			r.write([]byte{0x82, 0x02, 0x00, 0x01})
			r.expectClosed()
		}},
		{"SUBSCRIBE with an empty filter", func(t *testing.T) {
			r := connected(t)
			r.write([]byte{0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x01})
			r.expectClosed()
		}},
		{"hostile device IDs in topics", func(t *testing.T) {
			for _, dev := range []string{"", ".", "..", "a/b", "+", "#", "\x00", strings.Repeat("d", 300), "dev\xff", "$SYS"} {
				r := connected(t)
				r.send(pub("/reg/"+dev+"/events", 1, 1, "x"))
				r.expectClosed()
			}
		}},
		{"attach flood for unknown devices keeps the connection", func(t *testing.T) {
			r := connected(t)
			for i := uint16(1); i <= 200; i++ {
				r.send(pub("/reg/ghost"+strings.Repeat("x", int(i%7))+"/attach", 1, i, "{\"authorization\":\"a.b.c\"}"))
			}
			for i := uint16(1); i <= 200; i++ {
				pk, err := r.read()
				require.NoError(t, err)
				require.Equal(t, packets.Puback, pk.FixedHeader.Type)
				require.Equal(t, i, pk.PacketID)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, tc.run)
	}

	t.Run("random bytes", func(t *testing.T) {
		rng := rand.New(rand.NewPCG(1, 2)) // fixed seed: reproducible
		for i := range 60 {
			var r *rawConn
			if i%2 == 0 {
				r = dialRaw(t, f.srv)
			} else {
				r = connected(t)
			}
			junk := make([]byte, 1+rng.IntN(300))
			for j := range junk {
				junk[j] = byte(rng.UintN(256))
			}
			if i%3 == 0 { // a plausible fixed header first
				junk[0] = byte(rng.UintN(15)+1) << 4
			}
			r.write(junk)
			// Half-close so that a packet waiting for more bytes sees EOF.
			require.NoError(t, r.c.(*net.TCPConn).CloseWrite())
			r.expectClosed()
		}
	})
	t.Run("random packets", func(t *testing.T) {
		rng := rand.New(rand.NewPCG(3, 4))
		parts := []string{"", "reg", "other", gw, "dev1", "ghost", "events", "state", "config", "commands", "attach", "detach", "errors", "#", "+", "..", "a", "$SYS", "\u00e9"}
		r := connected(t)
		for i := range 300 {
			var b strings.Builder
			for n := rng.IntN(6); n > 0; n-- {
				b.WriteString("/")
				b.WriteString(parts[rng.IntN(len(parts))])
			}
			var pk packets.Packet
			if rng.IntN(4) == 0 {
				pk = sub(uint16(i+1), b.String(), byte(rng.IntN(3)))
			} else {
				qos := byte(rng.IntN(3))
				var id uint16
				if qos > 0 {
					id = uint16(i + 1)
				}
				pk = pub(b.String(), qos, id, string(bytes.Repeat([]byte{'p'}, rng.IntN(100))))
			}
			var buf bytes.Buffer
			pk.ProtocolVersion = 4
			var err error
			if pk.FixedHeader.Type == packets.Subscribe {
				err = pk.SubscribeEncode(&buf)
			} else {
				err = pk.PublishEncode(&buf)
			}
			require.NoError(t, err)
			if _, err := r.c.Write(buf.Bytes()); err != nil {
				// Closed by the bridge, as expected sooner or later: start over.
				r = connected(t)
			}
		}
	})

	// Still serving, and nothing left behind.
	c := f.gateway()
	c.attach("dev1")
	c.mustPublish("/reg/dev1/events", 1, "still fine")
	c.c.Disconnect(100)
	require.NoError(t, f.srv.WaitFor(f.ctx(), func() bool {
		st := f.srv.Stats()
		return st.ConnectionsOpen == 0
	}))
	for _, rec := range f.srv.Connections() {
		if !rec.Refused {
			require.NotEmpty(t, rec.Reason, "record %d has no reason", rec.ID)
		}
	}
}
