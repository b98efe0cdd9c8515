package gateway

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// publishJunk publishes one message for each of n device IDs the bridge
// does not know, from 64 goroutines; every one must be refused. It returns
// how many were refused for want of a max_devices slot.
func publishJunk(t *testing.T, s *Session, prefix string, n int) (overMax int) {
	t.Helper()
	ctx := testCtx(t, 60*time.Second)
	var wg sync.WaitGroup
	work := make(chan int)
	errs := make(chan error, n)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				errs <- s.Publish(ctx, Message{Device: fmt.Sprintf("%s-%06d", prefix, i), Kind: omnicore.KindEvents, Payload: []byte("junk"), QoS: 1})
			}
		}()
	}
	for i := range n {
		work <- i
	}
	close(work)
	wg.Wait()
	close(errs)
	for err := range errs {
		require.ErrorIs(t, err, ErrAttachRefused)
		if errors.Is(err, ErrTooManyDevices) {
			overMax++
		}
	}
	return overMax
}

// Issue 21 item 3: 10,000 metrics with junk device IDs (refused by the
// bridge) used to fill max_devices for detach_idle (1 h), after which every
// metric of a bound device was dropped as attach_refused. Now a refused
// device waits out its back-off outside the device table, and a bound
// device delivers everything, during a second burst too. Every message of
// the bound device is counted at the bridge: none lost, none twice.
func TestJunkDeviceIDsDoNotLockOutBoundDevices(t *testing.T) {
	const junk, good, maxDevices = 10000, 3000, 1000
	b := newTestBridge(t, 1)
	b.cfg.MaxDevices = maxDevices
	b.cfg.Log = testutil.Logger{Name: "gateway", Quiet: true}
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 120*time.Second)
	dev := deviceName(0)

	overMax := publishJunk(t, s, "junk", junk)
	known := s.Stats().Known

	// The bound device publishes while a second burst of junk IDs goes on.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		overMax += publishJunk(t, s, "more", junk)
	}()
	work := make(chan int)
	errs := make(chan error, good)
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				errs <- s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindEvents, Payload: fmt.Appendf(nil, "m%d", i), QoS: 1})
			}
		}()
	}
	for i := range good {
		work <- i
	}
	close(work)
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if err != nil {
			failed++
		}
	}
	got := receivedPayloads(b.srv)
	lost, dup := 0, 0
	for i := range good {
		switch n := got[fmt.Sprintf("%s|m%d", dev, i)]; {
		case n == 0:
			lost++
		case n > 1:
			dup += n - 1
		}
	}
	t.Logf("%d junk IDs (then devices known: %d), then %d messages of a bound device during %d more: %d delivered, %d failed, %d lost, %d duplicated; junk refused for max_devices %d; refusals kept %d",
		junk, known, good, junk, good-lost, failed, lost, dup, overMax, len(s.refused))
	require.Zero(t, failed)
	require.Zero(t, lost)
	require.Zero(t, dup)
	require.LessOrEqual(t, known, 1, "refused devices hold no slot")
	require.Zero(t, overMax, "junk IDs are refused by the bridge, never for want of a slot")
	require.Zero(t, s.Stats().DevicesRefused)
	s.mu.Lock()
	require.LessOrEqual(t, len(s.refused), maxRefusals)
	s.mu.Unlock()
}

// Issue 21 item 3 and issue 23 item 7: 10,000 refused junk IDs are counted,
// and the session says nothing of them above debug level: it is shared by
// the plugins of a gateway and logs with the logger of the one that started
// it, so each refusal goes back to the plugin that asked for the device,
// which reports it at its own pace (the output: one W! of the kind per
// warnInterval, see plugins/outputs/omnicore).
func TestJunkDeviceIDsLeftToTheAskingPlugin(t *testing.T) {
	b := newTestBridge(t, 0)
	log := &testutil.CaptureLogger{Name: "gateway"}
	b.cfg.Log = log
	s := startSession(t, b.cfg)
	publishJunk(t, s, "junk", 10000)
	debug := 0
	for _, e := range log.Messages() {
		if !strings.Contains(e.Text, `"junk-`) {
			continue
		}
		require.Equal(t, 'D', rune(e.Level), "a refusal above debug: %s", e.Text)
		debug++
	}
	t.Logf("10000 refused junk IDs: %d debug lines, %d attaches failed", debug, s.Stats().AttachesFailed)
	require.Positive(t, debug)
	require.GreaterOrEqual(t, s.Stats().AttachesFailed, uint64(10000))
}
