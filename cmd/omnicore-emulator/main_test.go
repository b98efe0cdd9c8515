package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

const wait = 10 * time.Second

var registryFile = filepath.Join("..", "..", "testdata", "registry.json")

// instance is the command running in-process.
type instance struct {
	info   map[string]string // banner lines "name: value"; "key" lines by device
	lines  chan string       // stdout after the banner
	done   chan error
	cancel context.CancelFunc
	token  string // the admin token api sends, if any

	stopOnce sync.Once
	stopErr  error
}

// stop cancels run's context and returns what run returned.
func (in *instance) stop(t *testing.T) error {
	t.Helper()
	in.stopOnce.Do(func() {
		in.cancel()
		select {
		case in.stopErr = <-in.done:
		case <-time.After(wait):
			t.Error("run did not return after cancel")
		}
	})
	return in.stopErr
}

func start(t *testing.T, extra ...string) *instance {
	t.Helper()
	return startArgs(t, append([]string{"-registry", registryFile, "-state-dir", t.TempDir()}, extra...)...)
}

// startArgs runs the command on loopback ports with args.
func startArgs(t *testing.T, extra ...string) *instance {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	args := append([]string{"-mqtt", "127.0.0.1:0", "-mqtts", "127.0.0.1:0", "-admin", "127.0.0.1:0"}, extra...)
	in := &instance{info: map[string]string{}, lines: make(chan string, 1000), done: make(chan error, 1), cancel: cancel}
	go func() {
		in.done <- run(ctx, args, pw, io.Discard)
		_ = pw.Close()
	}()
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		banner := true
		for sc.Scan() {
			line := sc.Text()
			if banner {
				if line == "ready" {
					banner = false
					close(ready)
					continue
				}
				name, value, _ := strings.Cut(line, ": ")
				if name == "key" { // "key: reg/dev ALG path"
					f := strings.Fields(value)
					name, value = "key "+f[0], f[2]
				}
				in.info[name] = value
				continue
			}
			in.lines <- line
		}
	}()
	t.Cleanup(func() { _ = in.stop(t) })
	select {
	case <-ready:
	case err := <-in.done:
		t.Fatalf("run ended early: %v", err)
	case <-time.After(wait):
		t.Fatal("no ready line")
	}
	return in
}

func token(t *testing.T, key, alg, aud string) string {
	t.Helper()
	var out, errOut bytes.Buffer
	require.NoError(t, run(context.Background(), []string{"token", "-key", key, "-alg", alg, "-aud", aud}, &out, &errOut), errOut.String())
	return strings.TrimSpace(out.String())
}

func api(t *testing.T, in *instance, method, path, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, in.info["admin"]+path, strings.NewReader(body))
	require.NoError(t, err)
	if method != http.MethodGet {
		req.Header.Set("Content-Type", "application/json")
	}
	if tok := in.token; tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	resp, err := (&http.Client{Timeout: wait}).Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, b
}

