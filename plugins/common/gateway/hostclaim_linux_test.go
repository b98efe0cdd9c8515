package gateway

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// envClaimHolder makes the test binary a process that holds the claim named
// by its value until its standard input closes (TestClaimOfAnotherUser).
const envClaimHolder = "GATEWAY_TEST_HOLD_CLAIM"

func init() {
	name := os.Getenv(envClaimHolder)
	if name == "" {
		return
	}
	c, _, _, err := claimHost(name)
	if err != nil || c == nil {
		os.Exit(3)
	}
	os.Stdout.WriteString("held\n")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	os.Exit(0)
}

func TestClaimHost(t *testing.T) {
	name := claimName("subscriptions/s/registries/r/devices/claim-"+t.Name(), []string{"tls://bridge:8883"})

	first, _, ignored, err := claimHost(name)
	require.NoError(t, err)
	require.NotNil(t, first)
	require.False(t, ignored)

	second, holder, ignored, err := claimHost(name)
	require.NoError(t, err)
	require.Nil(t, second, "a second claim of the same gateway must be refused")
	require.False(t, ignored, "a holder of the same user is trusted")
	require.Equal(t, os.Getpid(), holder.PID)
	require.Equal(t, os.Getuid(), holder.UID)

	h, ok := claimHolder(name)
	require.True(t, ok)
	require.Equal(t, os.Getpid(), h.PID)

	first.release()
	_, ok = claimHolder(name)
	require.False(t, ok, "a released claim has no holder")
	third, _, _, err := claimHost(name)
	require.NoError(t, err)
	require.NotNil(t, third, "a released claim can be taken again")
	third.release()

	_, ok = HostClaimHolder("subscriptions/s/registries/r/devices/nobody-holds-this", nil)
	require.False(t, ok)
}

// TestClaimOfAnotherUser: a process of another (unprivileged) user that
// binds a gateway's claim name must not keep this gateway off the bridge.
func TestClaimOfAnotherUser(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to run the squatting process as another user")
	}
	name := claimName("subscriptions/s/registries/r/devices/squatted", nil)
	// The test binary sits in a directory only root may enter: a copy in a
	// directory the other user can reach.
	self, err := os.ReadFile(os.Args[0])
	require.NoError(t, err)
	dir, err := os.MkdirTemp("", "claim")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	require.NoError(t, os.Chmod(dir, 0o755))
	bin := filepath.Join(dir, "holder.test")
	require.NoError(t, os.WriteFile(bin, self, 0o755))
	cmd := exec.Command(bin, "-test.run=^$")
	cmd.Env = append(os.Environ(), envClaimHolder+"="+name)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	if err := cmd.Start(); err != nil {
		t.Skipf("cannot run a process as uid 65534: %v", err)
	}
	defer func() { stdin.Close(); _ = cmd.Wait() }()
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "held\n", line)

	claim, holder, ignored, err := claimHost(name)
	require.NoError(t, err)
	require.Nil(t, claim)
	require.True(t, ignored, "the holder runs as another user and is not a Telegraf: ignored")
	require.Equal(t, 65534, holder.UID)
	require.Equal(t, cmd.Process.Pid, holder.PID)
}
