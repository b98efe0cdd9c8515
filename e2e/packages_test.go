package e2e

import (
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// The installed paths, as tools/dist lays them out and sample.conf names them.
const (
	pkgName       = "telegraf-omnicore"
	pkgBinary     = "/usr/bin/telegraf-omnicore"
	pkgWiring     = "/etc/telegraf/telegraf.d/omnicore.conf.sample"
	pkgPluginDir  = "/etc/telegraf/omnicore"
	pkgOutputConf = "/etc/telegraf/omnicore/output.conf"
	pkgInputConf  = "/etc/telegraf/omnicore/input.conf"
	pkgDocDir     = "/usr/share/doc/telegraf-omnicore"
	pkgDropIn     = "/usr/lib/systemd/system/telegraf.service.d/telegraf-omnicore.conf"
	pkgStateDir   = "/var/lib/telegraf-omnicore"
)

// Versions of the two builds the test installs one after the other.
const (
	pkgVersion1 = "v1.0.0-rc.1"
	pkgVersion2 = "v1.0.1"
)

// machinePaths are the paths the package creates or removes: the test
// leaves each of them as it found it. The state directory is not one of
// them: other tests running as root on the machine may create and use it
// at any time (telegraf-omnicore creates it when it can), so the test
// removes it only when it is empty.
var machinePaths = []string{"/etc/telegraf", "/etc/telegraf/telegraf.d", pkgWiring, pkgPluginDir,
	pkgBinary, pkgDocDir, "/usr/lib/systemd/system/telegraf.service.d", pkgDropIn}

// TestPackages builds the release packages with tools/dist (make dist's
// program) and checks them: the .deb's and the .rpm's contents, the arm64
// and armv7 binaries (under qemu-user when it is installed), then installs
// the .deb, runs the installed binary end to end with the installed wiring
// and plugin files against the emulator, upgrades, removes and purges it.
// It needs root and dpkg (CI has both), and leaves the machine as found.
func TestPackages(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and installs the packages")
	}
	if os.Geteuid() != 0 {
		t.Skip("the package test installs a .deb with dpkg: it runs as root only (CI runs as root)")
	}
	for _, tool := range []string{"dpkg", "dpkg-deb", "dpkg-query"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("the package test needs %s (a Debian-based machine)", tool)
		}
	}
	lockPackageTest(t)
	if status := packageStatus(t); status != "" {
		t.Skipf("%s is on this machine (%q): the package test installs and purges it, so it does not run here; dpkg --purge %s to run it",
			pkgName, status, pkgName)
	}
	for _, p := range []string{pkgBinary, pkgWiring, pkgPluginDir} {
		if _, err := os.Lstat(p); err == nil {
			t.Skipf("%s exists (a hand installation?): the package test would overwrite it, so it does not run here", p)
		}
	}
	before := existing(machinePaths)
	_, err := os.Lstat(pkgStateDir)
	stateDirBefore := err == nil

	root, err := RepoRoot()
	require.NoError(t, err)
	work := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	dist := filepath.Join(work, "dist")
	runCmd(t, ctx, "go", "-C", filepath.Join(root, "tools", "dist"), "build", "-o", dist, ".")
	out1, out2 := filepath.Join(work, "out1"), filepath.Join(work, "out2")
	runCmd(t, ctx, dist, "-repo", root, "-out", out1, "-version", pkgVersion1,
		"-platforms", "linux/amd64,linux/arm64,linux/arm/v7", "-formats", "deb,rpm")
	runCmd(t, ctx, dist, "-repo", root, "-out", out2, "-version", pkgVersion2, "-platforms", "linux/amd64", "-formats", "deb")
	t.Logf("packages built in %s", time.Since(start).Round(time.Second))

	deb := filepath.Join(out1, "telegraf-omnicore_1.0.0~rc.1_amd64.deb")
	debUpgrade := filepath.Join(out2, "telegraf-omnicore_1.0.1_amd64.deb")
	for _, p := range []string{deb, debUpgrade} {
		fi, err := os.Stat(p)
		require.NoError(t, err)
		t.Logf("%s: %d bytes", filepath.Base(p), fi.Size())
	}

	t.Run("deb contents", func(t *testing.T) { checkDebContents(t, ctx, root, deb) })
	t.Run("rpm contents", func(t *testing.T) {
		checkRPMContents(t, ctx, filepath.Join(out1, "telegraf-omnicore-1.0.0~rc.1-1.x86_64.rpm"))
	})
	t.Run("arm binaries", func(t *testing.T) {
		checkForeignBinary(t, ctx, filepath.Join(out1, "telegraf-omnicore_1.0.0~rc.1_arm64.deb"), elf.EM_AARCH64, "qemu-aarch64")
		checkForeignBinary(t, ctx, filepath.Join(out1, "telegraf-omnicore_1.0.0~rc.1_armhf.deb"), elf.EM_ARM, "qemu-arm")
	})
	t.Run("install_run_upgrade_remove_purge", func(t *testing.T) {
		t.Cleanup(func() { restoreMachine(t, before, stateDirBefore) })
		installRunRemove(t, ctx, deb, debUpgrade)
	})
}

