package check_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/check"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

const (
	registry = "reg"
	gw       = "gw-1"
)

// setup is one emulated bridge with a gateway and its devices, and the
// pieces of a plugin file for it.
type setup struct {
	srv     *emulator.Server
	dir     string
	key     string // the gateway's private key (ES256, registered)
	caFile  string
	gw      string // the gateway the plugin files name
	alg     string
	skew    time.Duration // of the Date server
	dateURL string
}

func newSetup(t *testing.T) *setup {
	t.Helper()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	s := &setup{srv: srv, dir: t.TempDir(), gw: gw, alg: omnicore.ES256}
	s.key = srv.AddTestGateway(t, registry, gw, omnicore.ES256, "dev-a", "dev-b")
	for _, d := range []string{"dev-unbound", "dev-blocked"} {
		require.NoError(t, srv.AddDevice(registry, emulator.Device{ID: d}))
	}
	require.NoError(t, srv.Bind(registry, gw, "dev-blocked"))
	require.NoError(t, srv.SetBlocked(registry, "dev-blocked", true))
	var err error
	s.caFile, err = srv.WriteCAFile(s.dir)
	require.NoError(t, err)
	date := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Date", time.Now().Add(s.skew).UTC().Format(http.TimeFormat))
	}))
	t.Cleanup(date.Close)
	s.dateURL = date.URL
	state := filepath.Join(t.TempDir(), "state")
	require.NoError(t, os.Mkdir(state, 0o700))
	t.Setenv("STATE_DIRECTORY", state)
	t.Setenv(share.EnvRuntimeDir, "")
	return s
}

// file writes a plugin file of table with the gateway's options and extra
// lines, and returns its path.
func (s *setup) file(t *testing.T, table string, extra ...string) string {
	t.Helper()
	lines := []string{
		"[[" + table + "]]",
		fmt.Sprintf("  servers = [%q]", s.srv.TLSURL),
		fmt.Sprintf("  subscription_id = %q", s.srv.Subscription()),
		fmt.Sprintf("  registry_id = %q", registry),
		fmt.Sprintf("  gateway_id = %q", s.gw),
		fmt.Sprintf("  private_key = %q", s.key),
		fmt.Sprintf("  algorithm = %q", s.alg),
		fmt.Sprintf("  tls_ca = %q", s.caFile),
	}
	path := filepath.Join(t.TempDir(), strings.ReplaceAll(table, ".", "_")+".conf")
	require.NoError(t, os.WriteFile(path, []byte(strings.Join(append(lines, extra...), "\n")+"\n"), 0o600))
	return path
}

func (s *setup) run(t *testing.T, env check.Env, flags []string, files ...string) (int, []string) {
	t.Helper()
	var out bytes.Buffer
	env.Stdout = &out
	if env.DateURL == nil {
		env.DateURL = func(string) string { return s.dateURL }
	}
	args := append([]string{}, flags...)
	for _, f := range files {
		args = append(args, "-config", f)
	}
	timeout := check.DefaultTimeout
	for i, a := range args {
		if a == "-timeout" {
			var err error
			timeout, err = time.ParseDuration(args[i+1])
			require.NoError(t, err)
		}
	}
	start := time.Now()
	code := check.Main(args, env)
	require.Less(t, time.Since(start), timeout, "the check took longer than -timeout")
	t.Logf("output:\n%s", out.String())
	return code, strings.Split(strings.TrimSpace(out.String()), "\n")
}

// lines returns the lines that start with mark and contain every part.
func find(lines []string, mark string, parts ...string) []string {
	var out []string
next:
	for _, l := range lines {
		if !strings.HasPrefix(l, mark) {
			continue
		}
		for _, p := range parts {
			if !strings.Contains(l, p) {
				continue next
			}
		}
		out = append(out, l)
	}
	return out
}

