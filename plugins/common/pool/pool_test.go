package pool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func devName(i int) string { return fmt.Sprintf("dev-%05d", i) }

func hashesOf(ids ...string) []uint64 {
	hs := make([]uint64, len(ids))
	for i, id := range ids {
		hs[i] = hashID(id)
	}
	return hs
}

func TestRendezvousSpreadsEvenlyAndMovesAboutOneNth(t *testing.T) {
	const n = 20000
	tests := []struct {
		name       string
		before     []string
		after      []string
		maxMovedPc float64 // of all devices
		minMovedPc float64
	}{
		{"add a 4th gateway", []string{"gw-a", "gw-b", "gw-c"}, []string{"gw-a", "gw-b", "gw-c", "gw-d"}, 27, 23},
		{"remove the 3rd gateway", []string{"gw-a", "gw-b", "gw-c"}, []string{"gw-a", "gw-b"}, 36, 30},
		{"add a 2nd gateway", []string{"gw-a"}, []string{"gw-a", "gw-b"}, 53, 47},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			hb, ha := hashesOf(tt.before...), hashesOf(tt.after...)
			perGateway := make(map[string]int)
			moved := 0
			for i := range n {
				d := devName(i)
				b := tt.before[order(hb, d)[0]]
				a := tt.after[order(ha, d)[0]]
				perGateway[a]++
				if a != b {
					moved++
					// Only to the new gateway, or off the removed one.
					require.True(t, !contains(tt.before, a) || !contains(tt.after, b), "device %s moved between two kept gateways %s -> %s", d, b, a)
				}
			}
			pc := 100 * float64(moved) / n
			require.GreaterOrEqual(t, pc, tt.minMovedPc)
			require.LessOrEqual(t, pc, tt.maxMovedPc)
			for gw, c := range perGateway {
				share := float64(c) / n * float64(len(tt.after))
				require.InDelta(t, 1, share, 0.05, "gateway %s carries %d of %d", gw, c, n)
			}
		})
	}
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func TestOrderIsAPermutationAndStable(t *testing.T) {
	hs := hashesOf("a", "b", "c", "d", "e")
	for i := range 100 {
		o := order(hs, devName(i))
		require.Len(t, o, 5)
		seen := map[uint8]bool{}
		for _, x := range o {
			seen[x] = true
		}
		require.Len(t, seen, 5)
		require.Equal(t, o, order(hs, devName(i)))
	}
}

// testPool is a pool of fakes whose health is checked only when the test
// says so.
type testPool struct {
	*Pool
	fakes []*gatewaytest.Conn
}

func newTestPool(t *testing.T, maxDevices int, ids ...string) *testPool {
	t.Helper()
	tp := &testPool{}
	var members []Member
	for _, id := range ids {
		f := gatewaytest.New(id)
		tp.fakes = append(tp.fakes, f)
		members = append(members, Member{Conn: f, MaxDevices: maxDevices})
	}
	p, err := New(members, Options{
		HealthInterval: time.Hour, // checkHealth by hand
		MoveBackAfter:  time.Nanosecond,
		DrainTimeout:   5 * time.Second,
		RefusalRetry:   time.Hour,
		OpTimeout:      5 * time.Second,
		Log:            testutil.Logger{Name: "pool"},
	})
	require.NoError(t, err)
	t.Cleanup(p.Close)
	tp.Pool = p
	return tp
}

// check runs one health check and waits for the moves it started.
func (tp *testPool) check() {
	tp.checkHealth()
	tp.batches.Wait()
}

// recovered runs the health checks that see a gateway back: connected at
// one, connected for MoveBackAfter at the next.
func (tp *testPool) recovered() {
	tp.check()
	tp.check()
}

func (tp *testPool) fake(id string) *gatewaytest.Conn {
	for _, f := range tp.fakes {
		if f.Gateway == id {
			return f
		}
	}
	panic(id)
}

