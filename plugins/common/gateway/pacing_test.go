package gateway

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Issue 23 item 6 and issue 22 item 5: states ten times faster than the
// bridge takes them. Publish never waits for pacing (a Write held for it
// made Telegraf log "did not complete within its flush interval"); the
// bridge sees at most one state per device per second, never detaches a
// device, and gets the latest state; the states replaced by a newer one are
// counted as coalesced, not as dropped.
func TestFastStatesNeverHoldThePublisher(t *testing.T) {
	const states, every = 30, 100 * time.Millisecond
	b := newTestBridge(t, 2)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 30*time.Second)

	var slowest time.Duration
	tick := time.NewTicker(every)
	defer tick.Stop()
	for i := range states {
		<-tick.C
		for d := range 2 {
			start := time.Now()
			require.NoError(t, s.Publish(ctx, Message{Device: deviceName(d), Kind: omnicore.KindState, Payload: fmt.Appendf(nil, "s%d", i), QoS: 1}))
			slowest = max(slowest, time.Since(start))
		}
	}
	// The last state of each device arrives, within a StateInterval.
	last := fmt.Sprintf("s%d", states-1)
	require.NoError(t, b.srv.WaitFor(ctx, func() bool {
		got := receivedPayloads(b.srv)
		return got[deviceName(0)+"|"+last] == 1 && got[deviceName(1)+"|"+last] == 1
	}))

	received := b.srv.Received()
	prev := map[string]time.Time{}
	for _, m := range received {
		if p, ok := prev[m.Device]; ok {
			require.GreaterOrEqual(t, m.Time.Sub(p), 990*time.Millisecond, "state of %s faster than 1/s", m.Device)
		}
		prev[m.Device] = m.Time
	}
	st := s.Stats()
	t.Logf("%d states per device every %s for 2 devices: slowest Publish %s; the bridge got %d states (at most 1/s per device), %d coalesced, dropped %v, bridge errors %d",
		states, every, slowest.Round(time.Microsecond), len(received), st.StatesCoalesced, st.DroppedByReason, len(b.srv.ErrorsSent()))
	require.Less(t, slowest, omnicore.StateInterval/2, "Publish does not wait for pacing")
	require.Equal(t, uint64(2*states-len(received)), st.StatesCoalesced, "every state is sent or coalesced")
	require.Empty(t, st.DroppedByReason)
	require.Empty(t, b.srv.ErrorsSent())
	require.Zero(t, b.srv.Stats().BridgeDetaches)
}

// A state kept for its turn is sent before Close returns.
func TestCloseSendsTheKeptState(t *testing.T) {
	b := newTestBridge(t, 1)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)
	dev := deviceName(0)
	require.NoError(t, s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindState, Payload: []byte("s1"), QoS: 1}))
	require.NoError(t, s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindState, Payload: []byte("s2"), QoS: 1}))
	require.Len(t, b.srv.Received(), 1, "s2 waits for its turn")
	closeCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	require.NoError(t, s.Close(closeCtx))
	got := receivedPayloads(b.srv)
	require.Equal(t, 1, got[dev+"|s1"])
	require.Equal(t, 1, got[dev+"|s2"])
	require.Empty(t, s.Stats().DroppedByReason)
}
