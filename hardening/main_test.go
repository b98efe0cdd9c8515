package hardening

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/latencyproxy"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/statecheck"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// soak runs the long variants: more metrics, longer and more faults.
var soak = flag.Bool("soak", os.Getenv("OMNICORE_SOAK") == "1", "run the long soak variants of the fault scenarios (also OMNICORE_SOAK=1)")

// Built once per test run by TestMain (empty under -short).
var (
	telegrafBin string
	pluginBin   string
	// selfBin is this test binary: Telegraf runs it as the generator.
	selfBin string
)

func TestMain(m *testing.M) {
	if spec := os.Getenv(EnvGenerator); spec != "" {
		if err := RunGenerator(spec, os.Stdin, os.Stdout); err != nil {
			fmt.Fprintf(os.Stderr, "E! generator: %v\n", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	flag.Parse()
	os.Exit(statecheck.Run(func() int {
		if testing.Short() {
			return m.Run()
		}
		return buildAndRun(m)
	}))
}

func buildAndRun(m *testing.M) int {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	var err error
	if selfBin, err = os.Executable(); err != nil {
		fmt.Fprintf(os.Stderr, "hardening: %v\n", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "telegraf-omnicore-hardening-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "hardening: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Other users must be able to run it (the unreadable key test runs it
	// as nobody when the tests run as root).
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "hardening: %v\n", err)
		return 1
	}
	if telegrafBin, pluginBin, err = e2e.BuildBinaries(ctx, dir, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "hardening: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "hardening: Telegraf %s and telegraf-omnicore ready in %s\n", e2e.TelegrafVersion, time.Since(start).Round(time.Second))
	return m.Run()
}

// world is one test's setup: an emulator whose accepted messages are
// tallied, a work directory, and the environment of the Telegraf process.
type world struct {
	t     *testing.T
	srv   *emulator.Server
	tally *Tally
	dir   string
	env   []string
	tg    *e2e.Telegraf
	// state is the STATE_DIRECTORY of Telegraf's children.
	state string
	// proxy is a slow link between the output and the emulator, when set.
	proxy *latencyproxy.Proxy
}

func newWorld(t *testing.T, opts ...emulator.Option) *world {
	t.Helper()
	if testing.Short() {
		t.Skip("runs a real Telegraf")
	}
	w := &world{t: t, tally: NewTally(), dir: t.TempDir()}
	w.srv = emulator.NewServer(append([]emulator.Option{emulator.WithOnReceive(w.tally.OnReceive)}, opts...)...)
	t.Cleanup(w.srv.Close)
	// A short private rendezvous directory for the connection sharing (Unix
	// socket paths are limited to about 100 bytes).
	rt, err := os.MkdirTemp("", "och")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(rt) })
	// The state directory (the output's spool) is the test's own.
	w.state = filepath.Join(w.dir, "state")
	require.NoError(t, os.Mkdir(w.state, 0o700))
	w.env = []string{"TELEGRAF_OMNICORE_RUNTIME_DIR=" + rt, "STATE_DIRECTORY=" + w.state}
	return w
}

func (w *world) write(name, content string) string {
	w.t.Helper()
	path := filepath.Join(w.dir, name)
	require.NoError(w.t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

// gateway registers gateway edge-gw of registry plant with the devices bound
// to it and returns its identity for plugin files (plain TCP).
func (w *world) gateway(devices ...string) e2e.Gateway {
	w.t.Helper()
	key := w.srv.AddTestGateway(w.t, "plant", "edge-gw", omnicore.ES256, devices...)
	return e2e.Gateway{
		Servers:      []string{w.srv.URL},
		Subscription: w.srv.Subscription(),
		Registry:     "plant",
		ID:           "edge-gw",
		PrivateKey:   key,
		Algorithm:    omnicore.ES256,
	}
}

// agent is the [agent] table: Telegraf flushes every 100 ms in batches of
// 1000 and buffers up to 100,000 metrics per output, far more than any
// scenario generates, so Telegraf itself never drops.
const agent = `[agent]
  interval = "1s"
  flush_interval = "100ms"
  metric_batch_size = 1000
  metric_buffer_limit = 100000
  omit_hostname = true
  debug = true
`

// generatorInput is the [[inputs.execd]] block that runs this test binary as
// the generator of spec.
func (w *world) generatorInput(spec GenSpec) string {
	w.t.Helper()
	path := filepath.Join(w.dir, fmt.Sprintf("generator-%d.json", time.Now().UnixNano()))
	require.NoError(w.t, WriteGenSpec(path, spec))
	return fmt.Sprintf(`[[inputs.execd]]
  alias = "generator"
  command = [%s]
  environment = [%s]
  signal = "none"
  restart_delay = "1s"
  data_format = "influx"
`, e2e.Quote(selfBin), e2e.Quote(EnvGenerator+"="+path))
}

// outputBlock is the [[outputs.execd]] block running the output with the
// plugin file at path, logging at debug level (the drop counts are read from
// its debug lines) and writing partial batches after 100 ms.
func outputBlock(path string, args ...string) string {
	return e2e.ExecdOutput(pluginBin, path, append([]string{"-batch_timeout", "100ms", "-log_level", "debug"}, args...)...)
}

// start runs Telegraf with config; it is killed at the end of the test and
// its log printed when the test failed.
func (w *world) start(config string) *e2e.Telegraf {
	w.t.Helper()
	path := w.write("telegraf.conf", config)
	tg, err := e2e.StartTelegraf(telegrafBin, path, w.env, nil)
	require.NoError(w.t, err)
	w.tg = tg
	w.t.Cleanup(func() {
		tg.Kill()
		if w.t.Failed() {
			w.t.Logf("Telegraf log (without buffer and batch lines):\n%s", tail(quiet(tg.Log()), 300))
		}
	})
	return tg
}

// stop stops Telegraf gracefully: execd closes the children's stdin, the
// output writes what it holds and exits.
func (w *world) stop() {
	w.t.Helper()
	elapsed, err := w.tg.Stop(20 * time.Second)
	require.NoError(w.t, err, "Telegraf stopped in %s", elapsed)
}

// waitFor waits, up to d, for cond, re-checking it every 20 ms; it fails
// at once when Telegraf exits.
func (w *world) waitFor(d time.Duration, what string, cond func() bool) {
	w.t.Helper()
	var exited <-chan struct{}
	if w.tg != nil {
		exited = w.tg.Done()
	}
	waitUntil(w.t, d, what, exited, cond)
}

// waitUntil waits, up to d, for cond, re-checking it every 20 ms; it fails
// when exited (may be nil) is closed first.
func waitUntil(t *testing.T, d time.Duration, what string, exited <-chan struct{}, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			require.FailNowf(t, "timeout", "%s did not happen within %s", what, d)
		}
		select {
		case <-tick.C:
		case <-exited:
			require.FailNowf(t, "Telegraf exited", "waiting for %s", what)
		}
	}
}

// waitEmulator waits, up to d, for cond on the emulator's state.
func (w *world) waitEmulator(d time.Duration, what string, cond func() bool) {
	w.t.Helper()
	waitEmulator(w.t, w.srv, d, what, cond)
}

func waitEmulator(t *testing.T, srv *emulator.Server, d time.Duration, what string, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := srv.WaitFor(ctx, cond); err != nil {
		require.FailNowf(t, "timeout", "%s did not happen within %s", what, d)
	}
}

// outputChild is the process ID of the telegraf-omnicore output child of
// Telegraf (0 when there is none).
func (w *world) outputChild() int {
	for _, pid := range w.tg.Children() {
		cmd := e2e.CommandLine(pid)
		if strings.Contains(cmd, filepath.Base(pluginBin)) && strings.Contains(cmd, "output") {
			return pid
		}
	}
	return 0
}

// connectionsClosed counts the gateway's closed connections by reason.
func (w *world) connectionsClosed() map[string]int {
	out := map[string]int{}
	id := w.srv.ClientID("plant", "edge-gw")
	for _, c := range w.srv.Connections() {
		if c.ClientID == id && !c.Disconnected.IsZero() {
			out[c.Reason]++
		}
	}
	return out
}

// openConnection is the ID of the gateway's open connection (0: none).
func (w *world) openConnection() int {
	id := w.srv.ClientID("plant", "edge-gw")
	for _, c := range w.srv.Connections() {
		if c.ClientID == id && c.Open() {
			return c.ID
		}
	}
	return 0
}

func deviceNames(prefix string, n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s-%02d", prefix, i+1)
	}
	return names
}

// quiet drops Telegraf's per-flush debug lines from a log.
func quiet(log string) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if !strings.Contains(l, "Buffer fullness") && !strings.Contains(l, "Wrote batch") && !strings.Contains(l, "] Write of ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func tail(s string, lines int) string {
	l := strings.Split(s, "\n")
	if len(l) > lines {
		l = l[len(l)-lines:]
	}
	return strings.Join(l, "\n")
}
