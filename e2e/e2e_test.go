package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/parsers/influx"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/statecheck"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Built once per test run by TestMain (empty under -short).
var (
	telegrafBin string
	builtinBin  string // Telegraf with the plugins compiled in
	pluginBin   string
)

func TestMain(m *testing.M) {
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
	dir, err := os.MkdirTemp("", "telegraf-omnicore-e2e-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)
	telegrafBin, pluginBin, err = BuildBinaries(ctx, dir, os.Stderr)
	if err == nil {
		builtinBin, err = BuildTelegrafBuiltin(ctx, os.Stderr)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		return 1
	}
	fmt.Fprintf(os.Stderr, "e2e: Telegraf %s (stock and built-in) and telegraf-omnicore ready in %s\n", TelegrafVersion, time.Since(start).Round(time.Second))
	return m.Run()
}

// setup is one test's world: an emulator, a work directory, and the
// environment the Telegraf processes get.
type setup struct {
	t   *testing.T
	srv *emulator.Server
	dir string
	env []string
	// runtimeDir is the rendezvous directory of the connection sharing.
	runtimeDir string
}

func newSetup(t *testing.T, opts ...emulator.Option) *setup {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end test: runs a real Telegraf")
	}
	srv := emulator.NewServer(opts...)
	t.Cleanup(srv.Close)
	// A short private rendezvous directory for the connection sharing
	// (Unix socket paths are limited to about 100 bytes).
	rt, err := os.MkdirTemp("", "oc")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(rt) })
	dir := t.TempDir()
	// The output's spool goes in the test's own state directory.
	state := filepath.Join(dir, "state")
	require.NoError(t, os.Mkdir(state, 0o700))
	return &setup{
		t:          t,
		srv:        srv,
		dir:        dir,
		env:        []string{"TELEGRAF_OMNICORE_RUNTIME_DIR=" + rt, "STATE_DIRECTORY=" + state},
		runtimeDir: rt,
	}
}

