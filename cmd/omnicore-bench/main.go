// Command omnicore-bench measures telegraf-omnicore side by side with its
// peers on loopback and prints one table: every figure of ours with the
// peer's figure measured in the same run, and their ratio. It writes the
// table, the machine it ran on and the method as Markdown (docs/benchmarks.md).
//
//	go run ./cmd/omnicore-bench              # the full run (about 15 minutes)
//	go run ./cmd/omnicore-bench -quick       # a smoke run with small sizes (< 60 s)
//	go run ./cmd/omnicore-bench -only 1,3    # some benchmarks only
//
// The benchmarks (issue 7):
//
//	1   publish throughput at QoS 1 with per-device topics: outputs.omnicore
//	    vs Telegraf's outputs.mqtt vs a bare paho publisher, on mosquitto
//	    and on the bridge emulator
//	    (also over TLS on the emulator, and with 50,000 devices vs bare paho)
//	1b  the same through a proxy that adds a 20 ms round trip; ours vs bare
//	    paho over TLS at 20 ms and 100 ms round trips
//	2   end to end through a real Telegraf: inputs.file -> outputs.execd ->
//	    telegraf-omnicore -> emulator, vs outputs.mqtt in the same Telegraf
//	    and vs bare paho; the output through the sharing socket of an
//	    inputs.execd telegraf-omnicore that owns the connection
//	3   attach storm: 1,000 and 10,000 devices pipelined vs one at a time
//	4   memory per attached device and over a long run, in a child process
//	5   under the bridge's 100 messages/s cap (throttle and close), a flush
//	    every 10 s: layout auto vs batch and non-batch, rate and latency
//	6   inbound: commands and configs to metrics, rate and latency, vs
//	    Telegraf's inputs.mqtt_consumer
//	7   the output's spool (store and forward) through a real Telegraf: its
//	    cost, the cost of its fsync, how fast a backlog drains
//	8   a pool of 1, 2 and 4 gateways under the bridge's 100 messages/s per
//	    connection (issue 16): metrics/s, goal linear
//	9   as a user measures it (issue 24): a real Telegraf, not --once, fed
//	    the file once by inputs.execd (cat), default options (the spool
//	    on), QoS 1 onto a mosquitto with its default settings; the clock
//	    runs from Telegraf's start to the last message at a QoS 1
//	    subscriber, CPU is the Telegraf process tree's: outputs.execd +
//	    telegraf-omnicore and built in vs outputs.mqtt, outputs.discard as
//	    the ceiling; again on one core (taskset -c 0)
//	10  bytes on the wire per metric (issue 24): TCP payload both ways
//	    through a counting proxy, layouts non-batch, batch and auto vs
//	    outputs.mqtt, influx and json, plain and TLS
//
// The throughput figures of benchmarks 1, 2 and 7 are steady-state figures:
// their clocks start at the first message or the first timed Write.
//
// Nothing leaves loopback; every phase is bounded in time; figures are
// printed, never asserted.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

// options are the command-line settings.
type options struct {
	runs          int
	quick         bool
	only          map[string]bool
	out           string
	mosquitto     string
	telegraf      string
	builtin       string
	strictMosq    bool
	omnicoreBin   string
	timeout       time.Duration
	workDir       string
	quiet         bool
	cpuProfile    string
	metrics       int
	e2eMetrics    int
	ratePerDevice int
	cpus          string
	clients       map[string]bool
	brokers       map[string]bool
}

func main() {
	if len(os.Args) > 2 && os.Args[1] == childFlag {
		os.Exit(runChild(os.Args[2:]))
	}
	opts, err := parseOptions(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "omnicore-bench:", err)
		os.Exit(2)
	}
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	if err := run(ctx, opts, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "omnicore-bench:", err)
		os.Exit(1)
	}
}

var allBenchmarks = []string{"1", "1b", "2", "3", "4", "5", "6", "7", "8", "9", "10"}

// benchmarkNames are the one-line descriptions -h shows for -only.
var benchmarkNames = []string{
	"1: publish throughput in process (steady state)",
	"1b: the same through a 20 ms / 100 ms round trip (steady state)",
	"2: end to end through Telegraf --once (steady state: first to last delivery)",
	"3: attach storm",
	"4: memory",
	"5: under the bridge's 100 messages/s cap",
	"6: inbound commands and configs",
	"7: the output's spool through Telegraf",
	"8: a pool of gateways",
	"9: as a user measures it: Telegraf's start to the last message at a QoS 1 subscriber, CPU of the process tree, also on one core",
	"10: bytes on the wire per metric (TCP payload both ways) by layout and data format",
}

