// Package e2e runs the real thing: a custom Telegraf v1.37.2 (built by
// scripts/build-telegraf.sh) that runs telegraf-omnicore under
// outputs.execd and inputs.execd against the OmniCore bridge emulator. Its
// tests are the end-to-end tests; this file is their harness, which the demo
// (e2e/demo) uses too.
package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// TelegrafVersion is the Telegraf release the harness builds and runs.
const TelegrafVersion = "1.37.2"

// RepoRoot is the root of this repository (the directory of go.mod).
func RepoRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if ok {
		dir := filepath.Dir(filepath.Dir(file))
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir, nil
		}
	}
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("finding the repository: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("finding the repository: not inside the module")
	}
	return filepath.Dir(gomod), nil
}

// BuildTelegraf builds (or finds, cached in $BUILD_DIR) the custom Telegraf
// with scripts/build-telegraf.sh and returns its path. Progress goes to log.
func BuildTelegraf(ctx context.Context, log io.Writer) (string, error) {
	return buildTelegraf(ctx, log)
}

// BuildTelegrafBuiltin is BuildTelegraf for the Telegraf with both plugins
// compiled in (scripts/build-telegraf.sh --builtin, make telegraf-builtin).
func BuildTelegrafBuiltin(ctx context.Context, log io.Writer) (string, error) {
	return buildTelegraf(ctx, log, "--builtin")
}

func buildTelegraf(ctx context.Context, log io.Writer, args ...string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	cmd := exec.CommandContext(ctx, "bash", append([]string{filepath.Join(root, "scripts", "build-telegraf.sh")}, args...)...)
	cmd.Dir = root
	cmd.Stderr = log
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("scripts/build-telegraf.sh: %w", err)
	}
	path := strings.TrimSpace(string(out))
	if i := strings.LastIndexByte(path, '\n'); i >= 0 {
		path = path[i+1:]
	}
	if _, err := os.Stat(path); err != nil {
		return "", fmt.Errorf("scripts/build-telegraf.sh printed %q: %w", path, err)
	}
	return path, nil
}

// BuildCommand builds the main package pkg of this repository (e.g.
// "./cmd/telegraf-omnicore") into dir and returns the binary's path.
func BuildCommand(ctx context.Context, pkg, dir string) (string, error) {
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build %s: %w\n%s", pkg, err, stderr.String())
	}
	return out, nil
}

// BuildBinaries gets both programs a Telegraf-level test runs: the custom
// Telegraf (cached, see BuildTelegraf) and telegraf-omnicore, built into dir.
func BuildBinaries(ctx context.Context, dir string, log io.Writer) (telegraf, plugin string, err error) {
	if telegraf, err = BuildTelegraf(ctx, log); err != nil {
		return "", "", err
	}
	if plugin, err = BuildCommand(ctx, "./cmd/telegraf-omnicore", dir); err != nil {
		return "", "", err
	}
	return telegraf, plugin, nil
}

// Gateway is a gateway identity as the plugin files name it.
type Gateway struct {
	Servers      []string
	Subscription string
	Registry     string
	ID           string
	PrivateKey   string
	Algorithm    string
	// TLSCA is the CA file for tls:// servers ("" for none).
	TLSCA string
}

// connection is the part of a plugin table both plugins share.
func (g Gateway) connection() string {
	var b strings.Builder
	servers := make([]string, len(g.Servers))
	for i, s := range g.Servers {
		servers[i] = Quote(s)
	}
	fmt.Fprintf(&b, "  servers = [%s]\n", strings.Join(servers, ", "))
	fmt.Fprintf(&b, "  subscription_id = %s\n", Quote(g.Subscription))
	fmt.Fprintf(&b, "  registry_id = %s\n", Quote(g.Registry))
	fmt.Fprintf(&b, "  gateway_id = %s\n", Quote(g.ID))
	fmt.Fprintf(&b, "  private_key = %s\n", Quote(g.PrivateKey))
	if g.Algorithm != "" {
		fmt.Fprintf(&b, "  algorithm = %s\n", Quote(g.Algorithm))
	}
	if g.TLSCA != "" {
		fmt.Fprintf(&b, "  tls_ca = %s\n", Quote(g.TLSCA))
	}
	// Fast reconnects keep the tests and the demo snappy.
	b.WriteString("  max_reconnect_interval = \"2s\"\n")
	return b.String()
}