func (s *setup) write(name, content string) string {
	s.t.Helper()
	path := filepath.Join(s.dir, name)
	require.NoError(s.t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

// start runs the stock Telegraf with the given config; the process is
// killed at the end of the test and its log printed when the test failed.
func (s *setup) start(config string) *Telegraf {
	s.t.Helper()
	return s.startBin(telegrafBin, config)
}

// startBin is start with the Telegraf binary bin.
func (s *setup) startBin(bin, config string) *Telegraf {
	s.t.Helper()
	path := s.write("telegraf.conf", config)
	tg, err := StartTelegraf(bin, path, s.env, nil)
	require.NoError(s.t, err)
	s.t.Cleanup(func() {
		tg.Kill()
		if s.t.Failed() {
			s.t.Logf("Telegraf log:\n%s", tg.Log())
		}
	})
	return tg
}

// waitEmulator waits, up to d, for cond on the emulator's state.
func (s *setup) waitEmulator(d time.Duration, what string, cond func() bool) {
	s.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if err := s.srv.WaitFor(ctx, cond); err != nil {
		require.FailNowf(s.t, "timeout", "%s did not happen within %s", what, d)
	}
}

// waitFile waits, up to d, until the metrics in path satisfy cond; it
// returns them.
func (s *setup) waitFile(d time.Duration, path, what string, cond func([]telegraf.Metric) bool) []telegraf.Metric {
	s.t.Helper()
	deadline := time.Now().Add(d)
	for {
		metrics := readMetrics(s.t, path)
		if cond(metrics) {
			return metrics
		}
		if time.Now().After(deadline) {
			require.FailNowf(s.t, "timeout", "%s did not happen within %s; %s holds %d metrics", what, d, filepath.Base(path), len(metrics))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// readMetrics parses the line protocol file path (missing: no metrics). A
// last line still being written is ignored.
func readMetrics(t *testing.T, path string) []telegraf.Metric {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	if i := strings.LastIndexByte(string(b), '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		return nil
	}
	return parseLines(t, b)
}

func parseLines(t *testing.T, b []byte) []telegraf.Metric {
	t.Helper()
	p := &influx.Parser{}
	require.NoError(t, p.Init())
	metrics, err := p.Parse(b)
	require.NoError(t, err, "%s", b)
	return metrics
}

// gatewayFor registers a gateway with devices bound to it and returns its
// identity for plugin files (plain TCP).
func (s *setup) gatewayFor(registry, id string, devices ...string) Gateway {
	s.t.Helper()
	key := s.srv.AddTestGateway(s.t, registry, id, omnicore.ES256, devices...)
	return Gateway{
		Servers:      []string{s.srv.URL},
		Subscription: s.srv.Subscription(),
		Registry:     registry,
		ID:           id,
		PrivateKey:   key,
		Algorithm:    omnicore.ES256,
	}
}

// telemetryFile writes an inputs.file source: one line per device, without
// timestamps (Telegraf stamps each gather).
func (s *setup) telemetryFile(devices []string) string {
	var b strings.Builder
	for i, d := range devices {
		fmt.Fprintf(&b, "telemetry,device_id=%s value=%di\n", d, i+1)
	}
	return s.write("telemetry.lp", b.String())
}

func fileInput(path string) string {
	return fmt.Sprintf("[[inputs.file]]\n  files = [%s]\n  data_format = \"influx\"\n", Quote(path))
}

func fileOutput(path string, namepass ...string) string {
	quoted := make([]string, len(namepass))
	for i, n := range namepass {
		quoted[i] = Quote(n)
	}
	return fmt.Sprintf("[[outputs.file]]\n  files = [%s]\n  data_format = \"influx\"\n  namepass = [%s]\n",
		Quote(path), strings.Join(quoted, ", "))
}

func deviceNames(prefix string, n int) []string {
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("%s-%02d", prefix, i+1)
	}
	return names
}

// connections are the emulator's connection records of one client ID.
func connections(srv *emulator.Server, clientID string) []emulator.ConnectionRecord {
	var recs []emulator.ConnectionRecord
	for _, c := range srv.Connections() {
		if c.ClientID == clientID {
			recs = append(recs, c)
		}
	}
	return recs
}

// perDevice counts the accepted telemetry messages per device.
func perDevice(msgs []emulator.Message) map[string]int {
	n := make(map[string]int)
	for _, m := range msgs {
		n[m.Device]++
	}
	return n
}

var (
	timestamped = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ([EWIDT])! (.*)$`)
	// outputs.execd logs every stderr line of its child as an error:
	// `E! [outputs.execd::omnicore] stderr: W! [outputs.omnicore] ...`.
	execdStderr = regexp.MustCompile(`stderr: "?([EWIDT])! `)
	// Telegraf's own race: exec.Cmd.Wait closes the stdout and stderr pipes
	// of an execd child that just exited while its readers still read, e.g.
	//   E! [inputs.execd] Error in plugin: error reading stderr: read |0: file already closed
	//   E! [outputs.execd] Error reading stderr: read |0: file already closed
	execdPipeRace = regexp.MustCompile(`^\[(inputs|outputs)\.execd[^]]*\] .*read \|\d+: file already closed$`)
)

// errorLines are Telegraf's log lines at error level, counting a child's
// line wrapped by outputs.execd at the child's own level.
func errorLines(log string) []string {
	var errs []string
	for _, l := range strings.Split(log, "\n") {
		m := timestamped.FindStringSubmatch(l)
		if m == nil || m[1] != "E" {
			continue
		}
		if w := execdStderr.FindStringSubmatch(m[2]); w != nil && w[1] != "E" {
			continue
		}
		if execdPipeRace.MatchString(m[2]) {
			continue
		}
		errs = append(errs, l)
	}
	return errs
}

// Telemetry of 50 devices goes through exactly one bridge connection, the
// gateway's, from a real Telegraf, on both routes.
func TestTelemetryOf50DevicesThroughOneConnection(t *testing.T) {
	for _, r := range routes {
		t.Run(r.name, func(t *testing.T) { testTelemetryOf50Devices(t, r) })
	}
}

func testTelemetryOf50Devices(t *testing.T, r route) {
	s := newSetup(t)
	devices := deviceNames("meter", 50)
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	tg := s.startBin(r.bin(), Agent(500*time.Millisecond, 100*time.Millisecond)+
		fileInput(s.telemetryFile(devices))+
		s.output(r, gw))

	s.waitEmulator(90*time.Second, "two messages from each of the 50 devices", func() bool {
		counts := perDevice(s.srv.Received())
		for _, d := range devices {
			if counts[d] < 2 {
				return false
			}
		}
		return true
	})
	// Attachments live as long as the connection.
	require.ElementsMatch(t, devices, s.srv.Attachments("plant", "edge-gw"))
	elapsed, err := tg.Stop(10 * time.Second)
	require.NoError(t, err, "Telegraf stopped in %s", elapsed)

	clientID := s.srv.ClientID("plant", "edge-gw")
	recs := connections(s.srv, clientID)
	require.Len(t, recs, 1, "connections: %+v", recs)
	require.False(t, recs[0].Refused)
	for _, c := range s.srv.Connections() {
		require.Equal(t, clientID, c.ClientID, "an unexpected connection: %+v", c)
	}

	for _, m := range s.srv.Received() {
		require.Equal(t, clientID, m.ClientID)
		require.Equal(t, omnicore.KindEvents, m.Kind)
		require.Equal(t, "/plant/"+m.Device+"/events", m.Topic)
		metrics := parseLines(t, m.Payload)
		require.Len(t, metrics, 1)
		require.Equal(t, "telemetry", metrics[0].Name())
		// The routing tag is not part of the payload.
		require.False(t, metrics[0].HasTag("device_id"))
		i := slices.Index(devices, m.Device)
		require.GreaterOrEqual(t, i, 0, "device %q", m.Device)
		require.Equal(t, map[string]any{"value": int64(i + 1)}, metrics[0].Fields())
	}
	require.Empty(t, errorLines(tg.Log()))
}

// The output and the input of one gateway share one bridge connection (two
// execd processes through the sharing socket, or one Telegraf process);
// config, commands and bridge errors come out of Telegraf as metrics, next
// to the gateway statistics.
func TestInputAndOutputOnOneGateway(t *testing.T) {
	for _, r := range routes {
		t.Run(r.name, func(t *testing.T) { testInputAndOutputOnOneGateway(t, r) })
	}
}

func testInputAndOutputOnOneGateway(t *testing.T, r route) {
	s := newSetup(t)
	devices := deviceNames("sensor", 3)
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	// A registered device that is not bound to the gateway: its telemetry
	// draws a GATEWAY_ATTACHMENT_ERROR on the errors topic.
	require.NoError(t, s.srv.AddDevice("plant", emulator.Device{ID: "stranger"}))

	received := filepath.Join(s.dir, "received.lp")
	tg := s.startBin(r.bin(), Agent(500*time.Millisecond, 100*time.Millisecond)+
		fileInput(s.telemetryFile(append(slices.Clone(devices), "stranger")))+
		s.output(r, gw)+
		s.input(r, gw, devices)+
		fileOutput(received, "omnicore_*", r.stats()))

	s.waitEmulator(60*time.Second, "telemetry of the bound devices and the input's subscriptions", func() bool {
		counts := perDevice(s.srv.Received())
		for _, d := range devices {
			if counts[d] == 0 || !s.srv.Subscribed("plant", d, omnicore.KindCommands) {
				return false
			}
		}
		return true
	})
	_, err := s.srv.SetConfig("plant", "sensor-01", []byte(`{"sample_rate":5}`))
	require.NoError(t, err)
	require.NoError(t, s.srv.SendCommand("plant", "sensor-02", "reboot", []byte("now")))

	// find returns the first metric named name with the tags and, when
	// payload is not empty, that payload.
	find := func(metrics []telegraf.Metric, name string, tags map[string]string, payload string) telegraf.Metric {
		for _, m := range metrics {
			if m.Name() != name {
				continue
			}
			match := true
			for k, v := range tags {
				if got, _ := m.GetTag(k); got != v {
					match = false
				}
			}
			if p, _ := m.GetField("payload"); payload != "" && p != payload {
				match = false
			}
			if match {
				return m
			}
		}
		return nil
	}
	const config = `{"sample_rate":5}`
	metrics := s.waitFile(60*time.Second, received, "config, command, error and statistics metrics", func(ms []telegraf.Metric) bool {
		return find(ms, "omnicore_config", map[string]string{"device_id": "sensor-01"}, config) != nil &&
			find(ms, "omnicore_command", map[string]string{"device_id": "sensor-02"}, "now") != nil &&
			find(ms, "omnicore_error", map[string]string{"device_id": "stranger"}, "") != nil &&
			slices.ContainsFunc(ms, func(m telegraf.Metric) bool {
				return m.Name() == r.stats() && m.HasField("errors_gateway_attachment_error")
			})
	})

	// Each device's current config (empty) came at subscribe, then the new one.
	cfg := find(metrics, "omnicore_config", map[string]string{"device_id": "sensor-01"}, config)
	require.Equal(t, map[string]string{"device_id": "sensor-01", "gateway_id": "edge-gw", "registry_id": "plant", "kind": "config"}, cfg.Tags())
	require.Equal(t, map[string]any{"payload": config}, cfg.Fields())

	cmd := find(metrics, "omnicore_command", map[string]string{"device_id": "sensor-02"}, "now")
	require.Equal(t, map[string]string{"device_id": "sensor-02", "gateway_id": "edge-gw", "registry_id": "plant", "kind": "command", "subfolder": "reboot"}, cmd.Tags())
	require.Equal(t, map[string]any{"payload": "now"}, cmd.Fields())

	bridgeErr := find(metrics, "omnicore_error", map[string]string{"device_id": "stranger"}, "")
	require.Equal(t, "GATEWAY_ATTACHMENT_ERROR", bridgeErr.Tags()["error_type"])
	require.Contains(t, bridgeErr.Fields(), "description")

	var stats telegraf.Metric
	for _, m := range metrics {
		if m.Name() == r.stats() {
			stats = m
		}
	}
	require.NotNil(t, stats, "the gateway's statistics series")
	require.Equal(t, map[string]string{"gateway_id": "edge-gw", "registry_id": "plant"}, stats.Tags())
	require.Contains(t, stats.Fields(), "acked")
	require.Contains(t, stats.Fields(), "errors_gateway_attachment_error", "bridge errors by type, as fields")

	// Nothing the input emits is sent back to the bridge: the execd
	// output's namedrop keeps omnicore_* away from it.
	for _, m := range s.srv.Received() {
		require.NotContains(t, string(m.Payload), "omnicore_")
	}

	// One connection for both processes.
	recs := connections(s.srv, s.srv.ClientID("plant", "edge-gw"))
	require.Len(t, recs, 1, "connections: %+v", recs)
	require.True(t, recs[0].Open())
	require.Len(t, s.srv.Connections(), 1)

	elapsed, err := tg.Stop(10 * time.Second)
	require.NoError(t, err, "Telegraf stopped in %s", elapsed)
	// While Telegraf stops, the process that stops last may take the
	// connection over to flush, but two connections never overlap (the
	// bridge would kick one).
	requireNoOverlap(t, connections(s.srv, s.srv.ClientID("plant", "edge-gw")), nil)
	if r.builtin {
		// In one process the plugins share the session in memory: no
		// sharing socket or lock file is ever made.
		entries, err := os.ReadDir(s.runtimeDir)
		require.NoError(t, err)
		require.Empty(t, entries, "files in the sharing rendezvous directory")
	}
}

// requireNoOverlap checks that no two connections of live processes were
// open at once. Connections in killed belonged to a process already SIGKILLed
// when the next one opened: the bridge may notice such a dead socket only when
// the successor's CONNECT kicks it, which is no double connection.
func requireNoOverlap(t *testing.T, recs []emulator.ConnectionRecord, killed map[int]bool) {
	t.Helper()
	for i := 1; i < len(recs); i++ {
		prev := recs[i-1]
		if killed[prev.ID] && (prev.Reason == emulator.ReasonTakenOver || prev.Reason == emulator.ReasonConnectionLost) {
			continue
		}
		require.False(t, prev.Disconnected.IsZero(), "connection %d still open when %d opened", prev.ID, recs[i].ID)
		require.False(t, recs[i].Connected.Before(prev.Disconnected), "connections %d and %d overlap: %+v", prev.ID, recs[i].ID, recs)
	}
}

// TLS with the emulator's CA works; with another CA the connection fails
// with an error line in Telegraf's log that names the certificate problem.
func TestTLS(t *testing.T) {
	tests := []struct {
		name    string
		rightCA bool
	}{
		{name: "right CA", rightCA: true},
		{name: "wrong CA"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSetup(t)
			devices := deviceNames("sensor", 2)
			gw := s.gatewayFor("plant", "edge-gw", devices...)
			gw.Servers = []string{s.srv.TLSURL}
			if tt.rightCA {
				ca, err := s.srv.WriteCAFile(s.dir)
				require.NoError(t, err)
				gw.TLSCA = ca
			} else {
				other, _, err := emulator.GenerateCA()
				require.NoError(t, err)
				gw.TLSCA = s.write("other-ca.pem", string(other))
			}
			output := s.write("omnicore-output.conf", gw.OutputFile())
			input := s.write("omnicore-input.conf", gw.InputFile(devices))
			tg := s.start(Agent(500*time.Millisecond, 100*time.Millisecond) +
				fileInput(s.telemetryFile(devices)) +
				ExecdOutput(pluginBin, output, "-batch_timeout", "100ms") +
				ExecdInput(pluginBin, input))

			if tt.rightCA {
				s.waitEmulator(60*time.Second, "telemetry over TLS", func() bool {
					counts := perDevice(s.srv.Received())
					return counts["sensor-01"] > 0 && counts["sensor-02"] > 0
				})
				recs := connections(s.srv, s.srv.ClientID("plant", "edge-gw"))
				require.Len(t, recs, 1)
				require.Equal(t, "tls", recs[0].Listener)
				_, err := tg.Stop(10 * time.Second)
				require.NoError(t, err)
				require.Empty(t, errorLines(tg.Log()))
				return
			}

			deadline := time.Now().Add(60 * time.Second)
			var tlsErrors []string
			for len(tlsErrors) == 0 {
				require.True(t, time.Now().Before(deadline), "no error line about the certificate within 60s")
				for _, l := range errorLines(tg.Log()) {
					if strings.Contains(l, "x509: certificate signed by unknown authority") {
						tlsErrors = append(tlsErrors, l)
					}
				}
				time.Sleep(50 * time.Millisecond)
			}
			t.Logf("the error users see: %s", tlsErrors[0])
			require.Contains(t, tlsErrors[0], "set tls_ca to the CA file of the bridge")
			require.Empty(t, s.srv.Received())
			for _, c := range s.srv.Connections() {
				require.False(t, c.Open(), "a connection got through: %+v", c)
			}
		})
	}
}

// Stopping Telegraf closes the stdin of the execd children; the output
// writes its last partial batch (here every metric: the batch timeout is an
// hour) and both exit, so Telegraf stops well within execd's 5 s grace
// period, and every metric Telegraf handed to the output reached the bridge.
func TestShutdownFlushesWithinFiveSeconds(t *testing.T) {
	s := newSetup(t)
	devices := deviceNames("sensor", 5)
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	output := s.write("omnicore-output.conf", gw.OutputFile())
	input := s.write("omnicore-input.conf", gw.InputFile(devices))
	record := filepath.Join(s.dir, "telemetry-record.lp")
	tg := s.start(Agent(200*time.Millisecond, 100*time.Millisecond) +
		fileInput(s.telemetryFile(devices)) +
		ExecdOutput(pluginBin, output, "-batch_timeout", "1h") +
		ExecdInput(pluginBin, input) +
		fileOutput(record, "telemetry"))

	// The input's subscriptions show the gateway is up; then let Telegraf
	// hand over a few gathers, which the output holds in its batch.
	s.waitEmulator(60*time.Second, "the input's subscriptions", func() bool {
		for _, d := range devices {
			if !s.srv.Subscribed("plant", d, omnicore.KindConfig) {
				return false
			}
		}
		return true
	})
	s.waitFile(30*time.Second, record, "three gathers", func(ms []telegraf.Metric) bool { return len(ms) >= 15 })
	require.Empty(t, s.srv.Received(), "the output wrote before its batch was full or stdin closed")

	elapsed, err := tg.Stop(15 * time.Second)
	require.NoError(t, err)
	t.Logf("Telegraf stopped in %s", elapsed)
	require.Less(t, elapsed, 5*time.Second, "execd had to signal a child that did not exit on stdin EOF")
	require.NotContains(t, tg.Log(), "not acknowledged")

	// Every metric Telegraf flushed reached the bridge, once.
	want := readMetrics(t, record)
	var got []telegraf.Metric
	for _, m := range s.srv.Received() {
		for _, pm := range parseLines(t, m.Payload) {
			pm.AddTag("device_id", m.Device)
			got = append(got, pm)
		}
	}
	require.ElementsMatch(t, lineSet(want), lineSet(got))
	require.Empty(t, errorLines(tg.Log()))
}

// lineSet renders metrics as comparable strings.
func lineSet(metrics []telegraf.Metric) []string {
	out := make([]string, 0, len(metrics))
	for _, m := range metrics {
		tags := m.Tags()
		keys := make([]string, 0, len(tags))
		for k := range tags {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		var b strings.Builder
		b.WriteString(m.Name())
		for _, k := range keys {
			b.WriteString("," + k + "=" + tags[k])
		}
		fmt.Fprintf(&b, " %v %d", m.Fields(), m.Time().UnixNano())
		out = append(out, b.String())
	}
	return out
}

// SIGTERM to the output child (what execd sends 5 s after closing stdin,
// and what a process-group Ctrl-C sends) makes it write its partial batch,
// close and exit within 5 s; execd restarts it and telemetry goes on.
func TestOutputChildSIGTERM(t *testing.T) {
	s := newSetup(t)
	devices := deviceNames("sensor", 3)
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	output := s.write("omnicore-output.conf", gw.OutputFile())
	tg := s.start(Agent(200*time.Millisecond, 100*time.Millisecond) +
		fileInput(s.telemetryFile(devices)) +
		ExecdOutput(pluginBin, output, "-batch_timeout", "1h", "-batch_size", "6", "-log_level", "info"))

	s.waitEmulator(60*time.Second, "telemetry", func() bool { return len(s.srv.Received()) >= 6 })
	child := 0
	for _, pid := range tg.Children() {
		if strings.Contains(CommandLine(pid), "telegraf-omnicore") {
			child = pid
		}
	}
	require.NotZero(t, child, "no telegraf-omnicore child of Telegraf")
	before := len(connections(s.srv, s.srv.ClientID("plant", "edge-gw")))

	start := time.Now()
	require.NoError(t, syscallKill(child))
	deadline := start.Add(10 * time.Second)
	for Alive(child) {
		require.True(t, time.Now().Before(deadline), "the child did not exit within 10s of SIGTERM")
		time.Sleep(10 * time.Millisecond)
	}
	elapsed := time.Since(start)
	t.Logf("the output child exited %s after SIGTERM", elapsed)
	require.Less(t, elapsed, 5*time.Second)
	// The child waits for Telegraf to read its last lines before it exits,
	// but Telegraf logs them from its own goroutine: wait for the line.
	require.Eventually(t, func() bool { return strings.Contains(tg.Log(), "Stopped outputs.omnicore") }, 30*time.Second, 10*time.Millisecond,
		"the child's last line in Telegraf's log")

	// execd restarts the child, which connects again; telemetry goes on.
	n := len(s.srv.Received())
	s.waitEmulator(60*time.Second, "telemetry after the restart", func() bool {
		return len(s.srv.Received()) >= n+6 && len(connections(s.srv, s.srv.ClientID("plant", "edge-gw"))) > before
	})
	_, err := tg.Stop(10 * time.Second)
	require.NoError(t, err)
}

func syscallKill(pid int) error { return syscall.Kill(pid, syscall.SIGTERM) }

// The execd child that owns the shared connection is killed (SIGKILL: no
// goodbye); the other child takes the connection over, and telemetry,
// config and commands keep flowing. Then the new owner is killed too.
func TestOwnerKilledOtherTakesOver(t *testing.T) {
	s := newSetup(t)
	devices := deviceNames("sensor", 3)
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	output := s.write("omnicore-output.conf", gw.OutputFile())
	input := s.write("omnicore-input.conf", gw.InputFile(devices))
	received := filepath.Join(s.dir, "received.lp")
	// A killed child comes back only after 3 s, so the survivor is the one
	// that takes over.
	slow := func(block string) string {
		return strings.Replace(block, `restart_delay = "1s"`, `restart_delay = "3s"`, 1)
	}
	tg := s.start(Agent(200*time.Millisecond, 100*time.Millisecond) +
		fileInput(s.telemetryFile(devices)) +
		slow(ExecdOutput(pluginBin, output, "-batch_timeout", "100ms")) +
		slow(ExecdInput(pluginBin, input)) +
		fileOutput(received, "omnicore_*"))
	clientID := s.srv.ClientID("plant", "edge-gw")

	// up waits until telemetry flows and the input listens, on the current
	// connection.
	up := func(what string) {
		t.Helper()
		n := len(s.srv.Received())
		s.waitEmulator(60*time.Second, what, func() bool {
			if len(s.srv.Received()) < n+len(devices) {
				return false
			}
			for _, d := range devices {
				if !s.srv.Subscribed("plant", d, omnicore.KindCommands) {
					return false
				}
			}
			return true
		})
	}
	// command sends a command and waits for it to come out of Telegraf.
	command := func(payload string) {
		t.Helper()
		require.NoError(t, s.srv.SendCommand("plant", "sensor-01", "", []byte(payload)))
		s.waitFile(60*time.Second, received, "command "+payload, func(ms []telegraf.Metric) bool {
			for _, m := range ms {
				if p, _ := m.GetField("payload"); m.Name() == "omnicore_command" && p == payload {
					return true
				}
			}
			return false
		})
	}
	owner := func() int {
		t.Helper()
		var pid int
		waitFor := time.Now().Add(30 * time.Second)
		for {
			if p, ok := ShareOwner(s.runtimeDir); ok && Alive(p) && slices.Contains(tg.Children(), p) {
				pid = p
				break
			}
			if time.Now().After(waitFor) {
				locks, _ := filepath.Glob(filepath.Join(s.runtimeDir, "*"))
				procLocks, _ := os.ReadFile("/proc/locks")
				require.FailNowf(t, "no owner", "no child of Telegraf owns the connection: children %v, files %v, /proc/locks:\n%s", tg.Children(), locks, procLocks)
			}
			time.Sleep(10 * time.Millisecond)
		}
		return pid
	}

	up("telemetry and subscriptions")
	command("before")

	killed := map[int]bool{}
	for round := 1; round <= 2; round++ {
		first := owner()
		children := tg.Children()
		require.Len(t, children, 2, "execd children: %v", children)
		survivor := children[0]
		if survivor == first {
			survivor = children[1]
		}
		t.Logf("round %d: killing the owner %d (%s); %d should take over", round, first, CommandLine(first), survivor)
		before := connections(s.srv, clientID)
		conns := len(before)
		require.True(t, before[conns-1].Open(), "the owner's connection is open before the kill")
		killed[before[conns-1].ID] = true
		require.NoError(t, syscall.Kill(first, syscall.SIGKILL))

		s.waitEmulator(30*time.Second, "a new connection", func() bool {
			recs := connections(s.srv, clientID)
			return len(recs) > conns && recs[len(recs)-1].Open()
		})
		require.Equal(t, survivor, owner(), "the surviving child did not take over")
		up(fmt.Sprintf("telemetry and subscriptions after takeover %d", round))
		command(fmt.Sprintf("after-%d", round))
		// Let the killed child come back (it joins the new owner) before
		// the next round.
		waitChildren := time.Now().Add(30 * time.Second)
		for len(tg.Children()) < 2 {
			require.True(t, time.Now().Before(waitChildren), "execd did not restart the killed child")
			time.Sleep(20 * time.Millisecond)
		}
	}

	requireNoOverlap(t, connections(s.srv, clientID), killed)
	_, err := tg.Stop(10 * time.Second)
	require.NoError(t, err)
}

// The root sample.conf works as documented: its execd blocks and the two
// plugin files it shows, with only the paths and identities filled in, run
// in a real Telegraf against the emulator over TLS.
func TestRootSampleConf(t *testing.T) {
	s := newSetup(t)
	root, err := RepoRoot()
	require.NoError(t, err)
	sample, err := os.ReadFile(filepath.Join(root, "sample.conf"))
	require.NoError(t, err)

	devices := []string{"sensor-01", "sensor-02"}
	key := s.srv.AddTestGateway(t, "my-registry", "my-gateway", omnicore.RS256, devices...)
	ca, err := s.srv.WriteCAFile(s.dir)
	require.NoError(t, err)
	plugins := pluginFiles(t, string(sample))
	require.Len(t, plugins, 2, "the plugin files of sample.conf")
	fill := strings.NewReplacer(
		"tls://<hostprefix>.mqtt.korewireless.com:8883", s.srv.TLSURL,
		`"my-subscription"`, Quote(s.srv.Subscription()),
		"/etc/telegraf/omnicore/gateway.key", key,
		"/etc/telegraf/omnicore/roots.pem", ca,
	)
	paths := map[string]string{}
	for path, content := range plugins {
		paths[path] = s.write(filepath.Base(path), fill.Replace(content))
	}
	outputConf, inputConf := paths["/etc/telegraf/omnicore/output.conf"], paths["/etc/telegraf/omnicore/input.conf"]
	require.NotEmpty(t, outputConf)
	require.NotEmpty(t, inputConf)

	wiring := strings.NewReplacer(
		"/usr/bin/telegraf-omnicore", pluginBin,
		"/etc/telegraf/omnicore/output.conf", outputConf,
		"/etc/telegraf/omnicore/input.conf", inputConf,
	).Replace(string(sample))
	tg := s.runShippedWiring(wiring, devices)
	recs := connections(s.srv, s.srv.ClientID("my-registry", "my-gateway"))
	require.Len(t, recs, 1)
	require.Equal(t, "tls", recs[0].Listener)
	_, err = tg.Stop(10 * time.Second)
	require.NoError(t, err)
	require.Empty(t, errorLines(tg.Log()))
}

// pluginFiles extracts the commented plugin files of the root sample.conf:
// a "# Plugin file PATH ..." header, a rule, then "# "-prefixed lines up to
// the next blank line.
func pluginFiles(t *testing.T, sample string) map[string]string {
	t.Helper()
	header := regexp.MustCompile(`^# Plugin file (\S+) `)
	files := map[string]string{}
	lines := strings.Split(sample, "\n")
	for i := 0; i < len(lines); i++ {
		m := header.FindStringSubmatch(lines[i])
		if m == nil {
			continue
		}
		i++ // the rule under the header
		var b strings.Builder
		for i+1 < len(lines) && strings.HasPrefix(lines[i+1], "#") {
			i++
			b.WriteString(strings.TrimPrefix(strings.TrimPrefix(lines[i], "#"), " ") + "\n")
		}
		files[m[1]] = b.String()
	}
	return files
}

// runShippedWiring starts Telegraf with wiring (the [[outputs.execd]] and
// [[inputs.execd]] blocks as shipped, their paths filled in) fed telemetry
// for devices of gateway my-gateway in registry my-registry, and waits
// until every device's telemetry reached the bridge, the input subscribed
// their configs, and a config set at the bridge came out of Telegraf as an
// omnicore_config metric.
func (s *setup) runShippedWiring(wiring string, devices []string) *Telegraf {
	received := filepath.Join(s.dir, "received.lp")
	tg := s.start(Agent(500*time.Millisecond, 100*time.Millisecond) +
		fileInput(s.telemetryFile(devices)) + wiring + "\n" + fileOutput(received, "omnicore_*"))
	s.waitEmulator(90*time.Second, "telemetry of every device and the input's subscriptions", func() bool {
		counts := perDevice(s.srv.Received())
		for _, d := range devices {
			if counts[d] == 0 || !s.srv.Subscribed("my-registry", d, omnicore.KindConfig) {
				return false
			}
		}
		return true
	})
	_, err := s.srv.SetConfig("my-registry", devices[len(devices)-1], []byte("mode=eco"))
	require.NoError(s.t, err)
	s.waitFile(60*time.Second, received, "the new config as a metric", func(ms []telegraf.Metric) bool {
		for _, m := range ms {
			if p, _ := m.GetField("payload"); m.Name() == "omnicore_config" && p == "mode=eco" {
				return true
			}
		}
		return false
	})
	return tg
}