// checkDebContents checks the .deb's metadata, files, modes and conffiles,
// and that the wiring it installs names the paths it installs.
func checkDebContents(t *testing.T, ctx context.Context, root, deb string) {
	info := runCmd(t, ctx, "dpkg-deb", "-I", deb)
	for _, want := range []string{"Package: telegraf-omnicore", "Version: 1.0.0~rc.1", "Architecture: amd64", "Suggests: telegraf"} {
		require.Contains(t, info, want)
	}
	conffiles := strings.Fields(runCmd(t, ctx, "dpkg-deb", "-I", deb, "conffiles"))
	require.ElementsMatch(t, []string{pkgWiring, pkgOutputConf, pkgInputConf}, conffiles,
		"conffiles: an upgrade keeps the user's edits")
	for _, script := range []string{"postinst", "postrm"} {
		require.Contains(t, runCmd(t, ctx, "dpkg-deb", "-I", deb, script), pkgStateDir)
	}

	// "-rwxr-xr-x root/root 20263074 2026-11-25 16:35 ./usr/bin/telegraf-omnicore"
	listing := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(runCmd(t, ctx, "dpkg-deb", "-c", deb)), "\n") {
		f := strings.Fields(line)
		require.GreaterOrEqual(t, len(f), 6, line)
		require.Equal(t, "root/root", f[1], line)
		listing[strings.TrimSuffix(strings.TrimPrefix(f[5], "."), "/")] = f[0]
	}
	want := map[string]string{
		pkgBinary:                "-rwxr-xr-x",
		pkgWiring:                "-rw-r--r--",
		pkgPluginDir:             "drwxr-xr-x",
		pkgOutputConf:            "-rw-r--r--",
		pkgInputConf:             "-rw-r--r--",
		pkgDropIn:                "-rw-r--r--",
		pkgDocDir + "/README.md": "-rw-r--r--",
		pkgDocDir + "/LICENSE":   "-rw-r--r--",
		pkgDocDir + "/plugins/outputs/omnicore/README.md": "-rw-r--r--",
		pkgDocDir + "/plugins/inputs/omnicore/README.md":  "-rw-r--r--",
	}
	for path, mode := range want {
		require.Containsf(t, listing, path, "%s in the .deb", path)
		require.Equalf(t, mode, listing[path], "mode of %s", path)
	}
	require.NotContains(t, listing, "/usr/bin/omnicore-emulator", "the emulator ships in the tarballs only")
	require.NotContains(t, listing, pkgStateDir, "the state directory is made by postinst, so that a removal keeps it")

	// The files are the repository's: the wiring is the root sample.conf,
	// the plugin files are the plugins' sample.conf under a header.
	x := t.TempDir()
	runCmd(t, ctx, "dpkg-deb", "-x", deb, x)
	read := func(path string) string {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		return string(b)
	}
	require.Equal(t, read(filepath.Join(root, "sample.conf")), read(filepath.Join(x, pkgWiring)))
	require.True(t, strings.HasSuffix(read(filepath.Join(x, pkgOutputConf)), read(filepath.Join(root, "plugins/outputs/omnicore/sample.conf"))))
	require.True(t, strings.HasSuffix(read(filepath.Join(x, pkgInputConf)), read(filepath.Join(root, "plugins/inputs/omnicore/sample.conf"))))
	require.Contains(t, read(filepath.Join(x, pkgDropIn)), "StateDirectory=telegraf-omnicore\n")

	// Every execd command the docs show runs a binary and a plugin file
	// that the package installs.
	command := regexp.MustCompile(`command = \["([^"]+)", "-config", "([^"]+)"\]`)
	for _, doc := range []string{"sample.conf", "plugins/outputs/omnicore/README.md", "plugins/inputs/omnicore/README.md"} {
		matches := command.FindAllStringSubmatch(read(filepath.Join(root, doc)), -1)
		require.NotEmptyf(t, matches, "execd command lines in %s", doc)
		for _, m := range matches {
			require.Containsf(t, listing, m[1], "%s runs %s", doc, m[1])
			require.Containsf(t, listing, m[2], "%s reads %s", doc, m[2])
		}
	}
}