// OutputFile is a plugin file with one [[outputs.omnicore]] table; extra
// lines are appended to the table.
func (g Gateway) OutputFile(extra ...string) string {
	return "[[outputs.omnicore]]\n" + g.connection() + indent(extra)
}

// InputFile is a plugin file with one [[inputs.omnicore]] table listening
// for devices; extra lines are appended to the table.
func (g Gateway) InputFile(devices []string, extra ...string) string {
	quoted := make([]string, len(devices))
	for i, d := range devices {
		quoted[i] = Quote(d)
	}
	return "[[inputs.omnicore]]\n" + g.connection() +
		fmt.Sprintf("  devices = [%s]\n", strings.Join(quoted, ", ")) + indent(extra)
}

func indent(lines []string) string {
	var b strings.Builder
	for _, l := range lines {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

// Quote makes s a TOML basic string.
func Quote(s string) string { return strconv.Quote(s) }

// ExecdOutput is the [[outputs.execd]] block that runs the output plugin of
// pluginFile with bin; args are extra flags.
func ExecdOutput(bin, pluginFile string, args ...string) string {
	return fmt.Sprintf(`[[outputs.execd]]
  alias = "omnicore"
  command = [%s]
  data_format = "influx"
  restart_delay = "1s"
  namedrop = ["omnicore_*"]
`, commandList(bin, pluginFile, args))
}

// ExecdInput is the [[inputs.execd]] block that runs the input plugin of
// pluginFile with bin; args are extra flags.
func ExecdInput(bin, pluginFile string, args ...string) string {
	return fmt.Sprintf(`[[inputs.execd]]
  alias = "omnicore"
  command = [%s]
  signal = "none"
  restart_delay = "1s"
  data_format = "influx"
`, commandList(bin, pluginFile, args))
}

func commandList(bin, pluginFile string, args []string) string {
	parts := []string{Quote(bin), Quote("-config"), Quote(pluginFile)}
	for _, a := range args {
		parts = append(parts, Quote(a))
	}
	return strings.Join(parts, ", ")
}

// Agent is an [agent] table for fast tests: metrics every interval, flushed
// every flush, no hostname, debug logging to stderr.
func Agent(interval, flush time.Duration) string {
	return fmt.Sprintf(`[agent]
  interval = %q
  flush_interval = %q
  metric_batch_size = 1000
  metric_buffer_limit = 100000
  omit_hostname = true
  debug = true
`, interval, flush)
}

// Telegraf is a running Telegraf process. Its log (stderr and stdout) is
// kept in memory and, when logPath is set, in a file.
type Telegraf struct {
	cmd  *exec.Cmd
	log  *SyncBuffer
	done chan struct{}
	err  error
}

// StartTelegraf runs bin with configPath; env is added to this process's
// environment; tee, when not nil, also gets the log.
func StartTelegraf(bin, configPath string, env []string, tee io.Writer) (*Telegraf, error) {
	return startTelegraf(bin, configPath, env, tee, false)
}

// StartTelegrafGroup is StartTelegraf with Telegraf leading a process group
// of its own, which holds its execd children: KillGroup kills them all at
// once, as a power cut would.
func StartTelegrafGroup(bin, configPath string, env []string, tee io.Writer) (*Telegraf, error) {
	return startTelegraf(bin, configPath, env, tee, true)
}

func startTelegraf(bin, configPath string, env []string, tee io.Writer, group bool) (*Telegraf, error) {
	cmd := exec.Command(bin, "--config", configPath)
	cmd.Env = append(os.Environ(), env...)
	DieWithParent(cmd)
	if group {
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.Setpgid = true
	}
	t := &Telegraf{cmd: cmd, log: &SyncBuffer{}, done: make(chan struct{})}
	var w io.Writer = t.log
	if tee != nil {
		w = io.MultiWriter(t.log, tee)
	}
	cmd.Stdout, cmd.Stderr = w, w
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	go func() {
		t.err = cmd.Wait()
		close(t.done)
	}()
	return t, nil
}

// Pid is the Telegraf process ID.
func (t *Telegraf) Pid() int { return t.cmd.Process.Pid }

// Log is everything Telegraf printed so far.
func (t *Telegraf) Log() string { return t.log.String() }

// Done is closed when the process exited.
func (t *Telegraf) Done() <-chan struct{} { return t.done }

// Stop sends SIGTERM and waits up to timeout for the exit; it kills the
// process after that. It returns how long the exit took and the exit error.
func (t *Telegraf) Stop(timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	select {
	case <-t.done:
		return 0, t.err
	default:
	}
	_ = t.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-t.done:
		return time.Since(start), t.err
	case <-time.After(timeout):
		_ = t.cmd.Process.Kill()
		<-t.done
		return time.Since(start), fmt.Errorf("telegraf did not exit within %s of SIGTERM; killed", timeout)
	}
}

// KillGroup sends SIGKILL to Telegraf's process group (see
// StartTelegrafGroup) and waits for Telegraf's exit.
func (t *Telegraf) KillGroup() error {
	err := syscall.Kill(-t.cmd.Process.Pid, syscall.SIGKILL)
	<-t.done
	return err
}

// Kill ends the process at once (cleanup).
func (t *Telegraf) Kill() {
	select {
	case <-t.done:
	default:
		_ = t.cmd.Process.Kill()
		<-t.done
	}
}

// Children lists the IDs of the live processes Telegraf started (the execd
// plugins), from /proc: each thread has its own list of children.
func (t *Telegraf) Children() []int {
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", t.Pid()))
	if err != nil {
		return nil
	}
	var pids []int
	for _, task := range tasks {
		b, err := os.ReadFile(task)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && Alive(pid) && !slices.Contains(pids, pid) {
				pids = append(pids, pid)
			}
		}
	}
	slices.Sort(pids)
	return pids
}

