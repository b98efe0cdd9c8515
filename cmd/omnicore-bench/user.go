package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

// Benchmark 9 measures the way a user sees it (issue 24): a real Telegraf
// left running, fed the metrics once, the clock from Telegraf's start to
// the last message at a subscriber of the broker, and the CPU of the whole
// Telegraf process tree. Benchmarks 1, 2 and 7 start their clocks at the
// first message or Write and show the steady state instead.

// The routes of benchmark 9.
const (
	routeExecd   = "outputs.execd + telegraf-omnicore"
	routeBuiltin = "built in (outputs.omnicore)"
	routeMQTT    = "outputs.mqtt"
	routeDiscard = "outputs.discard"
)

// userRoute is one Telegraf run of benchmark 9.
type userRoute struct {
	name string
	bin  string // the Telegraf binary
	cfg  string
	// once runs telegraf --once and stops the clock at its exit: the
	// ceiling (outputs.discard) has no receiver to stop it.
	once bool
}

// userResult is one run as the subscriber and the OS saw it.
type userResult struct {
	wall time.Duration // Telegraf's start to the last message (or its exit)
	cpu  time.Duration // CPU of Telegraf's process tree at that moment
	// others is the CPU the broker and the subscriber spent over the
	// same span: they share the machine's cores with Telegraf, so the
	// three together say whether a run was bound by the CPU.
	others time.Duration
	tally  tally
}

func (r userResult) rate(n int) float64         { return float64(n) / r.wall.Seconds() }
func (r userResult) cpuPerMetric(n int) float64 { return float64(r.cpu.Microseconds()) / float64(n) }

// userRows are the rows of one pass of benchmark 9 (all cores, or one).
type userRows struct {
	execd, builtin, cpuExecd, cpuBuiltin, ceiling *row
	// builtinVsExecd is goal 2 of issue 24: built in at least as fast as
	// outputs.execd.
	builtinVsExecd *row
	results        map[string][]userResult
	sums           map[string]*tally
	// cores is the machine's CPU count, for how busy a run kept it.
	cores int
}

func newUserRows(n, devices int, where string, strict bool) *userRows {
	queue := "(but an unbounded subscriber queue)"
	if strict {
		queue = "(all of them)"
	}
	what := fmt.Sprintf("%s metrics, %s devices, inputs.execd (cat) -> Telegraf (not --once) -> QoS 1 -> mosquitto with its defaults %s -> a QoS 1 subscriber%s",
		groupThousands(int64(n)), groupThousands(int64(devices)), queue, where)
	u := &userRows{
		execd: &row{id: "9", name: "as a user measures it, from Telegraf's start to the last message at the subscriber: " + what,
			unit: "metrics/s", oursLabel: routeExecd, peerLabel: routeMQTT},
		builtin: &row{id: "9", name: "the same, built in (make telegraf-builtin)" + where,
			unit: "metrics/s", oursLabel: routeBuiltin, peerLabel: routeMQTT},
		cpuExecd: &row{id: "9", name: "CPU per metric of Telegraf's process tree, same runs" + where,
			unit: "µs/metric", lowerIsBetter: true, oursLabel: routeExecd, peerLabel: routeMQTT},
		cpuBuiltin: &row{id: "9", name: "CPU per metric of Telegraf's process tree, built in, same runs" + where,
			unit: "µs/metric", lowerIsBetter: true, oursLabel: routeBuiltin, peerLabel: routeMQTT},
		builtinVsExecd: &row{id: "9", name: "built in vs outputs.execd + telegraf-omnicore, same runs" + where,
			unit: "metrics/s", oursLabel: routeBuiltin, peerLabel: routeExecd},
		ceiling: &row{id: "9", name: "the ceiling: Telegraf --once, inputs.file -> outputs.discard, Telegraf's start to its exit" + where,
			unit: "metrics/s", neutral: true, oursLabel: routeDiscard, peerLabel: routeMQTT},
		results: map[string][]userResult{},
		sums:    map[string]*tally{routeExecd: {}, routeBuiltin: {}, routeMQTT: {}},
		cores:   runtime.NumCPU(),
	}
	return u
}

func (u *userRows) all() []*row {
	return []*row{u.execd, u.builtin, u.builtinVsExecd, u.cpuExecd, u.cpuBuiltin, u.ceiling}
}

