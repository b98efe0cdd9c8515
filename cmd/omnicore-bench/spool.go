package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
)

// benchSpool is benchmark 7: the cost of the output's spool (store and
// forward) through a real Telegraf, the cost of its fsync, and how fast a
// spooled backlog drains once the bridge is back.
func (b *bench) benchSpool(ctx context.Context) error {
	n := b.sz.e2eMetrics
	rowSpool := &row{id: "7", name: fmt.Sprintf("store and forward through Telegraf: inputs.execd (cat), %s metrics, %s devices -> emulator",
		groupThousands(int64(n)), groupThousands(int64(b.sz.e2eDevices))),
		unit: "metrics/s", oursLabel: "spool (default)", peerLabel: "spool = false"}
	rowSync := &row{id: "7", name: "the spool's fsync: spool_sync_interval \"0s\" (fsync every batch read) against \"100ms\" (default)",
		unit: "metrics/s", oursLabel: "0s", peerLabel: "100ms", neutral: true}
	rowDrain := &row{id: "7", name: fmt.Sprintf("drain %s spooled metrics once the bridge is back (telegraf-omnicore alone), %s devices",
		groupThousands(int64(b.sz.drainMetrics)), groupThousands(int64(b.sz.e2eDevices))),
		unit: "metrics/s", oursLabel: "drain", peerLabel: "spooling (bridge down)", neutral: true}
	b.rows = append(b.rows, rowSpool, rowSync, rowDrain)
	telegrafBin, ourBin, skip := b.prepareBinaries(ctx)
	if skip != "" {
		rowSpool.skipped, rowSync.skipped, rowDrain.skipped = skip, skip, skip
		return nil
	}

	clock := newReceiver()
	emu, err := startEmulator(b.pub, b.sz.e2eDevices, emulator.WithOnReceive(clock.observeEmulator))
	if err != nil {
		return err
	}
	defer emu.Close()
	metricsFile := filepath.Join(b.dir, "spool-metrics.lp")
	if err := writeLineProtocol(metricsFile, b.sz.drainMetrics, b.sz.e2eDevices); err != nil {
		return err
	}
	defer os.Remove(metricsFile)
	small := filepath.Join(b.dir, "spool-metrics-small.lp")
	if err := writeLineProtocol(small, n, b.sz.e2eDevices); err != nil {
		return err
	}
	defer os.Remove(small)

	variants := []struct {
		name  string
		extra string
		row   *row
		ours  bool
	}{
		{name: "spool", extra: "", row: rowSpool, ours: true},
		{name: "no spool", extra: "spool = false\n", row: rowSpool},
		{name: "fsync 0s", extra: "spool_sync_interval = \"0s\"\n", row: rowSync, ours: true},
		{name: "fsync 100ms", extra: "spool_sync_interval = \"100ms\"\n", row: rowSync},
	}
	for run := 0; run < b.opts.runs; run++ {
		for i, v := range variants {
			if run%2 == 1 {
				v = variants[len(variants)-1-i]
			}
			pluginConf := filepath.Join(b.dir, fmt.Sprintf("spool-output-%d-%d.conf", run, i))
			if err := os.WriteFile(pluginConf, []byte(b.pluginFile(emu.URL, "")+hostTable(v.extra)), 0o600); err != nil {
				return err
			}
			cfg := filepath.Join(b.dir, fmt.Sprintf("spool-telegraf-%d-%d.conf", run, i))
			if err := os.WriteFile(cfg, []byte(spoolTelegrafConfig(small, n, ourBin, pluginConf)), 0o600); err != nil {
				return err
			}
			progress("  run %d/%d: Telegraf, %s", run+1, b.opts.runs, v.name)
			state, err := os.MkdirTemp(b.dir, "state-")
			if err != nil {
				return err
			}
			rate, err := spoolTelegrafRun(ctx, emu, telegrafBin, cfg, filepath.Join(b.dir, fmt.Sprintf("spool-telegraf-%d-%d.log", run, i)), state, clock, n)
			if err != nil {
				v.row.addProblem("%s: %v", v.name, err)
				v.row.leftOut++
				continue
			}
			progress("    %s", formatValue(rate, "metrics/s"))
			if v.ours {
				v.row.ours = append(v.row.ours, rate)
			} else {
				v.row.peer = append(v.row.peer, rate)
			}
		}
	}
	rowSpool.note = "real Telegraf processes (not --once: with the spool a stop leaves the unacknowledged metrics on disk for the next start), metric_batch_size 1000, QoS 1; rate between the first and the last message the emulator accepted"
	rowSpool.slowerWhy = "every metric is serialized to line protocol again, appended to the spool and read back and parsed before it is published"
	rowSync.note = "same setup as the spool row; an fsync per batch read from the pipe against the group commit"

	for run := 0; run < b.opts.runs; run++ {
		progress("  run %d/%d: drain of %s spooled metrics", run+1, b.opts.runs, groupThousands(int64(b.sz.drainMetrics)))
		spooling, drain, err := b.drainRun(ctx, emu, ourBin, metricsFile, clock)
		if err != nil {
			rowDrain.addProblem("%v", err)
			rowDrain.leftOut++
			continue
		}
		progress("    spooled at %s with the bridge down, drained at %s", formatValue(spooling, "metrics/s"), formatValue(drain, "metrics/s"))
		rowDrain.ours = append(rowDrain.ours, drain)
		rowDrain.peer = append(rowDrain.peer, spooling)
	}
	rowDrain.note = "telegraf-omnicore run with the line protocol file on stdin while the emulator is stopped (the spooling rate), then again with the emulator back: the drain rate is from the process's start to the last message accepted (replay, connect and attach included)"
	return nil
}

