// Package check is `telegraf-omnicore check`: it runs every check it can on
// a gateway setup before it goes live and prints one line per check, ✔ or ✘
// with the fix. It checks the key files, the state directory and the
// spools on this host, then, for each gateway, the bridge's TLS certificate,
// the clock, the token (CONNACK) and the attach of each configured device.
//
// It never publishes telemetry and never takes over a live connection: a
// gateway whose connection a running process of this host holds (through
// execd/share's rendezvous) is not connected to, its connect and attach
// checks are skipped with a line that says why. Every network step has its
// own timeout and the whole run its deadline (-timeout, 30 s).
package check

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"
)

// Status is the outcome of one check.
type Status int

const (
	Pass Status = iota
	Fail
	Skip
)

// Result is one line of the report.
type Result struct {
	Status Status
	// Name says what was checked ("key file /etc/.../gw.key").
	Name string
	// Detail is what was found; Fix, for a failure, what to do about it.
	Detail string
	Fix    string
}

func (r Result) String() string {
	switch r.Status {
	case Pass:
		return "✔ " + r.Name + ": " + r.Detail
	case Skip:
		return "– " + r.Name + ": skipped: " + r.Detail
	}
	s := "✘ " + r.Name + ": " + r.Detail
	if r.Fix != "" {
		s += "; fix: " + r.Fix
	}
	return s
}

// DefaultTimeout bounds a whole run.
const DefaultTimeout = 30 * time.Second

// Env is what a run needs from its surroundings; tests replace parts.
type Env struct {
	Stdout io.Writer
	// Now is the local clock the clock check compares with the bridge's
	// (time.Now when nil).
	Now func() time.Time
	// DateURL returns the URL whose HTTP Date header tells the bridge's
	// time, for the bridge host host (https://host/ when nil).
	DateURL func(host string) string
}

func (e *Env) now() time.Time {
	if e.Now != nil {
		return e.Now()
	}
	return time.Now()
}

// Usage is the check subcommand's synopsis.
const Usage = "telegraf-omnicore check -config FILE [-config FILE ...] [-timeout 30s]"

type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

// Main runs the check subcommand with args (those after "check") and returns
// the exit status: 0 when every check passed or was skipped, 1 when one
// failed, 2 for a usage error.
func Main(args []string, env Env) int {
	var cfgs files
	fs := flag.NewFlagSet("telegraf-omnicore check", flag.ContinueOnError)
	fs.SetOutput(env.Stdout)
	fs.Var(&cfgs, "config", "a plugin file, or a telegraf.conf with [[outputs.omnicore]] / [[inputs.omnicore]] tables; repeat for several")
	timeout := fs.Duration("timeout", DefaultTimeout, "the longest the whole check may take")
	fs.Usage = func() {
		fmt.Fprintf(env.Stdout, "usage: %s\n", Usage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if len(cfgs) == 0 || fs.NArg() > 0 {
		fmt.Fprintf(env.Stdout, "usage: %s\n", Usage)
		return 2
	}
	if *timeout < 2*closeTimeout {
		fmt.Fprintf(env.Stdout, "-timeout %s is too short: at least %s\n", *timeout, 2*closeTimeout)
		return 2
	}
	// The checks end closeTimeout early: closing the check's connections
	// takes up to that after them.
	ctx, cancel := context.WithTimeout(context.Background(), *timeout-closeTimeout)
	defer cancel()
	results := Run(ctx, cfgs, env)
	failed := 0
	skipped := 0
	for _, r := range results {
		switch r.Status {
		case Fail:
			failed++
		case Skip:
			skipped++
		}
	}
	fmt.Fprintf(env.Stdout, "%d checks: %d passed, %d failed, %d skipped\n", len(results), len(results)-failed-skipped, failed, skipped)
	if failed > 0 {
		return 1
	}
	return 0
}

// Run runs every check on the plugins of the files and returns the results
// in the order they were printed to env.Stdout.
func Run(ctx context.Context, paths []string, env Env) []Result {
	r := &runner{env: env, ctx: ctx}
	r.run(paths)
	return r.results
}

// runner collects the results of one run, printing each as it comes.
type runner struct {
	env     Env
	ctx     context.Context
	results []Result
	// stateDirBad is set when the state directory failed its check.
	stateDirBad bool
}

func (r *runner) add(res Result) {
	r.results = append(r.results, res)
	if r.env.Stdout != nil {
		fmt.Fprintln(r.env.Stdout, res)
	}
}

func (r *runner) pass(name, format string, a ...any) {
	r.add(Result{Status: Pass, Name: name, Detail: fmt.Sprintf(format, a...)})
}

func (r *runner) fail(name, detail, fix string) {
	r.add(Result{Status: Fail, Name: name, Detail: detail, Fix: fix})
}

func (r *runner) skip(name, format string, a ...any) {
	r.add(Result{Status: Skip, Name: name, Detail: fmt.Sprintf(format, a...)})
}

// step returns a context for one network step: its own timeout, within
// what is left of the run's.
func (r *runner) step(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.ctx, d)
}

// outOfTime reports (once per check) that the run's deadline passed.
func (r *runner) outOfTime(name string) bool {
	if r.ctx.Err() == nil {
		return false
	}
	r.skip(name, "the check's time (-timeout) ran out")
	return true
}

func (r *runner) run(paths []string) {
	var plugins []*plugin
	for _, p := range paths {
		ps, err := load(p)
		if err != nil {
			r.fail("config "+p, err.Error(), "correct the file")
			continue
		}
		if len(ps) == 0 {
			r.fail("config "+p, "no [[outputs.omnicore]] or [[inputs.omnicore]] table",
				"name the files that hold them: for Telegraf's execd, the plugin file after -config in each [[outputs.execd]] and [[inputs.execd]] command")
			continue
		}
		plugins = append(plugins, ps...)
	}
	if len(plugins) == 0 {
		return
	}
	gws := gatewaysOf(plugins)
	badKeys := map[string]bool{}
	for _, g := range gws {
		if !r.checkKey(g) {
			badKeys[g.opts.PrivateKey] = true
		}
	}
	for _, pl := range plugins {
		switch {
		case pl.initErr == nil:
			r.pass(pl.name(), "options valid")
		case refersTo(pl.initErr, badKeys):
			r.skip(pl.name(), "its private_key fails the key file check above")
		default:
			r.fail(pl.name(), pl.initErr.Error(), "correct the option in "+pl.file)
		}
	}
	r.checkStateDir()
	for _, pl := range plugins {
		r.checkSpool(pl)
	}
	r.runBridge(gws, badKeys)
}

// refersTo tells whether err is about one of the key files in paths.
func refersTo(err error, paths map[string]bool) bool {
	for p := range paths {
		if p != "" && strings.Contains(err.Error(), fmt.Sprintf("%q", p)) {
			return true
		}
	}
	return false
}