// attachedOnce checks that each device is attached on exactly one fake,
// the one the pool says carries it, and returns the count per gateway.
func (tp *testPool) attachedOnce(t *testing.T, devices []string) map[string]int {
	t.Helper()
	per := map[string]int{}
	for _, d := range devices {
		var on []string
		for _, f := range tp.fakes {
			if f.Attached(d) {
				on = append(on, f.Gateway)
			}
		}
		require.Len(t, on, 1, "device %s attached on %v", d, on)
		require.Equal(t, tp.Carrier(d), on[0])
		per[on[0]]++
	}
	return per
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func devices(n int) []string {
	ds := make([]string, n)
	for i := range ds {
		ds[i] = devName(i)
	}
	return ds
}

func TestPlacementFollowsHashAndCapacity(t *testing.T) {
	tests := []struct {
		name       string
		maxDevices int
		devices    int
		wantErr    int
	}{
		{"room for all", 0, 300, 0},
		{"full gateways hand devices on", 110, 300, 0},
		{"pool full", 90, 300, 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tp := newTestPool(t, tt.maxDevices, "gw-a", "gw-b", "gw-c")
			ctx := ctxT(t)
			var ok []string
			errs := 0
			for _, d := range devices(tt.devices) {
				err := tp.Attach(ctx, d)
				if err != nil {
					require.ErrorIs(t, err, gateway.ErrAttachRefused)
					errs++
					continue
				}
				ok = append(ok, d)
			}
			require.Equal(t, tt.wantErr, errs)
			per := tp.attachedOnce(t, ok)
			limit := tt.maxDevices
			if limit == 0 {
				limit = omnicore.MaxAttachedDevices
			}
			for gw, c := range per {
				require.LessOrEqual(t, c, limit, gw)
			}
			if tt.maxDevices == 0 {
				// Nothing full: every device on its first gateway.
				hs := hashesOf("gw-a", "gw-b", "gw-c")
				for _, d := range ok {
					require.Equal(t, []string{"gw-a", "gw-b", "gw-c"}[order(hs, d)[0]], tp.Carrier(d))
				}
			}
			for _, m := range tp.Members() {
				require.Equal(t, per[m.GatewayID], m.Devices)
			}
		})
	}
}

