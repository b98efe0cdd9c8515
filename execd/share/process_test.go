//go:build linux || darwin || freebsd

package share

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// envShareHelper switches the test binary into a helper process: the value
// is a JSON shareHelperSpec. The helper pattern of os/exec's own tests: the
// parent re-runs its test binary with -test.run selecting the helper.
const envShareHelper = "TELEGRAF_OMNICORE_SHARE_HELPER"

type shareHelperSpec struct {
	Role string // "acquire": Acquire and hold until stdin closes; "dial": dial Socket once
	// acquire
	Servers      []string
	Subscription string
	Key          string
	Dir          string
	DeviceAuth   string
	PluginFile   string
	NoWait       bool // an owner does not wait for its connection
	// dial
	Socket string
	Name   string
}

// TestShareHelperProcess is not a test: it is the second process of
// TestShareTwoProcesses and TestShareRefusesAnotherUser.
func TestShareHelperProcess(t *testing.T) {
	raw := os.Getenv(envShareHelper)
	if raw == "" {
		t.Skip("runs only as a helper process of the sharing tests")
	}
	var spec shareHelperSpec
	require.NoError(t, json.Unmarshal([]byte(raw), &spec))
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	switch spec.Role {
	case "dial":
		_, err := dialOwner(ctx, &rendezvous{sock: spec.Socket, name: spec.Name}, testutil.Logger{Name: "helper"}, nil, "")
		fmt.Printf("dialed err=%v\n", err)
	case "acquire":
		opts := gateway.DefaultOptions()
		opts.Servers = spec.Servers
		opts.SubscriptionID = spec.Subscription
		opts.RegistryID = shareRegistry
		opts.GatewayID = shareGateway
		opts.PrivateKey = spec.Key
		opts.Algorithm = omnicore.ES256
		if spec.DeviceAuth != "" {
			opts.DeviceAuth = spec.DeviceAuth
			opts.DeviceKeyDir = spec.Dir
		}
		cfg, err := opts.Validate(testutil.Logger{Name: "helper"})
		require.NoError(t, err)
		// No resend of its own while the parent withholds a PUBACK (not
		// an option, so not compared with the other process's).
		cfg.Timeout = 30 * time.Second
		conn, closeFn, err := (&sharer{dir: spec.Dir, settings: Settings{PluginFile: spec.PluginFile}}).acquire(cfg)
		require.NoError(t, err)
		be, _, err := conn.(*shareConn).backend(ctx)
		if err != nil {
			fmt.Printf("failed %v\n", err)
			_, _ = io.Copy(io.Discard, os.Stdin)
			return
		}
		role := "client"
		if s, ok := be.(*gateway.Session); ok {
			role = "owner"
			if !spec.NoWait {
				require.NoError(t, s.WaitReady(ctx))
			}
		}
		fmt.Printf("ready %s %d\n", role, os.Getpid())
		_, _ = io.Copy(io.Discard, os.Stdin) // until the parent closes stdin (or kills us)
		require.NoError(t, closeFn(ctx))
		fmt.Println("done")
	}
}

// shareHelper is a running helper process.
type shareHelper struct {
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr *lockedBuffer
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func startShareHelper(t *testing.T, spec shareHelperSpec, attr *syscall.SysProcAttr) *shareHelper {
	t.Helper()
	raw, err := json.Marshal(spec)
	require.NoError(t, err)
	bin := os.Args[0]
	if attr != nil && attr.Credential != nil {
		bin = publicCopy(t, bin) // the build directory is private to us
	}
	cmd := exec.Command(bin, "-test.run=^TestShareHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), envShareHelper+"="+string(raw))
	cmd.SysProcAttr = attr
	h := &shareHelper{cmd: cmd, lines: make(chan string, 16), stderr: &lockedBuffer{}}
	cmd.Stderr = h.stderr
	h.stdin, err = cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
		close(h.lines)
	}()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
		}
		if t.Failed() {
			t.Logf("helper stderr:\n%s", h.stderr.String())
		}
	})
	return h
}

// publicCopy copies the test binary where another user can run it.
func publicCopy(t *testing.T, bin string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ocsbin")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	data, err := os.ReadFile(bin)
	require.NoError(t, err)
	dst := filepath.Join(dir, "helper.test")
	require.NoError(t, os.WriteFile(dst, data, 0o755))
	return dst
}

// expect waits for a stdout line starting with prefix.
func (h *shareHelper) expect(t *testing.T, ctx context.Context, prefix string) string {
	t.Helper()
	for {
		select {
		case line, ok := <-h.lines:
			if !ok {
				require.FailNowf(t, "helper ended", "waiting for %q; stderr:\n%s", prefix, h.stderr.String())
			}
			if strings.HasPrefix(line, prefix) {
				return line
			}
		case <-ctx.Done():
			require.FailNowf(t, "helper too slow", "waiting for %q; stderr:\n%s", prefix, h.stderr.String())
		}
	}
}

