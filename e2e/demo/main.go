// Command demo shows telegraf-omnicore working end to end on this machine:
//
//	go run ./e2e/demo            # or: make demo
//
// It builds a custom Telegraf v1.37.2 (cached in $BUILD_DIR), our execd
// binary and the bridge emulator, starts the emulator with the example
// registry (testdata/registry.json) on loopback with TLS, and runs the real
// Telegraf with both plugins on one gateway: inputs.cpu, inputs.mem and
// inputs.mock, each tagged with a device ID, feed outputs.omnicore, while
// inputs.omnicore turns what the bridge sends back into metrics, printed by
// outputs.file. Through the emulator's admin API it then sets a device's
// config and sends a command. You watch, live:
//
//	[bridge]   telemetry arriving at the bridge
//	[metrics]  config, commands, bridge errors and gateway statistics as metrics
//	[telegraf] what Telegraf and the plugins log (warnings, errors, connects)
//	[demo]     what the demo does
//
// After DEMO_DURATION (default 25s) it stops Telegraf and the emulator,
// prints a summary and exits non-zero when something that should have
// happened did not. Everything lives in a temporary directory; only loopback
// ports are used.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
)

const (
	registryID = "demo-registry"
	gatewayID  = "demo-gateway"
)

// The devices the demo's Telegraf speaks for, all bound to demo-gateway in
// testdata/registry.json, and one that is not: its telemetry draws a
// GATEWAY_ATTACHMENT_ERROR, which comes back as an omnicore_error metric.
var (
	devices = []string{"sensor-01", "sensor-02", "sensor-03", "sensor-04", "sensor-05"}
	unbound = "sensor-unbound"
)

func main() {
	duration := 25 * time.Second
	if v := os.Getenv("DEMO_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			fmt.Fprintf(os.Stderr, "demo: DEMO_DURATION=%q: %v\n", v, err)
			os.Exit(2)
		}
		duration = d
	}
	keep := flag.Bool("keep", false, "keep the temporary directory (configs, logs, keys)")
	flag.DurationVar(&duration, "duration", duration, "how long Telegraf runs (env DEMO_DURATION)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	// A closed stdout (demo | head) must not kill the demo before it stops
	// Telegraf and the emulator and removes its directory.
	signal.Ignore(syscall.SIGPIPE)
	if err := run(ctx, duration, *keep); err != nil {
		say("FAILED: %v", err)
		os.Exit(1)
	}
}

var outMu sync.Mutex

func printLine(prefix, line string) {
	outMu.Lock()
	defer outMu.Unlock()
	fmt.Printf("%-10s %s\n", prefix, line)
}

func say(format string, args ...any) { printLine("[demo]", fmt.Sprintf(format, args...)) }