func TestRateBudgetHandsNewDevicesOn(t *testing.T) {
	a, b := gatewaytest.New("gw-a"), gatewaytest.New("gw-b")
	p, err := New([]Member{{Conn: a, MaxMessageRate: 5}, {Conn: b}}, Options{HealthInterval: time.Hour})
	require.NoError(t, err)
	t.Cleanup(p.Close)
	ctx := ctxT(t)
	hs := hashesOf("gw-a", "gw-b")
	var homeA []string
	for _, d := range devices(200) {
		if order(hs, d)[0] == 0 {
			homeA = append(homeA, d)
		}
	}
	// Before any traffic: on its first gateway.
	require.NoError(t, p.Publish(ctx, gateway.Message{Device: homeA[0], Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	require.Equal(t, "gw-a", p.Carrier(homeA[0]))
	for range 50 {
		require.NoError(t, p.Publish(ctx, gateway.Message{Device: homeA[0], Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	}
	p.checkHealth() // gw-a measured well over 5 msg/s
	require.NoError(t, p.Publish(ctx, gateway.Message{Device: homeA[1], Kind: omnicore.KindEvents, Payload: []byte("y"), QoS: 1}))
	require.Equal(t, "gw-b", p.Carrier(homeA[1]), "a new device skips the gateway over its budget")
	require.Equal(t, "gw-a", p.Carrier(homeA[0]), "placed devices stay")
	p.checkHealth()
	p.batches.Wait()
	require.Equal(t, "gw-b", p.Carrier(homeA[1]), "a device placed for the budget does not move back")
}

func TestFailoverAndMoveBack(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b", "gw-c")
	ctx := ctxT(t)
	ds := devices(300)
	for _, d := range ds {
		require.NoError(t, tp.Attach(ctx, d))
	}
	before := tp.attachedOnce(t, ds)
	home := map[string]string{}
	for _, d := range ds {
		home[d] = tp.Carrier(d)
	}

	tp.fake("gw-b").SetDown(true)
	tp.check()
	after := tp.attachedOnce(t, ds)
	require.Zero(t, after["gw-b"])
	require.Equal(t, before["gw-a"]+before["gw-b"]+before["gw-c"], after["gw-a"]+after["gw-c"])
	for _, d := range ds {
		if home[d] != "gw-b" {
			require.Equal(t, home[d], tp.Carrier(d), "devices of healthy gateways stay")
		}
	}
	// Publishing goes to the new carrier.
	for _, d := range ds {
		require.NoError(t, tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("p1-" + d), QoS: 1}))
	}
	require.Empty(t, tp.fake("gw-b").Published())
	st := tp.Members()
	require.False(t, st[1].Up)
	require.Equal(t, uint64(before["gw-b"]), st[1].MovedOut)

	tp.fake("gw-b").SetDown(false)
	tp.recovered()
	back := tp.attachedOnce(t, ds)
	require.Equal(t, before, back)
	for _, d := range ds {
		require.Equal(t, home[d], tp.Carrier(d))
		require.NoError(t, tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("p2-" + d), QoS: 1}))
	}
	// Every message exactly once, on the carrier of its time.
	count := map[string]int{}
	for _, f := range tp.fakes {
		for _, m := range f.Published() {
			count[string(m.Payload)]++
			if string(m.Payload[:2]) == "p2" {
				require.Equal(t, home[m.Device], f.Gateway)
			}
		}
	}
	require.Len(t, count, 600)
	for k, c := range count {
		require.Equal(t, 1, c, k)
	}
}

func TestFailoverResendsOnlyWhatWasNotAcknowledged(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b")
	ctx := ctxT(t)
	hs := hashesOf("gw-a", "gw-b")
	var d string
	for _, x := range devices(50) {
		if order(hs, x)[0] == 0 {
			d = x
			break
		}
	}
	a, b := tp.fake("gw-a"), tp.fake("gw-b")
	require.NoError(t, tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("acked"), QoS: 1}))
	a.SetHold(true)
	const inflight = 5
	var wg sync.WaitGroup
	errs := make(chan error, inflight)
	for i := range inflight {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte(fmt.Sprintf("held-%d", i)), QoS: 1})
		}()
	}
	require.NoError(t, a.WaitFor(ctx, func() bool { return a.Holding() == inflight }))
	a.SetDown(true)
	tp.check()
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.Equal(t, "gw-b", tp.Carrier(d))
	require.Len(t, a.Published(), 1, "only the acknowledged message is on gw-a")
	require.Len(t, b.Published(), inflight, "the unacknowledged ones were sent again on gw-b, once each")
	require.Equal(t, uint64(inflight), tp.Members()[0].Resent)
}

func TestMoveBackDrainsBeforeSwitching(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b")
	ctx := ctxT(t)
	hs := hashesOf("gw-a", "gw-b")
	var d string
	for _, x := range devices(50) {
		if order(hs, x)[0] == 0 {
			d = x
			break
		}
	}
	a, b := tp.fake("gw-a"), tp.fake("gw-b")
	a.SetDown(true)
	tp.check()
	require.NoError(t, tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("m0"), QoS: 1}))
	require.Equal(t, "gw-b", tp.Carrier(d))

	b.SetHold(true)
	done := make(chan error, 1)
	go func() {
		done <- tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("m1"), QoS: 1})
	}()
	require.NoError(t, b.WaitFor(ctx, func() bool { return b.Holding() == 1 }))
	a.SetDown(false)
	tp.checkHealth()
	tp.checkHealth() // starts the move back; it waits for m1
	require.NoError(t, a.WaitFor(ctx, func() bool { return a.Attached(d) }), "attached on gw-a before leaving gw-b")
	require.True(t, b.Attached(d))
	b.SetHold(false) // m1 acknowledged by gw-b
	require.NoError(t, <-done)
	tp.batches.Wait()
	require.Equal(t, "gw-a", tp.Carrier(d))
	require.False(t, b.Attached(d), "detached from the gateway it left")
	require.NoError(t, tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("m2"), QoS: 1}))
	payloads := func(f *gatewaytest.Conn) []string {
		var out []string
		for _, m := range f.Published() {
			out = append(out, string(m.Payload))
		}
		return out
	}
	require.Equal(t, []string{"m0", "m1"}, payloads(b))
	require.Equal(t, []string{"m2"}, payloads(a))
	require.Zero(t, tp.Members()[1].Resent)
}