// CommandLine is the command line of process pid, from /proc.
func CommandLine(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return ""
	}
	return strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
}

// Alive reports whether process pid exists and is not a zombie.
func Alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name in parentheses.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

// SyncBuffer is a bytes.Buffer safe for a process's writes and a test's
// reads at once.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// ShareOwner returns the process holding the owner lock of a gateway's
// shared connection in the rendezvous directory dir (what
// TELEGRAF_OMNICORE_RUNTIME_DIR names), from /proc/locks: the process that
// owns the MQTT connection.
func ShareOwner(dir string) (pid int, ok bool) {
	locks, err := filepath.Glob(filepath.Join(dir, "*.lock"))
	if err != nil || len(locks) == 0 {
		return 0, false
	}
	inodes := make(map[uint64]bool)
	for _, l := range locks {
		var st syscall.Stat_t
		if err := syscall.Stat(l, &st); err == nil {
			inodes[st.Ino] = true
		}
	}
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		return 0, false
	}
	// "1: FLOCK  ADVISORY  WRITE 18950 fe:00:9994571 0 EOF"
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[1] != "FLOCK" {
			continue
		}
		dev := strings.Split(f[5], ":")
		ino, err := strconv.ParseUint(dev[len(dev)-1], 10, 64)
		if err != nil || !inodes[ino] {
			continue
		}
		if pid, err := strconv.Atoi(f[4]); err == nil {
			return pid, true
		}
	}
	return 0, false
}
