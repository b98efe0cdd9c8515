package emulator_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	pahopackets "github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/golang-jwt/jwt/v5"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func mint(t *testing.T, keyPath, alg, aud string, iat time.Time, lifetime time.Duration) string {
	t.Helper()
	s, err := omnicore.LoadSigner(keyPath, alg)
	require.NoError(t, err)
	tok, err := s.Token(aud, iat, lifetime)
	require.NoError(t, err)
	return tok
}

// paddedToken is a correctly signed ES256 JWT whose parts use padded base64,
// which OmniCore rejects.
func paddedToken(t *testing.T, keyPath, aud string) string {
	t.Helper()
	pemBytes, err := os.ReadFile(keyPath)
	require.NoError(t, err)
	key, err := jwt.ParseECPrivateKeyFromPEM(pemBytes)
	require.NoError(t, err)
	enc := func(v any) string {
		b, err := json.Marshal(v)
		require.NoError(t, err)
		return base64.URLEncoding.EncodeToString(b) // padded
	}
	now := time.Now().Unix()
	header := enc(map[string]string{"alg": "ES256", "typ": "JWT"})
	signing := ""
	for pad := ""; !strings.Contains(signing, "="); pad += "x" { // make sure a part needs padding
		signing = header + "." + enc(map[string]any{"iat": now, "exp": now + 3600, "aud": aud, "pad": pad})
	}
	sig, err := jwt.SigningMethodES256.Sign(signing, key)
	require.NoError(t, err)
	return signing + "." + base64.URLEncoding.EncodeToString(sig)
}