func TestRefusedDeviceFailsOverAndAllRefusedIsAnError(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b", "gw-c")
	ctx := ctxT(t)
	hs := hashesOf("gw-a", "gw-b", "gw-c")
	ids := []string{"gw-a", "gw-b", "gw-c"}
	d := devName(7)
	o := order(hs, d)
	// Bound only to its last gateway.
	tp.fake(ids[o[0]]).Refuse(d, "not bound")
	tp.fake(ids[o[1]]).Refuse(d, "not bound")
	require.NoError(t, tp.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	require.Equal(t, ids[o[2]], tp.Carrier(d))
	tp.attachedOnce(t, []string{d})
	require.Len(t, tp.fake(ids[o[2]]).Published(), 1)

	// A health check keeps it there: the refusals have not expired.
	tp.check()
	require.Equal(t, ids[o[2]], tp.Carrier(d))

	e := devName(8)
	for _, f := range tp.fakes {
		f.Refuse(e, "not bound")
	}
	err := tp.Publish(ctx, gateway.Message{Device: e, Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
	require.ErrorIs(t, err, gateway.ErrAttachRefused)
	require.Contains(t, err.Error(), "not bound")
	for _, f := range tp.fakes {
		require.False(t, f.Attached(e))
	}
}

func TestInvalidAndOwnDevices(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b")
	ctx := ctxT(t)
	err := tp.Publish(ctx, gateway.Message{Device: "a/b", Kind: omnicore.KindEvents, Payload: []byte("x")})
	require.ErrorIs(t, err, gateway.ErrInvalidDevice)
	require.NoError(t, tp.Publish(ctx, gateway.Message{Device: "gw-b", Kind: omnicore.KindEvents, Payload: []byte("own")}))
	require.Len(t, tp.fake("gw-b").Published(), 1, "a gateway's own telemetry goes through itself")
	require.Empty(t, tp.fake("gw-a").Published())
	require.Equal(t, "gw-a", tp.GatewayID())
	require.Equal(t, []string{"gw-a", "gw-b"}, tp.GatewayIDs())

	_, err = New([]Member{{Conn: gatewaytest.New("x")}, {Conn: gatewaytest.New("x")}}, Options{})
	require.ErrorContains(t, err, "listed twice")
	_, err = New(nil, Options{})
	require.Error(t, err)
}

func TestSubscribeAllDeliversOnceFromTheCarrier(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b")
	ctx := ctxT(t)
	hs := hashesOf("gw-a", "gw-b")
	var d string
	for _, x := range devices(50) {
		if order(hs, x)[0] == 0 {
			d = x
			break
		}
	}
	a, b := tp.fake("gw-a"), tp.fake("gw-b")
	var mu sync.Mutex
	var got []string
	sub := tp.SubscribeAll(func(in gateway.Inbound) {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, fmt.Sprintf("%s %s %s %s", in.Gateway, in.Device, in.Kind, in.Payload))
	})
	defer sub.Unsubscribe()
	require.NoError(t, tp.Attach(ctx, d))
	cfg := func(f *gatewaytest.Conn, p string) {
		f.Deliver(gateway.Inbound{Device: d, Kind: omnicore.KindConfig, Payload: []byte(p)})
	}
	cmd := func(f *gatewaytest.Conn, p string) {
		f.Deliver(gateway.Inbound{Device: d, Kind: omnicore.KindCommands, Payload: []byte(p)})
	}
	cfg(a, "c1")
	a.Deliver(gateway.Inbound{Device: "gw-a", Kind: omnicore.KindConfig, Payload: []byte("own-a")})
	b.Deliver(gateway.Inbound{Device: "gw-b", Kind: omnicore.KindConfig, Payload: []byte("own-b")})
	cmd(a, "k1")

	a.SetDown(true)
	tp.check()
	require.Equal(t, "gw-b", tp.Carrier(d))
	require.True(t, b.Attached(d))
	cfg(b, "c1") // the bridge's copy on the new subscription
	cfg(a, "c2") // late, from the gateway it left
	cmd(b, "k2")
	cfg(b, "c3")

	a.SetDown(false)
	tp.recovered()
	require.Equal(t, "gw-a", tp.Carrier(d))
	cfg(a, "c3") // copy again
	cmd(a, "k3")
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []string{
		"gw-a " + d + " config c1",
		"gw-a gw-a config own-a",
		"gw-b gw-b config own-b",
		"gw-a " + d + " commands k1",
		"gw-b " + d + " commands k2",
		"gw-b " + d + " config c3",
		"gw-a " + d + " commands k3",
	}, got)
}

func TestSubscribeAllDevicesOfAnotherPlugin(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b")
	a, b := tp.fake("gw-a"), tp.fake("gw-b")
	var got []string
	sub := tp.SubscribeAll(func(in gateway.Inbound) {
		got = append(got, fmt.Sprintf("%s %s %s", in.Gateway, in.Kind, in.Payload))
	})
	defer sub.Unsubscribe()
	// Attached through the gateways by another plugin's pool, which moves
	// it from gw-a to gw-b.
	ctx := ctxT(t)
	require.NoError(t, a.Attach(ctx, "other"))
	a.Deliver(gateway.Inbound{Device: "other", Kind: omnicore.KindConfig, Payload: []byte("c1")})
	a.Deliver(gateway.Inbound{Device: "other", Kind: omnicore.KindCommands, Payload: []byte("k1")})
	require.NoError(t, b.Attach(ctx, "other"))
	b.Deliver(gateway.Inbound{Device: "other", Kind: omnicore.KindConfig, Payload: []byte("c1")})
	b.Deliver(gateway.Inbound{Device: "other", Kind: omnicore.KindCommands, Payload: []byte("k1")})
	b.Deliver(gateway.Inbound{Device: "other", Kind: omnicore.KindCommands, Payload: []byte("k2")})
	b.Deliver(gateway.Inbound{Device: "other", Kind: omnicore.KindCommands, Payload: []byte("k2")})
	require.Equal(t, []string{
		"gw-a config c1", "gw-a commands k1", "gw-b commands k2", "gw-b commands k2",
	}, got, "copies through the second gateway dropped; repeats through one gateway kept")
}

func TestSubscribeFollowsTheDevice(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b")
	ctx := ctxT(t)
	hs := hashesOf("gw-a", "gw-b")
	var d string
	for _, x := range devices(50) {
		if order(hs, x)[0] == 0 {
			d = x
			break
		}
	}
	a, b := tp.fake("gw-a"), tp.fake("gw-b")
	var mu sync.Mutex
	var got []string
	sub, err := tp.Subscribe(ctx, d, func(in gateway.Inbound) {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, fmt.Sprintf("%s %s %s", in.Gateway, in.Kind, in.Payload))
	})
	require.NoError(t, err)
	require.Equal(t, 1, a.Subscribers())
	a.Deliver(gateway.Inbound{Device: d, Kind: omnicore.KindConfig, Payload: []byte("c1")})

	a.SetDown(true)
	tp.check()
	require.Zero(t, a.Subscribers(), "unsubscribed on the gateway it left")
	require.Equal(t, 1, b.Subscribers())
	b.Deliver(gateway.Inbound{Device: d, Kind: omnicore.KindConfig, Payload: []byte("c1")})
	b.Deliver(gateway.Inbound{Device: d, Kind: omnicore.KindCommands, Payload: []byte("k1")})

	a.SetDown(false)
	tp.recovered()
	require.Equal(t, 1, a.Subscribers())
	require.Zero(t, b.Subscribers())
	a.Deliver(gateway.Inbound{Device: d, Kind: omnicore.KindCommands, Payload: []byte("k2")})
	sub.Unsubscribe()
	require.Zero(t, a.Subscribers())
	a.Deliver(gateway.Inbound{Device: d, Kind: omnicore.KindCommands, Payload: []byte("k3")})
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []string{"gw-a config c1", "gw-b commands k1", "gw-a commands k2"}, got)
}

