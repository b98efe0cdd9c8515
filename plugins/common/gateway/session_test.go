package gateway

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

const (
	testRegistry = "reg"
	testGateway  = "gw"
)

// testBridge is an emulator with one registry, one gateway and n devices
// bound to it, plus a Config for the gateway.
type testBridge struct {
	srv        *emulator.Server
	dir        string
	cfg        *Config
	gatewayPub emulator.PublicKey
	keyPath    string
}

func newTestBridge(t testing.TB, devices int, opts ...emulator.Option) *testBridge {
	t.Helper()
	srv := emulator.NewServer(opts...)
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	require.NoError(t, srv.AddRegistry(testRegistry))
	keyPath, pub := emulator.NewDeviceKey(t, dir, testGateway, omnicore.RS256)
	require.NoError(t, srv.AddDevice(testRegistry, emulator.Device{
		ID: testGateway, Gateway: true, AuthMethod: emulator.AssociationOnly, PublicKeys: []emulator.PublicKey{pub},
	}))
	for i := range devices {
		id := deviceName(i)
		require.NoError(t, srv.AddDevice(testRegistry, emulator.Device{ID: id}))
		require.NoError(t, srv.Bind(testRegistry, testGateway, id))
	}
	opt := DefaultOptions()
	opt.Servers = []string{srv.URL}
	opt.SubscriptionID = srv.Subscription()
	opt.RegistryID = testRegistry
	opt.GatewayID = testGateway
	opt.PrivateKey = keyPath
	cfg, err := opt.Validate(testutil.Logger{Name: "gateway"})
	require.NoError(t, err)
	// Fast failure detection and reconnects keep fault tests short.
	cfg.Timeout = 2 * time.Second
	cfg.MinReconnect = 20 * time.Millisecond
	cfg.MaxReconnect = 200 * time.Millisecond
	cfg.MaxInflight = 256
	return &testBridge{srv: srv, dir: dir, cfg: cfg, gatewayPub: pub, keyPath: keyPath}
}

func deviceName(i int) string { return fmt.Sprintf("dev-%05d", i) }

func startSession(t testing.TB, cfg *Config) *Session {
	t.Helper()
	s, err := New(cfg)
	require.NoError(t, err)
	s.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, s.WaitReady(ctx))
	return s
}

func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// receivedPayloads counts the payloads the bridge accepted per device.
func receivedPayloads(srv *emulator.Server) map[string]int {
	got := make(map[string]int)
	for _, m := range srv.Received() {
		got[m.Device+"|"+string(m.Payload)]++
	}
	return got
}

// waitUntil polls an observable condition of the emulator with a deadline.
func waitUntil(t testing.TB, d time.Duration, cond func() bool, msg string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			require.FailNow(t, "condition not met in time: "+msg)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestPublishGatewayAndDevices(t *testing.T) {
	b := newTestBridge(t, 3)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)

	tests := []struct {
		name string
		msg  Message
	}{
		{"gateway own events qos1", Message{Device: testGateway, Kind: omnicore.KindEvents, Payload: []byte("g1"), QoS: 1}},
		{"gateway own state", Message{Device: testGateway, Kind: omnicore.KindState, Payload: []byte("gs"), QoS: 1}},
		{"device events qos1", Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("d0"), QoS: 1}},
		{"device events subfolder", Message{Device: deviceName(1), Kind: omnicore.KindEvents, Subfolder: "a/b", Payload: []byte("d1"), QoS: 1}},
		{"device state", Message{Device: deviceName(2), Kind: omnicore.KindState, Payload: []byte("d2s"), QoS: 1}},
		{"device events qos0", Message{Device: deviceName(2), Kind: omnicore.KindEvents, Payload: []byte("d2q0"), QoS: 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, s.Publish(ctx, tt.msg))
			waitUntil(t, 5*time.Second, func() bool {
				for _, m := range b.srv.Received() {
					if m.Device == tt.msg.Device && string(m.Payload) == string(tt.msg.Payload) {
						require.Equal(t, tt.msg.Kind, m.Kind)
						require.Equal(t, tt.msg.Subfolder, m.Subfolder)
						return true
					}
				}
				return false
			}, "message received by the bridge")
		})
	}
	att := b.srv.Attachments(testRegistry, testGateway)
	sort.Strings(att)
	require.Equal(t, []string{deviceName(0), deviceName(1), deviceName(2)}, att)
	st := s.Stats()
	require.True(t, st.Connected)
	require.Equal(t, uint64(1), st.Connects)
	require.Equal(t, uint64(3), st.AttachesOK)
	require.Equal(t, 3, st.Attached)
	require.GreaterOrEqual(t, st.Acked, uint64(len(tests)))
}