// TestGatewaySession drives the command as a user would, following the
// origin document: connect as the gateway over TLS, subscribe to errors at
// QoS 0, attach at QoS 1 and wait for the PUBACK, subscribe to config and
// commands, publish events and state, receive a config set and a command sent
// through the admin API, detach.
func TestGatewaySession(t *testing.T) {
	in := start(t, "-log-received")
	jwt := token(t, in.info["key demo-registry/demo-gateway"], omnicore.RS256, "demo-sub")
	require.Len(t, strings.Split(jwt, "."), 3)

	caPEM, err := os.ReadFile(in.info["ca"])
	require.NoError(t, err)
	pool := x509.NewCertPool()
	require.True(t, pool.AppendCertsFromPEM(caPEM))
	msgs := make(chan paho.Message, 100)
	opts := paho.NewClientOptions().
		AddBroker(in.info["mqtts"]).
		SetClientID("subscriptions/demo-sub/registries/demo-registry/devices/demo-gateway").
		SetUsername("unused").SetPassword(jwt).
		SetProtocolVersion(4).SetAutoReconnect(false).SetCleanSession(true).
		SetConnectTimeout(wait).SetWriteTimeout(wait).
		SetTLSConfig(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}).
		SetOrderMatters(true).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { msgs <- m })
	c := paho.NewClient(opts)
	ok := func(tok paho.Token) {
		t.Helper()
		require.True(t, tok.WaitTimeout(wait))
		require.NoError(t, tok.Error())
	}
	next := func() paho.Message {
		t.Helper()
		select {
		case m := <-msgs:
			return m
		case <-time.After(wait):
			t.Fatal("no message")
			return nil
		}
	}
	ok(c.Connect())
	defer c.Disconnect(0)

	ok(c.Subscribe("/demo-registry/demo-gateway/errors", 0, nil))
	ok(c.Publish("/demo-registry/sensor-01/attach", 1, false, `{"authorization":""}`))
	ok(c.Publish("/demo-registry/sensor-unbound/attach", 1, false, "{}"))
	m := next()
	require.Equal(t, "/demo-registry/demo-gateway/errors", m.Topic())
	var em omnicore.ErrorMessage
	require.NoError(t, json.Unmarshal(m.Payload(), &em))
	require.Equal(t, omnicore.ErrorAttachment, em.ErrorType)
	require.Equal(t, "sensor-unbound", em.DeviceID)

	ok(c.Subscribe("/demo-registry/sensor-01/config", 1, nil))
	m = next()
	require.Equal(t, "/demo-registry/sensor-01/config", m.Topic())
	require.Equal(t, `{"interval":"10s"}`, string(m.Payload()), "the registry file's initial config")
	ok(c.Subscribe("/demo-registry/sensor-01/commands/#", 1, nil))

	ok(c.Publish("/demo-registry/sensor-01/events", 1, false, `{"temp":21.5}`))
	ok(c.Publish("/demo-registry/sensor-01/state", 1, false, `{"ok":true}`))
	ok(c.Publish("/demo-registry/demo-gateway/events/health", 1, false, "up"))

	status, body := api(t, in, "PUT", "/v1/registries/demo-registry/devices/sensor-01/config", `{"interval":"5s"}`)
	require.Equal(t, 200, status, string(body))
	require.JSONEq(t, `{"version":2}`, string(body))
	m = next()
	require.Equal(t, `{"interval":"5s"}`, string(m.Payload()))

	status, body = api(t, in, "POST", "/v1/registries/demo-registry/devices/sensor-01/commands?subfolder=led", "on")
	require.Equal(t, 200, status, string(body))
	m = next()
	require.Equal(t, "/demo-registry/sensor-01/commands/led", m.Topic())
	require.Equal(t, "on", string(m.Payload()))
	status, _ = api(t, in, "POST", "/v1/registries/demo-registry/devices/sensor-02/commands", "x")
	require.Equal(t, 409, status)

	status, body = api(t, in, "GET", "/v1/telemetry?since=0", "")
	require.Equal(t, 200, status)
	var page emulator.TelemetryPage
	require.NoError(t, json.Unmarshal(body, &page))
	require.Len(t, page.Messages, 3)
	require.Equal(t, `{"temp":21.5}`, page.Messages[0].Payload)
	require.Equal(t, omnicore.KindState, page.Messages[1].Kind)
	require.Equal(t, "health", page.Messages[2].Subfolder)

	status, body = api(t, in, "GET", "/v1/attachments", "")
	require.Equal(t, 200, status)
	require.Contains(t, string(body), `"sensor-01"`)

	ok(c.Publish("/demo-registry/sensor-01/detach", 1, false, "{}"))
	status, body = api(t, in, "GET", "/v1/attachments", "")
	require.Equal(t, 200, status)
	require.NotContains(t, string(body), `"sensor-01"`)

	status, body = api(t, in, "GET", "/v1/errors", "")
	require.Equal(t, 200, status)
	require.Contains(t, string(body), "GATEWAY_ATTACHMENT_ERROR")

	// -log-received: one readable line per message, no token anywhere.
	for i, want := range []string{"topic=/demo-registry/sensor-01/events kind=events qos=1 size=13", "topic=/demo-registry/sensor-01/state kind=state qos=1 size=11", "topic=/demo-registry/demo-gateway/events/health"} {
		select {
		case line := <-in.lines:
			require.Contains(t, line, want, "line %d", i)
			require.Contains(t, line, "client=subscriptions/demo-sub/registries/demo-registry/devices/demo-gateway")
			require.NotContains(t, line, jwt)
			for _, payload := range []string{"payload", `{"`, "temp", "true"} {
				require.NotContains(t, line, payload, "no payload bytes")
			}
		case <-time.After(wait):
			t.Fatal("no -log-received line")
		}
	}

	status, body = api(t, in, "POST", "/v1/kick", "")
	require.Equal(t, 200, status)
	require.JSONEq(t, `{"kicked":1}`, string(body))

	require.NoError(t, in.stop(t))
	select {
	case l := <-in.lines:
		require.Equal(t, "stopped", l)
	case <-time.After(wait):
		t.Fatal("no stopped line")
	}
}

