// Command telegraf-omnicore runs the OmniCore output or input plugin as a
// Telegraf external plugin, under outputs.execd or inputs.execd:
//
//	telegraf-omnicore -config /etc/telegraf/omnicore/output.conf
//
// The plugin file holds exactly one [[outputs.omnicore]] or [[inputs.omnicore]]
// table and is loaded with Telegraf's own config loader. In output mode the
// program reads line protocol from stdin and writes it to the bridge with its
// own batching, retry and back-pressure loop; in input mode it runs the
// plugin through Telegraf's shim and prints line protocol on stdout. Log
// lines go to stderr as "E! ", "W! ", "I! " or "D! " followed by the message,
// without timestamps, which is what execd parses; an output process sends
// its info and debug lines to stdout instead, which outputs.execd logs at
// info level (see logSink).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/logger"
	"github.com/influxdata/telegraf/models"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/check"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/hostconf"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/runner"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	inomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/inputs/omnicore"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// telegrafVersion is the Telegraf release whose plugin API, config loader and
// shim this program is built with.
const telegrafVersion = "1.37.2"

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func programVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}

// environment is what run needs from the process; tests replace it.
type environment struct {
	stdin          io.Reader
	stdout, stderr io.Writer
	// plugins are the plugin tables a plugin file may hold.
	plugins []string
}

func main() {
	tuneGC()
	code := run(os.Args[1:], environment{
		stdin:   os.Stdin,
		stdout:  os.Stdout,
		stderr:  os.Stderr,
		plugins: defaultPlugins,
	})
	// Let Telegraf read the last lines (the error, "Stopped ...") before
	// the exit closes its pipe.
	waitStderrRead(os.Stderr, stderrReadTimeout)
	waitStderrRead(os.Stdout, stderrReadTimeout) // an output's info lines
	os.Exit(code)
}

// gcPercent is the garbage collector's target for this process unless the
// environment sets GOGC: the heap may grow to 5x the live heap between
// collections, instead of Go's default 2x.
//
// Why: the live heap is small (the session, one batch or a few in flight),
// while every metric passing through allocates (parsing, routing,
// serializing, paho's packets), so at the default the collector runs every
// few hundred metrics. Measured through Telegraf (benchmark 2, 200,000
// metrics to a default mosquitto, two rounds): CPU per metric of the
// process tree 22.2 and 25.3 us at the default, 18.8 and 20.7 us at 400
// (-17%), for 12 to 21 MiB more peak RSS. GOGC=100 in the execd block's
// environment restores the default.
const gcPercent = 400

func tuneGC() {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(gcPercent)
	}
}

// stderrReadTimeout bounds how long an exit waits for Telegraf to read the
// last lines from stderr (see waitStderrRead).
const stderrReadTimeout = 3 * time.Second

type flags struct {
	config       string
	logLevel     string
	pollInterval time.Duration
	batchSize    int
	batchTimeout time.Duration
	version      bool
}

func parseFlags(args []string, usage io.Writer) (*flags, error) {
	f := &flags{}
	fs := flag.NewFlagSet("telegraf-omnicore", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&f.config, "config", "", "plugin file holding exactly one [[outputs.omnicore]] or [[inputs.omnicore]] table (required)")
	fs.StringVar(&f.logLevel, "log_level", "info", "log level: error, warn, info, debug or trace; a log_level in the plugin table wins")
	fs.DurationVar(&f.pollInterval, "poll_interval", 10*time.Second, "input only: how often the omnicore_gateway statistics metric is gathered until Telegraf signals a gather on stdin (signal = \"STDIN\"); 0 disables it")
	fs.IntVar(&f.batchSize, "batch_size", 1000, "output only: most metrics per Write")
	fs.DurationVar(&f.batchTimeout, "batch_timeout", time.Second, "output only: longest wait before a partial batch is written")
	fs.BoolVar(&f.version, "version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(usage, "Usage: telegraf-omnicore -config FILE [flags]\n\n"+
				"Runs the OmniCore output or input plugin under Telegraf's outputs.execd or inputs.execd.\n\nFlags:\n")
			fs.SetOutput(usage)
			fs.PrintDefaults()
			return nil, err
		}
		return nil, fmt.Errorf("%w (run with -h for the flags)", err)
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q (run with -h for the flags)", fs.Args())
	}
	return f, nil
}

