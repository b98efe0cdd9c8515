package gateway

import (
	"bytes"
	"context"
	"crypto"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/wiretap"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Security of the gateway session: TLS verifies by default
// and a certificate problem is loud, weakening it is warned about, private
// keys with loose permissions are warned about, and neither tokens nor key
// material ever reach a log line. The cross-process socket's uid check is
// TestShareRefusesAnotherUser (share_process_test.go) and TestShareCheckPeer.

// secGateway registers gateway "gw" of registry "reg" with a fresh RS256 key
// and the devices bound to it, and returns the key's path.
func secGateway(t *testing.T, srv *emulator.Server, devices ...string) string {
	t.Helper()
	return srv.AddTestGateway(t, "reg", "gw", omnicore.RS256, devices...)
}

// secOptions are valid options for gateway "gw" of srv with a copy of key
// (mode 0600) in a fresh directory.
func secOptions(t *testing.T, srv *emulator.Server, key string) Options {
	t.Helper()
	opt := DefaultOptions()
	opt.Servers = []string{srv.URL}
	if srv.URL == "" {
		opt.Servers = []string{"tcp://127.0.0.1:1"} // Validate does no network I/O
	}
	opt.SubscriptionID = srv.Subscription()
	opt.RegistryID = "reg"
	opt.GatewayID = "gw"
	opt.PrivateKey = filepath.Join(t.TempDir(), "gw.key")
	b, err := os.ReadFile(key)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(opt.PrivateKey, b, 0o600))
	return opt
}

func TestSecurityLoosePrivateKeyWarned(t *testing.T) {
	srv := emulator.NewServer(emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
	defer srv.Close()
	key := secGateway(t, srv)
	tests := []struct {
		mode os.FileMode
		warn bool
	}{
		{0o600, false},
		{0o400, false},
		{0o640, true},
		{0o644, true},
		{0o604, true},
		{0o660, true},
		{0o777, true},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%04o", tt.mode), func(t *testing.T) {
			opt := secOptions(t, srv, key)
			require.NoError(t, os.Chmod(opt.PrivateKey, tt.mode))
			log := &testutil.CaptureLogger{}
			_, err := opt.Validate(log)
			require.NoError(t, err)
			var warnings []string
			for _, w := range log.Warnings() {
				if strings.Contains(w, "private_key") {
					warnings = append(warnings, w)
				}
			}
			if !tt.warn {
				require.Empty(t, warnings)
				return
			}
			require.Len(t, warnings, 1)
			require.Contains(t, warnings[0], opt.PrivateKey)
			require.Contains(t, warnings[0], fmt.Sprintf("%04o", tt.mode))
			require.Contains(t, warnings[0], "0600")
			wiretap.RequireNoKeyMaterial(t, warnings[0], opt.PrivateKey)
		})
	}
}

