//go:build linux || darwin || freebsd

package share

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// The process owning the gateway's connection says so (it publishes the
// health state), the other does not; Holder tells the owner from the
// rendezvous without taking its lock, and nobody once both are gone or
// when the lock file names a dead process.
func TestOwnerAndHolder(t *testing.T) {
	br := newShareBridge(t, "dev-a")
	t.Setenv(EnvRuntimeDir, br.dir)
	ctx := shareCtx(t, time.Minute)

	pid, held, err := Holder(br.clientID())
	require.NoError(t, err)
	require.False(t, held, "nobody yet")

	owner, releaseOwner := br.acquire(t, br.config(t, "output"))
	require.NoError(t, ownerSession(t, ctx, owner).WaitReady(ctx))
	client, releaseClient := br.acquire(t, br.config(t, "input"))
	require.NoError(t, client.Attach(ctx, "dev-a"), "the client works through the owner")
	require.True(t, owner.(gateway.ConnectionOwner).OwnsConnection())
	require.False(t, client.(gateway.ConnectionOwner).OwnsConnection())

	pid, held, err = Holder(br.clientID())
	require.NoError(t, err)
	require.True(t, held)
	require.Equal(t, os.Getpid(), pid)
	require.Equal(t, 1, br.openConnections(), "Holder took nothing over")

	releaseOwner()
	releaseClient()
	_, held, err = Holder(br.clientID())
	require.NoError(t, err)
	require.False(t, held, "both gone")

	lock := filepath.Join(br.dir, rendezvousName(br.clientID())+".lock")
	require.NoError(t, os.WriteFile(lock, []byte("pid 2147483646\n"), 0o600))
	pid, held, err = Holder(br.clientID())
	require.NoError(t, err)
	require.False(t, held, "a crashed owner's lock file")
	require.Equal(t, 2147483646, pid)
}