// TestMosquitto publishes the gateway's own telemetry with the Debian
// mosquitto clients over TLS, with the CA file and a minted JWT.
func TestMosquitto(t *testing.T) {
	pubBin, err := exec.LookPath("mosquitto_pub")
	if err != nil {
		t.Skip("mosquitto_pub is not installed (apt-get install mosquitto-clients)")
	}
	in := start(t)
	jwt := token(t, in.info["key demo-registry/demo-gateway"], omnicore.RS256, "demo-sub")
	u, err := url.Parse(in.info["mqtts"])
	require.NoError(t, err)
	common := []string{
		"-h", u.Hostname(), "-p", u.Port(), "--cafile", in.info["ca"], "-V", "mqttv311",
		"-i", "subscriptions/demo-sub/registries/demo-registry/devices/demo-gateway", "-u", "unused", "-P", jwt,
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, pubBin, append(common, "-q", "1", "-t", "/demo-registry/demo-gateway/events/mosquitto", "-m", "hello from mosquitto")...).CombinedOutput()
	require.NoError(t, err, string(out))

	status, body := api(t, in, "GET", "/v1/telemetry", "")
	require.Equal(t, 200, status)
	var page emulator.TelemetryPage
	require.NoError(t, json.Unmarshal(body, &page))
	require.Len(t, page.Messages, 1)
	require.Equal(t, "hello from mosquitto", page.Messages[0].Payload)
	require.Equal(t, "mosquitto", page.Messages[0].Subfolder)
	require.Equal(t, byte(1), page.Messages[0].QoS)

	if subBin, err := exec.LookPath("mosquitto_sub"); err == nil {
		// The config is delivered right after the SUBACK.
		out, err := exec.CommandContext(ctx, subBin, append(common, "-q", "1", "-t", "/demo-registry/demo-gateway/config", "-C", "1", "-W", "10")...).Output()
		require.NoError(t, err)
		require.Equal(t, `{"log_level":"info"}`, strings.TrimSpace(string(out)))
	}
}

func TestRunFlagErrors(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer busy.Close()
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{"no registry nor subscription", []string{}, "give -subscription or -registry"},
		{"bad subscription", []string{"-subscription", "1-bad"}, "-subscription"},
		{"missing registry file", []string{"-registry", "nope.json"}, "no such file"},
		{"no listener", []string{"-registry", registryFile, "-mqtt", "", "-mqtts", ""}, "cannot both be empty"},
		{"bad credentials code", []string{"-registry", registryFile, "-bad-credentials-code", "3"}, "must be 4 or 5"},
		{"bad rate action", []string{"-registry", registryFile, "-rate-action", "drop"}, "-rate-action"},
		{"unknown flag", []string{"-nope"}, "flag provided but not defined"},
		{"extra argument", []string{"-registry", registryFile, "extra"}, "unexpected arguments"},
		{"bad admin address", []string{"-registry", registryFile, "-mqtt", "127.0.0.1:0", "-mqtts", "", "-admin", "bad address"}, "admin listener"},
		{"MQTT port in use", []string{"-registry", registryFile, "-mqtt", busy.Addr().String(), "-mqtts", ""}, "MQTT listener"},
		{"negative max received", []string{"-registry", registryFile, "-max-received", "-1"}, "-max-received must not be negative"},
		{"bad max received bytes", []string{"-registry", registryFile, "-max-received-bytes", "lots"}, "invalid value"},
		{"negative max received bytes", []string{"-registry", registryFile, "-max-received-bytes", "-1"}, "must not be negative"},
		{"max received bytes below a message", []string{"-registry", registryFile, "-max-received-bytes", "100KiB"}, "below 1MiB"},
		{"admin on every interface without a token", []string{"-registry", registryFile, "-mqtt", "127.0.0.1:0", "-mqtts", "", "-admin", "0.0.0.0:0"}, "not on loopback"},
		{"admin on an unspecified host without a token", []string{"-registry", registryFile, "-mqtt", "127.0.0.1:0", "-mqtts", "", "-admin", ":0"}, "not on loopback"},
		{"missing token file", []string{"-registry", registryFile, "-admin-token-file", "/nonexistent/token"}, "no such file"},
		{"token file for no admin API", []string{"-registry", registryFile, "-mqtt", "127.0.0.1:0", "-mqtts", "", "-admin", "", "-admin-token-file", tokenFile(t, "0123456789abcdef", 0o600)}, "-admin is empty"},
		{"token file readable by others", []string{"-registry", registryFile, "-admin-token-file", tokenFile(t, "0123456789abcdef", 0o644)}, "chmod 600"},
		{"short token", []string{"-registry", registryFile, "-admin-token-file", tokenFile(t, "short\n", 0o600)}, "at least 16"},
		{"token with a space", []string{"-registry", registryFile, "-admin-token-file", tokenFile(t, "0123456789 abcdef", 0o600)}, "without spaces"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append(tc.args, "-state-dir", t.TempDir())
			if tc.name == "unknown flag" {
				args = tc.args
			}
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			err := run(ctx, args, io.Discard, io.Discard)
			require.ErrorContains(t, err, tc.wantErr)
		})
	}
}

