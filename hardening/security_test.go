package hardening

import (
	"crypto"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/wiretap"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// TestNoSecretsInLogs runs a whole Telegraf with the output and the input of
// one gateway (sharing its connection), debug logging everywhere, device
// tokens on every attach, 10 s gateway tokens renewed mid-stream, a kicked
// connection, a refused attach, config and commands. Every JWT put on the
// wire is captured by a recording proxy; none of them, and no piece of any
// private key, appears in Telegraf's log (which holds both children's
// stderr) or in the emulator's log.
func TestNoSecretsInLogs(t *testing.T) {
	var emuLog e2e.SyncBuffer
	w := newWorld(t, emulator.WithLogger(slog.New(slog.NewTextHandler(&emuLog, &slog.HandlerOptions{Level: slog.LevelDebug}))))
	keyDir := filepath.Join(w.dir, "devices")
	require.NoError(t, os.Mkdir(keyDir, 0o700))

	require.NoError(t, w.srv.AddRegistry("plant"))
	gwKey, gwPub := emulator.NewDeviceKey(t, w.dir, "edge-gw", omnicore.ES256)
	require.NoError(t, w.srv.AddDevice("plant", emulator.Device{ID: "edge-gw", Gateway: true, AuthMethod: emulator.DeviceAuthTokenOnly, PublicKeys: []emulator.PublicKey{gwPub}}))
	keys := []string{gwKey}
	devices := deviceNames("dev", 3)
	public := map[string]crypto.PublicKey{}
	for _, d := range append(devices, "stranger") {
		priv, pub := emulator.NewDeviceKey(t, w.dir, d, omnicore.ES256)
		require.NoError(t, w.srv.AddDevice("plant", emulator.Device{ID: d, PublicKeys: []emulator.PublicKey{pub}}))
		if d == "stranger" {
			// Its attach is signed with a key the bridge does not know.
			keys = append(keys, priv)
			priv, _ = emulator.NewDeviceKey(t, w.dir, "impostor", omnicore.ES256)
		}
		dst := filepath.Join(keyDir, d+".pem")
		require.NoError(t, os.Rename(priv, dst))
		keys = append(keys, dst)
		k, err := omnicore.ParsePublicKey(pub.PEM, omnicore.ES256)
		require.NoError(t, err)
		public[d] = k
	}
	gwPublic, err := omnicore.ParsePublicKey(gwPub.PEM, omnicore.ES256)
	require.NoError(t, err)

	rec := wiretap.New(t, strings.TrimPrefix(w.srv.URL, "tcp://"))
	gw := e2e.Gateway{
		Servers:      []string{"tcp://" + rec.Addr()},
		Subscription: w.srv.Subscription(),
		Registry:     "plant",
		ID:           "edge-gw",
		PrivateKey:   gwKey,
		Algorithm:    omnicore.ES256,
	}
	tokenOpts := []string{`token_lifetime = "10s"`, `device_auth = "token"`, "device_key_dir = " + e2e.Quote(keyDir)}
	output := w.write("omnicore-output.conf", gw.OutputFile(tokenOpts...))
	// data_format: the config and command below fail to parse, which is
	// logged (a warning, then debug lines) by size, never by content.
	input := w.write("omnicore-input.conf", gw.InputFile(devices, append(tokenOpts, `log_level = "debug"`, `data_format = "influx"`)...))
	count := 1200
	w.start(agent +
		w.generatorInput(GenSpec{Count: count, Rate: 100, Devices: append(append([]string(nil), devices...), "stranger"), Record: filepath.Join(w.dir, "record.txt")}) +
		outputBlock(output) +
		e2e.ExecdInput(pluginBin, input, "-poll_interval", "1s"))

	w.waitEmulator(time.Minute, "the input's subscriptions", func() bool {
		for _, d := range devices {
			if !w.srv.Subscribed("plant", d, omnicore.KindCommands) {
				return false
			}
		}
		return true
	})
	const payloadSecret = "eyJub3QiOiJhIHRva2VuIn0"
	_, err = w.srv.SetConfig("plant", "dev-01", []byte(`{"secret_looking":"`+payloadSecret+`"}`))
	require.NoError(t, err)
	require.NoError(t, w.srv.SendCommand("plant", "dev-02", "reboot", []byte("wifi psk="+payloadSecret)))
	w.progress(&run{sc: &scenario{count: count}}, 0.3)
	w.srv.KickAll()
	w.waitEmulator(time.Minute, "a token renewal", func() bool {
		return w.connectionsClosed()[emulator.ReasonClientDisconnect] >= 1
	})
	// The last metric of a bound device (the stranger's never arrive).
	last := int64(count - 1)
	for last%4 == 3 {
		last--
	}
	w.waitFor(2*time.Minute, "the stream", func() bool { return w.tally.Has(last) })
	w.stop()

	// The JWTs actually sent: gateway passwords and attach authorizations.
	tokens := rec.Tokens()
	var gatewayTokens, deviceTokens int
	for _, tok := range tokens {
		if _, err := omnicore.VerifyToken(tok, w.srv.Subscription(), []crypto.PublicKey{gwPublic}, time.Now(), time.Hour, time.Hour); err == nil {
			gatewayTokens++
		}
		for _, d := range devices {
			if _, err := omnicore.VerifyToken(tok, w.srv.Subscription(), []crypto.PublicKey{public[d]}, time.Now(), time.Hour, 2*time.Hour); err == nil {
				deviceTokens++
			}
		}
	}
	require.GreaterOrEqual(t, gatewayTokens, 3, "gateway JWTs captured: the first connect, after the kick, after a renewal")
	require.GreaterOrEqual(t, deviceTokens, 2*len(devices), "device JWTs captured: attaches on two connections at least")

	logs := map[string]string{"Telegraf": w.tg.Log(), "emulator": emuLog.String()}
	for name, log := range logs {
		require.NotEmpty(t, log)
		require.NotContains(t, log, payloadSecret, "payload bytes in the %s log", name)
		require.NotContains(t, log, "secret_looking", "payload bytes in the %s log", name)
		wiretap.RequireNoKeyMaterial(t, log, keys...)
		for _, tok := range tokens {
			parts := strings.Split(tok, ".")
			require.NotContains(t, log, tok, "a JWT in the %s log", name)
			require.NotContains(t, log, parts[2], "a JWT signature in the %s log", name)
			require.NotContains(t, log, parts[0]+"."+parts[1], "a JWT's signed part in the %s log", name)
		}
	}
	// The run did log what happened (so the search searched something).
	for _, want := range []string{"Connected to the bridge", "Renewing the gateway token", "Attaching device \\\"stranger\\\" failed", "Connection to the bridge lost",
		`Parsing a config of device "dev-01" \(\d+ bytes\)`, `Parsing a command of device "dev-02" \(\d+ bytes\)`} {
		require.Regexp(t, regexp.MustCompile(want), logs["Telegraf"])
	}
	t.Logf("searched %d lines of Telegraf's log and %d of the emulator's for %d JWTs (%d gateway, %d device) and %d private keys: none found",
		strings.Count(logs["Telegraf"], "\n"), strings.Count(logs["emulator"], "\n"), len(tokens), gatewayTokens, deviceTokens, len(keys))
}

// TestTLSAndKeyWarnings runs the execd binary against the emulator's TLS
// listener: verification is on by default and a certificate problem is an
// E! line that names it; insecure_skip_verify works but is a W! line; a
// private key others can read is a W! line.
func TestTLSAndKeyWarnings(t *testing.T) {
	w := newWorld(t)
	gw := w.gateway("dev-01")
	gw.Servers = []string{w.srv.TLSURL}
	ca, err := w.srv.WriteCAFile(w.dir)
	require.NoError(t, err)
	otherCA, _, err := emulator.GenerateCA()
	require.NoError(t, err)
	loose := filepath.Join(w.dir, "loose.key")
	b, err := os.ReadFile(gw.PrivateKey)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(loose, b, 0o600))
	require.NoError(t, os.Chmod(loose, 0o644))

	tests := []struct {
		name     string
		set      func(g *e2e.Gateway) []string
		delivers bool
		want     []string // lines of stderr, as regular expressions
	}{
		{
			name: "no tls_ca",
			set:  func(*e2e.Gateway) []string { return nil },
			want: []string{`^E! \[outputs\.omnicore\] Connecting to the bridge .* x509: certificate signed by unknown authority .*set tls_ca`},
		},
		{
			name: "wrong tls_ca",
			set: func(g *e2e.Gateway) []string {
				g.TLSCA = w.write("other-ca.pem", string(otherCA))
				return nil
			},
			want: []string{`^E! \[outputs\.omnicore\] Connecting to the bridge .* x509: certificate signed by unknown authority .*set tls_ca`},
		},
		{
			name:     "insecure_skip_verify",
			set:      func(*e2e.Gateway) []string { return []string{"insecure_skip_verify = true"} },
			delivers: true,
			want:     []string{`^W! \[outputs\.omnicore\] insecure_skip_verify = true: the bridge's certificate is NOT verified`},
		},
		{
			name: "key readable by others",
			set: func(g *e2e.Gateway) []string {
				g.TLSCA = ca
				g.PrivateKey = loose
				return nil
			},
			delivers: true,
			want:     []string{`^W! \[outputs\.omnicore\] private_key ".*loose\.key" is readable by group or others \(mode 0644\); it should be 0600`},
		},
		{
			name:     "right tls_ca",
			set:      func(g *e2e.Gateway) []string { g.TLSCA = ca; return nil },
			delivers: true,
		},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := gw
			// Without the spool an undeliverable metric is reported at
			// the stop (with it, it would wait on disk for the next
			// start: the store-and-forward suite tests that).
			path := w.write(fmt.Sprintf("tls-%d.conf", i), g.OutputFile(tt.set(&g)...)+"\n[telegraf_omnicore]\n  spool = false\n")
			p := startPlugin(t, w.env, "-config", path)
			marker := fmt.Sprintf("case%d", i)
			p.send(t, fmt.Sprintf("tls,device_id=dev-01 case=%q\n", marker))
			for _, want := range tt.want {
				re := regexp.MustCompile(want)
				waitUntil(t, 30*time.Second, "the line "+want, p.done, func() bool {
					for _, l := range strings.Split(p.stderr.String(), "\n") {
						if re.MatchString(l) {
							t.Logf("%s", l)
							return true
						}
					}
					return false
				})
			}
			if tt.delivers {
				waitEmulator(t, w.srv, 30*time.Second, "the metric over TLS", func() bool {
					for _, m := range w.srv.Received() {
						if strings.Contains(string(m.Payload), marker) {
							return true
						}
					}
					return false
				})
			} else {
				for _, m := range w.srv.Received() {
					require.NotContains(t, string(m.Payload), marker)
				}
				for _, c := range w.srv.Connections() {
					require.Equal(t, "tcp", c.Listener, "a TLS connection got through: %+v", c)
				}
			}
			code := p.stop(t)
			if tt.delivers {
				require.Zero(t, code, "stderr:\n%s", p.stderr.String())
			} else {
				// The metric could not be delivered before the shutdown
				// deadline: said, and a non-zero exit.
				require.NotZero(t, code)
				require.Contains(t, p.stderr.String(), "1 metrics not acknowledged")
			}
			// Every line execd sees is a log line (none at all when all
			// went well: the default level is warn).
			if out := strings.TrimRight(p.stderr.String(), "\n"); out != "" {
				for _, l := range strings.Split(out, "\n") {
					require.Regexp(t, execdLine, l)
				}
			}
			wiretap.RequireNoKeyMaterial(t, p.stderr.String(), gw.PrivateKey)
		})
	}
}

// plugin is a running execd binary fed by the test.
type plugin struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr *e2e.SyncBuffer
	done   chan struct{}
	err    error
}

func startPlugin(t *testing.T, env []string, args ...string) *plugin {
	t.Helper()
	cmd := exec.Command(pluginBin, args...)
	cmd.Env = append(os.Environ(), env...)
	p := &plugin{cmd: cmd, stderr: &e2e.SyncBuffer{}, done: make(chan struct{})}
	cmd.Stderr = p.stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	p.stdin = stdin
	require.NoError(t, cmd.Start())
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

func (p *plugin) send(t *testing.T, lines string) {
	t.Helper()
	_, err := io.WriteString(p.stdin, lines)
	require.NoError(t, err)
}

// stop closes stdin, as execd does, and returns the exit status; the program
// must exit within execd's 5 s grace period.
func (p *plugin) stop(t *testing.T) int {
	t.Helper()
	require.NoError(t, p.stdin.Close())
	start := time.Now()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		require.FailNow(t, "the program did not exit within 10 s of stdin EOF")
	}
	require.Less(t, time.Since(start), 6*time.Second, "exit after stdin EOF")
	return p.cmd.ProcessState.ExitCode()
}