func TestStatsAndErrors(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a", "gw-b")
	var got []string
	sub := tp.SubscribeErrors(func(in gateway.Inbound) { got = append(got, in.Gateway+" "+string(in.Payload)) })
	defer sub.Unsubscribe()
	tp.fake("gw-b").Deliver(gateway.Inbound{Kind: omnicore.KindErrors, Payload: []byte("e")})
	require.Equal(t, []string{"gw-b e"}, got)
	tp.CountDrop("x", 2)
	require.Equal(t, uint64(2), tp.Stats().DroppedByReason["x"])
	require.Equal(t, uint64(2), tp.fake("gw-a").Drops()["x"])
	require.True(t, tp.Stats().Connected)
	tp.fake("gw-b").SetDown(true)
	require.False(t, tp.Stats().Connected)
	ms := tp.Members()
	require.Len(t, ms, 2)
	require.Equal(t, "gw-b", ms[1].GatewayID)
	require.False(t, ms[1].Stats.Connected)
	require.Equal(t, map[string]int64{"pool_up": 1, "pool_devices": 0, "pool_moved_in": 0, "pool_moved_out": 0, "pool_resent": 0}, ms[1].Fields(),
		"up: the pool has not moved devices away from it yet")
}

func TestClosedPool(t *testing.T) {
	tp := newTestPool(t, 0, "gw-a")
	tp.Close()
	err := tp.Publish(context.Background(), gateway.Message{Device: "d", Kind: omnicore.KindEvents, Payload: []byte("x")})
	require.True(t, errors.Is(err, gateway.ErrClosed), "%v", err)
}