func TestInvalidMessagesNeverReachATopic(t *testing.T) {
	b := newTestBridge(t, 1)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 10*time.Second)
	tests := []struct {
		name   string
		msg    Message
		target error
	}{
		{"slash", Message{Device: "a/b", Kind: omnicore.KindEvents}, ErrInvalidDevice},
		{"plus", Message{Device: "a+", Kind: omnicore.KindEvents}, ErrInvalidDevice},
		{"hash", Message{Device: "#", Kind: omnicore.KindEvents}, ErrInvalidDevice},
		{"dotdot", Message{Device: "..", Kind: omnicore.KindEvents}, ErrInvalidDevice},
		{"empty", Message{Device: "", Kind: omnicore.KindEvents}, ErrInvalidDevice},
		{"too long", Message{Device: "a" + strings.Repeat("x", 300), Kind: omnicore.KindEvents}, ErrInvalidDevice},
		{"invalid utf8", Message{Device: "a\xff\xfe", Kind: omnicore.KindEvents}, ErrInvalidDevice},
		{"telemetry too large", Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: make([]byte, omnicore.MaxTelemetryBytes+1)}, ErrTooLarge},
		{"state too large", Message{Device: deviceName(0), Kind: omnicore.KindState, Payload: make([]byte, omnicore.MaxStateBytes+1)}, ErrTooLarge},
		{"bad subfolder", Message{Device: deviceName(0), Kind: omnicore.KindEvents, Subfolder: "a/+"}, nil},
		{"state subfolder", Message{Device: deviceName(0), Kind: omnicore.KindState, Subfolder: "x"}, nil},
		{"qos 2", Message{Device: deviceName(0), Kind: omnicore.KindEvents, QoS: 2}, nil},
		{"config is not publishable", Message{Device: deviceName(0), Kind: omnicore.KindConfig}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := s.Publish(ctx, tt.msg)
			require.Error(t, err)
			if tt.target != nil {
				require.ErrorIs(t, err, tt.target)
			}
			require.ErrorIs(t, s.Attach(ctx, "x/y"), ErrInvalidDevice)
		})
	}
	require.Empty(t, b.srv.Received())
	require.Empty(t, b.srv.Attachments(testRegistry, testGateway))
	require.Len(t, b.srv.Connections(), 1, "bad input must never cost the connection")
}

func TestAttachRefused(t *testing.T) {
	for _, withPuback := range []bool{true, false} {
		t.Run(fmt.Sprintf("puback=%v", withPuback), func(t *testing.T) {
			b := newTestBridge(t, 1)
			b.srv.SetRules(func(r *emulator.Rules) { r.AttachFailurePuback = withPuback })
			require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{ID: "unbound"}))
			s := startSession(t, b.cfg)
			ctx := testCtx(t, 20*time.Second)

			// A refused device fails with a clear error, and does not hold up
			// a good one published at the same time.
			var wg sync.WaitGroup
			var refusedErr, unknownErr, goodErr error
			wg.Add(3)
			go func() {
				defer wg.Done()
				refusedErr = s.Publish(ctx, Message{Device: "unbound", Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
			}()
			go func() {
				defer wg.Done()
				unknownErr = s.Attach(ctx, "no-such-device")
			}()
			go func() {
				defer wg.Done()
				goodErr = s.Publish(ctx, Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("ok"), QoS: 1})
			}()
			wg.Wait()
			require.NoError(t, goodErr)
			require.ErrorIs(t, refusedErr, ErrAttachRefused)
			require.ErrorIs(t, unknownErr, ErrAttachRefused)
			require.Equal(t, []string{deviceName(0)}, b.srv.Attachments(testRegistry, testGateway))

			// While it is backing off, the refusal is answered at once.
			start := time.Now()
			require.ErrorIs(t, s.Attach(ctx, "unbound"), ErrAttachRefused)
			require.Less(t, time.Since(start), b.cfg.Timeout)

			st := s.Stats()
			require.Equal(t, uint64(2), st.ErrorsByType[omnicore.ErrorAttachment])
			require.GreaterOrEqual(t, st.AttachesFailed, uint64(2))
			for _, m := range b.srv.Received() {
				require.NotEqual(t, "unbound", m.Device)
			}
		})
	}
}

