package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/share"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/statecheck"
)

// The tests of the whole program run the test binary itself as the program:
// with this variable set, TestMain runs main's logic instead of the tests,
// with the test plugins allowed in plugin files.
const runMainEnv = "TELEGRAF_OMNICORE_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(runMainEnv) == "1" {
		os.Exit(run(os.Args[1:], environment{
			stdin:   os.Stdin,
			stdout:  os.Stdout,
			stderr:  os.Stderr,
			plugins: append(append([]string(nil), defaultPlugins...), testPlugins...),
		}))
	}
	// The programs these tests start share gateway connections in a
	// directory of their own, not in the user's state directory, and spool
	// in a state directory of their own (statecheck).
	if os.Getenv(share.EnvRuntimeDir) == "" {
		dir, err := os.MkdirTemp("", "ocm")
		if err != nil {
			panic(err)
		}
		os.Setenv(share.EnvRuntimeDir, dir)
		code := statecheck.Run(m.Run)
		os.RemoveAll(dir)
		os.Exit(code)
	}
	os.Exit(statecheck.Run(m.Run))
}

// syncBuffer is a bytes.Buffer safe for a process's writes and the test's
// reads at once.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// program is the program running in a child process.
type program struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stdout *syncBuffer
	stderr *syncBuffer
	done   chan struct{}
	err    error
}

func startProgram(t *testing.T, args ...string) *program {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	p := &program{cmd: cmd, stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.stdout, p.stderr
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	p.stdin = stdin
	require.NoError(t, cmd.Start())
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = cmd.Process.Kill()
			<-p.done
		}
		if t.Failed() {
			t.Logf("stderr of the program:\n%s\nstdout:\n%s", p.stderr.String(), p.stdout.String())
		}
	})
	return p
}

// log is what the program logged: an output logs warnings and errors on
// stderr and the rest on stdout.
func (p *program) log() string { return p.stdout.String() + p.stderr.String() }

// wait waits for the exit, failing the test after d, and returns the exit
// status and how long it took from since.
func (p *program) wait(t *testing.T, d time.Duration, since time.Time) (int, time.Duration) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(d):
		require.FailNowf(t, "timeout", "the program did not exit within %s; stderr:\n%s", d, p.stderr.String())
	}
	elapsed := time.Since(since)
	if p.err == nil {
		return 0, elapsed
	}
	var exitErr *exec.ExitError
	require.True(t, errors.As(p.err, &exitErr), "wait: %v", p.err)
	return exitErr.ExitCode(), elapsed
}

// waitFor polls cond every few milliseconds until it holds, up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			require.FailNowf(t, "timeout", "%s did not happen within %s", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