// rowsOf are the rows a route's runs feed, as ours and as the peer.
func (u *userRows) rowsOf(route string) (ours, peer []*row) {
	switch route {
	case routeExecd:
		return []*row{u.execd, u.cpuExecd}, []*row{u.builtinVsExecd}
	case routeBuiltin:
		return []*row{u.builtin, u.cpuBuiltin, u.builtinVsExecd}, nil
	case routeDiscard:
		return []*row{u.ceiling}, nil
	default:
		return nil, []*row{u.execd, u.builtin, u.cpuExecd, u.cpuBuiltin, u.ceiling}
	}
}

// add records one run of route in its rows.
func (u *userRows) add(route string, n int, res userResult) {
	u.results[route] = append(u.results[route], res)
	ours, peer := u.rowsOf(route)
	for _, r := range ours {
		if r.unit == "µs/metric" {
			r.ours = append(r.ours, res.cpuPerMetric(n))
		} else {
			r.ours = append(r.ours, res.rate(n))
		}
	}
	for _, r := range peer {
		if r.unit == "µs/metric" {
			r.peer = append(r.peer, res.cpuPerMetric(n))
		} else {
			r.peer = append(r.peer, res.rate(n))
		}
	}
}

// fail records a run of route that had a problem in the rows it feeds.
func (u *userRows) fail(route string, err error) {
	ours, peer := u.rowsOf(route)
	for _, r := range append(ours, peer...) {
		r.addProblem("%s: %v", route, err)
		r.leftOut++
	}
}

// summary is the medians of a route's runs: wall, CPU of the tree and CPU
// per metric, for the notes.
func (u *userRows) summary(route string, n int) string {
	rs := u.results[route]
	if len(rs) == 0 {
		return route + ": no run"
	}
	var wall, cpu, per, others, busy, bound []float64
	for _, r := range rs {
		wall = append(wall, r.wall.Seconds())
		cpu = append(cpu, r.cpu.Seconds())
		per = append(per, r.cpuPerMetric(n))
		others = append(others, float64(r.others.Microseconds())/float64(n))
		busy = append(busy, 100*(r.cpu+r.others).Seconds()/(r.wall.Seconds()*float64(u.cores)))
		if all := (r.cpu + r.others).Seconds(); all > 0 {
			bound = append(bound, float64(n)*float64(u.cores)/all)
		}
	}
	s := fmt.Sprintf("%s: wall %.2f s, CPU of the tree %.2f s, %.1f µs/metric", route, median(wall), median(cpu), median(per))
	if route != routeDiscard && u.cores > 0 {
		s += fmt.Sprintf(", the broker and the subscriber %.1f µs/metric, all three together %.0f%% of the machine's %d cores", median(others), median(busy), u.cores)
		if len(bound) > 0 {
			// The rate if the three kept every core busy and spent what
			// they did: no route of this CPU cost gets past it here.
			s += fmt.Sprintf(" (at 100%%, that CPU per metric allows %s)", formatValue(median(bound), "metrics/s"))
		}
	}
	if t := u.sums[route]; t != nil {
		s += "; all runs at the subscriber: " + t.String()
	}
	return s
}