// run is main without os.Exit; it returns the exit status.
func run(args []string, env environment) (status int) {
	sink := newLogSink(env.stderr, telegraf.Info)
	remove, err := installLogging(sink)
	if err != nil {
		sink.print(telegraf.Error, "", err.Error())
		return 1
	}
	defer remove()
	if len(args) > 0 && args[0] == "check" {
		// telegraf-omnicore check -config FILE...: see execd/check.
		return check.Main(args[1:], check.Env{Stdout: env.stdout})
	}
	log := logger.New("", "", "") // this program's own messages, without a plugin prefix
	ignoreSignals(log)

	f, err := parseFlags(args, env.stdout)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		log.Error(err)
		return 2
	}
	if f.version {
		fmt.Fprintf(env.stdout, "telegraf-omnicore %s (Telegraf %s, %s)\n", programVersion(), telegrafVersion, runtime.Version())
		return 0
	}
	level, err := parseLogLevel(f.logLevel)
	if err != nil {
		log.Errorf("-log_level: %v", err)
		return 2
	}
	sink.setLevel(level)
	switch {
	case f.config == "":
		log.Errorf("-config FILE is required: the plugin file holding one %s table", tableList(env.plugins))
		return 2
	case f.batchSize < 1:
		log.Errorf("-batch_size %d must be at least 1", f.batchSize)
		return 2
	case f.batchTimeout <= 0:
		log.Errorf("-batch_timeout %s must be positive", f.batchTimeout)
		return 2
	case f.pollInterval < 0:
		log.Errorf("-poll_interval %s must not be negative", f.pollInterval)
		return 2
	}

	p, err := loadPluginFile(f.config, env.plugins)
	if err != nil {
		log.Errorf("Loading plugin file %q failed: %v", f.config, err)
		return 1
	}
	if p.kind != "inputs" {
		// stdout is free in an output process: see logSink.
		sink.useQuietOutput(env.stdout)
	}
	if p.logLevel != "" {
		level, _ = parseLogLevel(p.logLevel) // validated by loadPluginFile
		sink.setLevel(level)
	}

	plog := pluginLogger(p.kind, p.name, p.alias, level)
	var plugin any = p.output
	if p.kind == "inputs" {
		plugin = p.input
	}
	models.SetLoggerOnPlugin(plugin, plog)
	if init, ok := plugin.(telegraf.Initializer); ok {
		if err := init.Init(); err != nil {
			log.Errorf("Initializing %s from %q failed: %v", p.id(), f.config, err)
			return 1
		}
	}
	// After Init, so that mistakes in the plugin file are reported first.
	connect, conflicted, err := installSharing(f.config, log)
	if err != nil {
		log.Errorf("Cannot share the gateway connection with the other plugin processes: %v; not starting, because a second connection as the same gateway would kick the first off (set %s=off if no other process connects as this gateway)", err, share.EnvSharing)
		return 1
	}
	defer func() {
		if conflicted.Load() {
			status = 1
		}
	}()
	setHost(plugin, gateway.Host{Connect: connect, Route: gateway.RouteExecd})

	switch p.kind {
	case "inputs":
		log.Debugf("Starting %s (telegraf-omnicore %s); gathering statistics on Telegraf's signal (signal = \"STDIN\"), until then every %s", p.id(), programVersion(), f.pollInterval)
		if err := runInput(p.input, plog, f.pollInterval, env.stdin); err != nil {
			log.Errorf("Running %s failed: %v", p.id(), err)
			return 1
		}
		log.Infof("Stopped %s", p.id())
		return 0
	default:
		log.Debugf("Starting %s (telegraf-omnicore %s); batches of up to %d metrics, written at least every %s",
			p.id(), programVersion(), f.batchSize, f.batchTimeout)
		stop, cancel := stopOnSignal()
		defer cancel()
		runner, err := newRunner(p, plog, f)
		if err != nil {
			log.Errorf("Starting %s: %v", p.id(), err)
			return 1
		}
		if err := runner.Run(env.stdin, stop); err != nil {
			log.Errorf("Stopping %s: %v", p.id(), err)
			return 1
		}
		log.Infof("Stopped %s", p.id())
		return 0
	}
}