func TestCheck(t *testing.T) {
	cases := []struct {
		name string
		// prepare returns the files to check; it may change the setup.
		prepare func(t *testing.T, s *setup) []string
		env     check.Env
		args    []string // more flags
		// fails are the ✘ lines expected, each as substrings; no other
		// line may be ✘.
		fails  [][]string
		skips  [][]string
		passes [][]string
	}{
		{
			name: "all pass, output and input of one gateway",
			prepare: func(t *testing.T, s *setup) []string {
				return []string{
					s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`),
					s.file(t, "inputs.omnicore", `  devices = ["dev-a", "dev-b"]`),
				}
			},
		},
		{
			name: "built-in telegraf.conf with other plugins, processors and aggregators",
			prepare: func(t *testing.T, s *setup) []string {
				path := s.file(t, "outputs.omnicore", `  devices = ["dev-b"]`)
				data, err := os.ReadFile(path)
				require.NoError(t, err)
				conf := "[agent]\n  interval = \"10s\"\n[[inputs.cpu]]\n  percpu = true\n[[processors.rename]]\n  [[processors.rename.replace]]\n    tag = \"a\"\n    dest = \"b\"\n" +
					string(data) + "[[aggregators.minmax]]\n  period = \"30s\"\n[[outputs.file]]\n  files = [\"stdout\"]\n"
				require.NoError(t, os.WriteFile(path, []byte(conf), 0o600))
				return []string{path}
			},
		},
		{
			name: "key readable by others",
			prepare: func(t *testing.T, s *setup) []string {
				require.NoError(t, os.Chmod(s.key, 0o644))
				return []string{s.file(t, "outputs.omnicore")}
			},
			fails: [][]string{{"key file", "mode 0644", "chmod 600"}},
		},
		{
			name: "public key given as private_key",
			prepare: func(t *testing.T, s *setup) []string {
				s.key = strings.TrimSuffix(s.key, ".key") + ".pub"
				require.NoError(t, os.Chmod(s.key, 0o600))
				return []string{s.file(t, "outputs.omnicore")}
			},
			fails: [][]string{{"key file", "public key, not a private key"}},
			skips: [][]string{{"[[outputs.omnicore]]", "fails the key file check"}, {"bridge checks of gateway gw-1"}},
		},
		{
			name: "key type does not match algorithm",
			prepare: func(t *testing.T, s *setup) []string {
				s.alg = omnicore.RS256
				return []string{s.file(t, "inputs.omnicore")}
			},
			fails: [][]string{{"key file", `the key is EC: set algorithm = "ES256"`}},
			skips: [][]string{{"[[inputs.omnicore]]", "fails the key file check"}, {"bridge checks of gateway gw-1"}},
		},
		{
			name: "tls_ca of another CA",
			prepare: func(t *testing.T, s *setup) []string {
				other, _, err := emulator.GenerateCA()
				require.NoError(t, err)
				s.caFile = filepath.Join(t.TempDir(), "other-ca.pem")
				require.NoError(t, os.WriteFile(s.caFile, other, 0o644))
				return []string{s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)}
			},
			fails: [][]string{{"TLS 127.0.0.1", "issued by", "set tls_ca to the CA certificate of"}, {"token of gateway gw-1", "TLS"}},
			skips: [][]string{{"devices of gateway gw-1"}},
		},
		{
			name: "clock an hour ahead (HTTP Date)",
			prepare: func(t *testing.T, s *setup) []string {
				s.skew = -time.Hour // the bridge host says an hour earlier
				return []string{s.file(t, "outputs.omnicore")}
			},
			fails: [][]string{{"clock against 127.0.0.1", "1h0m0s ahead of", "HTTP Date", "10m0s"}},
		},
		{
			name: "clock behind the certificate (no HTTP Date: weak bound)",
			prepare: func(t *testing.T, s *setup) []string {
				s.dateURL = "http://127.0.0.1:1/"
				return []string{s.file(t, "outputs.omnicore")}
			},
			env:   check.Env{Now: func() time.Time { return time.Now().Add(-30 * 24 * time.Hour) }},
			fails: [][]string{{"clock against 127.0.0.1", "before the bridge certificate's NotBefore", "behind"}},
		},
		{
			name: "key not registered: CONNACK refused",
			prepare: func(t *testing.T, s *setup) []string {
				s.key, _ = emulator.NewDeviceKey(t, t.TempDir(), "stranger", omnicore.ES256)
				return []string{s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)}
			},
			fails: [][]string{{"token of gateway gw-1", "refused", "register the public key"}},
			skips: [][]string{{"devices of gateway gw-1"}},
		},
		{
			name: "devices refused: not bound, blocked, unknown",
			prepare: func(t *testing.T, s *setup) []string {
				return []string{s.file(t, "inputs.omnicore", `  devices = ["dev-a", "dev-unbound", "dev-blocked", "dev-nowhere"]`)}
			},
			fails: [][]string{{"devices of gateway gw-1", "3 of 4 refused", "dev-unbound (not bound", "dev-blocked (blocked", "dev-nowhere (unknown", "bind each refused device"}},
		},
		{
			name: "devices refused: wrong auth",
			prepare: func(t *testing.T, s *setup) []string {
				// A gateway whose auth method wants a device JWT, configured
				// with device_auth = "association".
				key, pub := emulator.NewDeviceKey(t, t.TempDir(), "gw-tok", omnicore.ES256)
				require.NoError(t, s.srv.AddDevice(registry, emulator.Device{ID: "gw-tok", Gateway: true, AuthMethod: emulator.DeviceAuthTokenOnly, PublicKeys: []emulator.PublicKey{pub}}))
				s.gw, s.key = "gw-tok", key
				return []string{s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)}
			},
			fails: [][]string{{"devices of gateway gw-tok", "dev-a (wrong auth", "device_auth"}},
		},
		{
			name: "spool with records, open in a running process",
			prepare: func(t *testing.T, s *setup) []string {
				dir := filepath.Join(t.TempDir(), "spool")
				sp, err := spool.Open(context.Background(), spool.Options{Dir: dir, Log: testutil.Logger{}})
				require.NoError(t, err)
				t.Cleanup(func() { require.NoError(t, sp.Close()) })
				for range 3 {
					require.NoError(t, sp.Append([]byte("m,device_id=dev-a v=1 1\n")))
				}
				require.NoError(t, sp.Commit())
				return []string{s.file(t, "outputs.omnicore", fmt.Sprintf("  spool_dir = %q", dir))}
			},
			passes: [][]string{{"spool ", "bytes in 1 segment files", "oldest record waiting since"}},
		},
		{
			name: "gateway held by a running process: no connect",
			prepare: func(t *testing.T, s *setup) []string {
				path := s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)
				// This test process is the running telegraf-omnicore: it
				// owns the gateway's connection through the rendezvous.
				rt, err := os.MkdirTemp("", "oc") // short: a Unix socket path
				require.NoError(t, err)
				t.Cleanup(func() { os.RemoveAll(rt) })
				require.NoError(t, os.Chmod(rt, 0o700))
				t.Setenv(share.EnvRuntimeDir, rt)
				connect, _, err := share.Install(share.Settings{PluginFile: path})
				require.NoError(t, err)
				o := gateway.DefaultOptions()
				o.Servers, o.SubscriptionID, o.RegistryID, o.GatewayID = []string{s.srv.URL}, s.srv.Subscription(), registry, gw
				o.PrivateKey, o.Algorithm = s.key, omnicore.ES256
				cfg, err := o.Validate(nil)
				require.NoError(t, err)
				conn, release, err := gateway.Host{Connect: connect}.Acquire(cfg)
				require.NoError(t, err)
				t.Cleanup(release)
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				_, err = s.srv.WaitConnected(ctx, s.srv.ClientID(registry, gw))
				require.NoError(t, err)
				_ = conn
				return []string{path}
			},
			skips: [][]string{{"token of gateway gw-1", fmt.Sprintf("process %d", os.Getpid()), "does not connect"}, {"devices of gateway gw-1"}},
		},
		{
			name: "gateway connected by a process started with another file: its host claim, no connect",
			prepare: func(t *testing.T, s *setup) []string {
				path := s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)
				// This test process stands for a built-in Telegraf whose
				// telegraf.conf is not among the checked files: only the
				// gateway's host claim tells.
				o := gateway.DefaultOptions()
				o.Servers, o.SubscriptionID, o.RegistryID, o.GatewayID = []string{s.srv.TLSURL}, s.srv.Subscription(), registry, gw
				o.PrivateKey, o.Algorithm = s.key, omnicore.ES256
				o.TLSCA = s.caFile
				cfg, err := o.Validate(nil)
				require.NoError(t, err)
				sess, err := gateway.New(cfg)
				require.NoError(t, err)
				sess.Start()
				t.Cleanup(func() {
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					defer cancel()
					_ = sess.Close(ctx)
				})
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				defer cancel()
				require.NoError(t, sess.WaitReady(ctx))
				return []string{path}
			},
			skips: [][]string{{"token of gateway gw-1", fmt.Sprintf("process %d", os.Getpid()), "host claim"}, {"devices of gateway gw-1"}},
		},
		{
			name: "gateway of a running built-in Telegraf: no connect",
			prepare: func(t *testing.T, s *setup) []string {
				path := s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)
				// A process named telegraf started with the checked file,
				// waiting on its stdin.
				fake := filepath.Join(t.TempDir(), "telegraf")
				require.NoError(t, os.WriteFile(fake, []byte("#!/bin/sh\nread x\n"), 0o700))
				cmd := exec.Command(fake, "--config", path)
				stdin, err := cmd.StdinPipe()
				require.NoError(t, err)
				require.NoError(t, cmd.Start())
				t.Cleanup(func() {
					stdin.Close()
					_ = cmd.Wait()
				})
				return []string{path}
			},
			skips: [][]string{{"token of gateway gw-1", "started with", "may hold the gateway's connection"}, {"devices of gateway gw-1"}},
		},
		{
			name: "bridge that never answers: within -timeout",
			prepare: func(t *testing.T, s *setup) []string {
				// Accepts connections and says nothing: no TLS handshake.
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				require.NoError(t, err)
				t.Cleanup(func() { ln.Close() })
				go func() {
					var held []net.Conn
					defer func() {
						for _, c := range held {
							c.Close()
						}
					}()
					for {
						c, err := ln.Accept()
						if err != nil {
							return
						}
						held = append(held, c)
					}
				}()
				path := s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)
				data, err := os.ReadFile(path)
				require.NoError(t, err)
				data = []byte(strings.Replace(string(data), s.srv.TLSURL, "tls://"+ln.Addr().String(), 1))
				require.NoError(t, os.WriteFile(path, data, 0o600))
				return []string{path}
			},
			args:  []string{"-timeout", "10s"},
			fails: [][]string{{"TLS 127.0.0.1", "no TLS handshake"}, {"token of gateway gw-1", "no CONNACK"}},
			skips: [][]string{{"devices of gateway gw-1"}},
		},
		{
			name: "state directory writable by others",
			prepare: func(t *testing.T, s *setup) []string {
				dir := filepath.Join(t.TempDir(), "open")
				require.NoError(t, os.Mkdir(dir, 0o700))
				require.NoError(t, os.Chmod(dir, 0o777))
				t.Setenv("STATE_DIRECTORY", dir)
				return []string{s.file(t, "outputs.omnicore", `  devices = ["dev-a"]`)}
			},
			fails: [][]string{{"state directory", "mode 0777", "chmod go-w"}},
			// Whether a running process holds the gateway cannot be told
			// without the sharing directory: no connect.
			skips: [][]string{{"spool of [[outputs.omnicore]]", "fails its check above"}, {"token of gateway gw-1", "cannot tell"}, {"devices of gateway gw-1"}},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := newSetup(t)
			files := tc.prepare(t, s)
			code, lines := s.run(t, tc.env, tc.args, files...)
			for _, f := range tc.fails {
				require.Len(t, find(lines, "✘", f...), 1, "one ✘ line with %q", f)
			}
			require.Len(t, find(lines, "✘"), len(tc.fails), "no other ✘ line")
			for _, sk := range tc.skips {
				require.Len(t, find(lines, "–", sk...), 1, "one skipped line with %q", sk)
			}
			require.Len(t, find(lines, "–"), len(tc.skips), "no other skipped line")
			for _, p := range tc.passes {
				require.Len(t, find(lines, "✔", p...), 1, "one ✔ line with %q", p)
			}
			if len(tc.fails) == 0 && len(tc.skips) == 0 {
				require.Equal(t, 0, code)
				require.NotEmpty(t, find(lines, "✔", "token of gateway"))
				require.NotEmpty(t, find(lines, "✔", "TLS 127.0.0.1", "verifies against tls_ca"))
				require.NotEmpty(t, find(lines, "✔", "clock against 127.0.0.1", "HTTP Date"))
			} else if len(tc.fails) > 0 {
				require.Equal(t, 1, code)
			} else {
				require.Equal(t, 0, code, "a skipped check does not fail the run")
			}
			// Nothing was published, no device stays attached, and no
			// connection but the check's own came and went: none was
			// taken over.
			require.Empty(t, s.srv.Received())
			require.Empty(t, s.srv.Attachments(registry, s.gw))
			kicked := 0
			for _, c := range s.srv.Connections() {
				if c.Reason == emulator.ReasonTakenOver {
					kicked++
				}
			}
			require.Zero(t, kicked)
		})
	}
}