func TestDeviceTokenAuth(t *testing.T) {
	b := newTestBridge(t, 0)
	keyDir := t.TempDir()
	priv, pub := emulator.NewDeviceKey(t, b.dir, "tokdev", omnicore.ES256)
	require.NoError(t, os.Rename(priv, filepath.Join(keyDir, "tokdev.pem")))
	require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{ID: "tokdev", PublicKeys: []emulator.PublicKey{pub}}))
	require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{ID: "nokey"}))
	require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{
		ID: "gw2", Gateway: true, AuthMethod: emulator.DeviceAuthTokenOnly,
		PublicKeys: []emulator.PublicKey{b.gatewayPub},
	}))
	cfg := *b.cfg
	cfg.GatewayID = "gw2"
	cfg.DeviceAuth = DeviceAuthToken
	cfg.DeviceKeyDir = keyDir
	cfg.DeviceAlgorithm = omnicore.ES256
	s := startSession(t, &cfg)
	ctx := testCtx(t, 10*time.Second)
	require.NoError(t, s.Attach(ctx, "tokdev"), "device JWT in the attach authorises an unbound device")
	require.ErrorIs(t, s.Attach(ctx, "nokey"), ErrAttachRefused)
	require.Equal(t, []string{"tokdev"}, b.srv.Attachments(testRegistry, "gw2"))
}

func TestAttachStorm(t *testing.T) {
	n := 10000
	if testing.Short() {
		n = 1000
	}
	b := newTestBridge(t, n)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 120*time.Second)

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	errs := AttachAll(ctx, s, deviceNames(n), 0)
	elapsed := time.Since(start)
	require.Empty(t, errs)
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	require.Len(t, b.srv.Attachments(testRegistry, testGateway), n)
	require.Len(t, b.srv.Connections(), 1)
	t.Logf("attached %d devices through one connection in %s (%.0f attaches/s); heap grew %d bytes (%.0f B/device)",
		n, elapsed.Round(time.Millisecond), float64(n)/elapsed.Seconds(),
		int64(after.HeapAlloc)-int64(before.HeapAlloc), float64(int64(after.HeapAlloc)-int64(before.HeapAlloc))/float64(n))
}

func deviceNames(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = deviceName(i)
	}
	return ids
}

// publishStream publishes n numbered messages spread over devices from
// several goroutines and records which ones the session acknowledged.
func publishStream(ctx context.Context, s *Session, n, devices int, onAck func(i int)) []error {
	var wg sync.WaitGroup
	errs := make([]error, n)
	next := atomic.Int64{}
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				errs[i] = s.Publish(ctx, Message{
					Device: deviceName(i % devices), Kind: omnicore.KindEvents, QoS: 1,
					Payload: []byte(fmt.Sprintf("m%06d", i)),
				})
				if errs[i] == nil && onAck != nil {
					onAck(i)
				}
			}
		}()
	}
	wg.Wait()
	return errs
}

// requireNoAckedLoss checks that every acknowledged message reached the
// bridge, and reports duplicates.
func requireNoAckedLoss(t *testing.T, srv *emulator.Server, n, devices int) {
	t.Helper()
	got := receivedPayloads(srv)
	dups := 0
	for i := range n {
		c := got[deviceName(i%devices)+"|"+fmt.Sprintf("m%06d", i)]
		require.NotZero(t, c, "acknowledged message %d lost", i)
		dups += c - 1
	}
	t.Logf("%d messages acknowledged, all received, %d duplicates", n, dups)
}

