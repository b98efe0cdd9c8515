package gateway

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Case 9: the bridge may name a message in GATEWAY_DEVICE_NOT_FOUND before
// or after its PUBACK. Either way the message is delivered exactly once:
// the session believes the device attached while the bridge does not (a
// detach it missed), publishes, hears the error, re-attaches and re-sends.
func TestErrorEitherSideOfThePuback(t *testing.T) {
	tests := []struct {
		name  string
		rules func(*emulator.Rules)
	}{
		{"error, no PUBACK", func(*emulator.Rules) {}},
		{"error, then PUBACK", func(r *emulator.Rules) { r.NotAttachedPuback = true }},
		{"PUBACK, then error", func(r *emulator.Rules) { r.NotAttachedErrorAfterPuback = true }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newTestBridge(t, 1)
			b.srv.SetRules(tt.rules)
			s := startSession(t, b.cfg)
			ctx := testCtx(t, 20*time.Second)
			dev := deviceName(0)
			// The session's view: attached on this connection.
			s.mu.Lock()
			d := s.deviceLocked(dev)
			d.wanted, d.attachedGen, d.lastUsed = true, s.conn.gen, time.Now()
			s.mu.Unlock()

			require.NoError(t, s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindEvents, Payload: []byte("m1"), QoS: 1}))
			waitUntil(t, 10*time.Second, func() bool { return receivedPayloads(b.srv)[dev+"|m1"] == 1 }, "m1 delivered after re-attaching")
			require.Equal(t, 1, b.srv.Stats().DroppedNotAttached, "the first copy was dropped by the bridge")
			require.Equal(t, 1, receivedPayloads(b.srv)[dev+"|m1"], "exactly once")
			require.Equal(t, []string{dev}, b.srv.Attachments(testRegistry, testGateway))
		})
	}
}

// Case 8: device state is bounded. New devices above max_devices are refused
// and counted; idle ones are forgotten; a reconnect re-attaches only the
// devices used since the previous connect.
func TestDeviceStateIsBounded(t *testing.T) {
	b := newTestBridge(t, 6)
	b.cfg.MaxDevices = 4
	log := &testutil.CaptureLogger{Name: "gateway"}
	b.cfg.Log = log
	b.cfg.DetachIdle = time.Second
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 30*time.Second)
	for i := range 4 {
		require.NoError(t, s.Attach(ctx, deviceName(i)))
	}
	err := s.Publish(ctx, Message{Device: deviceName(4), Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
	require.ErrorIs(t, err, ErrAttachRefused)
	require.ErrorIs(t, err, ErrTooManyDevices)
	require.ErrorIs(t, s.Attach(ctx, deviceName(5)), ErrTooManyDevices)
	st := s.Stats()
	require.Equal(t, uint64(2), st.DevicesRefused)
	require.Equal(t, 4, st.Known)
	warned := 0
	for _, w := range log.Warnings() {
		if strings.Contains(w, "max_devices = 4") {
			warned++
		}
	}
	require.Equal(t, 1, warned, "at most one warning per 10 s, not one per device")

	// Idle devices are detached and forgotten, which makes room.
	waitUntil(t, 10*time.Second, func() bool { return s.Stats().Known == 0 }, "idle devices forgotten")
	// The session forgets a device as its detach goes out; the bridge
	// records the detach when it reads it.
	waitUntil(t, 10*time.Second, func() bool { return len(b.srv.Attachments(testRegistry, testGateway)) == 0 }, "idle devices detached at the bridge")
	require.NoError(t, s.Attach(ctx, deviceName(4)))
}

// Case 8: a reconnect re-attaches only what was used since the previous
// connect.
func TestReconnectReattachesOnlyActiveDevices(t *testing.T) {
	b := newTestBridge(t, 3)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 30*time.Second)
	for i := range 3 {
		require.NoError(t, s.Attach(ctx, deviceName(i)))
	}
	// Two reconnects: after the first, only dev 0 is used again.
	b.srv.KickAll()
	waitUntil(t, 10*time.Second, func() bool { return s.Stats().Connects == 2 && s.Stats().Connected }, "reconnected")
	require.NoError(t, s.Publish(ctx, Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	b.srv.KickAll()
	waitUntil(t, 10*time.Second, func() bool { return s.Stats().Connects == 3 && s.Stats().Connected }, "reconnected again")
	require.NoError(t, b.srv.WaitAttached(ctx, testRegistry, testGateway, deviceName(0)))
	require.Equal(t, []string{deviceName(0)}, b.srv.Attachments(testRegistry, testGateway), "idle devices wait for their next message")
	require.NoError(t, s.Publish(ctx, Message{Device: deviceName(2), Kind: omnicore.KindEvents, Payload: []byte("y"), QoS: 1}), "and attach on it")
}

func TestRefusedBackoffCap(t *testing.T) {
	for f := 1; f < 40; f++ {
		require.LessOrEqual(t, retryBackoff(f), time.Minute, "failures %d", f)
	}
}

// Case 10: state pacing survives a Detach.
func TestStatePacingSurvivesDetach(t *testing.T) {
	b := newTestBridge(t, 1)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)
	dev := deviceName(0)
	require.NoError(t, s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindState, Payload: []byte("s1"), QoS: 1}))
	require.NoError(t, s.Detach(ctx, dev))
	require.NoError(t, s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindState, Payload: []byte("s2"), QoS: 1}))
	_, err := b.srv.WaitReceived(ctx, 2)
	require.NoError(t, err)
	for _, e := range b.srv.ErrorsSent() {
		require.NotEqual(t, omnicore.ErrorDetachedByError, e.Error.ErrorType, "state after a detach was paced")
	}
	msgs := b.srv.Received()
	require.Len(t, msgs, 2)
	require.GreaterOrEqual(t, msgs[1].Time.Sub(msgs[0].Time), 990*time.Millisecond)
}

