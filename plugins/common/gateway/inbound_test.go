package gateway

import (
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Issue 22 item 6: a subscriber whose handler blocks used to stall the
// session's single dispatcher; its queue filled, paho's router blocked, and
// every QoS 1 publish then waited for the router (waitRouted) until the ack
// timeout. Now each subscriber has its own bounded queue: publishes are
// acknowledged as fast as without it, a healthy subscriber of the same
// device gets every command, and what the blocked one's full queue cannot
// take is counted.
func TestBlockedHandlerDoesNotDelayPublishes(t *testing.T) {
	const commands, publishes = 1100, 200
	b := newTestBridge(t, 1)
	b.cfg.Timeout = 5 * time.Second
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 60*time.Second)
	dev := deviceName(0)
	// The config the bridge sends on subscribing is the blocked handler's
	// first message, the one it blocks in.
	_, err := b.srv.SetConfig(testRegistry, dev, []byte("cfg"))
	require.NoError(t, err)

	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	blocked := make(chan struct{})
	var once sync.Once
	_, err = s.Subscribe(ctx, dev, func(Inbound) {
		once.Do(func() { close(blocked) })
		<-release
	})
	require.NoError(t, err)
	var healthy atomic.Int64
	_, err = s.Subscribe(ctx, dev, func(in Inbound) {
		if in.Kind == omnicore.KindCommands {
			healthy.Add(1)
		}
	})
	require.NoError(t, err)

	// The blocked subscriber's handler holds the config; its queue fills
	// up with commands, and then some.
	select {
	case <-blocked:
	case <-ctx.Done():
		require.FailNow(t, "the config never reached the blocked subscriber")
	}
	for i := range commands {
		require.NoError(t, b.srv.SendCommand(testRegistry, dev, "", fmt.Appendf(nil, "c%d", i)))
	}

	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, publishes)
	for i := range publishes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindEvents, Payload: fmt.Appendf(nil, "m%d", i), QoS: 1})
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
		}
	}
	t.Logf("%d QoS 1 publishes with a blocked subscriber: %d failed, in %s (ack timeout %s), retries %d, connects %d",
		publishes, failed, elapsed.Round(time.Millisecond), b.cfg.Timeout, s.Stats().Retries, s.Stats().Connects)
	require.Zero(t, failed)
	waitUntil(t, 20*time.Second, func() bool { return healthy.Load() == commands }, "the healthy subscriber gets every command")
	st := s.Stats()
	t.Logf("%d commands: the healthy subscriber got %d, the blocked one's full queue dropped %d", commands, healthy.Load(), st.DroppedByReason[dropInboundQueueFull])
	require.Less(t, elapsed, b.cfg.Timeout/2, "publishes do not wait on the blocked handler")
	require.Zero(t, st.Retries)
	require.Equal(t, uint64(1), st.Connects, "no reconnect")
	// The config in the blocked handler, subscriberQueue commands waiting.
	require.Equal(t, uint64(commands-subscriberQueue), st.DroppedByReason[dropInboundQueueFull])
	got := receivedPayloads(b.srv)
	for i := range publishes {
		require.Equal(t, 1, got[fmt.Sprintf("%s|m%d", dev, i)])
	}
}