func TestFaultsLoseNothingAcknowledged(t *testing.T) {
	const n, devices = 3000, 50
	tests := []struct {
		name   string
		setup  func(b *testBridge)
		inject func(t *testing.T, b *testBridge)
		check  func(t *testing.T, b *testBridge, s *Session)
	}{
		{
			name: "bridge restart",
			inject: func(t *testing.T, b *testBridge) {
				b.srv.Stop()
				require.NoError(t, b.srv.Restart())
			},
			check: func(t *testing.T, b *testBridge, s *Session) {
				require.GreaterOrEqual(t, s.Stats().Connects, uint64(2))
				require.Len(t, b.srv.Attachments(testRegistry, testGateway), devices, "every device re-attached")
			},
		},
		{
			name:   "connections kicked",
			inject: func(t *testing.T, b *testBridge) { b.srv.KickAll(); b.srv.KickAll() },
			check: func(t *testing.T, b *testBridge, s *Session) {
				require.GreaterOrEqual(t, s.Stats().Connects, uint64(2))
			},
		},
		{
			name:   "pubacks withheld",
			setup:  func(b *testBridge) { b.cfg.Timeout = 300 * time.Millisecond },
			inject: func(t *testing.T, b *testBridge) { b.srv.WithholdPubacks(20) },
			check: func(t *testing.T, b *testBridge, s *Session) {
				require.NotZero(t, s.Stats().Retries)
			},
		},
		{
			name: "token renewed mid-stream",
			setup: func(b *testBridge) {
				// Paced so that the stream outlives a few tokens.
				b.cfg.MaxMessageRate = 1000
				b.cfg.TokenLifetime = 2 * time.Second
				b.cfg.RenewBefore = 500 * time.Millisecond
			},
			inject: func(t *testing.T, b *testBridge) {},
			check: func(t *testing.T, b *testBridge, s *Session) {
				require.NotZero(t, s.Stats().TokenRenewals)
			},
		},
		{
			name: "token expired by the bridge",
			setup: func(b *testBridge) {
				b.srv.SetRules(func(r *emulator.Rules) { r.ClockSkew = 0 })
				// Renewal deliberately too late: the bridge cuts first.
				b.cfg.MaxMessageRate = 1000
				b.cfg.TokenLifetime = 2 * time.Second
				b.cfg.RenewBefore = -time.Hour
			},
			inject: func(t *testing.T, b *testBridge) {},
			check: func(t *testing.T, b *testBridge, s *Session) {
				require.NotZero(t, s.Stats().ConnectionLost)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newTestBridge(t, devices)
			if tt.setup != nil {
				tt.setup(b)
			}
			s := startSession(t, b.cfg)
			ctx := testCtx(t, 60*time.Second)
			var acked atomic.Int64
			injected := make(chan struct{})
			go func() {
				defer close(injected)
				// Inject once the stream is well under way.
				for acked.Load() < n/4 && ctx.Err() == nil {
					time.Sleep(time.Millisecond)
				}
				tt.inject(t, b)
			}()
			errs := publishStream(ctx, s, n, devices, func(int) { acked.Add(1) })
			<-injected
			for i, err := range errs {
				require.NoError(t, err, "message %d", i)
			}
			requireNoAckedLoss(t, b.srv, n, devices)
			tt.check(t, b, s)
		})
	}
}