func (b *bench) benchUser(ctx context.Context) error {
	n, devices := b.sz.userMetrics, b.sz.userDevices
	passes := []string{"", "0"}
	var all []*userRows
	for _, cpus := range passes {
		u := newUserRows(n, devices, pinnedWhere(cpus), b.opts.strictMosq)
		all = append(all, u)
		b.rows = append(b.rows, u.all()...)
	}
	skipAll := func(why string) error {
		for _, u := range all {
			for _, r := range u.all() {
				r.skipped = why
			}
		}
		return nil
	}
	telegrafBin, ourBin, skip := b.prepareBinaries(ctx)
	if skip != "" {
		return skipAll(skip)
	}
	if b.hdr.telegraf == "not used" {
		b.hdr.telegraf = telegrafBin + " " + telegrafVersion(ctx, telegrafBin)
	}
	mosqBin := findMosquitto(b.opts.mosquitto)
	if mosqBin == "" {
		return skipAll("no mosquitto (install it with: apt-get install -y mosquitto)")
	}
	mosq, err := startMosquittoDefaults(ctx, mosqBin, b.dir, b.opts.strictMosq)
	if err != nil {
		return skipAll(fmt.Sprintf("mosquitto with its defaults did not start: %v", err))
	}
	defer mosq.stop()
	if b.hdr.mosquitto == "not used" {
		b.hdr.mosquitto = mosqBin + " " + mosquittoVersion(mosqBin)
	}
	rcv := newReceiver()
	sub, err := startUserSubscriber(ctx, mosq.url, b.dir, rcv)
	if err != nil {
		return err
	}
	defer sub.stop()

	builtinBin, builtinSkip := b.prepareBuiltin(ctx)
	if builtinSkip != "" {
		for _, u := range all {
			u.builtin.skipped, u.cpuBuiltin.skipped, u.builtinVsExecd.skipped = builtinSkip, builtinSkip, builtinSkip
		}
	} else {
		b.hdr.telegraf += "; built in: " + builtinBin
	}

	metricsFile := filepath.Join(b.dir, "user-metrics.lp")
	if err := writeLineProtocol(metricsFile, n, devices); err != nil {
		return err
	}
	defer os.Remove(metricsFile)
	routes, err := b.userRoutes(mosq.url, metricsFile, n, telegrafBin, ourBin, builtinBin)
	if err != nil {
		return err
	}
	want := lineProtocolTimes(n)
	for i, cpus := range passes {
		u := all[i]
		for run := 0; run < b.opts.runs; run++ {
			k := run % len(routes)
			for _, rt := range append(routes[k:], routes[:k]...) {
				progress("  run %d/%d%s: %s", run+1, b.opts.runs, pinnedWhere(cpus), rt.name)
				logPath := filepath.Join(b.dir, fmt.Sprintf("user-%s-%d-%s.log", cpus, run, strings.Fields(rt.name)[0]))
				res, err := b.userRun(ctx, cpus, rt, logPath, mosq, sub, rcv, want)
				if t := u.sums[rt.name]; t != nil {
					t.add(res.tally)
				}
				if err != nil {
					u.fail(rt.name, err)
					progress("    problem: %v", err)
					continue
				}
				u.add(rt.name, n, res)
				progress("    %s from Telegraf's start (%s); CPU of the tree %s, %.1f µs/metric; broker and subscriber %.1f µs/metric; at the subscriber %s",
					formatValue(res.rate(n), "metrics/s"), res.wall.Round(time.Millisecond), res.cpu.Round(time.Millisecond), res.cpuPerMetric(n),
					float64(res.others.Microseconds())/float64(n), res.tally)
			}
		}
		b.userNotes(u, n, cpus, sub.kind)
	}
	return nil
}

func pinnedWhere(cpus string) string {
	if cpus == "" {
		return ""
	}
	return fmt.Sprintf(", Telegraf and its children on CPU %s only (taskset -c %s)", cpus, cpus)
}

// prepareBuiltin finds or builds the Telegraf with our plugins compiled in;
// a reason is returned instead when that route cannot run.
func (b *bench) prepareBuiltin(ctx context.Context) (bin, skip string) {
	switch b.opts.builtin {
	case "none":
		return "", "no built-in Telegraf (-telegraf-builtin none)"
	case "":
		root, err := repoRoot()
		if err != nil {
			return "", err.Error()
		}
		if bin, err = buildTelegraf(ctx, root, "--builtin"); err != nil {
			return "", err.Error()
		}
	default:
		bin = b.opts.builtin
	}
	if st, err := os.Stat(bin); err != nil || st.IsDir() {
		return "", fmt.Sprintf("%s is not a file", bin)
	}
	return bin, ""
}

// userRoutes writes the Telegraf configuration of every route. Every route
// but the ceiling is the same agent and input (catAgentConfig) with another
// output, each with its default options.
func (b *bench) userRoutes(url, metricsFile string, n int, telegrafBin, ourBin, builtinBin string) ([]userRoute, error) {
	pluginConf := filepath.Join(b.dir, "user-omnicore-output.conf")
	if err := os.WriteFile(pluginConf, []byte(b.pluginFile(url, "")), 0o600); err != nil {
		return nil, err
	}
	peer, err := b.mqttOutputTable(url, broker{})
	if err != nil {
		return nil, err
	}
	outputs := []struct {
		name, bin, output string
	}{
		{routeExecd, telegrafBin, execdOutputTable(ourBin, pluginConf)},
		{routeMQTT, telegrafBin, peer},
	}
	if builtinBin != "" {
		outputs = append(outputs, struct{ name, bin, output string }{routeBuiltin, builtinBin, b.pluginFile(url, "")})
	}
	var routes []userRoute
	for i, o := range outputs {
		cfg := filepath.Join(b.dir, fmt.Sprintf("user-telegraf-%d.conf", i))
		if err := os.WriteFile(cfg, []byte(catAgentConfig(metricsFile, n)+"\n"+o.output), 0o600); err != nil {
			return nil, err
		}
		routes = append(routes, userRoute{name: o.name, bin: o.bin, cfg: cfg})
	}
	ceiling := filepath.Join(b.dir, "user-telegraf-discard.conf")
	if err := b.telegrafConfig(ceiling, metricsFile, n, "[[outputs.discard]]\n"); err != nil {
		return nil, err
	}
	return append(routes, userRoute{name: routeDiscard, bin: telegrafBin, cfg: ceiling, once: true}), nil
}