func run(ctx context.Context, duration time.Duration, keep bool) error {
	root, err := e2e.RepoRoot()
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "telegraf-omnicore-demo-")
	if err != nil {
		return err
	}
	if keep {
		defer say("Kept %s", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	// 1. Build.
	say("Building the custom Telegraf %s (cached after the first time), telegraf-omnicore and the emulator...", e2e.TelegrafVersion)
	start := time.Now()
	telegraf, err := e2e.BuildTelegraf(ctx, prefixWriter("[build]"))
	if err != nil {
		return err
	}
	bin := filepath.Join(dir, "bin")
	plugin, err := e2e.BuildCommand(ctx, "./cmd/telegraf-omnicore", bin)
	if err != nil {
		return err
	}
	emulatorBin, err := e2e.BuildCommand(ctx, "./cmd/omnicore-emulator", bin)
	if err != nil {
		return err
	}
	say("Built in %s", time.Since(start).Round(100*time.Millisecond))

	// 2. The bridge emulator, TLS only, like the real bridge.
	em, err := startEmulator(ctx, emulatorBin, filepath.Join(root, "testdata", "registry.json"), filepath.Join(dir, "emulator"))
	if err != nil {
		return err
	}
	defer em.stop()
	say("Bridge emulator up: MQTT over TLS at %s, admin API at %s, its CA in %s", em.mqtts, em.admin, em.ca)

	// 3. Telegraf with both plugins on one gateway.
	gw := e2e.Gateway{
		Servers:      []string{em.mqtts},
		Subscription: em.subscription,
		Registry:     registryID,
		ID:           gatewayID,
		PrivateKey:   em.keys[registryID+"/"+gatewayID],
		Algorithm:    "RS256",
		TLSCA:        em.ca,
	}
	if gw.PrivateKey == "" {
		return fmt.Errorf("the emulator printed no key for %s/%s", registryID, gatewayID)
	}
	// The plugin files live outside any directory Telegraf loads configs from.
	pluginDir := filepath.Join(dir, "omnicore")
	if err := os.MkdirAll(pluginDir, 0o700); err != nil {
		return err
	}
	outputConf := filepath.Join(pluginDir, "output.conf")
	inputConf := filepath.Join(pluginDir, "input.conf")
	if err := os.WriteFile(outputConf, []byte(gw.OutputFile()), 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(inputConf, []byte(gw.InputFile(devices)), 0o600); err != nil {
		return err
	}
	telegrafConf := filepath.Join(dir, "telegraf.conf")
	if err := os.WriteFile(telegrafConf, []byte(telegrafConfig(plugin, outputConf, inputConf)), 0o600); err != nil {
		return err
	}
	say("Starting Telegraf %s with %s", e2e.TelegrafVersion, telegrafConf)
	// The plugins' processes meet in a private directory to share the
	// gateway's connection; keep it in the demo's directory when the socket
	// path stays short enough.
	// The output's spool goes in the demo's own state directory.
	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		return err
	}
	env := []string{"STATE_DIRECTORY=" + state}
	if rt := filepath.Join(dir, "rt"); len(rt) < 64 {
		env = append(env, "TELEGRAF_OMNICORE_RUNTIME_DIR="+rt)
	}
	tg, metrics, err := startTelegraf(telegraf, telegrafConf, filepath.Join(dir, "telegraf.log"), env)
	if err != nil {
		return err
	}
	defer tg.Kill()

	// 4. Wait for the gateway to attach its devices, then act through the
	// bridge's admin API.
	if err := waitUntil(ctx, 60*time.Second, func() bool { return attached(em.admin) }); err != nil {
		return fmt.Errorf("the gateway did not attach %v: %w", devices, err)
	}
	say("The gateway attached %s through ONE connection", strings.Join(devices, ", "))
	if err := em.post(fmt.Sprintf("/v1/registries/%s/devices/sensor-01/config", registryID), `{"interval":"5s","threshold":21.5}`); err != nil {
		return err
	}
	if err := em.post(fmt.Sprintf("/v1/registries/%s/devices/sensor-02/commands?subfolder=reboot", registryID), `{"delay":"10s"}`); err != nil {
		return err
	}

	// 5. Run, watching.
	select {
	case <-ctx.Done():
		say("Interrupted")
	case <-time.After(duration):
	case <-tg.Done():
		return errors.New("Telegraf exited early; see its log above")
	}

	// 6. Stop and sum up.
	var conns []struct {
		ClientID string `json:"client_id"`
		Refused  bool   `json:"refused"`
	}
	if err := getJSON(em.admin+"/v1/connections", &conns); err != nil {
		return err
	}
	say("Stopping Telegraf (it closes the plugins' stdin; they flush and exit)...")
	elapsed, err := tg.Stop(15 * time.Second)
	if err != nil {
		return err
	}
	say("Telegraf stopped in %s", elapsed.Round(time.Millisecond))
	return summarize(em, metrics, len(conns))
}

// telegrafConfig is the demo's telegraf.conf: real inputs tagged per device,
// the two execd plugins, and outputs.file printing what the input emits.
func telegrafConfig(plugin, outputConf, inputConf string) string {
	var b strings.Builder
	b.WriteString(`[agent]
  interval = "2s"
  flush_interval = "1s"
  omit_hostname = true

# Real inputs, each standing in for one device behind the gateway.
[[inputs.cpu]]
  percpu = false
  totalcpu = true
  fieldinclude = ["usage_user", "usage_system", "usage_idle"]
  [inputs.cpu.tags]
    device_id = "sensor-01"

[[inputs.mem]]
  fieldinclude = ["used_percent", "available"]
  [inputs.mem.tags]
    device_id = "sensor-02"
`)
	for i, d := range append(slices.Clone(devices[2:]), unbound) {
		fmt.Fprintf(&b, `
[[inputs.mock]]
  metric_name = "environment"
  [[inputs.mock.sine_wave]]
    name = "temperature"
    amplitude = 3.0
    period = 60.0
    base_line = %d.0
  [[inputs.mock.random]]
    name = "humidity"
    min = 40.0
    max = 60.0
  [inputs.mock.tags]
    device_id = %q
`, 20+i, d)
	}
	b.WriteString("\n# outputs.omnicore: telemetry of the tagged devices to the bridge. namedrop keeps\n" +
		"# the input's own metrics from being sent back.\n")
	b.WriteString(e2e.ExecdOutput(plugin, outputConf))
	b.WriteString("\n# inputs.omnicore: config, commands, bridge errors and gateway statistics.\n")
	b.WriteString(e2e.ExecdInput(plugin, inputConf, "-poll_interval", "10s"))
	b.WriteString(`
# Print what the bridge sent back, as metrics.
[[outputs.file]]
  files = ["stdout"]
  data_format = "influx"
  namepass = ["omnicore_*"]
`)
	return b.String()
}

// emulatorProc is the running omnicore-emulator command.
type emulatorProc struct {
	cmd          *exec.Cmd
	done         chan struct{}
	subscription string
	mqtts, admin string
	ca           string
	keys         map[string]string // "registry/device" -> private key path
}

func startEmulator(ctx context.Context, bin, registry, stateDir string) (*emulatorProc, error) {
	cmd := exec.Command(bin,
		"-registry", registry,
		"-mqtt", "", // TLS only, like the real bridge
		"-mqtts", "127.0.0.1:0",
		"-admin", "127.0.0.1:0",
		"-state-dir", stateDir,
		"-log-received")
	e2e.DieWithParent(cmd)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = prefixWriter("[emulator]")
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	em := &emulatorProc{cmd: cmd, done: make(chan struct{}), keys: map[string]string{}}
	ready := make(chan error, 1)
	go func() {
		defer close(em.done)
		sc := bufio.NewScanner(stdout)
		isReady := false
		for sc.Scan() {
			line := sc.Text()
			if isReady {
				// With -log-received every accepted message is a line.
				if strings.Contains(line, " received ") {
					printLine("[bridge]", line)
				} else {
					printLine("[emulator]", line)
				}
				continue
			}
			key, value, _ := strings.Cut(line, ": ")
			switch key {
			case "subscription":
				em.subscription = value
			case "mqtts":
				em.mqtts = value
			case "admin":
				em.admin = value
			case "ca":
				em.ca = value
			case "key":
				// "key: demo-registry/demo-gateway RS256 /path/to/key"
				if f := strings.Fields(value); len(f) == 3 {
					em.keys[f[0]] = f[2]
				}
			}
			if line == "ready" {
				isReady = true
				ready <- nil
			}
		}
		_ = cmd.Wait()
		if !isReady {
			ready <- errors.New("the emulator exited before it was ready")
		}
	}()
	select {
	case err := <-ready:
		if err != nil {
			return nil, err
		}
	case <-time.After(30 * time.Second):
		em.stop()
		return nil, errors.New("the emulator was not ready within 30s")
	case <-ctx.Done():
		em.stop()
		return nil, ctx.Err()
	}
	return em, nil
}

func (em *emulatorProc) stop() {
	_ = em.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-em.done:
	case <-time.After(10 * time.Second):
		_ = em.cmd.Process.Kill()
		<-em.done
	}
}