func TestSubscriptionsRestoredAfterReconnect(t *testing.T) {
	b := newTestBridge(t, 2)
	_, err := b.srv.SetConfig(testRegistry, deviceName(0), []byte(`{"v":1}`))
	require.NoError(t, err)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 30*time.Second)

	got := make(chan Inbound, 100)
	_, err = s.Subscribe(ctx, deviceName(0), func(in Inbound) { got <- in })
	require.NoError(t, err)
	all := make(chan Inbound, 100)
	s.SubscribeAll(func(in Inbound) { all <- in })
	errs := make(chan Inbound, 100)
	s.SubscribeErrors(func(in Inbound) { errs <- in })

	next := func(ch chan Inbound) Inbound {
		t.Helper()
		select {
		case in := <-ch:
			return in
		case <-ctx.Done():
			require.FailNow(t, "no inbound message")
			return Inbound{}
		}
	}
	in := next(got)
	require.Equal(t, Inbound{Device: deviceName(0), Kind: omnicore.KindConfig, Topic: "/reg/dev-00000/config", Payload: []byte(`{"v":1}`), Received: in.Received}, in)

	require.NoError(t, b.srv.SendCommand(testRegistry, deviceName(0), "reboot/now", []byte("go")))
	in = next(got)
	require.Equal(t, omnicore.KindCommands, in.Kind)
	require.Equal(t, "reboot/now", in.Subfolder)
	require.Equal(t, "go", string(in.Payload))

	b.srv.KickAll()
	// The bridge re-sends the config on the restored subscription.
	in = next(got)
	require.Equal(t, omnicore.KindConfig, in.Kind)
	require.Equal(t, `{"v":1}`, string(in.Payload))
	_, err = b.srv.SetConfig(testRegistry, deviceName(0), []byte(`{"v":2}`))
	require.NoError(t, err)
	for in = next(got); string(in.Payload) != `{"v":2}`; in = next(got) {
	}
	require.NoError(t, b.srv.SendCommand(testRegistry, deviceName(0), "", []byte("plain")))
	for in = next(got); in.Kind != omnicore.KindCommands; in = next(got) {
	}
	require.Empty(t, in.Subfolder)

	// SubscribeAll also sees devices attached for telemetry.
	require.NoError(t, s.Publish(ctx, Message{Device: deviceName(1), Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	waitUntil(t, 5*time.Second, func() bool { return b.srv.SendCommand(testRegistry, deviceName(1), "", []byte("c1")) == nil }, "device 1 subscribed")
	for in = next(all); in.Device != deviceName(1) || in.Kind != omnicore.KindCommands; in = next(all) {
	}

	// Errors reach their subscribers and are counted.
	require.ErrorIs(t, s.Attach(ctx, "nope"), ErrAttachRefused)
	in = next(errs)
	require.Equal(t, omnicore.KindErrors, in.Kind)
	require.Contains(t, string(in.Payload), omnicore.ErrorAttachment)
}

func TestDetachAndIdleDetach(t *testing.T) {
	b := newTestBridge(t, 3)
	b.cfg.DetachIdle = 200 * time.Millisecond
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)
	require.NoError(t, s.Attach(ctx, deviceName(0)))
	require.NoError(t, s.Attach(ctx, deviceName(1)))
	require.NoError(t, s.Detach(ctx, deviceName(0)))
	require.NoError(t, s.Detach(ctx, deviceName(2)), "detaching a device that is not attached is fine")
	require.NotContains(t, b.srv.Attachments(testRegistry, testGateway), deviceName(0))
	waitUntil(t, 5*time.Second, func() bool { return len(b.srv.Attachments(testRegistry, testGateway)) == 0 }, "idle device detached")
	// It comes back on its next message.
	require.NoError(t, s.Publish(ctx, Message{Device: deviceName(1), Kind: omnicore.KindEvents, Payload: []byte("back"), QoS: 1}))
	require.GreaterOrEqual(t, s.Stats().Detaches, uint64(2))
}

func TestBridgeDetachmentReattaches(t *testing.T) {
	b := newTestBridge(t, 1)
	// A bridge stricter than the documented 1/s: the session's own pacing
	// (1/s) then trips it, and the device must come back by itself.
	b.srv.SetRules(func(r *emulator.Rules) { r.StateInterval = 1500 * time.Millisecond })
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)
	dev := deviceName(0)
	require.NoError(t, s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindState, Payload: []byte("s1"), QoS: 1}))
	require.NoError(t, s.Publish(ctx, Message{Device: dev, Kind: omnicore.KindState, Payload: []byte("s2"), QoS: 1}))
	// s2 is kept for its turn, sent 1 s after s1, refused by the stricter
	// bridge, and sent again once the device is attached again.
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return receivedPayloads(b.srv)[dev+"|s2"] == 1 }))
	msgs := b.srv.Received()
	require.Len(t, msgs, 2)
	require.GreaterOrEqual(t, msgs[1].Time.Sub(msgs[0].Time), time.Second, "state is paced to 1/s per device")
	require.NotZero(t, s.Stats().ErrorsByType[omnicore.ErrorDetachedByError])
	got := receivedPayloads(b.srv)
	require.Equal(t, 1, got[dev+"|s1"])
	require.Equal(t, 1, got[dev+"|s2"], "the refused state is re-sent after re-attaching")
	require.Equal(t, []string{dev}, b.srv.Attachments(testRegistry, testGateway))
}

