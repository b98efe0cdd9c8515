package emulator_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestLogsNeverContainTokens logs at debug level while clients send good,
// bad and repeated CONNECT packets (mochi itself logs packets on errors).
func TestLogsNeverContainTokens(t *testing.T) {
	t.Parallel()
	var logs syncBuffer
	f := newFixture(t, emulator.WithLogger(slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	id := f.srv.ClientID(reg, gw)
	good := f.gwToken()
	expired := mint(t, f.gwKey, omnicore.ES256, f.srv.Subscription(), time.Now().Add(-3*time.Hour), time.Hour)

	c := f.gateway()
	c.mustPublish("/reg/dev1/attach", 1, `{"authorization":"`+good+`"}`)
	c.c.Disconnect(0)
	_, err := f.dial(id, expired)
	require.Error(t, err)
	r := dialRaw(t, f.srv)
	require.Equal(t, byte(0), r.connect(id, good))
	r.send(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connect}, Connect: packets.ConnectParams{
		ProtocolName: []byte("MQTT"), Clean: true, ClientIdentifier: id, PasswordFlag: true, Password: []byte(good),
	}})
	r.expectClosed()
	f.waitClosed(id)

	out := logs.String()
	require.Contains(t, out, "connection refused")
	require.Contains(t, out, "connected")
	for _, tok := range []string{good, expired} {
		for _, part := range bytes.Split([]byte(tok), []byte(".")) {
			require.NotContains(t, out, string(part))
		}
	}
}

func TestWithCAAndCertHosts(t *testing.T) {
	t.Parallel()
	certPEM, keyPEM, err := emulator.GenerateCA()
	require.NoError(t, err)
	srv := emulator.NewServer(emulator.WithCA(certPEM, keyPEM), emulator.WithCertHosts("bridge.example", "10.1.2.3"), emulator.WithTCPAddr(""))
	defer srv.Close()
	require.Equal(t, certPEM, srv.CAPEM())

	u, err := url.Parse(srv.TLSURL)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(certPEM)
	conn, err := tls.Dial("tcp", u.Host, &tls.Config{RootCAs: pool, ServerName: "bridge.example", MinVersion: tls.VersionTLS12})
	require.NoError(t, err)
	defer conn.Close()
	leaf := conn.ConnectionState().PeerCertificates[0]
	require.ElementsMatch(t, []string{"localhost", "bridge.example"}, leaf.DNSNames)
	var ips []string
	for _, ip := range leaf.IPAddresses {
		ips = append(ips, ip.String())
	}
	require.ElementsMatch(t, []string{"127.0.0.1", "::1", "10.1.2.3"}, ips)

	block, _ := pem.Decode(certPEM)
	require.NotNil(t, block)
	_, err = emulator.Start(emulator.WithCA(certPEM, []byte("not a key")))
	require.ErrorContains(t, err, "CA")
}

func TestWithOnReceive(t *testing.T) {
	t.Parallel()
	got := make(chan emulator.Message, 10)
	f := newFixture(t, emulator.WithOnReceive(func(m emulator.Message) { got <- m }))
	c := f.gateway()
	c.mustPublish("/reg/gw/events/x", 1, "payload")
	select {
	case m := <-got:
		require.Equal(t, "/reg/gw/events/x", m.Topic)
		require.Equal(t, "payload", string(m.Payload))
		require.Equal(t, 0, m.Index)
	case <-time.After(wait):
		t.Fatal("callback not called")
	}
}

func TestBindUnbindBlock(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := f.srv
	c := f.gateway()
	c.subscribe("/reg/gw/errors", 0)

	require.NoError(t, srv.Unbind(reg, gw, "dev1"))
	c.mustPublish("/reg/dev1/attach", 1, "{}")
	require.Contains(t, c.nextError().Description, "not bound")
	require.NoError(t, srv.Bind(reg, gw, "dev1"))
	c.attach("dev1")

	require.NoError(t, srv.SetBlocked(reg, "dev2", true))
	c.mustPublish("/reg/dev2/attach", 1, "{}")
	require.Contains(t, c.nextError().Description, "is blocked")
	require.NoError(t, srv.SetBlocked(reg, "dev2", false))
	c.attach("dev2")

	require.NoError(t, srv.SetBlocked(reg, gw, true))
	require.True(t, lastRecord(t, srv, srv.ClientID(reg, gw)).Open(), "blocking does not kick")
	srv.KickAll()
	c.expectLost()
	_, err := f.dial(srv.ClientID(reg, gw), f.gwToken())
	require.Error(t, err)
	require.Equal(t, emulator.RefusedBlocked, lastRecord(t, srv, srv.ClientID(reg, gw)).Reason)

	tests := []struct {
		name string
		err  error
	}{
		{"bind to a non-gateway", srv.Bind(reg, "dev1", "dev2")},
		{"bind a gateway", srv.Bind(reg, gw, gw)},
		{"unknown device", srv.Bind(reg, gw, "ghost")},
		{"unknown registry", srv.Unbind("nope", gw, "dev1")},
		{"block unknown", srv.SetBlocked(reg, "ghost", true)},
		{"duplicate device", srv.AddDevice(reg, emulator.Device{ID: "dev1"})},
		{"duplicate registry", srv.AddRegistry(reg)},
		{"auth method on a device", srv.AddDevice(reg, emulator.Device{ID: "x", AuthMethod: emulator.AssociationOnly})},
		{"bad key", srv.AddDevice(reg, emulator.Device{ID: "y", PublicKeys: []emulator.PublicKey{{Algorithm: "ES256", PEM: []byte("nope")}}})},
		{"four keys", srv.AddDevice(reg, emulator.Device{ID: "z", PublicKeys: make([]emulator.PublicKey, 4)})},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) { require.Error(t, tc.err) })
	}
}

func TestWaitHelpers(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	id := f.srv.ClientID(reg, gw)
	done := make(chan error, 1)
	go func() { done <- f.srv.WaitAttached(f.ctx(), reg, gw, "dev1", "dev2") }()
	c := f.gateway()
	rec, err := f.srv.WaitConnected(f.ctx(), id)
	require.NoError(t, err)
	require.True(t, rec.Open())
	c.attach("dev1")
	c.attach("dev2")
	require.NoError(t, <-done)
	c.c.Disconnect(100)
	closed, err := f.srv.WaitClosed(f.ctx(), id, 0)
	require.NoError(t, err)
	require.Equal(t, rec.ID, closed.ID)
	require.Equal(t, emulator.ReasonClientDisconnect, closed.Reason)

	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	_, err = f.srv.WaitConnected(ctx, id)
	require.ErrorIs(t, err, context.DeadlineExceeded, "nobody is connected")
}