func TestConnect(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := f.srv
	sub := srv.Subscription()
	rsaKey := srv.AddTestGateway(t, reg, "gw-rsa", omnicore.RS256)
	blockedKey, blockedPub := emulator.NewDeviceKey(t, t.TempDir(), "blocked", omnicore.ES256)
	require.NoError(t, srv.AddDevice(reg, emulator.Device{ID: "blocked", PublicKeys: []emulator.PublicKey{blockedPub}, Blocked: true}))
	otherKey, _ := emulator.NewDeviceKey(t, t.TempDir(), "other", omnicore.ES256)
	now := time.Now()
	valid := mint(t, f.gwKey, omnicore.ES256, sub, now, time.Hour)

	tests := []struct {
		name       string
		clientID   string
		password   string
		username   string
		rules      func(*emulator.Rules)
		tls        bool
		wantCode   byte // 0: accepted
		wantReason string
		wantDetail string
	}{
		{name: "ES256 gateway over TCP", clientID: srv.ClientID(reg, gw), password: valid},
		{name: "RS256 gateway over TLS", clientID: srv.ClientID(reg, "gw-rsa"), password: mint(t, rsaKey, omnicore.RS256, sub, now, time.Hour), tls: true},
		{name: "username is ignored", clientID: srv.ClientID(reg, gw), password: valid, username: "anything at all"},
		{name: "iat in the future within the skew", clientID: srv.ClientID(reg, gw), password: mint(t, f.gwKey, omnicore.ES256, sub, now.Add(5*time.Minute), time.Hour)},
		{name: "lifetime of exactly 24h", clientID: srv.ClientID(reg, gw), password: mint(t, f.gwKey, omnicore.ES256, sub, now, 24*time.Hour)},

		{name: "client ID is not a device path", clientID: gw, password: valid, wantCode: 2, wantReason: emulator.RefusedClientID},
		{name: "other subscription", clientID: "subscriptions/other/registries/reg/devices/gw", password: valid, wantCode: 2, wantReason: emulator.RefusedClientID},
		{name: "unknown registry", clientID: srv.ClientID("nope", gw), password: valid, wantCode: 2, wantReason: emulator.RefusedClientID},
		{name: "unknown device", clientID: srv.ClientID(reg, "ghost"), password: valid, wantCode: 2, wantReason: emulator.RefusedClientID},
		{name: "invalid device ID", clientID: srv.ClientID(reg, "g+w"), password: valid, wantCode: 2, wantReason: emulator.RefusedClientID},
		{name: "extra path level", clientID: srv.ClientID(reg, gw) + "/x", password: valid, wantCode: 2, wantReason: emulator.RefusedClientID},

		{name: "no password", clientID: srv.ClientID(reg, gw), wantCode: 5, wantReason: emulator.RefusedCredentials},
		{name: "password is not a JWT", clientID: srv.ClientID(reg, gw), password: "not-a-jwt", wantCode: 5, wantReason: emulator.RefusedCredentials},
		{name: "audience is not the subscription", clientID: srv.ClientID(reg, gw), password: mint(t, f.gwKey, omnicore.ES256, "other-sub", now, time.Hour), wantCode: 5, wantReason: emulator.RefusedCredentials, wantDetail: "audience"},
		{name: "expired beyond the skew", clientID: srv.ClientID(reg, gw), password: mint(t, f.gwKey, omnicore.ES256, sub, now.Add(-2*time.Hour), time.Hour), wantCode: 5, wantReason: emulator.RefusedCredentials, wantDetail: "expired"},
		{name: "iat in the future beyond the skew", clientID: srv.ClientID(reg, gw), password: mint(t, f.gwKey, omnicore.ES256, sub, now.Add(20*time.Minute), time.Hour), wantCode: 5, wantReason: emulator.RefusedCredentials},
		{name: "lifetime over 24h", clientID: srv.ClientID(reg, gw), password: mint(t, f.gwKey, omnicore.ES256, sub, now, 25*time.Hour), wantCode: 5, wantReason: emulator.RefusedCredentials},
		{name: "padded base64", clientID: srv.ClientID(reg, gw), password: paddedToken(t, f.gwKey, sub), wantCode: 5, wantReason: emulator.RefusedCredentials, wantDetail: "padded"},
		{name: "signed by a key the device does not have", clientID: srv.ClientID(reg, gw), password: mint(t, otherKey, omnicore.ES256, sub, now, time.Hour), wantCode: 5, wantReason: emulator.RefusedCredentials},
		{name: "RS256 key with an ES256 token of another device", clientID: srv.ClientID(reg, "gw-rsa"), password: valid, wantCode: 5, wantReason: emulator.RefusedCredentials},
		{name: "device without keys", clientID: srv.ClientID(reg, "dev1"), password: valid, wantCode: 5, wantReason: emulator.RefusedCredentials},
		{name: "blocked device", clientID: srv.ClientID(reg, "blocked"), password: mint(t, blockedKey, omnicore.ES256, sub, now, time.Hour), wantCode: 5, wantReason: emulator.RefusedBlocked},
		{name: "bad credentials code switched to 4", clientID: srv.ClientID(reg, gw), password: "not-a-jwt",
			rules: func(r *emulator.Rules) { r.BadCredentialsCode = 4 }, wantCode: 4, wantReason: emulator.RefusedCredentials},
		{name: "max lifetime switched to 1h", clientID: srv.ClientID(reg, gw), password: mint(t, f.gwKey, omnicore.ES256, sub, now, 2*time.Hour),
			rules: func(r *emulator.Rules) { r.MaxTokenLifetime = time.Hour }, wantCode: 5, wantReason: emulator.RefusedCredentials},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv.SetRules(func(r *emulator.Rules) {
				*r = emulator.DefaultRules()
				if tc.rules != nil {
					tc.rules(r)
				}
			})
			var opts []clientOpt
			if tc.tls {
				opts = append(opts, withTLS(srv))
			}
			if tc.username != "" {
				opts = append(opts, func(o *paho.ClientOptions) { o.SetUsername(tc.username) })
			}
			c, err := (&fixture{t: t, srv: srv, gwKey: f.gwKey}).dial(tc.clientID, tc.password, opts...)
			rec := lastRecord(t, srv, tc.clientID)
			if tc.wantCode == 0 {
				require.NoError(t, err)
				require.True(t, rec.Open())
				require.False(t, rec.TokenExpires.IsZero())
				if tc.tls {
					require.Equal(t, "tls", rec.Listener)
				}
				c.c.Disconnect(100)
				require.Equal(t, emulator.ReasonClientDisconnect, (&fixture{t: t, srv: srv}).waitClosed(tc.clientID).Reason)
				return
			}
			require.Error(t, err)
			require.Equal(t, pahopackets.ConnErrors[tc.wantCode], err, "paho error")
			require.True(t, rec.Refused)
			require.Equal(t, tc.wantCode, rec.ConnackCode)
			require.Equal(t, tc.wantReason, rec.Reason)
			require.Contains(t, rec.Detail, tc.wantDetail)
			if len(tc.password) > 20 {
				require.NotContains(t, rec.Detail, tc.password, "the record must not echo the token")
			}
		})
	}
}