func TestSecurityTLS(t *testing.T) {
	srv := emulator.NewServer()
	defer srv.Close()
	dir := t.TempDir()
	base := secOptions(t, srv, secGateway(t, srv, "dev-1"))
	base.Servers = []string{srv.TLSURL}
	rightCA, err := srv.WriteCAFile(dir)
	require.NoError(t, err)
	otherCA, _, err := emulator.GenerateCA()
	require.NoError(t, err)
	wrongCA := filepath.Join(dir, "other-ca.pem")
	require.NoError(t, os.WriteFile(wrongCA, otherCA, 0o600))

	tests := []struct {
		name    string
		set     func(*Options)
		connect bool
		warn    string // a warning Validate must log
		problem string // what the E! line must name
		hint    string // the option the E! line must point to
	}{
		{name: "right CA", set: func(o *Options) { o.TLSCA = rightCA }, connect: true},
		{name: "no tls_ca: verified against the system roots", set: func(*Options) {}, problem: "x509: certificate signed by unknown authority", hint: "tls_ca"},
		{name: "wrong CA", set: func(o *Options) { o.TLSCA = wrongCA }, problem: "x509: certificate signed by unknown authority", hint: "tls_ca"},
		{
			name:    "right CA, wrong server name",
			set:     func(o *Options) { o.TLSCA = rightCA; o.ServerName = "bridge.example.com" },
			problem: "x509: certificate is valid for",
			hint:    "tls_server_name",
		},
		{
			name:    "insecure_skip_verify",
			set:     func(o *Options) { o.InsecureSkipVerify = true },
			connect: true,
			warn:    "insecure_skip_verify = true: the bridge's certificate is NOT verified",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opt := base
			tt.set(&opt)
			connections, received := len(srv.Connections()), len(srv.Received())
			log := &testutil.CaptureLogger{Name: "gateway"}
			cfg, err := opt.Validate(log)
			require.NoError(t, err)
			if tt.warn != "" {
				require.Len(t, log.Warnings(), 1)
				require.Contains(t, log.Warnings()[0], tt.warn)
			} else {
				require.Empty(t, log.Warnings())
			}
			cfg.MinReconnect = 10 * time.Millisecond
			cfg.MaxReconnect = 50 * time.Millisecond
			s, err := New(cfg)
			require.NoError(t, err)
			s.Start()
			defer func() {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = s.Close(ctx)
			}()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if tt.connect {
				require.NoError(t, s.Publish(ctx, Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
				return
			}
			// Loudly: an error line that names the certificate problem and
			// the option that fixes it.
			var line string
			require.NoError(t, waitLog(ctx, log, func(e testutil.Entry) bool {
				if e.Level == testutil.LevelError && strings.Contains(e.Text, tt.problem) {
					line = e.Text
					return true
				}
				return false
			}), "no error line naming %q; log: %v", tt.problem, log.Messages())
			t.Logf("E! %s", line)
			require.Contains(t, line, tt.hint)
			require.Len(t, srv.Received(), received)
			require.Len(t, srv.Connections(), connections, "an MQTT connection got through the TLS handshake")
		})
	}
}

// waitLog waits until a captured log entry satisfies cond.
func waitLog(ctx context.Context, log *testutil.CaptureLogger, cond func(testutil.Entry) bool) error {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		for _, e := range log.Messages() {
			if cond(e) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// A private_key that is not a usable key file is refused without echoing
// what the option or the file holds: users paste keys where the path goes.
func TestSecurityPrivateKeyErrorsNeverEchoKeyMaterial(t *testing.T) {
	srv := emulator.NewServer(emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
	defer srv.Close()
	dir := t.TempDir()
	base := secOptions(t, srv, secGateway(t, srv))
	keyPEM, err := os.ReadFile(base.PrivateKey)
	require.NoError(t, err)
	ecKey, _, err := omnicore.WriteKeyPair(dir, "ec", omnicore.ES256)
	require.NoError(t, err)
	publicOnly := filepath.Join(dir, "gw.pub.pem")
	_, pub, err := omnicore.GenerateKeyPEM(omnicore.RS256)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(publicOnly, pub, 0o600))
	truncated := filepath.Join(dir, "truncated.key")
	require.NoError(t, os.WriteFile(truncated, keyPEM[:len(keyPEM)/2], 0o600))
	caFile := filepath.Join(dir, "ca.pem")
	require.NoError(t, os.WriteFile(caFile, srv.CAPEM(), 0o600))

	tests := []struct {
		name    string
		set     func(*Options)
		wantErr string
	}{
		{"the key itself instead of its path", func(o *Options) { o.PrivateKey = string(keyPEM) }, "private_key"},
		{"the key on one line", func(o *Options) { o.PrivateKey = strings.ReplaceAll(string(keyPEM), "\n", "") }, "private_key"},
		{"a directory", func(o *Options) { o.PrivateKey = dir }, "private_key"},
		{"a missing file", func(o *Options) { o.PrivateKey = filepath.Join(dir, "missing.key") }, "no such file"},
		{"a public key", func(o *Options) { o.PrivateKey = publicOnly }, "this file is a public key, not a private key"},
		{"a CA certificate", func(o *Options) { o.PrivateKey = caFile }, "this file is a certificate (PEM \"CERTIFICATE\"), not a private key"},
		{"a truncated key", func(o *Options) { o.PrivateKey = truncated }, "private_key"},
		{"an EC key for RS256", func(o *Options) { o.PrivateKey = ecKey }, `the key is EC: set algorithm = "ES256"`},
		{"an RSA key for ES256", func(o *Options) { o.Algorithm = omnicore.ES256 }, `the key is RSA: set algorithm = "RS256"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opt := base
			tt.set(&opt)
			log := &testutil.CaptureLogger{}
			_, err := opt.Validate(log)
			require.ErrorContains(t, err, tt.wantErr)
			wiretap.RequireNoKeyMaterial(t, err.Error(), base.PrivateKey, ecKey, publicOnly)
			for _, e := range log.Messages() {
				wiretap.RequireNoKeyMaterial(t, e.Text, base.PrivateKey, ecKey, publicOnly)
			}
		})
	}
}

// TestSecurityNoSecretsInSessionLogs runs a session through everything that
// logs (connects, token renewals, a kicked connection, device tokens for
// attaches, a refused attach, bridge errors) with debug logging, captures
// every JWT it sends on the wire, and finds none of them, nor any key
// material, in the session's log or the emulator's.
func TestSecurityNoSecretsInSessionLogs(t *testing.T) {
	var emuLog bytes.Buffer
	var emuMu sync.Mutex
	srv := emulator.NewServer(emulator.WithLogger(slog.New(slog.NewTextHandler(lockedWriter{&emuMu, &emuLog}, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	defer srv.Close()
	dir := t.TempDir()
	keyDir := filepath.Join(dir, "devices")
	require.NoError(t, os.Mkdir(keyDir, 0o700))

	// A DEVICE_AUTH_TOKEN_ONLY gateway: every attach carries a device JWT.
	require.NoError(t, srv.AddRegistry("reg"))
	gwKey, gwPub := emulator.NewDeviceKey(t, dir, "gw", omnicore.ES256)
	require.NoError(t, srv.AddDevice("reg", emulator.Device{ID: "gw", Gateway: true, AuthMethod: emulator.DeviceAuthTokenOnly, PublicKeys: []emulator.PublicKey{gwPub}}))
	keyFiles := []string{gwKey}
	devices := []string{"dev-1", "dev-2", "dev-3"}
	pubs := map[string]crypto.PublicKey{}
	for _, d := range append(devices, "stranger") {
		priv, pub := emulator.NewDeviceKey(t, dir, d, omnicore.ES256)
		if d == "stranger" {
			// The gateway signs the stranger's attach with a key the
			// bridge does not know: refused on the errors topic.
			keyFiles = append(keyFiles, priv)
			priv, _ = emulator.NewDeviceKey(t, dir, "impostor", omnicore.ES256)
		}
		require.NoError(t, os.Rename(priv, filepath.Join(keyDir, d+".pem")))
		keyFiles = append(keyFiles, filepath.Join(keyDir, d+".pem"))
		require.NoError(t, srv.AddDevice("reg", emulator.Device{ID: d, PublicKeys: []emulator.PublicKey{pub}}))
		k, err := omnicore.ParsePublicKey(pub.PEM, omnicore.ES256)
		require.NoError(t, err)
		pubs[d] = k
	}
	gwPublic, err := omnicore.ParsePublicKey(gwPub.PEM, omnicore.ES256)
	require.NoError(t, err)

	rec := wiretap.New(t, strings.TrimPrefix(srv.URL, "tcp://"))
	opt := DefaultOptions()
	opt.Servers = []string{"tcp://" + rec.Addr()}
	opt.SubscriptionID = srv.Subscription()
	opt.RegistryID = "reg"
	opt.GatewayID = "gw"
	opt.PrivateKey = gwKey
	opt.Algorithm = omnicore.ES256
	opt.DeviceAuth = DeviceAuthToken
	opt.DeviceKeyDir = keyDir
	log := &testutil.CaptureLogger{Name: "gateway"}
	cfg, err := opt.Validate(log)
	require.NoError(t, err)
	cfg.TokenLifetime = 2 * time.Second
	cfg.RenewBefore = 700 * time.Millisecond
	cfg.Timeout = 2 * time.Second
	cfg.MinReconnect = 10 * time.Millisecond
	cfg.MaxReconnect = 100 * time.Millisecond
	s, err := New(cfg)
	require.NoError(t, err)
	s.Start()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	publishAll := func(round int) {
		t.Helper()
		for _, d := range devices {
			require.NoError(t, s.Publish(ctx, Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte(fmt.Sprintf("round %d", round)), QoS: 1}))
		}
	}
	publishAll(1)
	require.ErrorIs(t, s.Attach(ctx, "stranger"), ErrAttachRefused)
	srv.KickAll()
	publishAll(2)
	for s.Stats().TokenRenewals < 2 {
		require.NoError(t, ctx.Err(), "no two token renewals")
		time.Sleep(10 * time.Millisecond)
	}
	publishAll(3)
	closeCtx, closeCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer closeCancel()
	require.NoError(t, s.Close(closeCtx))
	st := s.Stats()
	t.Logf("connects %d, renewals %d, lost %d, attaches %d ok / %d failed", st.Connects, st.TokenRenewals, st.ConnectionLost, st.AttachesOK, st.AttachesFailed)

	// The JWTs actually sent: gateway passwords and attach authorizations.
	tokens := rec.Tokens()
	var gateway, device int
	for _, tok := range tokens {
		if _, err := omnicore.VerifyToken(tok, srv.Subscription(), []crypto.PublicKey{gwPublic}, time.Now(), time.Hour, time.Hour); err == nil {
			gateway++
			continue
		}
		for _, d := range devices {
			if _, err := omnicore.VerifyToken(tok, srv.Subscription(), []crypto.PublicKey{pubs[d]}, time.Now(), time.Hour, 2*time.Hour); err == nil {
				device++
			}
		}
	}
	require.GreaterOrEqual(t, gateway, 4, "gateway JWTs captured (a connect, a reconnect after the kick, two renewals)")
	require.GreaterOrEqual(t, device, 2*len(devices), "device JWTs captured (attaches on at least two connections)")

	emuMu.Lock()
	lines := strings.Split(emuLog.String(), "\n")
	emuMu.Unlock()
	require.NotEmpty(t, lines)
	for _, e := range log.Messages() {
		lines = append(lines, e.String())
	}
	t.Logf("checked %d log lines for %d JWTs and %d private keys", len(lines), len(tokens), len(keyFiles))
	for _, l := range lines {
		wiretap.RequireNoKeyMaterial(t, l, keyFiles...)
		for _, tok := range tokens {
			requireNoToken(t, l, tok)
		}
	}
}

type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// requireNoToken fails when line holds tok or its signature.
func requireNoToken(t *testing.T, line, tok string) {
	t.Helper()
	parts := strings.Split(tok, ".")
	require.Len(t, parts, 3)
	require.NotContains(t, line, tok, "a JWT in a log line")
	require.NotContains(t, line, parts[2], "a JWT signature in a log line")
	require.NotContains(t, line, parts[0]+"."+parts[1], "a JWT's signed part in a log line")
}

// The session renews its token RenewBefore ahead of the expiry it believes
// the token has. That belief must not be later than the token's exp claim,
// which is whole seconds (truncated): otherwise up to a second of the margin
// is gone, and with token_lifetime = "10s" (RenewBefore 1 s) a bridge that
// enforces exp closes the connection before the renewal (seen in the soak
// run of hardening's "token renewals" scenario: one of ten renewals lost to
// the bridge's expiry).
func TestSecuritySessionKnowsWhenItsTokenExpires(t *testing.T) {
	srv := emulator.NewServer(emulator.WithTLSAddr(""))
	defer srv.Close()
	opt := secOptions(t, srv, secGateway(t, srv))
	opt.TokenLifetime = config.Duration(10 * time.Second)
	cfg, err := opt.Validate(&testutil.CaptureLogger{})
	require.NoError(t, err)
	s, err := New(cfg)
	require.NoError(t, err)
	s.Start()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = s.Close(ctx)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, s.WaitReady(ctx))
	s.mu.Lock()
	believed := s.conn.expires
	s.mu.Unlock()
	rec, err := srv.WaitConnected(ctx, srv.ClientID("reg", "gw"))
	require.NoError(t, err)
	require.False(t, rec.TokenExpires.IsZero())
	require.Falsef(t, believed.After(rec.TokenExpires),
		"the session plans its renewal for a token expiring at %s, but the token's exp is %s (%s earlier)",
		believed.Format(time.StampMilli), rec.TokenExpires.Format(time.StampMilli), believed.Sub(rec.TokenExpires).Round(time.Millisecond))
}