// pluginFile is the [[outputs.omnicore]] plugin file for the emulator at
// url with extra lines.
func (b *bench) pluginFile(url, extra string) string {
	return b.gatewayTable("outputs.omnicore", url, extra)
}

// gatewayTable is a plugin file with one [[table]] for the bench's gateway
// at url, data_format influx, and extra lines.
func (b *bench) gatewayTable(table, url, extra string) string {
	return fmt.Sprintf(`[[%s]]
  servers = [%s]
  subscription_id = %s
  registry_id = %s
  gateway_id = %s
  private_key = %s
  algorithm = %s
  data_format = "influx"
%s`, table, tomlString(url), tomlString(b.id.subscription), tomlString(registryID), tomlString(gatewayID), tomlString(b.id.key), tomlString(keyAlg), extra)
}

// spoolTelegrafConfig runs Telegraf (not --once) with inputs.execd writing
// the file once into outputs.execd running telegraf-omnicore.
func spoolTelegrafConfig(metricsFile string, n int, ourBin, pluginConf string) string {
	return catAgentConfig(metricsFile, n) + "\n" + execdOutputTable(ourBin, pluginConf)
}

// catAgentConfig is the agent and input of a Telegraf that runs (not
// --once) with inputs.execd writing the file of n metrics once (cat); the
// output is appended. The command then waits for its stdin to close:
// inputs.execd loses the tail of what a process wrote when it exits at once
// ("read |0: file already closed").
func catAgentConfig(metricsFile string, n int) string {
	return fmt.Sprintf(`[agent]
  interval = "10s"
  round_interval = false
  metric_batch_size = 1000
  metric_buffer_limit = %d
  flush_interval = "1s"
  flush_jitter = "0s"
  omit_hostname = true

[[inputs.execd]]
  command = ["sh", "-c", "cat \"$0\" && exec cat >/dev/null", %s]
  signal = "none"
  restart_delay = "1h"
  data_format = "influx"
`, n+10000, tomlString(metricsFile))
}

// spoolTelegrafRun runs Telegraf with cfgPath until the emulator accepted n
// messages, stops it, and returns the rate between the first and the last.
func spoolTelegrafRun(ctx context.Context, emu *emulator.Server, telegrafBin, cfgPath, logPath, stateDir string, clock *receiver, n int) (float64, error) {
	clock.reset(false)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute+time.Duration(n/1000)*time.Second)
	defer cancel()
	logf, err := os.Create(logPath)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	cmd := exec.Command(telegrafBin, "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), share.EnvRuntimeDir+"="+filepath.Join(stateDir, "rt"), "STATE_DIRECTORY="+stateDir)
	if err := cmd.Start(); err != nil {
		return 0, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	go func() {
		select {
		case <-exited:
			wcancel()
		case <-wctx.Done():
		}
	}()
	clock.waitFor(wctx, n, clientTimeout)
	if t := clock.count(lineProtocolTimes(n)); !t.ok() {
		return 0, fmt.Errorf("at the receiver %s (log %s)", t, logPath)
	}
	first, last := clock.span()
	if !last.After(first) {
		return 0, errors.New("no time between the first and the last message")
	}
	return float64(n-1) / last.Sub(first).Seconds(), nil
}

// drainRun spools the file with the emulator stopped, then drains it with
// the emulator back. It returns both rates in metrics/s.
func (b *bench) drainRun(ctx context.Context, emu *emulator.Server, ourBin, metricsFile string, clock *receiver) (spooling, drain float64, err error) {
	n := b.sz.drainMetrics
	state, err := os.MkdirTemp(b.dir, "state-")
	if err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(state)
	pluginConf := filepath.Join(state, "output.conf")
	if err := os.WriteFile(pluginConf, []byte(b.pluginFile(emu.URL, "")), 0o600); err != nil {
		return 0, 0, err
	}
	env := append(os.Environ(), share.EnvRuntimeDir+"="+filepath.Join(state, "rt"), "STATE_DIRECTORY="+state)

	// 1. The bridge is down: everything goes to the spool, then EOF.
	emu.Stop()
	in, err := os.Open(metricsFile)
	if err != nil {
		return 0, 0, err
	}
	defer in.Close()
	cctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	fill := exec.CommandContext(cctx, ourBin, "-config", pluginConf)
	fill.Stdin, fill.Env = in, env
	start := time.Now()
	if out, err := fill.CombinedOutput(); err != nil {
		_ = emu.Restart()
		return 0, 0, fmt.Errorf("spooling with the bridge down: %v: %s", err, lastLines(string(out), 3))
	}
	spooling = float64(n) / time.Since(start).Seconds()
	if err := emu.Restart(); err != nil {
		return 0, 0, err
	}

	// 2. The bridge is back: a new process replays the spool.
	clock.reset(false)
	drainCmd := exec.CommandContext(cctx, ourBin, "-config", pluginConf)
	drainCmd.Env = env
	stdin, err := drainCmd.StdinPipe()
	if err != nil {
		return 0, 0, err
	}
	start = time.Now()
	if err := drainCmd.Start(); err != nil {
		return 0, 0, err
	}
	clock.waitFor(cctx, n, clientTimeout)
	_, last := clock.span()
	stdin.Close()
	_ = drainCmd.Wait()
	if t := clock.count(lineProtocolTimes(n)); !t.ok() {
		return 0, 0, fmt.Errorf("drained: at the receiver %s", t)
	}
	return spooling, float64(n) / last.Sub(start).Seconds(), nil
}

// hostTable is the plugin file's [telegraf_omnicore] table (the execd
// binary's own options: the spool's) holding lines; "" for none.
func hostTable(lines string) string {
	if lines == "" {
		return ""
	}
	return "\n[telegraf_omnicore]\n  " + strings.TrimLeft(lines, " ")
}