func TestConnectProtocolLevel(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	tests := []struct {
		name    string
		proto   string
		version byte
	}{
		{"MQTT 3.1", "MQIsdp", 3},
		{"MQTT 5", "MQTT", 5},
		{"level 3 with the 3.1.1 name", "MQTT", 3},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, f.srv)
			r.send(packets.Packet{
				FixedHeader:     packets.FixedHeader{Type: packets.Connect},
				ProtocolVersion: tc.version,
				Connect: packets.ConnectParams{
					ProtocolName: []byte(tc.proto), Clean: true, Keepalive: 30, ClientIdentifier: f.srv.ClientID(reg, gw),
					PasswordFlag: true, Password: []byte(f.gwToken()),
				},
			})
			pk, err := r.read()
			require.NoError(t, err)
			require.Equal(t, packets.Connack, pk.FixedHeader.Type)
			require.Equal(t, byte(1), pk.ReasonCode)
			r.expectClosed()
			rec := lastRecord(t, f.srv, f.srv.ClientID(reg, gw))
			require.Equal(t, emulator.RefusedProtocol, rec.Reason)
		})
	}

	// And paho's own 3.1 support, end to end.
	_, err := f.dial(f.srv.ClientID(reg, gw), f.gwToken(), func(o *paho.ClientOptions) { o.SetProtocolVersion(3) })
	require.Equal(t, pahopackets.ErrorRefusedBadProtocolVersion, err)
}

func TestRefuseConnections(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	id := f.srv.ClientID(reg, gw)

	f.srv.RefuseConnections(2)
	for range 2 {
		_, err := f.dial(id, f.gwToken())
		require.Equal(t, pahopackets.ErrorRefusedServerUnavailable, err)
		require.Equal(t, emulator.RefusedUnavailable, lastRecord(t, f.srv, id).Reason)
	}
	c := f.gateway()
	c.c.Disconnect(0)

	f.srv.RefuseFor(time.Hour)
	_, err := f.dial(id, f.gwToken())
	require.Equal(t, pahopackets.ErrorRefusedServerUnavailable, err)
	f.srv.RefuseFor(0)
	f.gateway()
	require.Equal(t, 3, f.srv.Stats().ConnectionsRefused)
}

func TestTLS(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	u, err := url.Parse(f.srv.TLSURL)
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(f.srv.CAPEM()))

	dir := t.TempDir()
	path, err := f.srv.WriteCAFile(dir)
	require.NoError(t, err)
	onDisk, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, f.srv.CAPEM(), onDisk)

	other := emulator.NewServer(emulator.WithTCPAddr(""))
	defer other.Close()
	require.Empty(t, other.URL)
	wrongPool := x509.NewCertPool()
	wrongPool.AppendCertsFromPEM(other.CAPEM())

	tests := []struct {
		name    string
		host    string
		pool    *x509.CertPool
		wantErr string
	}{
		{"CA and IP address", u.Host, pool, ""},
		{"CA and localhost", "localhost:" + u.Port(), pool, ""},
		{"another emulator's CA", u.Host, wrongPool, "certificate signed by unknown authority"},
		{"system roots only", u.Host, nil, "certificate signed by unknown authority"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := f.dial(f.srv.ClientID(reg, gw), f.gwToken(), func(o *paho.ClientOptions) {
				o.Servers = nil
				o.AddBroker("tls://" + tc.host)
				o.SetTLSConfig(&tls.Config{RootCAs: tc.pool, MinVersion: tls.VersionTLS12})
			})
			if tc.wantErr == "" {
				require.NoError(t, err)
				c.c.Disconnect(0)
				return
			}
			require.ErrorContains(t, err, tc.wantErr)
		})
	}
}

func TestTokenExpiryClosesConnection(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.ClockSkew = 0 }))
	id := f.srv.ClientID(reg, gw)
	// JWT times are whole seconds: a 2 s lifetime expires 1 to 2 s from now.
	start := time.Now()
	c, err := f.dial(id, mint(t, f.gwKey, omnicore.ES256, f.srv.Subscription(), start, 2*time.Second))
	require.NoError(t, err)
	c.expectLost()
	rec := f.waitClosed(id)
	require.Equal(t, emulator.ReasonTokenExpired, rec.Reason)
	require.False(t, rec.Disconnected.Before(rec.TokenExpires), "closed before exp")
	require.Less(t, time.Since(start), 4*time.Second)

	// A fresh token after the kick is the only refresh.
	f.gateway()
}

func TestTokenExpiryWithSkewAndSwitchedOff(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) {
		r.ClockSkew = time.Second
		r.CloseOnTokenExpiry = false
	}))
	id := f.srv.ClientID(reg, gw)
	c, err := f.dial(id, mint(t, f.gwKey, omnicore.ES256, f.srv.Subscription(), time.Now(), 2*time.Second))
	require.NoError(t, err)
	rec := lastRecord(t, f.srv, id)
	// Waiting past exp + skew is the point of this case: the switch is off, so
	// the connection must still be open (and usable) afterwards.
	ctx, cancel := context.WithDeadline(context.Background(), rec.TokenExpires.Add(1500*time.Millisecond))
	defer cancel()
	require.ErrorIs(t, f.srv.WaitFor(ctx, func() bool { return !lastRecord(t, f.srv, id).Open() }), context.DeadlineExceeded)
	c.ackBarrier()
}