// checkRPMContents checks the .rpm's files, modes and config flags with rpm
// (Debian's rpm package; .ci/run installs it).
func checkRPMContents(t *testing.T, ctx context.Context, rpm string) {
	if _, err := exec.LookPath("rpm"); err != nil {
		t.Skip("rpm is not installed (apt-get install rpm): the .rpm's contents are not checked")
	}
	require.Equal(t, "telegraf-omnicore 1.0.0~rc.1 1 x86_64",
		runCmd(t, ctx, "rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}", rpm))
	files := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(runCmd(t, ctx, "rpm", "-qp", "--qf",
		`[%{FILENAMES} %{FILEMODES:perms} %{FILEUSERNAME} %{FILEFLAGS:fflags}\n]`, rpm)), "\n") {
		f := strings.Fields(line)
		require.GreaterOrEqual(t, len(f), 3, line)
		require.Equal(t, "root", f[2], line)
		files[f[0]] = strings.Join(append([]string{f[1]}, f[3:]...), " ")
	}
	for path, want := range map[string]string{
		pkgBinary:              "-rwxr-xr-x",
		pkgWiring:              "-rw-r--r-- cn", // %config(noreplace)
		pkgOutputConf:          "-rw-r--r-- cn",
		pkgInputConf:           "-rw-r--r-- cn",
		pkgPluginDir:           "drwxr-xr-x",
		pkgDropIn:              "-rw-r--r--",
		pkgDocDir + "/LICENSE": "-rw-r--r--",
	} {
		require.Containsf(t, files, path, "%s in the .rpm", path)
		require.Equalf(t, want, files[path], "mode and flags of %s", path)
	}
	scripts := runCmd(t, ctx, "rpm", "-qp", "--scripts", rpm)
	require.Contains(t, scripts, "postinstall scriptlet")
	require.Contains(t, scripts, "postuninstall scriptlet")
}

// checkForeignBinary checks the binary of another architecture's .deb: its
// ELF machine, that it is static, and, when qemu-user is installed, that it
// runs and prints its version.
func checkForeignBinary(t *testing.T, ctx context.Context, deb string, machine elf.Machine, qemu string) {
	x := t.TempDir()
	runCmd(t, ctx, "dpkg-deb", "-x", deb, x)
	bin := filepath.Join(x, pkgBinary)
	f, err := elf.Open(bin)
	require.NoError(t, err)
	require.Equal(t, machine, f.Machine, filepath.Base(deb))
	for _, p := range f.Progs {
		require.NotEqual(t, elf.PT_INTERP, p.Type, "%s: a dynamically linked binary (CGO_ENABLED=0 makes it static)", filepath.Base(deb))
	}
	require.NoError(t, f.Close())
	if _, err := exec.LookPath(qemu); err != nil {
		t.Logf("%s is not installed (apt-get install qemu-user): %s checked by its ELF header only", qemu, filepath.Base(deb))
		return
	}
	out := runCmd(t, ctx, qemu, bin, "-version")
	require.True(t, strings.HasPrefix(out, "telegraf-omnicore "+pkgVersion1+" (Telegraf 1.37.2, go"), out)
	t.Logf("%s under %s: %s", filepath.Base(deb), qemu, strings.TrimSpace(out))
}