func TestStatePacedPerDevice(t *testing.T) {
	b := newTestBridge(t, 2)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)
	var wg sync.WaitGroup
	for d := range 2 {
		for i := range 3 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				require.NoError(t, s.Publish(ctx, Message{Device: deviceName(d), Kind: omnicore.KindState, Payload: []byte(fmt.Sprint(i)), QoS: 1}))
			}()
		}
	}
	wg.Wait()
	// Per device: one state sent at once, the second kept for its turn and
	// replaced by the third (coalesced), which goes a second later.
	_, err := b.srv.WaitReceived(ctx, 4)
	require.NoError(t, err)
	last := map[string]time.Time{}
	for _, m := range b.srv.Received() {
		if prev, ok := last[m.Device]; ok {
			require.GreaterOrEqual(t, m.Time.Sub(prev), 990*time.Millisecond, "state of %s faster than 1/s", m.Device)
		}
		last[m.Device] = m.Time
	}
	require.Len(t, b.srv.Received(), 4)
	require.Equal(t, uint64(2), s.Stats().StatesCoalesced)
	require.Empty(t, s.Stats().DroppedByReason)
	require.Empty(t, b.srv.ErrorsSent())
}

func TestTLS(t *testing.T) {
	b := newTestBridge(t, 1)
	caPath, err := b.srv.WriteCAFile(b.dir)
	require.NoError(t, err)

	opt := DefaultOptions()
	opt.Servers = []string{b.srv.TLSURL}
	opt.SubscriptionID = b.srv.Subscription()
	opt.RegistryID = testRegistry
	opt.GatewayID = testGateway
	opt.PrivateKey = filepath.Join(b.dir, testGateway+".key")
	opt.TLSCA = caPath
	cfg, err := opt.Validate(testutil.Logger{})
	require.NoError(t, err)
	s := startSession(t, cfg)
	require.NoError(t, s.Publish(testCtx(t, 10*time.Second), Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("tls"), QoS: 1}))

	// A CA that did not sign the bridge's certificate fails loudly.
	other := emulator.NewServer()
	defer other.Close()
	wrongCA, err := other.WriteCAFile(t.TempDir())
	require.NoError(t, err)
	opt.TLSCA = wrongCA
	cfg, err = opt.Validate(testutil.Logger{})
	require.NoError(t, err)
	cfg.MinReconnect = 10 * time.Millisecond
	// One session of a gateway at a time on a host (hostclaim.go).
	require.NoError(t, s.Close(testCtx(t, 5*time.Second)))
	bad, err := New(cfg)
	require.NoError(t, err)
	bad.Start()
	defer bad.Close(context.Background())
	err = bad.WaitReady(testCtx(t, 2*time.Second))
	require.Error(t, err)
	require.Contains(t, err.Error(), "tls_ca")
	require.NotZero(t, bad.Stats().ConnectFailures)

	// No verification setting at all: the system roots do not know the bridge.
	opt.TLSCA = ""
	cfg, err = opt.Validate(testutil.Logger{})
	require.NoError(t, err)
	plain, err := New(cfg)
	require.NoError(t, err)
	plain.Start()
	defer plain.Close(context.Background())
	require.Error(t, plain.WaitReady(testCtx(t, 2*time.Second)))
}