// userQuiet is how long benchmark 9 waits for the next message at the
// subscriber (from Telegraf's start for the first one) before it counts
// what arrived.
const userQuiet = 30 * time.Second

// userRun runs Telegraf for one route with a fresh state and sharing
// directory, optionally pinned to cpus. A streaming route is stopped
// (SIGTERM) once every metric arrived at the subscriber, or nothing more
// came; its CPU is read from /proc at the last arrival, before the stop,
// so that Telegraf's shutdown is not counted.
func (b *bench) userRun(ctx context.Context, cpus string, rt userRoute, logPath string, mosq *mosquitto, sub *userSubscriber, rcv *receiver, want []int64) (userResult, error) {
	n := len(want)
	rcv.reset(false)
	mosqLog := mosq.logSize()
	state, err := os.MkdirTemp(b.dir, "user-state-")
	if err != nil {
		return userResult{}, err
	}
	defer os.RemoveAll(state)
	logf, err := os.Create(logPath)
	if err != nil {
		return userResult{}, err
	}
	defer logf.Close()
	args := []string{rt.bin, "--config", rt.cfg}
	if rt.once {
		args = append(args, "--once")
	}
	if cpus != "" {
		// taskset execs Telegraf, whose children inherit the affinity.
		args = append([]string{"taskset", "-c", cpus}, args...)
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), statedir.EnvStateDirectory+"="+state, share.EnvRuntimeDir+"="+filepath.Join(state, "rt"))
	othersAtStart := othersCPU(mosq, sub)
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return userResult{}, err
	}
	exited := make(chan struct{})
	var exitedAt time.Time
	var exitErr error
	go func() { exitErr = cmd.Wait(); exitedAt = time.Now(); close(exited) }()
	stop := func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}

	if rt.once {
		select {
		case <-exited:
		case <-ctx.Done():
			stop()
			return userResult{}, ctx.Err()
		}
		if exitErr != nil {
			out, _ := os.ReadFile(logPath)
			return userResult{}, fmt.Errorf("telegraf --once: %v: %s", exitErr, lastLines(string(out), 4))
		}
		res := userResult{wall: exitedAt.Sub(start)}
		// wait4 reports the CPU of Telegraf and of the children it
		// waited for.
		if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
			res.cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
		return res, nil
	}

	// Telegraf runs on: a lost message never comes, so the wait ends
	// after userQuiet without one.
	rcv.waitWhileRunning(ctx, n, userQuiet, exited)
	cpu, cpuErr := treeCPU(cmd.Process.Pid)
	others := othersCPU(mosq, sub) - othersAtStart
	_, last := rcv.span()
	stop()
	logf.Close()
	res := userResult{wall: last.Sub(start), cpu: cpu, others: others, tally: rcv.count(want)}
	out, _ := os.ReadFile(logPath)
	switch {
	case !res.tally.ok():
		why := ""
		// mosquitto 2.0 logs this once per subscriber connection: only
		// the first run with drops can say so.
		if mosq.mosquittoDrops(mosqLog) > 0 {
			why = "; mosquitto logged that it dropped outgoing messages for a client: the subscriber fell behind and its queue (max_queued_messages, 1,000 by default, kept by -mosquitto-strict-defaults) was full"
		}
		return res, fmt.Errorf("at the subscriber %s%s (telegraf: %v; log: %s)", res.tally, why, exitErr, lastLines(string(out), 4))
	case cpuErr != nil:
		return res, fmt.Errorf("the CPU of Telegraf's tree at the last message: %w", cpuErr)
	case !onlyExecdStopErrors(string(out)):
		return res, fmt.Errorf("telegraf logged errors: %s", lastLines(errorLines(string(out)), 3))
	case !last.After(start):
		return res, errors.New("no message after Telegraf's start")
	}
	return res, nil
}