func TestVersion(t *testing.T) {
	for _, tc := range []struct{ name, set, want string }{
		{name: "set at build time", set: "v1.2.3-4-gabcdef0", want: "omnicore-emulator v1.2.3-4-gabcdef0 (go"},
		{name: "not set", set: "", want: "omnicore-emulator dev (go"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			saved := version
			t.Cleanup(func() { version = saved })
			version = tc.set
			var out bytes.Buffer
			// -version wins over the missing -registry: it starts nothing.
			require.NoError(t, run(context.Background(), []string{"-version"}, &out, io.Discard))
			require.True(t, strings.HasPrefix(out.String(), tc.want), out.String())
		})
	}
}

func tokenFile(t *testing.T, token string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "admin-token")
	require.NoError(t, os.WriteFile(path, []byte(token), 0o600))
	require.NoError(t, os.Chmod(path, mode))
	return path
}

// TestAdminToken runs the admin API on every interface, which needs a token:
// requests without it, or with another, are refused; a loopback Host with
// the token is served, a foreign Host is refused even with it.
func TestAdminToken(t *testing.T) {
	const secret = "4f3c2a1b0e9d8c7b6a5f4e3d2c1b0a99"
	in := start(t, "-admin", "0.0.0.0:0", "-admin-token-file", tokenFile(t, secret+"\n", 0o600))
	_, port, err := net.SplitHostPort(strings.TrimPrefix(in.info["admin"], "http://"))
	require.NoError(t, err)
	in.info["admin"] = "http://127.0.0.1:" + port

	status, body := api(t, in, "GET", "/v1/stats", "")
	require.Equal(t, 401, status, string(body))
	in.token = "not-" + secret
	status, _ = api(t, in, "POST", "/v1/kick", "")
	require.Equal(t, 401, status)
	in.token = secret
	status, body = api(t, in, "GET", "/v1/stats", "")
	require.Equal(t, 200, status, string(body))
	status, body = api(t, in, "POST", "/v1/kick", "")
	require.Equal(t, 200, status, string(body))

	req, err := http.NewRequest("GET", in.info["admin"]+"/v1/stats", nil)
	require.NoError(t, err)
	req.Host = "attacker.example:" + port
	req.Header.Set("Authorization", "Bearer "+secret)
	resp, err := (&http.Client{Timeout: wait}).Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 403, resp.StatusCode)
}