func (b *shareBridge) helperSpec() shareHelperSpec {
	return shareHelperSpec{Role: "acquire", Servers: b.opts.Servers, Subscription: b.opts.SubscriptionID, Key: b.opts.PrivateKey, Dir: b.dir}
}

func TestShareTwoProcesses(t *testing.T) {
	b := newShareBridge(t, "dev-a", "dev-b")
	ctx := shareCtx(t, 50*time.Second)
	_, err := b.srv.SetConfig(shareRegistry, "dev-a", []byte("cfg-1"))
	require.NoError(t, err)

	// Process 1 starts first and owns the connection.
	helper := startShareHelper(t, b.helperSpec(), nil)
	line := helper.expect(t, ctx, "ready ")
	require.Equal(t, fmt.Sprintf("ready owner %d", helper.cmd.Process.Pid), line)
	require.Equal(t, 1, b.connectionsMade())

	// Process 2 (this one) shares it.
	client, _ := b.acquire(t, b.config(t, "input"))
	sc, ok := client.(*shareConn)
	require.True(t, ok)
	box := newInbox()
	_, err = client.Subscribe(ctx, "dev-a", box.handler)
	require.NoError(t, err)
	require.NoError(t, client.Attach(ctx, "dev-b"))
	box.waitFor(t, ctx, 1, isConfig("cfg-1"))
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("p1"), QoS: 1}))
	require.Len(t, b.received("dev-a", "p1"), 1)
	require.Equal(t, 1, b.openConnections())
	require.Equal(t, 1, b.connectionsMade(), "two processes, one bridge connection")
	st := client.Stats()
	require.True(t, st.Connected)
	require.GreaterOrEqual(t, st.Acked, uint64(1))

	// A publish is waiting for its PUBACK at the owner when the owner is
	// killed with SIGKILL: no clean-up runs there.
	b.srv.WithholdPubacks(1)
	done := make(chan error, 1)
	go func() {
		done <- client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("in-flight"), QoS: 1})
	}()
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return b.srv.Stats().Withheld == 1 }))
	killed := time.Now()
	require.NoError(t, helper.cmd.Process.Kill())
	err = helper.cmd.Wait()
	require.ErrorContains(t, err, "killed")

	require.NoError(t, <-done, "the in-flight publish is delivered through the new owner")
	box.waitFor(t, ctx, 2, isConfig("cfg-1"))
	t.Logf("takeover after kill -9: config re-delivered after %s", time.Since(killed).Round(time.Millisecond))
	require.True(t, sc.owns())
	require.NoError(t, b.srv.WaitAttached(ctx, shareRegistry, shareGateway, "dev-a", "dev-b"))
	require.NotEmpty(t, b.received("dev-a", "in-flight"))
	require.Equal(t, 2, b.connectionsMade())
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return b.openConnections() == 1 }))

	// A new process shares the new owner's connection.
	helper2 := startShareHelper(t, b.helperSpec(), nil)
	require.Equal(t, fmt.Sprintf("ready client %d", helper2.cmd.Process.Pid), helper2.expect(t, ctx, "ready "))
	require.NoError(t, helper2.stdin.Close())
	helper2.expect(t, ctx, "done")
	require.NoError(t, helper2.cmd.Wait())
	require.Equal(t, 2, b.connectionsMade())
}

func TestShareRefusesAnotherUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a process as another user; checkPeer is covered by TestShareCheckPeer")
	}
	type decision struct {
		cred peerCred
		err  error
	}
	decided := make(chan decision, 1)
	rz, _ := serveFake(t, newShareFake(), func(s *shareServer) {
		s.allow = func(c peerCred) error {
			err := checkPeer(c, s.uid)
			decided <- decision{c, err}
			return err
		}
	})
	ctx := shareCtx(t, 30*time.Second)
	asNobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	spec := shareHelperSpec{Role: "dial", Socket: rz.sock, Name: rz.name}

	// First line of defence: the private directory.
	require.NoError(t, os.Chmod(filepath.Dir(rz.dir), 0o711))
	helper := startShareHelper(t, spec, asNobody)
	require.Contains(t, helper.expect(t, ctx, "dialed "), "permission denied")
	require.Empty(t, decided, "the server never saw the connection")

	// Open the files on purpose so that only the credential check stands
	// between the other user and the socket.
	require.NoError(t, os.Chmod(rz.dir, 0o711))
	require.NoError(t, os.Chmod(rz.sock, 0o666))
	helper = startShareHelper(t, spec, asNobody)
	line := helper.expect(t, ctx, "dialed ")
	// Both ends check: the client refuses an owner of another uid too.
	require.Contains(t, line, "runs as uid 0, not as uid 65534")
	select {
	case d := <-decided:
		require.Equal(t, 65534, d.cred.UID)
		require.Equal(t, helper.cmd.Process.Pid, d.cred.PID)
		require.ErrorContains(t, d.err, "runs as uid 65534")
	case <-ctx.Done():
		require.FailNow(t, "the server saw no connection")
	}
}

