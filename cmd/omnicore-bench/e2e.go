package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/share"
)

// receiveClock records when the emulator accepted events messages.
type receiveClock struct {
	mu          sync.Mutex
	count       atomic.Int64
	first, last time.Time
}

func (c *receiveClock) reset() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.count.Store(0)
	c.first, c.last = time.Time{}, time.Time{}
}

func (c *receiveClock) observe(m emulator.Message) {
	now := time.Now()
	c.mu.Lock()
	if c.first.IsZero() {
		c.first = now
	}
	c.last = now
	c.mu.Unlock()
	c.count.Add(1)
}

func (c *receiveClock) span() (time.Time, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.first, c.last
}

// repoRoot finds the directory of this module's go.mod, from the working
// directory up.
func repoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && bytes.Contains(b, []byte("module github.com/telegraf-omnicore/telegraf-omnicore")) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("not inside the telegraf-omnicore repository (no go.mod found)")
		}
		dir = parent
	}
}

// prepareBinaries finds or builds Telegraf and telegraf-omnicore; a reason
// is returned instead when benchmark 2 cannot run.
func (b *bench) prepareBinaries(ctx context.Context) (telegrafBin, ourBin, skip string) {
	if b.opts.telegraf == "none" {
		return "", "", "no Telegraf binary (-telegraf none)"
	}
	root, rootErr := repoRoot()
	telegrafBin = b.opts.telegraf
	if telegrafBin == "" {
		if rootErr != nil {
			return "", "", rootErr.Error()
		}
		cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(cctx, filepath.Join(root, "scripts", "build-telegraf.sh"))
		cmd.Dir = root
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			return "", "", fmt.Sprintf("scripts/build-telegraf.sh failed: %v: %s", err, lastLines(stderr.String(), 3))
		}
		telegrafBin = strings.TrimSpace(string(out))
	}
	ourBin = b.opts.omnicoreBin
	if ourBin == "" {
		if rootErr != nil {
			return "", "", rootErr.Error()
		}
		ourBin = filepath.Join(b.dir, "telegraf-omnicore")
		cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
		defer cancel()
		cmd := exec.CommandContext(cctx, "go", "build", "-o", ourBin, "./cmd/telegraf-omnicore")
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Sprintf("go build ./cmd/telegraf-omnicore failed: %v: %s", err, lastLines(string(out), 3))
		}
	}
	for _, p := range []string{telegrafBin, ourBin} {
		if st, err := os.Stat(p); err != nil || st.IsDir() {
			return "", "", fmt.Sprintf("%s is not a file", p)
		}
	}
	return telegrafBin, ourBin, ""
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}

// writeLineProtocol writes n metrics over devices as a line-protocol file.
func writeLineProtocol(path string, n, devices int) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	w := bufio.NewWriterSize(f, 1<<20)
	ser, err := newSerializer()
	if err != nil {
		f.Close()
		return err
	}
	start := time.Unix(1_700_000_000, 0)
	const chunk = 10000
	for done := 0; done < n; done += chunk {
		ms := genMetrics(min(chunk, n-done), devices, start.Add(time.Duration(done)*time.Millisecond))
		bs, err := ser.SerializeBatch(ms)
		if err != nil {
			f.Close()
			return err
		}
		if _, err := w.Write(bs); err != nil {
			f.Close()
			return err
		}
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func tomlString(s string) string { return fmt.Sprintf("%q", s) }

// telegrafConfig is the Telegraf side: inputs.file reading the file once
// (--once), and either outputs.execd running our binary or outputs.mqtt.
func (b *bench) telegrafConfig(path, metricsFile string, n int, output string) error {
	agent := fmt.Sprintf(`[agent]
  interval = "10s"
  round_interval = false
  metric_batch_size = 1000
  metric_buffer_limit = %d
  flush_interval = "1s"
  flush_jitter = "0s"
  omit_hostname = true
  skip_processors_after_aggregators = true

[[inputs.file]]
  files = [%s]
  data_format = "influx"

`, n+10000, tomlString(metricsFile))
	return os.WriteFile(path, []byte(agent+output), 0o600)
}

// e2eRun runs Telegraf once with cfgPath and returns metrics/s at the
// emulator from the first to the last accepted message, and the wall time
// from Telegraf's start to the last one.
func e2eRun(ctx context.Context, emu *emulator.Server, telegrafBin, cfgPath, logPath, runtimeDir string, clock *receiveClock, n int) (float64, time.Duration, error) {
	clock.reset()
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	logf, err := os.Create(logPath)
	if err != nil {
		return 0, 0, err
	}
	defer logf.Close()
	cmd := exec.CommandContext(ctx, telegrafBin, "--config", cfgPath, "--once")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), share.EnvRuntimeDir+"="+runtimeDir)
	cmd.WaitDelay = 10 * time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	var exitErr error
	exited := make(chan struct{})
	go func() { exitErr = cmd.Wait(); close(exited) }()
	// Wait until everything arrived, or Telegraf exited without it.
	wctx, wcancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-exited:
			wcancel()
		case <-wctx.Done():
		}
	}()
	_ = emu.WaitFor(wctx, func() bool { return clock.count.Load() >= int64(n) })
	wcancel()
	got := clock.count.Load()
	first, last := clock.span()
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
	logf.Close()
	if got < int64(n) {
		out, _ := os.ReadFile(logPath)
		return 0, 0, fmt.Errorf("the emulator accepted %d of %d metrics (telegraf: %v; log: %s)", got, n, exitErr, lastLines(string(out), 4))
	}
	if exitErr != nil {
		out, _ := os.ReadFile(logPath)
		return 0, 0, fmt.Errorf("telegraf --once failed after delivering everything: %v: %s", exitErr, lastLines(string(out), 4))
	}
	if !last.After(first) {
		return 0, 0, errors.New("no time between the first and the last message")
	}
	return float64(n-1) / last.Sub(first).Seconds(), last.Sub(start), nil
}