// installRunRemove installs the .deb, runs the installed binary under
// Telegraf with the installed wiring and plugin files (edited as a user
// would) against the emulator, upgrades to debUpgrade, removes and purges.
func installRunRemove(t *testing.T, ctx context.Context, deb, debUpgrade string) {
	_, err := os.Lstat(pkgStateDir)
	stateDirBefore := err == nil
	dpkg(t, ctx, "-i", deb)
	require.Equal(t, "install ok installed", packageStatus(t))
	require.True(t, strings.HasPrefix(runCmd(t, ctx, pkgBinary, "-version"), "telegraf-omnicore "+pkgVersion1+" (Telegraf 1.37.2, go"))
	requireMode(t, pkgBinary, 0o755)
	requireMode(t, pkgOutputConf, 0o644)
	state, err := os.Lstat(pkgStateDir)
	require.NoError(t, err, "postinst creates the state directory")
	require.True(t, state.IsDir())
	require.Zero(t, state.Mode().Perm()&0o022, "telegraf-omnicore refuses a state directory group or others may write")
	if !stateDirBefore {
		require.Equal(t, fs.FileMode(0o750), state.Mode().Perm(), "mode of the new state directory")
		owner := uint32(0)
		if out, err := exec.Command("id", "-u", "telegraf").Output(); err == nil {
			var uid uint32
			_, err := fmt.Sscan(string(out), &uid)
			require.NoError(t, err)
			owner = uid
		}
		require.Equal(t, owner, state.Sys().(*syscall.Stat_t).Uid, "owner of the state directory: telegraf when that user exists, else root")
	}

	// A user's setup: the two installed plugin files filled in for the
	// emulator's gateway, the installed wiring as it is.
	s := newSetup(t)
	devices := []string{"sensor-01", "sensor-02"}
	key := s.srv.AddTestGateway(t, "my-registry", "my-gateway", omnicore.RS256, devices...)
	ca, err := s.srv.WriteCAFile(s.dir)
	require.NoError(t, err)
	fill := strings.NewReplacer(
		`servers = ["tls://<hostprefix>.mqtt.korewireless.com:8883"]`, "servers = ["+Quote(s.srv.TLSURL)+"]",
		`subscription_id = "my-subscription"`, "subscription_id = "+Quote(s.srv.Subscription()),
		`private_key = "/etc/telegraf/omnicore/gateway.key"`, "private_key = "+Quote(key),
		`# tls_ca = "/etc/telegraf/omnicore/roots.pem"`, "tls_ca = "+Quote(ca),
		"  # devices = []\n", `  devices = ["sensor-01", "sensor-02"]`+"\n",
	)
	edited := map[string]string{}
	for _, path := range []string{pkgOutputConf, pkgInputConf} {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		edited[path] = fill.Replace(string(b))
		require.NotEqual(t, string(b), edited[path])
		require.NoError(t, os.WriteFile(path, []byte(edited[path]), 0o644))
	}
	wiring, err := os.ReadFile(pkgWiring)
	require.NoError(t, err)
	tg := s.runShippedWiring(string(wiring), devices)
	var commands []string
	for _, pid := range tg.Children() {
		commands = append(commands, CommandLine(pid))
	}
	require.ElementsMatch(t, []string{pkgBinary + " -config " + pkgOutputConf, pkgBinary + " -config " + pkgInputConf}, commands,
		"Telegraf runs the installed binary with the installed plugin files")
	_, err = tg.Stop(10 * time.Second)
	require.NoError(t, err)
	require.Empty(t, errorLines(tg.Log()))

	// An upgrade replaces the binary and keeps the edited plugin files,
	// without asking (dpkg's stdin is empty: a prompt would fail).
	dpkg(t, ctx, "-i", debUpgrade)
	require.True(t, strings.HasPrefix(runCmd(t, ctx, pkgBinary, "-version"), "telegraf-omnicore "+pkgVersion2+" "))
	for path, content := range edited {
		b, err := os.ReadFile(path)
		require.NoError(t, err)
		require.Equalf(t, content, string(b), "%s after the upgrade", path)
	}

	// A removal keeps the configuration and the state directory.
	dpkg(t, ctx, "-r", pkgName)
	require.Equal(t, "deinstall ok config-files", packageStatus(t))
	requireMissing(t, pkgBinary)
	requireMissing(t, pkgDropIn)
	for path, content := range edited {
		b, err := os.ReadFile(path)
		require.NoError(t, err, "a removal keeps the configuration")
		require.Equal(t, content, string(b))
	}
	_, err = os.Stat(pkgWiring)
	require.NoError(t, err, "a removal keeps the wiring sample")
	_, err = os.Stat(pkgStateDir)
	require.NoError(t, err, "a removal keeps the state directory")

	// A purge deletes the configuration and, when it is empty, the state
	// directory (which other tests on this machine may be using).
	dpkg(t, ctx, "--purge", pkgName)
	require.Equal(t, "", packageStatus(t))
	requireMissing(t, pkgOutputConf)
	requireMissing(t, pkgWiring)
	if entries, err := os.ReadDir(pkgStateDir); err == nil {
		require.NotEmpty(t, entries, "a purge removes the state directory when it is empty")
	}
}