func TestBadCredentialsExplained(t *testing.T) {
	b := newTestBridge(t, 0)
	_, otherPub := emulator.NewDeviceKey(t, b.dir, "other", omnicore.RS256)
	_ = otherPub
	opt := DefaultOptions()
	opt.Servers = []string{b.srv.URL}
	opt.SubscriptionID = b.srv.Subscription()
	opt.RegistryID = testRegistry
	opt.GatewayID = testGateway
	opt.PrivateKey = filepath.Join(b.dir, "other.key")
	cfg, err := opt.Validate(testutil.Logger{})
	require.NoError(t, err)
	s, err := New(cfg)
	require.NoError(t, err)
	s.Start()
	defer s.Close(context.Background())
	err = s.WaitReady(testCtx(t, 2*time.Second))
	require.Error(t, err)
	require.Contains(t, err.Error(), "refused the JWT")
}

func TestAcquireSharesOneSession(t *testing.T) {
	b := newTestBridge(t, 1)
	c1, release1, err := Acquire(b.cfg)
	require.NoError(t, err)
	c2, release2, err := Acquire(b.cfg)
	require.NoError(t, err)
	require.Same(t, c1, c2)
	ctx := testCtx(t, 10*time.Second)
	require.NoError(t, c1.Publish(ctx, Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("a"), QoS: 1}))
	require.NoError(t, c2.Publish(ctx, Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("b"), QoS: 1}))
	release1()
	release1() // idempotent
	require.NoError(t, c2.Publish(ctx, Message{Device: testGateway, Kind: omnicore.KindEvents, Payload: []byte("c"), QoS: 1}))
	release2()
	require.ErrorIs(t, c2.Publish(ctx, Message{Device: testGateway, Kind: omnicore.KindEvents, Payload: []byte("d"), QoS: 1}), ErrClosed)
	require.Len(t, b.srv.Connections(), 1)
}

func TestCloseWhileDown(t *testing.T) {
	b := newTestBridge(t, 1)
	s := startSession(t, b.cfg)
	b.srv.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err := s.Publish(ctx, Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
	require.True(t, errors.Is(err, context.DeadlineExceeded), "publish waits for the bridge until its context ends: %v", err)
	start := time.Now()
	require.NoError(t, s.Close(testCtx(t, 3*time.Second)))
	require.Less(t, time.Since(start), 3*time.Second)
}

func BenchmarkAttach(b *testing.B) {
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("devices=%d", n), func(b *testing.B) {
			var perSec, perDevice float64
			for range b.N {
				tb := newTestBridge(b, n)
				s := startSession(b, tb.cfg)
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				start := time.Now()
				errs := AttachAll(context.Background(), s, deviceNames(n), 0)
				elapsed := time.Since(start)
				if len(errs) > 0 {
					b.Fatalf("attach errors: %d", len(errs))
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				perSec = float64(n) / elapsed.Seconds()
				perDevice = float64(int64(after.HeapAlloc)-int64(before.HeapAlloc)) / float64(n)
			}
			b.ReportMetric(perSec, "attaches/s")
			b.ReportMetric(perDevice, "B/device")
		})
	}
}

func TestRefusedSubscriberHealsWhenBound(t *testing.T) {
	b := newTestBridge(t, 0)
	require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{ID: "late"}))
	_, err := b.srv.SetConfig(testRegistry, "late", []byte("cfg"))
	require.NoError(t, err)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)
	got := make(chan Inbound, 10)
	sub, err := s.Subscribe(ctx, "late", func(in Inbound) { got <- in })
	require.ErrorIs(t, err, ErrAttachRefused)
	require.NotNil(t, sub, "the handler stays registered while the device is refused")

	require.NoError(t, b.srv.Bind(testRegistry, testGateway, "late"))
	select {
	case in := <-got:
		require.Equal(t, "late", in.Device)
		require.Equal(t, omnicore.KindConfig, in.Kind)
		require.Equal(t, "cfg", string(in.Payload))
	case <-ctx.Done():
		require.FailNow(t, "config of a device bound later never arrived")
	}
	require.Equal(t, []string{"late"}, b.srv.Attachments(testRegistry, testGateway))
}