// Case 2: a process started first with a key the bridge refuses does not
// hold a correctly configured one hostage: at the correct one's hello it
// hands the connection over, logs the bridge's reason at error level and
// stops; the correct one delivers.
func TestShareWrongKeyOwnerHandsOver(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 50*time.Second)
	wrongKey, _ := emulator.NewDeviceKey(t, t.TempDir(), "other-gateway", omnicore.ES256)
	spec := b.helperSpec()
	spec.Key, spec.NoWait, spec.PluginFile = wrongKey, true, "/etc/wrong.conf"
	helper := startShareHelper(t, spec, nil)
	require.Equal(t, fmt.Sprintf("ready owner %d", helper.cmd.Process.Pid), helper.expect(t, ctx, "ready "))
	require.NoError(t, b.srv.WaitFor(ctx, func() bool {
		for _, c := range b.srv.Connections() {
			if c.ClientID == b.clientID() && c.Refused {
				return true
			}
		}
		return false
	}), "the bridge refuses the wrong key")
	// The bridge records a refusal before it writes the CONNACK: wait until
	// the helper has read it (it logs it after noting it), or the client can
	// reach an owner that does not know yet that it is refused, and that
	// turns it away as a conflict instead of handing over.
	require.Eventually(t, func() bool { return strings.Contains(helper.stderr.String(), "not Authorized") }, 30*time.Second, 10*time.Millisecond)

	client, _ := b.acquire(t, b.config(t, "output"))
	for i := range 20 {
		require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: fmt.Appendf(nil, "m%d", i), QoS: 1}))
	}
	for i := range 20 {
		require.Len(t, b.received("dev-a", fmt.Sprintf("m%d", i)), 1)
	}
	require.True(t, client.(*shareConn).owns(), "the correct process took the connection over")
	require.Eventually(t, func() bool { return strings.Contains(helper.stderr.String(), "E! [helper]") }, 30*time.Second, 10*time.Millisecond)
	require.Contains(t, helper.stderr.String(), "the bridge refuses the credentials of this process (plugin file \"/etc/wrong.conf\")")
	require.Contains(t, helper.stderr.String(), "not Authorized")
}

// Case 5: an owner stopped with SIGSTOP is reported at error level by its
// client within shareSilence and counted; delivery resumes with SIGCONT.
func TestShareStoppedOwnerIsReported(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 60*time.Second)
	helper := startShareHelper(t, b.helperSpec(), nil)
	helper.expect(t, ctx, "ready owner")
	cfg := b.config(t, "input")
	log := &testutil.CaptureLogger{Name: "input"}
	cfg.Log = log
	client, _ := b.acquire(t, cfg)
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("before"), QoS: 1}))

	require.NoError(t, helper.cmd.Process.Signal(syscall.SIGSTOP))
	stopped := time.Now()
	done := make(chan error, 1)
	go func() {
		done <- client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("during"), QoS: 1})
	}()
	require.Eventually(t, func() bool {
		for _, e := range log.Errors() {
			if strings.Contains(e, "has not been heard from") {
				return true
			}
		}
		return false
	}, 45*time.Second, 20*time.Millisecond)
	t.Logf("stopped owner reported after %s", time.Since(stopped).Round(100*time.Millisecond))
	require.Equal(t, uint64(1), client.Stats().ErrorsByType[errOwnerSilent])
	require.NoError(t, helper.cmd.Process.Signal(syscall.SIGCONT))
	require.NoError(t, <-done)
	require.Len(t, b.received("dev-a", "during"), 1)
}

// Case 6 with real processes: 20 processes of one gateway started one after
// the other, each stopped gracefully as soon as its successor is up (which
// may still be connecting): the bridge never kicks a connection for a
// duplicate client ID.
func TestShareRapidProcessRestarts(t *testing.T) {
	b := newShareBridge(t)
	ctx := shareCtx(t, 120*time.Second)
	spec := b.helperSpec()
	spec.NoWait = true
	const n = 20
	var prev *shareHelper
	for range n {
		h := startShareHelper(t, spec, nil)
		h.expect(t, ctx, "ready ")
		if prev != nil {
			require.NoError(t, prev.stdin.Close())
		}
		prev = h
	}
	require.NoError(t, prev.stdin.Close())
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return b.openConnections() == 0 }))
	kicks := 0
	for _, c := range b.srv.Connections() {
		if c.Reason == emulator.ReasonTakenOver {
			kicks++
		}
	}
	t.Logf("%d processes, %d bridge connections, %d kicked for a duplicate client ID", n, b.connectionsMade(), kicks)
	require.Zero(t, kicks)
}