// restoreMachine purges the package if a failed test left it installed,
// and removes what it created: the machine is left as the test found it.
func restoreMachine(t *testing.T, before map[string]bool, stateDirBefore bool) {
	if packageStatus(t) != "" {
		out, err := dpkgCommand(context.Background(), "--purge", pkgName)
		if err != nil {
			t.Errorf("cleanup: dpkg --purge %s: %v\n%s", pkgName, err, out)
		}
	}
	after := existing(machinePaths)
	for i := len(machinePaths) - 1; i >= 0; i-- {
		p := machinePaths[i]
		if after[p] && !before[p] {
			t.Errorf("%s was left on the machine; removing it", p)
			if err := os.RemoveAll(p); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	}
	if !stateDirBefore {
		_ = os.Remove(pkgStateDir) // only when empty: other tests may be using it
	}
}

// lockPackageTest serialises the package test between concurrent test runs
// on one machine (each would install and purge the same package).
func lockPackageTest(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "telegraf-omnicore-package-test.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	require.NoError(t, syscall.Flock(int(f.Fd()), syscall.LOCK_EX))
}

// packageStatus is dpkg's status of the package ("" when it is unknown).
func packageStatus(t *testing.T) string {
	out, err := exec.Command("dpkg-query", "-W", "-f", "${Status}", pkgName).Output()
	if err != nil {
		var ee *exec.ExitError
		require.True(t, errors.As(err, &ee), "dpkg-query: %v", err)
		return "" // not known to dpkg
	}
	status := strings.TrimSpace(string(out))
	if status == "unknown ok not-installed" || status == "purge ok not-installed" {
		return ""
	}
	return status
}

// dpkg runs dpkg with args; it fails the test on an error.
func dpkg(t *testing.T, ctx context.Context, args ...string) {
	t.Helper()
	out, err := dpkgCommand(ctx, args...)
	require.NoError(t, err, "dpkg %s:\n%s", strings.Join(args, " "), out)
}

// dpkgCommand runs dpkg with an empty stdin (a question would fail it). It
// waits, up to two minutes, while another dpkg or apt holds dpkg's lock.
func dpkgCommand(ctx context.Context, args ...string) (string, error) {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		cmd := exec.CommandContext(ctx, "dpkg", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err == nil || !bytes.Contains(out, []byte("lock")) || time.Now().After(deadline) {
			return string(out), err
		}
		select {
		case <-ctx.Done():
			return string(out), err
		case <-time.After(time.Second):
		}
	}
}

// runCmd runs a command and returns its stdout; it fails the test on an error.
func runCmd(t *testing.T, ctx context.Context, name string, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(ctx, name, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	require.NoError(t, err, "%s %s:\n%s", name, strings.Join(args, " "), stderr.String())
	return string(out)
}

func existing(paths []string) map[string]bool {
	m := map[string]bool{}
	for _, p := range paths {
		_, err := os.Lstat(p)
		m[p] = err == nil
	}
	return m
}

func requireMode(t *testing.T, path string, mode fs.FileMode) {
	t.Helper()
	fi, err := os.Stat(path)
	require.NoError(t, err)
	require.Equalf(t, mode, fi.Mode().Perm(), "mode of %s", path)
}

func requireMissing(t *testing.T, path string) {
	t.Helper()
	_, err := os.Lstat(path)
	require.Truef(t, errors.Is(err, fs.ErrNotExist), "%s should be gone: %v", path, err)
}
