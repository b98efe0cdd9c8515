package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
)

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
		var err error
		if telegrafBin, err = buildTelegraf(ctx, root); err != nil {
			return "", "", err.Error()
		}
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

// buildTelegraf runs scripts/build-telegraf.sh with args (none: the stock
// build; --builtin: our plugins compiled in), which builds Telegraf or finds
// it cached, and returns the path it prints last.
func buildTelegraf(ctx context.Context, root string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(root, "scripts", "build-telegraf.sh"), args...)
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("scripts/build-telegraf.sh %s failed: %v: %s", strings.Join(args, " "), err, lastLines(stderr.String(), 3))
	}
	path := strings.TrimSpace(string(out))
	if i := strings.LastIndexByte(path, '\n'); i >= 0 {
		path = path[i+1:]
	}
	return path, nil
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
	if err := lineProtocolMetrics(n, devices, func(ms []telegraf.Metric) error {
		bs, err := ser.SerializeBatch(ms)
		if err != nil {
			return err
		}
		_, err = w.Write(bs)
		return err
	}); err != nil {
		f.Close()
		return err
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// lineProtocolMetrics hands the metrics of a file of n metrics over devices
// to f in chunks, in file order: writeLineProtocol writes them, and the bare
// paho peer of benchmark 2 publishes them.
func lineProtocolMetrics(n, devices int, f func([]telegraf.Metric) error) error {
	start := time.Unix(1_700_000_000, 0)
	const chunk = 10000
	for done := 0; done < n; done += chunk {
		if err := f(genMetrics(min(chunk, n-done), devices, start.Add(time.Duration(done)*time.Millisecond))); err != nil {
			return err
		}
	}
	return nil
}

// lineProtocolTimes are the metric times of a file of n metrics written by
// writeLineProtocol, as the receiver counts them.
func lineProtocolTimes(n int) []int64 {
	want := make([]int64, n)
	for i := range want {
		want[i] = time.Unix(1_700_000_000, 0).Add(time.Duration(i) * time.Millisecond).UnixNano()
	}
	return want
}

func tomlString(s string) string { return fmt.Sprintf("%q", s) }

// execdOutputTable is the [[outputs.execd]] table running telegraf-omnicore
// with the plugin file pluginConf.
func execdOutputTable(ourBin, pluginConf string) string {
	return fmt.Sprintf(`[[outputs.execd]]
  command = [%s, "-config", %s]
  restart_delay = "10s"
  data_format = "influx"
`, tomlString(ourBin), tomlString(pluginConf))
}

// mqttOutputTable is the [[outputs.mqtt]] table of the peer: QoS 1, as the
// gateway, per-device topics (mqttTopic of br), its default layout
// non-batch.
func (b *bench) mqttOutputTable(url string, br broker) (string, error) {
	tok, err := b.id.token()
	if err != nil {
		return "", err
	}
	return fmt.Sprintf(`[[outputs.mqtt]]
  servers = [%s]
  topic = '%s'
  qos = 1
  client_id = %s
  username = "unused"
  password = %s
  data_format = "influx"
`, tomlString(url), mqttTopic(br), tomlString(b.id.clientID()), tomlString(tok)), nil
}

// telegrafConfig is the Telegraf side: inputs.file reading the file once
// (--once), and either outputs.execd running our binary or outputs.mqtt.
func (b *bench) telegrafConfig(path, metricsFile string, n int, output string) error {
	agent := fmt.Sprintf(`[agent]
  interval = "10s"
  # Keep every metric's own timestamp: the receiver knows a metric by it
  # (the default rounds to the interval, to seconds here).
  precision = "1ns"
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

// e2eResult is one Telegraf run as the receiver and the OS saw it.
type e2eResult struct {
	rate  float64       // metrics/s between the first and the last delivery
	wall  time.Duration // Telegraf's start to the last delivery
	first time.Duration // Telegraf's start to the first delivery
	cpu   float64       // µs of CPU per metric, Telegraf and its children
	rss   int64         // peak of the summed RSS of Telegraf and its children
	tally tally
}

// e2eRun runs Telegraf once with cfgPath and counts at rcv what arrived of
// want (the metric timestamps of the input file).
//
// stop, when not nil, runs Telegraf with --test-wait (its service inputs
// keep running after the gather of --once) and is called once everything
// arrived, or nothing more came: it checks what it needs to and stops
// Telegraf (SIGTERM), which then ends as --once does.
func e2eRun(ctx context.Context, cpus, telegrafBin, cfgPath, logPath, runtimeDir string, rcv *receiver, want []int64, stop ...func(*os.Process) error) (e2eResult, error) {
	rcv.reset(false)
	n := len(want)
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	logf, err := os.Create(logPath)
	if err != nil {
		return e2eResult{}, err
	}
	defer logf.Close()
	args := []string{telegrafBin, "--config", cfgPath, "--once"}
	if len(stop) > 0 {
		args = append(args, "--test-wait", strconv.Itoa(int(clientTimeout.Seconds())))
	}
	if cpus != "" {
		// taskset execs Telegraf: the process (and the children it starts,
		// which inherit the affinity) is Telegraf itself.
		args = append([]string{"taskset", "-c", cpus}, args...)
	}
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), share.EnvRuntimeDir+"="+runtimeDir)
	cmd.WaitDelay = 10 * time.Second
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return e2eResult{}, err
	}
	var exitErr error
	exited := make(chan struct{})
	var peakRSS atomic.Int64
	go func() {
		// Sample the memory of Telegraf and the plugin process it runs
		// until Telegraf exits; the peak is reported.
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			if rss := treeRSS(cmd.Process.Pid); rss > peakRSS.Load() {
				peakRSS.Store(rss)
			}
			select {
			case <-exited:
				return
			case <-tick.C:
			}
		}
	}()
	go func() { exitErr = cmd.Wait(); close(exited) }()
	rcv.waitWhileRunning(ctx, n, clientTimeout, exited)
	first, last := rcv.span()
	var stopErr error
	if len(stop) > 0 {
		select {
		case <-exited:
			stopErr = errors.New("telegraf exited before it was stopped")
		default:
			stopErr = stop[0](cmd.Process)
		}
	}
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-exited
	}
	logf.Close()
	res := e2eResult{tally: rcv.count(want), rss: peakRSS.Load()}
	if st := cmd.ProcessState; st != nil {
		// wait4 reports the CPU of Telegraf and of the children it
		// waited for (the execd plugin process).
		if ru, ok := st.SysUsage().(*syscall.Rusage); ok {
			res.cpu = float64(time.Duration(ru.Utime.Nano()+ru.Stime.Nano()).Microseconds()) / float64(n)
		}
	}
	if !res.tally.ok() {
		out, _ := os.ReadFile(logPath)
		return res, fmt.Errorf("at the receiver %s (telegraf: %v; log: %s)", res.tally, exitErr, lastLines(string(out), 4))
	}
	if stopErr != nil {
		return res, stopErr
	}
	if exitErr != nil {
		out, _ := os.ReadFile(logPath)
		if len(stop) == 0 || !onlyExecdStopErrors(string(out)) {
			return res, fmt.Errorf("telegraf --once failed after delivering everything: %v: %s", exitErr, lastLines(string(out), 4))
		}
	}
	if !last.After(first) {
		return res, errors.New("no time between the first and the last message")
	}
	res.rate = float64(n-1) / last.Sub(first).Seconds()
	res.wall = last.Sub(start)
	res.first = first.Sub(start)
	return res, nil
}

// e2eBroker is one receiving end of benchmark 2.
type e2eBroker struct {
	name, url string
	emu       bool
	rcv       *receiver
}

// benchEndToEnd is benchmark 2: through a real Telegraf, into the emulator
// and into a mosquitto with its default settings.
func (b *bench) benchEndToEnd(ctx context.Context) error {
	n, devices := b.sz.e2eMetrics, b.sz.e2eDevices
	if b.opts.e2eMetrics > 0 {
		n = b.opts.e2eMetrics
	}
	telegrafBin, ourBin, skip := b.prepareBinaries(ctx)
	if skip != "" {
		b.rows = append(b.rows, &row{id: "2", name: "end to end through Telegraf", skipped: skip})
		b.hdr.telegraf = "not available: " + skip
		return nil
	}
	b.hdr.telegraf = telegrafBin + " " + telegrafVersion(ctx, telegrafBin)

	var brokers []e2eBroker
	if b.opts.brokers == nil || b.opts.brokers["emulator"] {
		rcv := newReceiver()
		emu, err := startEmulator(b.pub, devices, emulator.WithOnReceive(rcv.observeEmulator))
		if err != nil {
			return err
		}
		defer emu.Close()
		brokers = append(brokers, e2eBroker{name: "emulator", url: emu.URL, emu: true, rcv: rcv})
	}
	if b.opts.brokers == nil || b.opts.brokers["mosquitto"] {
		if b.mosqNagle == nil {
			b.rows = append(b.rows, &row{id: "2", name: "end to end through Telegraf -> mosquitto with its defaults", skipped: b.hdr.mosquitto})
		} else {
			rcv := newReceiver()
			sub, err := subscribe(b.mosqNagle.url, rcv)
			if err != nil {
				return err
			}
			defer sub.Disconnect(250)
			brokers = append(brokers, e2eBroker{name: "mosquitto with its defaults (Nagle on)", url: b.mosqNagle.url, rcv: rcv})
		}
	}

	metricsFile := filepath.Join(b.dir, "e2e-metrics.lp")
	if err := writeLineProtocol(metricsFile, n, devices); err != nil {
		return err
	}
	defer os.Remove(metricsFile)
	want := lineProtocolTimes(n)
	for _, br := range brokers {
		if err := b.endToEndOn(ctx, br, telegrafBin, ourBin, metricsFile, want, devices); err != nil {
			return err
		}
	}
	// Goal 2 also on one core, standing in for a small gateway: the
	// default-mosquitto runs again with Telegraf and the plugin pinned to
	// CPU 0 (unless -cpus already pinned every run).
	if b.opts.cpus == "" {
		for _, br := range brokers {
			if br.emu {
				continue
			}
			b.opts.cpus = "0"
			err := b.endToEndOn(ctx, br, telegrafBin, ourBin, metricsFile, want, devices)
			b.opts.cpus = ""
			if err != nil {
				return err
			}
		}
	}
	return nil
}

func (b *bench) endToEndOn(ctx context.Context, br e2eBroker, telegrafBin, ourBin, metricsFile string, want []int64, devices int) error {
	n := len(want)
	slug := strings.Fields(br.name)[0]
	where := ""
	if b.opts.cpus != "" {
		where = fmt.Sprintf(", Telegraf and the plugin on CPU %s only (taskset -c %s)", b.opts.cpus, b.opts.cpus)
	}
	r := &row{id: "2", name: fmt.Sprintf("end to end through Telegraf --once: inputs.file, %s metrics, %s devices -> %s%s",
		groupThousands(int64(n)), groupThousands(int64(devices)), br.name, where),
		unit: "metrics/s", oursLabel: "outputs.execd + telegraf-omnicore", peerLabel: "outputs.mqtt"}
	cpuRow := &row{id: "2", name: fmt.Sprintf("CPU per metric of Telegraf and its children, same runs (-> %s%s)", br.name, where),
		unit: "µs/metric", lowerIsBetter: true, oursLabel: "outputs.execd + telegraf-omnicore", peerLabel: "outputs.mqtt",
		note:      "user + system time of the whole process tree (wait4 of Telegraf, which waits for the execd child), divided by the metrics; goal ours <= 0.5x",
		slowerWhy: "outputs.execd serializes every metric to line protocol and our process parses it again: two processes do the work of one"}
	rssRow := &row{id: "2", name: fmt.Sprintf("peak memory (RSS) of Telegraf plus the plugin process, same runs (-> %s%s)", br.name, where),
		unit: "MiB", lowerIsBetter: true, oursLabel: "outputs.execd + telegraf-omnicore", peerLabel: "outputs.mqtt",
		note:      "VmRSS of Telegraf and every descendant summed, sampled every 50 ms, peak; metric_buffer_limit holds the whole input in both",
		slowerWhy: "a second Go process (the execd plugin) has its own runtime and buffers"}
	bareRow := &row{id: "2", name: fmt.Sprintf("the same %s metrics, %s devices -> %s%s: ours through Telegraf vs bare paho", groupThousands(int64(n)), groupThousands(int64(devices)), br.name, where),
		unit: "metrics/s", oursLabel: "outputs.execd + telegraf-omnicore", peerLabel: "bare paho"}
	b.rows = append(b.rows, r, bareRow, cpuRow, rssRow)
	// The bare peer publishes exactly the payloads ours publishes: the
	// file's metrics without the device tag, one message per metric, to
	// /{registry}/{device}/events. Prepared before any timing.
	var bareMsgs []bareMsg
	if err := lineProtocolMetrics(n, devices, func(ms []telegraf.Metric) error {
		m, err := bareMessages(ms)
		bareMsgs = append(bareMsgs, m...)
		return err
	}); err != nil {
		return err
	}

	pluginConf := filepath.Join(b.dir, "omnicore-output-"+slug+".conf")
	plugin := b.pluginFile(br.url, "") + hostTable(`  ## Steady state without the spool (benchmark 7 measures the spool).
  spool = false
`)
	if err := os.WriteFile(pluginConf, []byte(plugin), 0o600); err != nil {
		return err
	}
	oursConf := filepath.Join(b.dir, "telegraf-execd-"+slug+".conf")
	if err := b.telegrafConfig(oursConf, metricsFile, n, execdOutputTable(ourBin, pluginConf)); err != nil {
		return err
	}
	peer, err := b.mqttOutputTable(br.url, broker{isEmu: br.emu})
	if err != nil {
		return err
	}
	peerConf := filepath.Join(b.dir, "telegraf-mqtt-"+slug+".conf")
	if err := b.telegrafConfig(peerConf, metricsFile, n, peer); err != nil {
		return err
	}

	// The cross-process path (emulator only): the same Telegraf also runs
	// inputs.execd with telegraf-omnicore and inputs.omnicore for the same
	// gateway. That process owns the gateway's connection; the output's
	// process reaches it through the sharing socket.
	runtimeDir := filepath.Join(b.dir, "runtime-e2e")
	var (
		sharedRow            *row
		sharedConf, inputCfg string
		sumShared            tally
		cpuShared            []float64
	)
	if br.emu {
		sharedRow = &row{id: "2", name: fmt.Sprintf("the same %s metrics -> %s, cross-process: the output through the sharing socket of an inputs.execd telegraf-omnicore that owns the connection, vs the output owning it", groupThousands(int64(n)), br.name),
			unit: "metrics/s", oursLabel: "output via the socket", peerLabel: "output owning the connection"}
		b.rows = append(b.rows, sharedRow)
		inputCfg = filepath.Join(b.dir, "omnicore-input-"+slug+".conf")
		input := b.gatewayTable("inputs.omnicore", br.url, "")
		if err := os.WriteFile(inputCfg, []byte(input), 0o600); err != nil {
			return err
		}
		// Telegraf starts its outputs before its inputs: the output's
		// process waits (at most 10 s) for the input's process to serve
		// the gateway's socket, so that the input owns the connection.
		// Whether it did is checked in the lock file after the run.
		sock := filepath.Join(runtimeDir, rendezvousName(b.id.clientID())+".sock")
		sharedConf = filepath.Join(b.dir, "telegraf-shared-"+slug+".conf")
		if err := b.telegrafConfig(sharedConf, metricsFile, n, fmt.Sprintf(`[[outputs.execd]]
  command = ["/bin/sh", "-c", 'i=0; while [ ! -S "$1" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; exec "$2" -config "$3"', "sh", %s, %s, %s]
  restart_delay = "10s"
  data_format = "influx"
  ## Only the file's metrics: inputs.omnicore turns the config the bridge
  ## sends each device it attaches into a metric, which is not for the
  ## receiver.
  namepass = ["sensor"]

[[inputs.execd]]
  command = [%s, "-config", %s]
  signal = "none"
  restart_delay = "10s"
  data_format = "influx"
`, tomlString(sock), tomlString(ourBin), tomlString(pluginConf), tomlString(ourBin), tomlString(inputCfg))); err != nil {
			return err
		}
	}
	// stopShared checks, once everything arrived, that the input's
	// process still owns the connection, then stops Telegraf.
	stopShared := func(p *os.Process) error {
		lock := filepath.Join(runtimeDir, rendezvousName(b.id.clientID())+".lock")
		text, err := os.ReadFile(lock)
		_ = p.Signal(syscall.SIGTERM)
		if err != nil {
			return fmt.Errorf("no owner's lock file at the last delivery: %w", err)
		}
		if !strings.Contains(string(text), "plugin_file "+inputCfg+"\n") {
			return fmt.Errorf("at the last delivery the connection was not owned by the input's process (lock file: %q)", lastLines(string(text), 4))
		}
		return nil
	}

	var wallOurs, wallPeer, firstOurs, firstPeer []float64
	var sumOurs, sumPeer, sumBare tally
	for run := 0; run < b.opts.runs; run++ {
		// ours, outputs.mqtt, bare paho and (emulator) ours through the
		// sharing socket, in an order that rotates between runs.
		clients := []string{"ours", "mqtt", "bare"}
		if sharedRow != nil {
			clients = append(clients, "shared")
		}
		k := run % len(clients)
		order := append(clients[k:], clients[:k]...)
		for _, who := range order {
			if who == "shared" {
				progress("  run %d/%d: telegraf --once with inputs.execd and outputs.execd telegraf-omnicore sharing one connection -> %s", run+1, b.opts.runs, br.name)
				logPath := filepath.Join(b.dir, fmt.Sprintf("telegraf-%s-%d-shared.log", slug, run))
				res, err := e2eRun(ctx, b.opts.cpus, telegrafBin, sharedConf, logPath, runtimeDir, br.rcv, want, stopShared)
				sumShared.add(res.tally)
				if err != nil {
					sharedRow.addProblem("shared: %v", err)
					sharedRow.leftOut++
					continue
				}
				sharedRow.ours = append(sharedRow.ours, res.rate)
				cpuShared = append(cpuShared, res.cpu)
				progress("    %s between the first and the last delivery, through the sharing socket; %.1f µs CPU/metric (process tree)", formatValue(res.rate, "metrics/s"), res.cpu)
				continue
			}
			if who == "bare" {
				progress("  run %d/%d: bare paho in this process -> %s", run+1, b.opts.runs, br.name)
				res, err := e2eBare(ctx, br, b.id, devices, bareMsgs, want)
				sumBare.add(res.tally)
				if err != nil {
					bareRow.addProblem("bare paho: %v", err)
					bareRow.leftOut++
					continue
				}
				bareRow.peer = append(bareRow.peer, res.rate)
				progress("    bare paho %s between the first and the last delivery", formatValue(res.rate, "metrics/s"))
				continue
			}
			ours := who == "ours"
			name, conf := "outputs.execd + telegraf-omnicore", oursConf
			if !ours {
				name, conf = "outputs.mqtt", peerConf
			}
			progress("  run %d/%d: telegraf --once with %s -> %s", run+1, b.opts.runs, name, br.name)
			logPath := filepath.Join(b.dir, fmt.Sprintf("telegraf-%s-%d-%t.log", slug, run, ours))
			res, err := e2eRun(ctx, b.opts.cpus, telegrafBin, conf, logPath, runtimeDir, br.rcv, want)
			if ours {
				sumOurs.add(res.tally)
			} else {
				sumPeer.add(res.tally)
			}
			if err != nil {
				rows := []*row{r, cpuRow, rssRow}
				if ours {
					rows = append(rows, bareRow)
					if sharedRow != nil {
						rows = append(rows, sharedRow)
					}
				}
				for _, rr := range rows {
					rr.addProblem("%s: %v", name, err)
					rr.leftOut++
				}
				continue
			}
			rss := float64(res.rss) / (1 << 20)
			if ours {
				r.ours = append(r.ours, res.rate)
				bareRow.ours = append(bareRow.ours, res.rate)
				if sharedRow != nil {
					sharedRow.peer = append(sharedRow.peer, res.rate)
				}
				cpuRow.ours = append(cpuRow.ours, res.cpu)
				rssRow.ours = append(rssRow.ours, rss)
				wallOurs = append(wallOurs, float64(n)/res.wall.Seconds())
				firstOurs = append(firstOurs, res.first.Seconds()*1000)
			} else {
				r.peer = append(r.peer, res.rate)
				cpuRow.peer = append(cpuRow.peer, res.cpu)
				rssRow.peer = append(rssRow.peer, rss)
				wallPeer = append(wallPeer, float64(n)/res.wall.Seconds())
				firstPeer = append(firstPeer, res.first.Seconds()*1000)
			}
			progress("    %s between the first and the last delivery; %s from Telegraf's start (%s); first delivery after %s; %.1f µs CPU/metric (process tree); peak RSS %.1f MiB",
				formatValue(res.rate, "metrics/s"), formatValue(float64(n)/res.wall.Seconds(), "metrics/s"), res.wall.Round(time.Millisecond),
				res.first.Round(time.Millisecond), res.cpu, rss)
		}
	}
	where = "the emulator's accepted events"
	topics := "outputs.mqtt publishes to the gateway's own events/{device} subfolders (it cannot attach)"
	if !br.emu {
		where = "a subscriber of mosquitto"
		topics = "both publish to the per-device topics /{registry}/{device}/events"
	}
	r.note = fmt.Sprintf("real Telegraf %s processes, metric_batch_size 1000, QoS 1 both; rate between the first and the last delivery; counting from Telegraf's start (startup, connect and attach included) ours %s, outputs.mqtt %s; time from Telegraf's start to the first delivery ours %s, outputs.mqtt %s; %s; counted at the receiver (%s), all runs: ours %s; outputs.mqtt %s",
		telegrafVersion(ctx, telegrafBin), formatValue(median(wallOurs), "metrics/s"), formatValue(median(wallPeer), "metrics/s"),
		formatValue(median(firstOurs), "ms"), formatValue(median(firstPeer), "ms"), topics, where, sumOurs, sumPeer)
	r.slowerWhy = "outputs.execd serializes every metric to line protocol and our binary parses it again, and outputs.execd gives no acknowledgement, so the pipe is the only back-pressure"
	attached := "devices attached beforehand (untimed, as the bridge requires)"
	if !br.emu {
		attached = "the same attaches first (mosquitto acknowledges them; untimed)"
	}
	bareRow.note = fmt.Sprintf("ours: the runs of the row above (real Telegraf, inputs.file -> outputs.execd -> telegraf-omnicore); bare paho: paho.mqtt.golang in the benchmark's own process (no Telegraf, no pipe, no parsing), publishing exactly the payloads ours publishes (the file's lines without the device tag, one message per metric, to /{registry}/{device}/events), prepared before the clock, QoS 1 with 100 publishes in flight (our max_inflight), continuously, %s; both rates between the first and the last delivery at the same receiver (%s), in the same run loop; goal ours >= 0.80x; counted at the receiver, all runs: ours %s; bare paho %s",
		attached, where, sumOurs, sumBare)
	if b.opts.cpus != "" {
		bareRow.note += fmt.Sprintf("; Telegraf and our plugin on CPU %s only, bare paho (this process) not pinned", b.opts.cpus)
	}
	bareRow.slowerWhy = "the bare publisher has its payloads ready in memory in the same process; ours gets every metric from Telegraf through outputs.execd, which serializes it to line protocol on a pipe that our process reads and parses again, then routes, strips the device tag and re-serializes it, with Write boundaries of 1,000 (see the CPU row: the two processes share the machine's cores with the broker)"
	if !br.emu {
		bareRow.slowerWhy = "with Nagle on at the broker (its default), the last PUBACKs of each of our Writes of 1,000 wait for the client's delayed TCP ACK (up to 40 ms on Linux) before mosquitto sends them, while the continuous bare publisher never has a last message; besides, ours gets every metric from Telegraf through outputs.execd (serialized to line protocol on a pipe, parsed again in our process), where bare paho has its payloads ready in memory"
	}
	if sharedRow != nil {
		sharedRow.note = fmt.Sprintf("the same Telegraf --once and file as the row above, plus [[inputs.execd]] running telegraf-omnicore with an inputs.omnicore file for the same gateway and connection options (listen = \"attached\", its default: it also subscribes to the config and commands of every device the output attaches, and the config each then receives becomes a metric, which namepass keeps from the output); the input's process owns the gateway's connection (the output's process is started once the input's socket is served, and the lock file is checked to still name the input's plugin file at the last delivery) and the output's process publishes through the sharing socket (%s); the peer is the output alone owning the connection, the runs of the row above; after the last delivery Telegraf (run with --test-wait so that the input keeps running) is stopped with SIGTERM; rate between the first and the last delivery; CPU per metric of Telegraf and its children: through the socket %.1f µs (three processes), owning %.1f µs; counted at the receiver (%s), all runs: through the socket %s; owning %s",
			share.EnvRuntimeDir, median(cpuShared), median(cpuRow.ours), where, sumShared, sumOurs)
		sharedRow.slowerWhy = "every message and its acknowledgement cross the Unix socket between the output's process and the owner's, a third process on the machine's two cores"
	}
	return nil
}

// rendezvousName is the share package's name of a gateway's files in the
// sharing directory: "gw-" and 24 hex digits of the SHA-256 of the client
// ID (execd/share/conn.go; the benchmark checks the owner's lock).
func rendezvousName(clientID string) string {
	sum := sha256.Sum256([]byte(clientID))
	return "gw-" + hex.EncodeToString(sum[:12])
}

// e2eBare publishes msgs with bare paho from this process to br, as ours
// does through Telegraf, and counts at br's receiver what arrived of want.
// The rate is taken as ours is: between the first and the last delivery.
func e2eBare(ctx context.Context, br e2eBroker, id identity, devices int, msgs []bareMsg, want []int64) (e2eResult, error) {
	br.rcv.reset(false)
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	_, err := runBare(ctx, br.url, id, deviceIDs(devices), nil, msgs, 100, 0, nil)
	br.rcv.waitFor(ctx, len(want), receiverQuiet)
	first, last := br.rcv.span()
	res := e2eResult{tally: br.rcv.count(want)}
	if err != nil {
		return res, err
	}
	if !res.tally.ok() {
		return res, fmt.Errorf("at the receiver %s", res.tally)
	}
	if !last.After(first) {
		return res, errors.New("no time between the first and the last message")
	}
	res.rate = float64(len(want)-1) / last.Sub(first).Seconds()
	return res, nil
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

// execdStopErrors are the error lines Telegraf 1.37.2 itself may log when
// it is stopped (SIGTERM) while inputs.execd runs a process: its execd
// reads the process's pipes after they were closed, and with --test-wait
// those count as input errors and make it exit 1. They say nothing about
// the plugin, which logs its own errors as "stderr: E! ...".
var execdStopErrors = []string{
	"[agent] SleepContext finished with: context canceled",
	"Error in plugin: read |0: file already closed",
	"Error in plugin: error reading stderr: read |0: file already closed",
	"Error reading stderr: read |0: file already closed",
	"[telegraf] Error running agent: input plugins recorded",
}

// onlyExecdStopErrors says whether every error line of a Telegraf log
// stopped with SIGTERM is one of execdStopErrors, or a plugin's line below
// error level that execd logs as an error ("stderr: W! ...").
func onlyExecdStopErrors(log string) bool {
	for _, l := range strings.Split(log, "\n") {
		if !strings.Contains(l, " E! ") {
			continue
		}
		benign := strings.Contains(l, "] stderr: W! ") || strings.Contains(l, "] stderr: I! ") || strings.Contains(l, "] stderr: D! ")
		for _, e := range execdStopErrors {
			benign = benign || strings.Contains(l, e)
		}
		if !benign {
			return false
		}
	}
	return true
}