var httpClient = &http.Client{Timeout: 10 * time.Second}

// post sends body to the admin API and shows the exchange.
func (em *emulatorProc) post(path, body string) error {
	// The admin API takes every body as the raw payload, but insists on
	// application/json so that no web page can send it (see emulator/README.md).
	resp, err := httpClient.Post(em.admin+path, "application/json", strings.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	answer, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var compact bytes.Buffer
	if json.Compact(&compact, answer) != nil {
		compact.Reset()
		compact.Write(bytes.TrimSpace(answer))
	}
	say("POST %s%s %s -> %s %s", em.admin, path, body, resp.Status, compact.String())
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST %s: %s", path, resp.Status)
	}
	return nil
}

func getJSON(url string, v any) error {
	resp, err := httpClient.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// attached reports whether the gateway has every demo device attached.
func attached(admin string) bool {
	var sets []struct {
		Registry string   `json:"registry"`
		Gateway  string   `json:"gateway"`
		Devices  []string `json:"devices"`
	}
	if err := getJSON(admin+"/v1/attachments", &sets); err != nil {
		return false
	}
	for _, s := range sets {
		if s.Registry == registryID && s.Gateway == gatewayID {
			for _, d := range devices {
				if !slices.Contains(s.Devices, d) {
					return false
				}
			}
			return true
		}
	}
	return false
}

func waitUntil(ctx context.Context, d time.Duration, cond func() bool) error {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return fmt.Errorf("not within %s", d)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return nil
}

// metricLog collects the metric lines Telegraf prints on stdout.
type metricLog struct {
	mu    sync.Mutex
	lines []string
}

func (m *metricLog) add(line string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.lines = append(m.lines, line)
}

func (m *metricLog) count(prefix string, contains ...string) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, l := range m.lines {
		if !strings.HasPrefix(l, prefix) {
			continue
		}
		ok := true
		for _, c := range contains {
			ok = ok && strings.Contains(l, c)
		}
		if ok {
			n++
		}
	}
	return n
}

