package hardening

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/wiretap"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// pluginResult is what a run of the execd binary left behind.
type pluginResult struct {
	code   int
	stderr string
	stdout string
}

// runPlugin runs the execd binary with args and stdin, as user (nil: this
// user), and waits up to 30 s for it to exit.
func runPlugin(t *testing.T, stdin string, cred *syscall.Credential, env []string, args ...string) pluginResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, pluginBin, args...)
	cmd.Stdin = strings.NewReader(stdin)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	err := cmd.Run()
	require.NoError(t, ctx.Err(), "the program did not exit within 30 s; stderr:\n%s", stderr.String())
	code := 0
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
	} else {
		require.NoError(t, err)
	}
	return pluginResult{code: code, stderr: stderr.String(), stdout: stdout.String()}
}

// execdLine matches a log line execd files at its level.
var execdLine = regexp.MustCompile(`^[EWIDT]! `)

// TestBrokenPluginFiles runs the execd binary on plugin files users get
// wrong: it exits non-zero with an E! line that says what is wrong and
// where, every line of its stderr is one execd files at the right level, and
// nothing of the private key ever appears.
func TestBrokenPluginFiles(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the execd binary")
	}
	// A directory others may enter: one case runs the program as nobody.
	dir, err := os.MkdirTemp("", "hardening-config-")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	key, _, err := omnicore.WriteKeyPair(dir, "gateway", omnicore.RS256)
	require.NoError(t, err)
	ecKey, _, err := omnicore.WriteKeyPair(dir, "ec", omnicore.ES256)
	require.NoError(t, err)
	keyPEM, err := os.ReadFile(key)
	require.NoError(t, err)
	keys := []string{key, ecKey}
	srv := emulator.NewServer(emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
	defer srv.Close()
	caFile := filepath.Join(dir, "roots.pem")
	require.NoError(t, os.WriteFile(caFile, srv.CAPEM(), 0o644))

	unreadable := filepath.Join(dir, "unreadable.key")
	require.NoError(t, os.WriteFile(unreadable, keyPEM, 0o600))
	var asOther *syscall.Credential
	if os.Geteuid() == 0 {
		// Root reads everything: run as nobody, for whom the root-owned
		// 0600 key is unreadable.
		asOther = &syscall.Credential{Uid: 65534, Gid: 65534}
	} else {
		require.NoError(t, os.Chmod(unreadable, 0))
	}

	table := func(lines ...string) string {
		return "[[outputs.omnicore]]\n  " + strings.Join(lines, "\n  ") + "\n"
	}
	good := []string{
		`servers = ["tls://127.0.0.1:8883"]`,
		`subscription_id = "sub"`,
		`registry_id = "plant"`,
		`gateway_id = "edge-gw"`,
		`private_key = ` + e2e.Quote(key),
	}
	with := func(replace map[string]string, extra ...string) string {
		var lines []string
		for _, l := range good {
			name := strings.Fields(l)[0]
			if r, ok := replace[name]; ok {
				if r != "" {
					lines = append(lines, r)
				}
				continue
			}
			lines = append(lines, l)
		}
		return table(append(lines, extra...)...)
	}
	tests := []struct {
		name    string
		file    string
		as      *syscall.Credential
		wantErr []string // all in one E! line
	}{
		{name: "typo in an option", file: with(nil, `gateway_idd = "x"`), wantErr: []string{`"gateway_idd"`, "not used"}},
		{name: "typo in a required option", file: with(map[string]string{"private_key": `privat_key = ` + e2e.Quote(key)}), wantErr: []string{`"privat_key"`}},
		{name: "missing registry_id", file: with(map[string]string{"registry_id": ""}), wantErr: []string{"registry_id is required"}},
		{name: "missing private_key", file: with(map[string]string{"private_key": ""}), wantErr: []string{"private_key is required"}},
		{name: "missing servers", file: with(map[string]string{"servers": ""}), wantErr: []string{"servers is required"}},
		{name: "private key file missing", file: with(map[string]string{"private_key": `private_key = "/nonexistent/gateway.key"`}), wantErr: []string{"/nonexistent/gateway.key", "no such file"}},
		{name: "private key file unreadable", file: with(map[string]string{"private_key": `private_key = ` + e2e.Quote(unreadable)}), as: asOther, wantErr: []string{"unreadable.key", "permission denied"}},
		{name: "private key is a directory", file: with(map[string]string{"private_key": `private_key = ` + e2e.Quote(dir)}), wantErr: []string{"is a directory"}},
		{name: "private key of another algorithm", file: with(map[string]string{"private_key": `private_key = ` + e2e.Quote(ecKey)}), wantErr: []string{`the key is EC: set algorithm = "ES256"`}},
		{name: "CA file as the private key", file: with(map[string]string{"private_key": `private_key = ` + e2e.Quote(caFile)}), wantErr: []string{"this file is a certificate", "not a private key", "tls_ca"}},
		{name: "RSA key with ES256", file: with(nil, `algorithm = "ES256"`), wantErr: []string{`the key is RSA: set algorithm = "RS256"`}},
		{name: "hostprefix placeholder", file: with(map[string]string{"servers": `servers = ["tls://<hostprefix>.mqtt.korewireless.com:8883"]`}), wantErr: []string{"<hostprefix>", "replace it with your subscription's host prefix"}},
		{name: "server without a port", file: with(map[string]string{"servers": `servers = ["tls://mqtt.korewireless.com"]`}), wantErr: []string{"has no port", "tls://mqtt.korewireless.com:8883"}},
		{name: "several required options missing", file: with(map[string]string{"gateway_id": "", "subscription_id": "", "private_key": ""}), wantErr: []string{"subscription_id, gateway_id, private_key are required"}},
		{name: "unknown data_format", file: with(nil, `data_format = "protobuf"`), wantErr: []string{`data_format "protobuf" is not built in; the serializers built in are: binary, carbon2, csv, graphite, influx, json, msgpack`}},
		{name: "private key pasted instead of its path", file: with(map[string]string{"private_key": `private_key = """` + "\n" + string(keyPEM) + `"""`}), wantErr: []string{"private_key"}},
		// Telegraf's loader names the line and the Go field of a value of the
		// wrong type.
		{name: "servers as a string", file: with(map[string]string{"servers": `servers = "tls://127.0.0.1:8883"`}), wantErr: []string{"line 2", "Servers", "cannot unmarshal TOML string"}},
		{name: "number as a string", file: with(nil, `max_inflight = "100"`), wantErr: []string{"line 7", "MaxInflight", "cannot unmarshal TOML string"}},
		{name: "duration as a bool", file: with(nil, `token_lifetime = true`), wantErr: []string{"line 7", "TokenLifetime", "invalid duration"}},
		{name: "list as a string", file: with(nil, `devices = "dev-01"`), wantErr: []string{"line 7", "Devices", "cannot unmarshal TOML string"}},
		{name: "QoS 2", file: with(nil, `qos = 2`), wantErr: []string{"qos 2 must be 0 or 1"}},
		{name: "unknown algorithm", file: with(nil, `algorithm = "HS256"`), wantErr: []string{"HS256"}},
		{name: "token lifetime over 24h", file: with(nil, `token_lifetime = "48h"`), wantErr: []string{"token_lifetime"}},
		{name: "hostile gateway_id", file: with(map[string]string{"gateway_id": `gateway_id = "gw/+/#"`}), wantErr: []string{"gateway_id"}},
		{name: "plain http server", file: with(map[string]string{"servers": `servers = ["http://127.0.0.1:8883"]`}), wantErr: []string{"scheme must be tls://"}},
		{name: "TOML syntax error", file: with(nil, `timeout = "10s`), wantErr: []string{"omnicore-output.conf"}},
		{name: "two plugin tables", file: with(nil) + with(nil), wantErr: []string{"exactly one"}},
		{name: "another plugin", file: "[[outputs.file]]\n  files = [\"stdout\"]\n", wantErr: []string{"output: file", "belong in telegraf.conf"}},
		{name: "empty file", file: "", wantErr: []string{"no plugin table"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// A neutral path: the expected words must come from the message.
			path := filepath.Join(dir, fmt.Sprintf("case%02d", i), "omnicore-output.conf")
			require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o755))
			require.NoError(t, os.WriteFile(path, []byte(tt.file), 0o644))
			res := runPlugin(t, "m,device_id=dev-01 v=1i\n", tt.as, nil, "-config", path)
			require.NotZero(t, res.code, "exit status; stderr:\n%s", res.stderr)
			var errLine string
			for _, l := range strings.Split(strings.TrimRight(res.stderr, "\n"), "\n") {
				require.Regexp(t, execdLine, l, "a stderr line execd cannot file at a level")
				if strings.HasPrefix(l, "E! ") && errLine == "" {
					errLine = l
				}
			}
			require.NotEmpty(t, errLine, "no E! line; stderr:\n%s", res.stderr)
			for _, want := range tt.wantErr {
				require.Contains(t, errLine, want)
			}
			t.Logf("exit %d: %s", res.code, errLine)
			wiretap.RequireNoKeyMaterial(t, res.stderr+res.stdout, keys...)
		})
	}

	// Through Telegraf: the child's E! line shows up as such and execd
	// reports the exit.
	t.Run("through Telegraf", func(t *testing.T) {
		w := newWorld(t)
		output := w.write("omnicore-output.conf", with(nil, `gateway_idd = "x"`))
		w.start(agent + w.generatorInput(GenSpec{Lines: []string{"m,device_id=dev-01 v=1i"}}) + outputBlock(output))
		w.waitFor(30*time.Second, "the child's exit", func() bool {
			return strings.Contains(w.tg.Log(), "exited: exit status 1")
		})
		var errLine string
		for _, l := range strings.Split(w.tg.Log(), "\n") {
			if strings.Contains(l, "stderr: E! ") && strings.Contains(l, "gateway_idd") {
				errLine = l
			}
		}
		require.NotEmpty(t, errLine)
		t.Logf("in Telegraf's log: %s", errLine)
		wiretap.RequireNoKeyMaterial(t, w.tg.Log(), keys...)
	})
}