// othersCPU is the CPU spent so far by the broker and the subscriber
// process (0 for what cannot be read: the figure is a note, not a row).
func othersCPU(mosq *mosquitto, sub *userSubscriber) time.Duration {
	var sum time.Duration
	for _, pid := range []int{mosq.cmd.Process.Pid, sub.pid} {
		if pid == 0 {
			continue
		}
		if d, err := treeCPU(pid); err == nil {
			sum += d
		}
	}
	return sum
}

// errorLines are the lines of a Telegraf log at error level.
func errorLines(log string) string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, " E! ") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// userNotes writes the method of one pass into its rows' notes.
func (b *bench) userNotes(u *userRows, n int, cpus, subscriber string) {
	mqtt := u.summary(routeMQTT, n)
	broker := "mosquitto with its default settings (Nagle on, max_inflight_messages 20) but max_queued_messages 0: its default 1,000 drops what does not fit in a subscriber's queue, and on a loaded machine the subscriber fell behind the fastest routes (-mosquitto-strict-defaults keeps it)"
	if b.opts.strictMosq {
		broker = "mosquitto with its default settings (Nagle on, max_inflight_messages 20, max_queued_messages 1000, which drops what does not fit in a subscriber's queue)"
	}
	common := "real Telegraf processes left running (not --once), inputs.execd running cat on the line-protocol file once (signal none), metric_batch_size 1000, flush_interval 1s, metric_buffer_limit above the file; default plugin options (telegraf-omnicore's spool on, a fresh STATE_DIRECTORY per run); QoS 1 onto " + broker + "; the subscriber: %s, counting every metric; the clock runs from Telegraf's start to the last metric at the subscriber"
	common = fmt.Sprintf(common, subscriber)
	// Why the share of the cores is in the notes: the broker and the
	// subscriber run on the same cores as Telegraf, and when the three
	// keep them busy the run is bound by CPU, not by round trips, so a
	// route gets faster only by spending less CPU per metric.
	common += "; the broker's and the subscriber's CPU over the same span is given next to the tree's, with how busy the three kept the machine's cores: near 100% a route is bound by CPU, not by round trips"
	u.execd.note = fmt.Sprintf("%s; %s; %s", common, u.summary(routeExecd, n), mqtt)
	u.builtin.note = fmt.Sprintf("the runs of the row above with Telegraf %s (outputs.omnicore compiled in, the same options in Telegraf's config; its spool options do not apply there); %s; %s",
		"of make telegraf-builtin", u.summary(routeBuiltin, n), mqtt)
	cpuNote := "user + system time of Telegraf and every descendant (its own and its waited-for children's, from /proc/<pid>/stat) read at the last metric's arrival, before Telegraf is stopped, divided by the metrics; goal ours <= 0.5x"
	u.cpuExecd.note = cpuNote
	u.cpuBuiltin.note = cpuNote
	u.ceiling.note = fmt.Sprintf("what Telegraf itself costs: the same file read by inputs.file under --once into outputs.discard, no broker; wall from Telegraf's start to its exit, CPU from wait4; %s; %s", u.summary(routeDiscard, n), mqtt)
	u.execd.slowerWhy = "outputs.execd serializes every metric to line protocol and our process parses it again, and with the spool appends it to disk and reads it back before publishing"
	u.cpuExecd.slowerWhy = "two processes do the work of one: outputs.execd serializes, telegraf-omnicore parses, spools and serializes again"
	u.builtin.slowerWhy = "Telegraf calls one Write at a time and each Write waits for the last PUBACK of its batch"
	u.cpuBuiltin.slowerWhy = "see the profile in the closing note of issue 24"
	u.builtinVsExecd.note = fmt.Sprintf("the runs of the two rows above; goal (issue 24) built in at least as fast; %s; %s", u.summary(routeBuiltin, n), u.summary(routeExecd, n))
	u.builtinVsExecd.slowerWhy = u.builtin.slowerWhy
	if cpus != "" {
		for _, r := range u.all() {
			r.note += "; mosquitto and the subscriber are not pinned"
		}
	}
}