// startTelegraf runs Telegraf: its stdout (the metrics outputs.file prints)
// is shown as [metrics], its log as [telegraf] (the plugins' informational
// lines, warnings and errors; not the agent's debug chatter) and kept in
// logPath.
func startTelegraf(bin, conf, logPath string, env []string) (*e2e.Telegraf, *metricLog, error) {
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, nil, err
	}
	metrics := &metricLog{}
	pr, pw := io.Pipe()
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64*1024), 1024*1024)
		for sc.Scan() {
			line := sc.Text()
			_, _ = fmt.Fprintln(logFile, line)
			switch {
			case strings.HasPrefix(line, "omnicore_"):
				metrics.add(line)
				printLine("[metrics]", line)
			case interesting(line):
				printLine("[telegraf]", line)
			}
		}
		logFile.Close()
	}()
	tg, err := e2e.StartTelegraf(bin, conf, env, pw)
	if err != nil {
		return nil, nil, err
	}
	go func() {
		<-tg.Done()
		pw.Close()
	}()
	return tg, metrics, nil
}

// interesting picks the log lines worth showing live.
func interesting(line string) bool {
	switch {
	case strings.Contains(line, " W! "), strings.Contains(line, " E! ") && !strings.Contains(line, "stderr: I! ") && !strings.Contains(line, "stderr: D! "):
		return !strings.Contains(line, "skip_processors_after_aggregators") && !strings.Contains(line, "Strict environment variable")
	case strings.Contains(line, "omnicore"):
		// The plugins' own informational lines (outputs.execd shows its
		// child's stderr as "E! ... stderr: I! ...").
		return strings.Contains(line, "I! ") && !strings.Contains(line, "Buffer fullness")
	}
	return false
}

// summarize prints what the bridge got and checks that the demo showed what
// it promises.
func summarize(em *emulatorProc, metrics *metricLog, connections int) error {
	perDevice := map[string]int{}
	for since, more := 0, true; more; {
		var page struct {
			Next     int  `json:"next"`
			More     bool `json:"more"`
			Messages []struct {
				Device string `json:"device"`
			} `json:"messages"`
		}
		if err := getJSON(fmt.Sprintf("%s/v1/telemetry?since=%d", em.admin, since), &page); err != nil {
			return err
		}
		for _, m := range page.Messages {
			perDevice[m.Device]++
		}
		since, more = page.Next, page.More
	}
	var errs []struct {
		Error struct {
			ErrorType string `json:"error_type"`
			DeviceID  string `json:"device_id"`
		} `json:"error"`
	}
	if err := getJSON(em.admin+"/v1/errors", &errs); err != nil {
		return err
	}

	say("Summary")
	for _, d := range devices {
		say("  %-15s %3d telemetry messages at the bridge", d, perDevice[d])
	}
	say("  %-15s %3d (not bound to the gateway: refused)", unbound, perDevice[unbound])
	say("  bridge connections while running: %d (Telegraf's output and input processes share the gateway's one)", connections)
	errCounts := map[string]int{}
	var errKeys []string
	for _, e := range errs {
		k := e.Error.ErrorType + " for device " + e.Error.DeviceID
		if errCounts[k] == 0 {
			errKeys = append(errKeys, k)
		}
		errCounts[k]++
	}
	for _, k := range errKeys {
		say("  bridge errors: %d x %s", errCounts[k], k)
	}
	cfg := metrics.count("omnicore_config", "device_id=sensor-01", "threshold")
	cmd := metrics.count("omnicore_command", "device_id=sensor-02", "subfolder=reboot")
	errMetrics := metrics.count("omnicore_error", "device_id="+unbound)
	stats := metrics.count("omnicore_gateway")
	say("  metrics out of Telegraf: %d omnicore_config (new config of sensor-01), %d omnicore_command (reboot of sensor-02), %d omnicore_error, %d omnicore_gateway",
		cfg, cmd, errMetrics, stats)

	var problems []string
	if connections != 1 {
		problems = append(problems, fmt.Sprintf("%d bridge connections instead of one", connections))
	}
	for _, d := range devices {
		if perDevice[d] == 0 {
			problems = append(problems, "no telemetry from "+d)
		}
	}
	if cfg == 0 {
		problems = append(problems, "the config of sensor-01 did not come out as a metric")
	}
	if cmd == 0 {
		problems = append(problems, "the command to sensor-02 did not come out as a metric")
	}
	if errMetrics == 0 {
		problems = append(problems, "the attach error of "+unbound+" did not come out as a metric")
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	say("OK")
	return nil
}

// prefixWriter shows a child's output line by line with a prefix.
func prefixWriter(prefix string) io.Writer {
	pr, pw := io.Pipe()
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			printLine(prefix, sc.Text())
		}
	}()
	return pw
}