// installSharing makes the plugin share its gateway connection with the
// other plugin processes of the host (execd/share). When this
// process's connection options conflict with those of the process that owns
// the connection, the share package has logged the error; this process then
// stops as on SIGTERM (flushing what it holds) and exits non-zero: the flag
// returned says so.
func installSharing(pluginFile string, log telegraf.Logger) (gateway.CrossProcess, *atomic.Bool, error) {
	conflicted := &atomic.Bool{}
	if abs, err := filepath.Abs(pluginFile); err == nil {
		pluginFile = abs
	}
	connect, dir, err := share.Install(share.Settings{
		PluginFile: pluginFile,
		OnConflict: func(error) {
			if conflicted.CompareAndSwap(false, true) {
				_ = syscall.Kill(os.Getpid(), syscall.SIGTERM)
			}
		},
	})
	switch {
	case err != nil:
		return nil, nil, err
	case dir != "":
		log.Debugf("Sharing the gateway connection with other plugin processes through %q", dir)
	case share.Off():
		log.Warnf("%s=off: this process connects on its own; another process connecting as the same gateway would kick it off", share.EnvSharing)
	}
	return connect, conflicted, nil
}

// connOutput is implemented by outputs.omnicore: its gateway connection
// after Connect (nil before), through which the queue's gauges are reported.
type connOutput interface {
	GatewayConn() gateway.Conn
}

// newRunner wires the output to the execd runner with the plugin file's
// [telegraf_omnicore] options: the spool when on, else memory.
func newRunner(p *loadedPlugin, plog telegraf.Logger, f *flags) (*runner.Runner, error) {
	host := p.host.Options
	if len(p.host.Legacy) > 0 {
		plog.Warnf("%s in [[%s]] belong in the plugin file's [%s] table now (they are this program's options, not the plugin's); they still work where they are",
			strings.Join(p.host.Legacy, ", "), p.id(), hostconf.Table)
	}
	cfg := runner.Config{
		Output:       p.output,
		Log:          plog,
		BatchSize:    f.batchSize,
		BatchTimeout: f.batchTimeout,
		Full:         spool.FullPolicy(host.SpoolFull),
	}
	if c, ok := p.output.(connOutput); ok {
		cfg.Conn = c.GatewayConn
	}
	if !host.Spool {
		cfg.MemoryLimit = runner.NoSpoolMemoryLimit
		return runner.New(cfg), nil
	}
	opts := spool.Options{
		Dir:          host.SpoolDir,
		MaxSize:      int64(host.SpoolMaxSize),
		SyncInterval: time.Duration(host.SpoolSyncInterval),
		Full:         spool.FullPolicy(host.SpoolFull),
		Log:          plog,
	}
	if opts.Dir == "" {
		g, ok := p.output.(gatewayOutput)
		if !ok {
			plog.Debugf("%s names no gateway and spool_dir is not set: queueing standard input in memory", p.id())
			return runner.New(cfg), nil
		}
		gatewayID, clientID := g.GatewayIdentity()
		dir, err := hostconf.SpoolDir(gatewayID, clientID, p.alias)
		if err != nil {
			return nil, err
		}
		opts.Dir = dir
		hostconf.AdoptEarlierSpools(dir, gatewayID, opts, plog)
	}
	cfg.Spool = &opts
	return runner.New(cfg), nil
}

// setHost tells an omnicore plugin how this program runs it (gateway.Host):
// connections shared with the other processes of the gateway, and the
// execd route for its health state.
func setHost(plugin any, h gateway.Host) {
	switch p := plugin.(type) {
	case *outomni.OmniCore:
		p.Host = h
	case *inomni.OmniCore:
		p.Host = h
	}
}

// gatewayOutput is implemented by outputs.omnicore: the gateway it publishes
// as, which names its default spool directory.
type gatewayOutput interface {
	GatewayIdentity() (gatewayID, clientID string)
}

// stopOnSignal returns a channel closed on the first SIGINT or SIGTERM.
func stopOnSignal() (stop <-chan struct{}, cancel func()) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	ch := make(chan struct{})
	done := make(chan struct{})
	go func() {
		select {
		case <-sigs:
			close(ch)
		case <-done:
		}
	}()
	var once sync.Once
	return ch, func() {
		once.Do(func() {
			signal.Stop(sigs)
			close(done)
		})
	}
}

// ignoreSignals keeps SIGHUP, SIGUSR1 and SIGUSR2 from killing the process
// (Go's default for SIGHUP): inputs.execd sends them when its signal option
// is set to one of them, which a service input does not need. The first one
// is reported.
func ignoreSignals(log telegraf.Logger) {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		var once sync.Once
		for sig := range sigs {
			once.Do(func() {
				log.Warnf("Ignoring %v: this program stops on stdin EOF, SIGINT or SIGTERM; use signal = \"STDIN\" (or \"none\") on [[inputs.execd]]", sig)
			})
		}
	}()
}