// Case 10: keep_alive and detach_idle bounds are config errors.
func TestOptionBounds(t *testing.T) {
	b := newTestBridge(t, 0)
	base := DefaultOptions()
	base.Servers = b.cfg.Servers
	base.SubscriptionID, base.RegistryID, base.GatewayID = b.cfg.SubscriptionID, b.cfg.RegistryID, b.cfg.GatewayID
	base.PrivateKey = b.keyPath
	tests := []struct {
		name    string
		mutate  func(*Options)
		wantErr string
	}{
		{"defaults", func(*Options) {}, ""},
		{"keep_alive 0", func(o *Options) { o.KeepAlive = 0 }, "keep_alive 0s must be between 10s and 19m0s"},
		{"keep_alive 9s", func(o *Options) { o.KeepAlive = config.Duration(9 * time.Second) }, "keep_alive 9s"},
		{"keep_alive 20m", func(o *Options) { o.KeepAlive = config.Duration(20 * time.Minute) }, "keep_alive 20m0s"},
		{"keep_alive 19m", func(o *Options) { o.KeepAlive = config.Duration(19 * time.Minute) }, ""},
		{"detach_idle 0", func(o *Options) { o.DetachIdle = 0 }, ""},
		{"detach_idle 500ms", func(o *Options) { o.DetachIdle = config.Duration(500 * time.Millisecond) }, "detach_idle 500ms must be 0 (never detach idle devices) or at least 1s"},
		{"detach_idle negative", func(o *Options) { o.DetachIdle = config.Duration(-time.Second) }, "detach_idle -1s"},
		{"max_devices 0", func(o *Options) { o.MaxDevices = 0 }, "max_devices 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := base
			tt.mutate(&o)
			_, err := o.Validate(nil)
			if tt.wantErr == "" {
				require.NoError(t, err)
			} else {
				require.ErrorContains(t, err, tt.wantErr)
			}
		})
	}
	require.Equal(t, time.Hour, time.Duration(base.DetachIdle), "detach_idle's default bounds memory")
	require.Equal(t, omnicore.MaxAttachedDevices, base.MaxDevices)
}

// Two plugins of one process with other options for one client ID are a
// conflict, not a second connection.
func TestAcquireConflictInProcess(t *testing.T) {
	b := newTestBridge(t, 0)
	_, release, err := Acquire(b.cfg)
	require.NoError(t, err)
	defer release()
	other := *b.cfg
	other.settings = b.cfg.Settings()
	other.settings["servers"] = "tcp://localhost:1"
	_, _, err = Acquire(&other)
	require.ErrorIs(t, err, ErrConflict)
	require.ErrorContains(t, err, `servers = "tcp://localhost:1" here`)
}

// Case 8, in numbers: a stream of unknown device IDs (each refused by the
// bridge) keeps none of them in the device table (issue 21: they used to
// fill max_devices until detach_idle), and the refused table stays within
// its bound. The heap figures are logged, not asserted.
func TestUnknownDevicesDoNotGrowMemory(t *testing.T) {
	const ids, maxDevices = 12000, 2000
	b := newTestBridge(t, 0)
	b.cfg.MaxDevices = maxDevices
	b.cfg.DetachIdle = time.Second
	b.cfg.Log = testutil.Logger{Name: "gateway", Quiet: true}
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 60*time.Second)
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	before := heap()
	var wg sync.WaitGroup
	work := make(chan int)
	for range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				err := s.Publish(ctx, Message{Device: fmt.Sprintf("unknown-%06d", i), Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
				require.ErrorIs(t, err, ErrAttachRefused)
			}
		}()
	}
	for i := range ids {
		work <- i
	}
	close(work)
	wg.Wait()
	st := s.Stats()
	peak := heap()
	s.mu.Lock()
	refusals := len(s.refused)
	s.mu.Unlock()
	require.Zero(t, st.Known, "refused devices hold no max_devices slot")
	require.Zero(t, st.DevicesRefused, "none refused for want of a slot")
	require.LessOrEqual(t, refusals, maxRefusals)
	t.Logf("%d unknown IDs, max_devices %d: %d in the device table, %d in the refused table; heap %d KiB before, %d KiB with them",
		ids, maxDevices, st.Known, refusals, before>>10, peak>>10)
}