// benchEndToEnd is benchmark 2.
func (b *bench) benchEndToEnd(ctx context.Context) error {
	r := &row{id: "2", name: fmt.Sprintf("end to end through Telegraf --once: inputs.file, %s metrics, %s devices -> emulator",
		groupThousands(int64(b.sz.e2eMetrics)), groupThousands(int64(b.sz.e2eDevices))),
		unit: "metrics/s", oursLabel: "outputs.execd + telegraf-omnicore", peerLabel: "outputs.mqtt"}
	b.rows = append(b.rows, r)
	telegrafBin, ourBin, skip := b.prepareBinaries(ctx)
	if skip != "" {
		r.skipped = skip
		b.hdr.telegraf = "not available: " + skip
		return nil
	}
	b.hdr.telegraf = telegrafBin + " " + telegrafVersion(ctx, telegrafBin)

	clock := &receiveClock{}
	emu, err := startEmulator(b.pub, b.sz.e2eDevices, emulator.WithOnReceive(clock.observe))
	if err != nil {
		return err
	}
	defer emu.Close()
	n := b.sz.e2eMetrics
	metricsFile := filepath.Join(b.dir, "e2e-metrics.lp")
	if err := writeLineProtocol(metricsFile, n, b.sz.e2eDevices); err != nil {
		return err
	}
	defer os.Remove(metricsFile)

	pluginConf := filepath.Join(b.dir, "omnicore-output.conf")
	plugin := fmt.Sprintf(`[[outputs.omnicore]]
  servers = [%s]
  subscription_id = %s
  registry_id = %s
  gateway_id = %s
  private_key = %s
  algorithm = %s
  data_format = "influx"
  ## telegraf --once stops the output at the end: with the spool it would
  ## leave what is not acknowledged on disk for the next run (benchmark 7
  ## measures the spool).
  spool = false
`, tomlString(emu.URL), tomlString(b.id.subscription), tomlString(registryID), tomlString(gatewayID), tomlString(b.id.key), tomlString(keyAlg))
	if err := os.WriteFile(pluginConf, []byte(plugin), 0o600); err != nil {
		return err
	}
	oursConf := filepath.Join(b.dir, "telegraf-execd.conf")
	if err := b.telegrafConfig(oursConf, metricsFile, n, fmt.Sprintf(`[[outputs.execd]]
  command = [%s, "-config", %s]
  restart_delay = "10s"
  data_format = "influx"
`, tomlString(ourBin), tomlString(pluginConf))); err != nil {
		return err
	}
	tok, err := b.id.token()
	if err != nil {
		return err
	}
	peerConf := filepath.Join(b.dir, "telegraf-mqtt.conf")
	if err := b.telegrafConfig(peerConf, metricsFile, n, fmt.Sprintf(`[[outputs.mqtt]]
  servers = [%s]
  topic = '%s'
  qos = 1
  client_id = %s
  username = "unused"
  password = %s
  layout = "non-batch"
  data_format = "influx"
`, tomlString(emu.URL), mqttTopic(broker{isEmu: true}), tomlString(b.id.clientID()), tomlString(tok))); err != nil {
		return err
	}

	var wallOurs, wallPeer []float64
	for run := 0; run < b.opts.runs; run++ {
		order := []bool{true, false}
		if run%2 == 1 {
			order = []bool{false, true}
		}
		for _, ours := range order {
			name, conf := "outputs.execd + telegraf-omnicore", oursConf
			if !ours {
				name, conf = "outputs.mqtt", peerConf
			}
			progress("  run %d/%d: telegraf --once with %s", run+1, b.opts.runs, name)
			logPath := filepath.Join(b.dir, fmt.Sprintf("telegraf-%d-%t.log", run, ours))
			v, wall, err := e2eRun(ctx, emu, telegrafBin, conf, logPath, filepath.Join(b.dir, "runtime-e2e"), clock, n)
			if err != nil {
				r.addProblem("%s: %v", name, err)
				continue
			}
			if ours {
				r.ours = append(r.ours, v)
				wallOurs = append(wallOurs, float64(n)/wall.Seconds())
			} else {
				r.peer = append(r.peer, v)
				wallPeer = append(wallPeer, float64(n)/wall.Seconds())
			}
			progress("    %s between the first and the last message; %s from Telegraf's start (%s)",
				formatValue(v, "metrics/s"), formatValue(float64(n)/wall.Seconds(), "metrics/s"), wall.Round(time.Millisecond))
		}
	}
	r.note = fmt.Sprintf("real Telegraf %s processes, metric_batch_size 1000, QoS 1 both; rate between the first and the last message the emulator accepted; counting from Telegraf's start (startup, connect and attach included) ours %s, outputs.mqtt %s; outputs.mqtt publishes to the gateway's own events/{device} subfolders (it cannot attach)",
		telegrafVersion(ctx, telegrafBin), formatValue(median(wallOurs), "metrics/s"), formatValue(median(wallPeer), "metrics/s"))
	r.slowerWhy = "outputs.execd serializes every metric to line protocol and our binary parses it again, and outputs.execd gives no acknowledgement, so the pipe is the only back-pressure"
	return nil
}

func telegrafVersion(ctx context.Context, bin string) string {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "(version unknown)"
	}
	return strings.TrimSpace(string(out))
}