// TestIssue14Request is the request of issue 14, which any web page could
// make: before, it set the gateway's config; now it is refused and the
// config stays at version 1.
func TestIssue14Request(t *testing.T) {
	in := start(t)
	// curl -X POST -H 'Host: attacker.example' -H 'Origin: http://attacker.example' -H 'Content-Type: text/plain'
	//   --data-binary '{"evil":1}' http://127.0.0.1:8080/v1/registries/demo-registry/devices/demo-gateway/config
	req, err := http.NewRequest("POST", in.info["admin"]+"/v1/registries/demo-registry/devices/demo-gateway/config", strings.NewReader(`{"evil":1}`))
	require.NoError(t, err)
	req.Host = "attacker.example"
	req.Header.Set("Origin", "http://attacker.example")
	req.Header.Set("Content-Type", "text/plain")
	resp, err := (&http.Client{Timeout: wait}).Do(req)
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, 403, resp.StatusCode, string(body))

	status, body := api(t, in, "GET", "/v1/devices", "")
	require.Equal(t, 200, status)
	var devs []emulator.DeviceStatus
	require.NoError(t, json.Unmarshal(body, &devs))
	for _, d := range devs {
		if d.ID == "demo-gateway" {
			require.Equal(t, 1, d.ConfigVersion, "the registry file's config, untouched")
			return
		}
	}
	t.Fatal("demo-gateway not listed")
}

func TestTokenCommand(t *testing.T) {
	dir := t.TempDir()
	keys := map[string]string{}
	pubs := map[string]emulator.PublicKey{}
	for _, alg := range []string{omnicore.RS256, omnicore.ES256} {
		keys[alg], pubs[alg] = emulator.NewDeviceKey(t, dir, alg, alg)
	}
	tests := []struct {
		name    string
		args    []string
		alg     string
		wantErr string
	}{
		{name: "RS256", args: []string{"-key", keys[omnicore.RS256], "-alg", "RS256", "-aud", "demo-sub"}, alg: omnicore.RS256},
		{name: "ES256 with a lifetime", args: []string{"-key", keys[omnicore.ES256], "-alg", "ES256", "-aud", "demo-sub", "-lifetime", "10m"}, alg: omnicore.ES256},
		{name: "no key", args: []string{"-aud", "demo-sub"}, wantErr: "-key is required"},
		{name: "no audience", args: []string{"-key", keys[omnicore.ES256]}, wantErr: "-aud is required"},
		{name: "algorithm does not match the key", args: []string{"-key", keys[omnicore.ES256], "-alg", "RS256", "-aud", "a"}, wantErr: "the key is EC"},
		{name: "unsupported algorithm", args: []string{"-key", keys[omnicore.ES256], "-alg", "HS256", "-aud", "a"}, wantErr: "not supported"},
		{name: "missing key file", args: []string{"-key", filepath.Join(dir, "none"), "-aud", "a"}, wantErr: "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			err := run(context.Background(), append([]string{"token"}, tc.args...), &out, io.Discard)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			key, err := omnicore.ParsePublicKey(pubs[tc.alg].PEM, tc.alg)
			require.NoError(t, err)
			claims, err := omnicore.VerifyToken(strings.TrimSpace(out.String()), "demo-sub", []crypto.PublicKey{key}, time.Now(), 0, 24*time.Hour)
			require.NoError(t, err)
			require.Equal(t, tc.alg, claims.Algorithm)
		})
	}
}

// TestMain lets TestSignalShutdown run main() in a child process.
func TestMain(m *testing.M) {
	if args := os.Getenv("OMNICORE_EMULATOR_MAIN_ARGS"); args != "" {
		var list []string
		if err := json.Unmarshal([]byte(args), &list); err != nil {
			panic(err)
		}
		os.Args = append([]string{"omnicore-emulator"}, list...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestSignalShutdown(t *testing.T) {
	state := t.TempDir() // shared: the second run reuses the generated keys
	for _, sig := range []os.Signal{os.Interrupt, syscall.SIGTERM} {
		t.Run(sig.String(), func(t *testing.T) {
			args, err := json.Marshal([]string{
				"-registry", registryFile, "-state-dir", state,
				"-mqtt", "127.0.0.1:0", "-mqtts", "127.0.0.1:0", "-admin", "127.0.0.1:0",
			})
			require.NoError(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), 2*wait)
			defer cancel()
			cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "OMNICORE_EMULATOR_MAIN_ARGS="+string(args))
			stdout, err := cmd.StdoutPipe()
			require.NoError(t, err)
			require.NoError(t, cmd.Start())
			sc := bufio.NewScanner(stdout)
			for sc.Scan() && sc.Text() != "ready" {
			}
			require.NoError(t, cmd.Process.Signal(sig))
			var rest []string
			for sc.Scan() {
				rest = append(rest, sc.Text())
			}
			require.NoError(t, cmd.Wait(), "clean exit")
			require.Equal(t, []string{"stopped"}, rest)
		})
	}
}
