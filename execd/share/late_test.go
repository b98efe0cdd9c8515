//go:build linux || darwin || freebsd

package share

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestShareLateSubscriberGetsCurrentConfig: a second Subscribe for a device
// the session already subscribed on this connection still receives the
// device's current config, although no new SUBSCRIBE makes the bridge resend
// it (the session replays its copy). Across processes this is a process that
// subscribes to a device another process already listens to, or one the owner
// disconnected for being too slow.
func TestShareLateSubscriberGetsCurrentConfig(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 20*time.Second)
	_, err := b.srv.SetConfig(shareRegistry, "dev-a", []byte("cfg-1"))
	require.NoError(t, err)

	tests := []struct {
		name  string
		local bool // second subscriber in the owner process, or in another process
	}{
		{"second plugin of the owner process", true},
		{"plugin of another process", false},
	}
	owner, _ := b.acquire(t, b.config(t, "input-1"))
	first := newInbox()
	_, err = owner.Subscribe(ctx, "dev-a", first.handler)
	require.NoError(t, err)
	first.waitFor(t, ctx, 1, isConfig("cfg-1"))
	client, _ := b.acquire(t, b.config(t, "input-2"))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn := client
			if tt.local {
				conn = owner
			}
			late := newInbox()
			_, err := conn.Subscribe(ctx, "dev-a", late.handler)
			require.NoError(t, err)
			late.waitFor(t, shareCtx(t, 5*time.Second), 1, isConfig("cfg-1"))
		})
	}
}