func TestIdleDevicesAreDetachedAndForgotten(t *testing.T) {
	a, b := gatewaytest.New("gw-a"), gatewaytest.New("gw-b")
	p, err := New([]Member{{Conn: a}, {Conn: b}}, Options{HealthInterval: time.Hour, DetachIdle: time.Nanosecond})
	require.NoError(t, err)
	t.Cleanup(p.Close)
	ctx := ctxT(t)
	ds := devices(20)
	for _, d := range ds {
		require.NoError(t, p.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	}
	sub, err := p.Subscribe(ctx, ds[0], func(gateway.Inbound) {})
	require.NoError(t, err)
	defer sub.Unsubscribe()
	p.checkHealth()
	p.batches.Wait()
	for _, d := range ds[1:] {
		require.False(t, a.Attached(d) || b.Attached(d), d)
		require.Empty(t, p.Carrier(d))
	}
	require.NotEmpty(t, p.Carrier(ds[0]), "a subscribed device stays")
	total := 0
	for _, m := range p.Members() {
		total += m.Devices
		require.Zero(t, m.MovedOut)
	}
	require.Equal(t, 1, total)
	require.NoError(t, p.Publish(ctx, gateway.Message{Device: ds[1], Kind: omnicore.KindEvents, Payload: []byte("y"), QoS: 1}))
	require.True(t, a.Attached(ds[1]) || b.Attached(ds[1]))
}