func parseOptions(args []string) (*options, error) {
	o := &options{}
	fs := flag.NewFlagSet("omnicore-bench", flag.ContinueOnError)
	var only string
	fs.IntVar(&o.runs, "runs", 3, "runs per figure; the table shows medians")
	fs.BoolVar(&o.quick, "quick", false, "smoke run: small sizes, 1 run unless -runs is given, finishes in under a minute")
	fs.StringVar(&only, "only", "", "comma-separated benchmarks to run; default all:\n"+strings.Join(benchmarkNames, "\n"))
	fs.StringVar(&o.out, "out", "", "write the table and method as Markdown to this file (e.g. docs/benchmarks.md)")
	fs.StringVar(&o.mosquitto, "mosquitto", "", "mosquitto binary (default: from PATH or /usr/sbin); without one the mosquitto rows are skipped")
	fs.StringVar(&o.telegraf, "telegraf", "", "Telegraf 1.37.2 binary for benchmark 2 (default: built by scripts/build-telegraf.sh)")
	fs.StringVar(&o.builtin, "telegraf-builtin", "", "Telegraf 1.37.2 with our plugins compiled in, for benchmark 9 (default: built by scripts/build-telegraf.sh --builtin; none: skip that route)")
	fs.BoolVar(&o.strictMosq, "mosquitto-strict-defaults", false, "benchmark 9: leave mosquitto's max_queued_messages at its default 1,000 too (a subscriber that falls behind then loses messages at the broker)")
	fs.StringVar(&o.omnicoreBin, "omnicore-bin", "", "telegraf-omnicore binary for benchmark 2 (default: go build ./cmd/telegraf-omnicore)")
	fs.DurationVar(&o.timeout, "timeout", time.Hour, "bound of the whole run")
	fs.StringVar(&o.workDir, "workdir", "", "directory for keys, configs and logs (default: a temporary one, removed at the end)")
	fs.BoolVar(&o.quiet, "q", false, "no progress lines on stderr")
	fs.StringVar(&o.cpuProfile, "cpuprofile", "", "write a CPU profile of this process to the file")
	fs.IntVar(&o.metrics, "metrics", 0, "override the number of metrics of benchmark 1 (ours, outputs.mqtt and bare alike)")
	fs.IntVar(&o.e2eMetrics, "e2e-metrics", 0, "override the number of metrics of benchmark 2")
	fs.StringVar(&o.cpus, "cpus", "", "benchmark 2: run Telegraf (and the plugin process it starts) on these CPUs only (taskset -c), e.g. 0 to stand in for a one-core gateway")
	fs.IntVar(&o.ratePerDevice, "rate-per-device", 0, "override the metrics per device and flush of benchmark 5")
	var clients, brokers string
	fs.StringVar(&clients, "clients", "", "benchmarks 1 and 1b: only these clients (ours,mqtt,bare), e.g. to profile one of them")
	fs.StringVar(&brokers, "brokers", "", "benchmarks 1, 1b and 2: only these brokers (mosquitto,emulator)")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	runsSet := false
	fs.Visit(func(f *flag.Flag) {
		if f.Name == "runs" {
			runsSet = true
		}
	})
	if o.quick && !runsSet {
		o.runs = 1
	}
	if o.runs < 1 {
		return nil, fmt.Errorf("-runs %d must be at least 1", o.runs)
	}
	var err error
	if o.clients, err = parseSet("-clients", clients, []string{"ours", "mqtt", "bare"}); err != nil {
		return nil, err
	}
	if o.brokers, err = parseSet("-brokers", brokers, []string{"mosquitto", "emulator"}); err != nil {
		return nil, err
	}
	if only != "" {
		o.only = map[string]bool{}
		for _, b := range strings.Split(only, ",") {
			b = strings.TrimSpace(b)
			if !slices.Contains(allBenchmarks, b) {
				return nil, fmt.Errorf("-only: unknown benchmark %q (have %s)", b, strings.Join(allBenchmarks, ","))
			}
			o.only[b] = true
		}
	}
	return o, nil
}

func (o *options) wants(id string) bool { return o.only == nil || o.only[id] }

// parseSet parses a comma-separated subset of allowed; nil means all.
func parseSet(flagName, value string, allowed []string) (map[string]bool, error) {
	if value == "" {
		return nil, nil
	}
	set := map[string]bool{}
	for _, v := range strings.Split(value, ",") {
		v = strings.TrimSpace(v)
		if !slices.Contains(allowed, v) {
			return nil, fmt.Errorf("%s: unknown value %q (have %s)", flagName, v, strings.Join(allowed, ","))
		}
		set[v] = true
	}
	return set, nil
}