var logLine = regexp.MustCompile(`^[EWIDT]! \S`)
var timestamp = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d`)

// requireLogFormat checks that every stderr line is what execd parses: a
// level prefix, and no timestamp (Telegraf adds its own).
func requireLogFormat(t *testing.T, stderr string) {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(stderr))
	for sc.Scan() {
		require.Regexp(t, logLine, sc.Text())
		require.NotRegexp(t, timestamp, sc.Text())
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return ""
	}
	require.NoError(t, err)
	return string(b)
}

func TestMainExitStatus(t *testing.T) {
	dir := t.TempDir()
	valid := writeFile(t, dir, "valid.conf", "[[outputs.omnicore_test]]\n")
	tests := []struct {
		name   string
		args   []string
		config string // written to a file passed as -config when not empty
		code   int
		stdout []string
		stderr []string
	}{
		{name: "version", args: []string{"-version"}, stdout: []string{"telegraf-omnicore ", "(Telegraf 1.37.2, go"}},
		{name: "help", args: []string{"-h"}, stdout: []string{"Usage: telegraf-omnicore -config FILE", "-batch_timeout", "-poll_interval"}},
		{
			name:   "no config",
			code:   2,
			stderr: []string{"E! -config FILE is required: the plugin file holding one [[outputs.omnicore]] or [[inputs.omnicore]]"},
		},
		{name: "unknown flag", args: []string{"-nope"}, code: 2, stderr: []string{"E! flag provided but not defined: -nope (run with -h for the flags)"}},
		{name: "extra argument", args: []string{"-config", valid, "extra"}, code: 2, stderr: []string{`E! unexpected arguments ["extra"]`}},
		{name: "bad log level", args: []string{"-config", valid, "-log_level", "loud"}, code: 2, stderr: []string{`E! -log_level: log level "loud" must be`}},
		{name: "bad batch size", args: []string{"-config", valid, "-batch_size", "0"}, code: 2, stderr: []string{"E! -batch_size 0 must be at least 1"}},
		{name: "bad batch timeout", args: []string{"-config", valid, "-batch_timeout", "0s"}, code: 2, stderr: []string{"E! -batch_timeout 0s must be positive"}},
		{
			name:   "missing plugin file",
			args:   []string{"-config", filepath.Join(dir, "missing.conf")},
			code:   1,
			stderr: []string{`E! Loading plugin file "` + filepath.Join(dir, "missing.conf") + `" failed: reading the plugin file`},
		},
		{
			name:   "unknown option",
			config: "[[outputs.omnicore_test]]\n  tpoic = \"x\"\n",
			code:   1,
			stderr: []string{"E! Loading plugin file", `configuration specified the fields ["tpoic"], but they were not used`},
		},
		{
			name:   "secret from an unknown store",
			config: "[[outputs.omnicore_test]]\n  password = \"@{vault:pw}\"\n",
			code:   1,
			stderr: []string{`E! Loading plugin file`, `unknown secret-store for "@{vault:pw}"`},
		},
		{
			name:   "two tables",
			config: "[[outputs.omnicore_test]]\n[[inputs.omnicore_test]]\n",
			code:   1,
			stderr: []string{"E! Loading plugin file", "holds 2 plugin tables"},
		},
		{
			name:   "output Init fails",
			config: "[[outputs.omnicore_test]]\n  fail_init = true\n",
			code:   1,
			stderr: []string{"E! Initializing outputs.omnicore_test from", "failed: fail_init is set"},
		},
		{
			name:   "input Start fails",
			config: "[[inputs.omnicore_test]]\n  fail_start = true\n",
			code:   1,
			stderr: []string{"E! Running inputs.omnicore_test failed: running input failed: failed to start input: fail_start is set"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if tt.config != "" {
				args = append([]string{"-config", writeFile(t, t.TempDir(), "plugin.conf", tt.config)}, args...)
			}
			p := startProgram(t, args...)
			require.NoError(t, p.stdin.Close())
			code, _ := p.wait(t, 30*time.Second, time.Now())
			require.Equal(t, tt.code, code, "stderr:\n%s", p.stderr.String())
			for _, s := range tt.stdout {
				require.Contains(t, p.stdout.String(), s)
			}
			for _, s := range tt.stderr {
				require.Contains(t, p.stderr.String(), s)
			}
			if tt.code != 0 {
				requireLogFormat(t, p.stderr.String())
			}
		})
	}
}

func TestMainOutput(t *testing.T) {
	lines := lpLine(1) + lpLine(2) + lpLine(3)
	tests := []struct {
		name  string
		args  []string
		table string
		// ready is a log line that shows the program is running; the
		// time to exit is measured from there (not checked when empty).
		ready  string
		stop   func(t *testing.T, p *program)
		code   int
		record string
		// log are substrings of the log: stdout (info and below) and
		// stderr (warnings and errors).
		log []string
		// absent are substrings the log must not contain.
		absent []string
	}{
		{
			name:   "stdin EOF flushes and closes",
			args:   []string{"-batch_timeout", "1h", "-log_level", "info"},
			ready:  "I! [outputs.omnicore_test] Connected",
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			record: lines + "closed\n",
			log: []string{
				"I! [outputs.omnicore_test] Closed the test output",
				"I! Stopped outputs.omnicore_test",
			},
			absent: []string{"D! ", "Starting"},
		},
		{
			name:  "SIGTERM closes",
			args:  []string{"-batch_size", "3", "-batch_timeout", "1h", "-log_level", "debug"},
			ready: "Wrote 3 metrics",
			stop: func(t *testing.T, p *program) {
				// Signal once the full batch was written; stdin stays
				// open. (The flush of a partial batch on a signal is
				// tested on the run loop: here the signal could overtake
				// the metrics in the pipe.)
				waitFor(t, 30*time.Second, "the batch to be written", func() bool {
					return strings.Contains(p.log(), "Wrote 3 metrics")
				})
				require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
			},
			record: lines + "closed\n",
			log:    []string{"D! [outputs.omnicore_test] Signalled to stop", "D! [outputs.omnicore_test] Wrote 3 metrics"},
		},
		{
			name:   "log level from the plugin table",
			table:  "log_level = \"debug\"",
			ready:  "D! Starting outputs.omnicore_test (telegraf-omnicore ",
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			record: lines + "closed\n",
			log:    []string{"D! [outputs.omnicore_test] Wrote 3 metrics", "D! [outputs.omnicore_test] Standard input closed"},
		},
		{
			name:   "spool options in the output's table, as earlier versions had them",
			table:  "spool = false",
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			record: lines + "closed\n",
			log:    []string{"W! [outputs.omnicore_test] spool in [[outputs.omnicore_test]] belong in the plugin file's [telegraf_omnicore] table now"},
		},
		{
			name:   "info level (the default) hides debug",
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			record: lines + "closed\n",
			log:    []string{"I! [outputs.omnicore_test] Connected", "I! Stopped outputs.omnicore_test"},
			absent: []string{"D! "},
		},
		{
			name:   "metrics that cannot be written at EOF",
			table:  "fail_writes = true\n[telegraf_omnicore]\n  spool = false",
			ready:  "I! [outputs.omnicore_test] Connected",
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			code:   1,
			record: "closed\n",
			log: []string{
				"E! Stopping outputs.omnicore_test: 3 metrics not acknowledged by the bridge are lost: they were held in memory, and spool = false",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			record := filepath.Join(dir, "record.txt")
			conf := writeFile(t, dir, "plugin.conf", "[[outputs.omnicore_test]]\n  record = \""+record+"\"\n  "+tt.table+"\n")
			p := startProgram(t, append([]string{"-config", conf}, tt.args...)...)
			_, err := io.WriteString(p.stdin, lines)
			require.NoError(t, err)
			if tt.ready != "" {
				waitFor(t, 30*time.Second, "the program to run", func() bool { return strings.Contains(p.log(), tt.ready) })
			}
			start := time.Now()
			tt.stop(t, p)
			code, elapsed := p.wait(t, 30*time.Second, start)
			require.Equal(t, tt.code, code, "stderr:\n%s", p.stderr.String())
			if tt.ready != "" {
				// execd's grace period is 5 s; the bound allows for a
				// loaded machine (the exit takes milliseconds, or 3 s
				// when the last Write keeps failing).
				require.Less(t, elapsed, 10*time.Second, "exit took %s", elapsed)
			}
			require.Equal(t, tt.record, readFile(t, record))
			requireLogFormat(t, p.stderr.String())
			requireLogFormat(t, p.stdout.String())
			// outputs.execd shows stderr as errors and stdout at info level.
			require.NotRegexp(t, `(?m)^[IDT]! `, p.stderr.String(), "info and debug on stderr")
			require.NotRegexp(t, `(?m)^[EW]! `, p.stdout.String(), "warnings and errors on stdout")
			for _, s := range tt.log {
				require.Contains(t, p.log(), s)
			}
			for _, s := range tt.absent {
				require.NotContains(t, p.log(), s)
			}
		})
	}
}

func TestMainInput(t *testing.T) {
	tests := []struct {
		name   string
		table  string
		args   []string
		stop   func(t *testing.T, p *program)
		code   int
		stdout []string
		stderr []string
	}{
		{
			name:   "stdin EOF stops",
			args:   []string{"-poll_interval", "10ms", "-log_level", "info"},
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			stdout: []string{"test_start ok=true ", "test_gather n=1i ", "test_gather n=2i "},
			stderr: []string{"I! [inputs.omnicore_test] Started", "I! [inputs.omnicore_test] Stopped the test input", "I! Stopped inputs.omnicore_test"},
		},
		{
			name:   "SIGTERM stops",
			args:   []string{"-poll_interval", "10ms", "-log_level", "info"},
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM)) },
			stdout: []string{"test_start ok=true ", "test_gather n=2i "},
			stderr: []string{"I! [inputs.omnicore_test] Stopped the test input"},
		},
		{
			name: "SIGHUP is ignored",
			args: []string{"-poll_interval", "10ms"},
			stop: func(t *testing.T, p *program) {
				require.NoError(t, p.cmd.Process.Signal(syscall.SIGHUP))
				waitFor(t, 30*time.Second, "the SIGHUP warning", func() bool {
					return strings.Contains(p.stderr.String(), "W! Ignoring hangup")
				})
				require.NoError(t, p.stdin.Close())
			},
			stdout: []string{"test_gather n=2i "},
			stderr: []string{`W! Ignoring hangup: this program stops on stdin EOF, SIGINT or SIGTERM; use signal = "STDIN" (or "none") on [[inputs.execd]]`},
		},
		{
			name:   "data_format parser",
			table:  "payload = '{\"name\":\"config\",\"device\":\"sensor-01\",\"temp\":21.5}'\n  data_format = \"json\"\n  json_name_key = \"name\"\n  tag_keys = [\"device\"]",
			args:   []string{"-poll_interval", "10ms", "-log_level", "debug"},
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			stdout: []string{"config,device=sensor-01 temp=21.5 ", "test_gather n=2i "},
			stderr: []string{"D! [inputs.omnicore_test] A debug line"},
		},
		{
			name:   "Stop that hangs is bounded",
			table:  "hang_stop = true",
			args:   []string{"-poll_interval", "10ms"},
			stop:   func(t *testing.T, p *program) { require.NoError(t, p.stdin.Close()) },
			code:   1,
			stdout: []string{"test_gather n=2i "},
			stderr: []string{"E! [inputs.omnicore_test] Stopping the input did not finish within 4.5s; exiting anyway"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conf := writeFile(t, t.TempDir(), "plugin.conf", "[[inputs.omnicore_test]]\n  "+tt.table+"\n")
			p := startProgram(t, append([]string{"-config", conf}, tt.args...)...)
			// The shim is running once gathers come out.
			waitFor(t, 30*time.Second, "two gathers", func() bool {
				return strings.Contains(p.stdout.String(), "test_gather n=2i ")
			})
			start := time.Now()
			tt.stop(t, p)
			code, elapsed := p.wait(t, 30*time.Second, start)
			require.Equal(t, tt.code, code, "stderr:\n%s", p.stderr.String())
			// execd's grace period is 5 s; the bound allows for a loaded
			// machine (the exit takes milliseconds, or the 4.5 s Stop
			// bound when Stop hangs).
			require.Less(t, elapsed, 10*time.Second, "exit took %s", elapsed)
			for _, s := range tt.stdout {
				require.Contains(t, p.stdout.String(), s)
			}
			requireLogFormat(t, p.stderr.String())
			for _, s := range tt.stderr {
				require.Contains(t, p.stderr.String(), s)
			}
		})
	}
}

// With signal = "STDIN" Telegraf writes a line at every interval: each line
// is one Gather.
func TestMainInputGathersOnStdinSignal(t *testing.T) {
	conf := writeFile(t, t.TempDir(), "plugin.conf", "[[inputs.omnicore_test]]\n")
	p := startProgram(t, "-config", conf, "-poll_interval", "0s")
	for i := 1; i <= 3; i++ {
		_, err := io.WriteString(p.stdin, "\n")
		require.NoError(t, err)
		want := "test_gather n=" + strconv.Itoa(i) + "i "
		waitFor(t, 30*time.Second, want, func() bool { return strings.Contains(p.stdout.String(), want) })
	}
	require.NoError(t, p.stdin.Close())
	code, _ := p.wait(t, 30*time.Second, time.Now())
	require.Equal(t, 0, code)
	require.Equal(t, 3, strings.Count(p.stdout.String(), "test_gather "), "one gather per line:\n%s", p.stdout.String())
}

// lpLine is metric i in line protocol, as outputs.execd writes it.
func lpLine(i int) string {
	return fmt.Sprintf("m,device_id=sensor-%02d value=%di %d\n", i, i, 1700000000000000000+int64(i))
}