// sizes are the workload sizes of one mode.
type sizes struct {
	pub, pubRTT            publishSizes
	nagleMetrics           int // ours and bare on mosquitto with Nagle on
	tlsRTT100Metrics       int // ours and bare over TLS through the 100 ms RTT proxy
	tlsMetrics             int // ours, outputs.mqtt and bare over TLS on loopback
	manyDevices            int // ours and bare with this many devices on one connection
	manyMetrics            int // their metrics
	e2eMetrics, e2eDevices int
	drainMetrics           int   // spooled metrics drained by benchmark 7
	attach                 []int // device counts of the loopback attach storm
	attachRTT              int   // pipelined attaches over the RTT link
	attachRTTSeq           int   // sequential attaches over the RTT link
	memDevices             []int
	longCycles             int
	longDevices            int
	rateDevices            int
	ratePerDevice          int // metrics per device and flush (auto and batch)
	rateFlushes            int
	inDevices              int
	inFlood                int // messages per flood
	inLatency              int // messages sent one at a time for latency
	poolDevices            int // benchmark 8
	poolMetricsPerGateway  int // benchmark 8: metrics per run and gateway
	userMetrics            int // benchmark 9
	userDevices            int
	wireMetrics            int // benchmark 10: timed metrics per client
	wireDevices            int
}

func sizesFor(quick bool) sizes {
	if quick {
		return sizes{
			pub:                   publishSizes{devices: 100, metrics: 10000, mqttMetrics: 2000, warmMQTT: 100, batch: 1000, window: 100},
			pubRTT:                publishSizes{devices: 100, metrics: 2000, mqttMetrics: 30, warmMQTT: 5, batch: 1000, window: 100},
			nagleMetrics:          5000,
			tlsRTT100Metrics:      500,
			tlsMetrics:            2000,
			manyDevices:           2000,
			manyMetrics:           4000,
			e2eMetrics:            5000,
			drainMetrics:          20000,
			e2eDevices:            100,
			attach:                []int{1000},
			attachRTT:             1000,
			attachRTTSeq:          20,
			memDevices:            []int{100, 1000},
			longCycles:            6,
			longDevices:           100,
			rateDevices:           20,
			ratePerDevice:         50,
			rateFlushes:           1,
			inDevices:             10,
			inFlood:               500,
			inLatency:             50,
			poolDevices:           50,
			poolMetricsPerGateway: 100,
			userMetrics:           10000,
			userDevices:           100,
			wireMetrics:           2000,
			wireDevices:           100,
		}
	}
	return sizes{
		pub:                   publishSizes{devices: 1000, metrics: 200000, mqttMetrics: 200000, warmMQTT: 1000, batch: 1000, window: 100},
		pubRTT:                publishSizes{devices: 1000, metrics: 30000, mqttMetrics: 300, warmMQTT: 20, batch: 1000, window: 100},
		nagleMetrics:          50000,
		tlsRTT100Metrics:      5000,
		tlsMetrics:            50000,
		manyDevices:           50000,
		manyMetrics:           100000,
		e2eMetrics:            200000,
		drainMetrics:          1000000,
		e2eDevices:            1000,
		attach:                []int{1000, 10000},
		attachRTT:             10000,
		attachRTTSeq:          250,
		memDevices:            []int{1000, 10000},
		longCycles:            60,
		longDevices:           1000,
		rateDevices:           1000,
		ratePerDevice:         600,
		rateFlushes:           2,
		inDevices:             100,
		inFlood:               5000,
		inLatency:             300,
		poolDevices:           1000,
		poolMetricsPerGateway: 2000,
		userMetrics:           200000,
		userDevices:           1000,
		wireMetrics:           20000,
		wireDevices:           100,
	}
}

// progressOut receives progress lines (stderr, or nothing with -q).
var progressOut io.Writer = os.Stderr

func progress(format string, args ...any) {
	fmt.Fprintf(progressOut, format+"\n", args...)
}

// bench is the state shared by the benchmarks of one invocation.
type bench struct {
	opts *options
	sz   sizes
	dir  string
	id   identity
	pub  []byte // the gateway's public key PEM
	mosq *mosquitto
	// mosqNagle is a second mosquitto with its default set_tcp_nodelay
	// false, for the row that shows what Nagle's algorithm costs us.
	mosqNagle *mosquitto
	hdr       header
	// tls is the CA and mosquitto's certificate files of the TLS rows.
	tls   *benchTLS
	rows  []*row
	notes []string
}

func run(ctx context.Context, opts *options, stdout io.Writer) error {
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()
	if opts.quiet {
		progressOut = io.Discard
	}
	dir := opts.workDir
	if dir == "" {
		d, err := os.MkdirTemp("", "omnicore-bench-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(d)
		dir = d
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	// The gateway sessions of this process rendezvous here, not in the
	// user's runtime directory shared with other programs.
	if err := os.Setenv(share.EnvRuntimeDir, filepath.Join(dir, "runtime")); err != nil {
		return err
	}
	// Their spools go here too, never into the system's state directory
	// (the benchmarks that spool on purpose give each run its own).
	state := filepath.Join(dir, "state")
	if err := os.MkdirAll(state, 0o700); err != nil {
		return err
	}
	if err := os.Setenv(statedir.EnvStateDirectory, state); err != nil {
		return err
	}
	id, pub, err := newIdentity(dir)
	if err != nil {
		return err
	}
	b := &bench{opts: opts, sz: sizesFor(opts.quick), dir: dir, id: id, pub: pub}
	if opts.metrics > 0 {
		b.sz.pub.metrics, b.sz.pub.mqttMetrics = opts.metrics, opts.metrics
	}
	if opts.ratePerDevice > 0 {
		b.sz.ratePerDevice = opts.ratePerDevice
	}
	if opts.cpuProfile != "" {
		f, err := os.Create(opts.cpuProfile)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	mode := "full"
	if opts.quick {
		mode = "quick"
	}
	b.hdr = header{
		started:   time.Now(),
		cores:     runtime.NumCPU(),
		gomaxproc: runtime.GOMAXPROCS(0),
		goVersion: runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH,
		cpuModel:  cpuModel(),
		loadStart: loadAverage(),
		mode:      mode,
		runs:      opts.runs,
		telegraf:  "not used",
		mosquitto: "not used",
	}
	for _, l := range b.hdr.lines()[:5] {
		progress("%s", l)
	}

	if opts.wants("1") || opts.wants("1b") || opts.wants("10") {
		t, err := newBenchTLS()
		if err != nil {
			return fmt.Errorf("the TLS rows' CA and certificate: %w", err)
		}
		defer t.close()
		b.tls = t
	}
	if opts.wants("1") || opts.wants("1b") || opts.wants("2") || opts.wants("10") {
		b.hdr.mosquitto = "not found: the mosquitto rows are skipped (install it with: apt-get install -y mosquitto)"
		if bin := findMosquitto(opts.mosquitto); bin != "" {
			m, err := startMosquitto(ctx, bin, dir, true, b.tls)
			if err != nil {
				b.hdr.mosquitto = fmt.Sprintf("%s failed to start: %v (mosquitto rows skipped)", bin, err)
			} else {
				defer m.stop()
				b.mosq = m
				b.hdr.mosquitto = bin + " " + mosquittoVersion(bin) + ", set_tcp_nodelay true (a second instance with its default false for the rows that say so)"
				if m.tlsURL != "" {
					b.hdr.mosquitto += "; a TLS listener for the TLS rows"
				}
				if opts.wants("1") || opts.wants("2") {
					if m2, err := startMosquitto(ctx, bin, dir, false); err == nil {
						defer m2.stop()
						b.mosqNagle = m2
					}
				}
			}
		}
	}

	steps := []struct {
		id  string
		run func(context.Context) error
	}{
		{"1", b.benchPublish},
		{"2", b.benchEndToEnd},
		{"3", b.benchAttach},
		{"4", b.benchMemory},
		{"5", b.benchRateLimit},
		{"6", b.benchInbound},
		{"7", b.benchSpool},
		{"8", b.benchPool},
		{"9", b.benchUser},
		{"10", b.benchWire},
	}
	for _, s := range steps {
		if s.id == "1" && !opts.wants("1") && !opts.wants("1b") {
			continue
		}
		if s.id != "1" && !opts.wants(s.id) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("stopped before benchmark %s: %w", s.id, err)
		}
		start := time.Now()
		progress("== benchmark %s", s.id)
		if err := s.run(ctx); err != nil {
			return fmt.Errorf("benchmark %s: %w", s.id, err)
		}
		progress("== benchmark %s done in %s", s.id, time.Since(start).Round(time.Second))
	}
	b.hdr.loadEnd = loadAverage()
	b.hdr.elapsed = time.Since(b.hdr.started)

	var out strings.Builder
	for _, l := range b.hdr.lines() {
		fmt.Fprintf(&out, "%s\n", l)
	}
	out.WriteString("\n")
	printTable(&out, b.rows)
	for _, n := range b.notes {
		fmt.Fprintf(&out, "\nnote: %s\n", n)
	}
	if _, err := io.WriteString(stdout, out.String()); err != nil {
		return err
	}
	if opts.out != "" {
		if err := writeMarkdown(opts.out, b); err != nil {
			return err
		}
		progress("wrote %s", opts.out)
	}
	return nil
}

func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
