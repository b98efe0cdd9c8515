package pool

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

const testRegistry = "reg"

// bridge is an emulator with gateways and devices, and a started session
// per gateway.
type bridge struct {
	srv      *emulator.Server
	gateways []string
	sessions []*gateway.Session
}

// newBridge registers gateways and n devices; bound says which gateways
// each device is bound to (all when nil).
func newBridge(t testing.TB, gateways []string, n int, bound func(dev, gw string) bool) *bridge {
	t.Helper()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	require.NoError(t, srv.AddRegistry(testRegistry))
	b := &bridge{srv: srv, gateways: gateways}
	var cfgs []*gateway.Config
	for _, gw := range gateways {
		key, pub := emulator.NewDeviceKey(t, t.TempDir(), gw, omnicore.ES256)
		require.NoError(t, srv.AddDevice(testRegistry, emulator.Device{
			ID: gw, Gateway: true, AuthMethod: emulator.AssociationOnly, PublicKeys: []emulator.PublicKey{pub},
		}))
		opt := gateway.DefaultOptions()
		opt.Servers = []string{srv.URL}
		opt.SubscriptionID = srv.Subscription()
		opt.RegistryID = testRegistry
		opt.GatewayID = gw
		opt.PrivateKey = key
		opt.Algorithm = omnicore.ES256
		cfg, err := opt.Validate(testutil.Logger{Name: gw})
		require.NoError(t, err)
		cfg.Timeout = 3 * time.Second
		cfg.MinReconnect = 20 * time.Millisecond
		cfg.MaxReconnect = 200 * time.Millisecond
		cfg.MaxInflight = 256
		cfgs = append(cfgs, cfg)
	}
	for i := range n {
		d := devName(i)
		require.NoError(t, srv.AddDevice(testRegistry, emulator.Device{ID: d}))
		for _, gw := range gateways {
			if bound == nil || bound(d, gw) {
				require.NoError(t, srv.Bind(testRegistry, gw, d))
			}
		}
	}
	for _, cfg := range cfgs {
		s, err := gateway.New(cfg)
		require.NoError(t, err)
		s.Start()
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s.Close(ctx)
		})
		b.sessions = append(b.sessions, s)
	}
	return b
}

func (b *bridge) pool(t testing.TB, opts Options) *Pool {
	t.Helper()
	var members []Member
	for _, s := range b.sessions {
		members = append(members, Member{Conn: s})
	}
	opts.Log = testutil.Logger{Name: "pool"}
	p, err := New(members, opts)
	require.NoError(t, err)
	t.Cleanup(p.Close)
	return p
}

// attachments returns, per device, the gateways whose live connection has
// it attached.
func (b *bridge) attachments() map[string][]string {
	out := map[string][]string{}
	for _, set := range b.srv.AllAttachments() {
		for _, d := range set.Devices {
			out[d] = append(out[d], set.Gateway)
		}
	}
	return out
}

func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			require.FailNow(t, "timed out waiting: "+what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestEmulator25000DevicesOverThreeGateways(t *testing.T) {
	const n = 25000
	gws := []string{"gw-a", "gw-b", "gw-c"}
	b := newBridge(t, gws, n, nil)
	p := b.pool(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	var g errgroup.Group
	g.SetLimit(3 * 256)
	for i := range n {
		g.Go(func() error { return p.Attach(ctx, devName(i)) })
	}
	require.NoError(t, g.Wait())
	t.Logf("attached %d devices through %d gateways in %s", n, len(gws), time.Since(start).Round(time.Millisecond))

	att := b.attachments()
	require.Len(t, att, n, "every device attached")
	per := map[string]int{}
	for d, on := range att {
		require.Len(t, on, 1, "device %s attached on %v", d, on)
		require.Equal(t, p.Carrier(d), on[0])
		per[on[0]]++
	}
	for _, gw := range gws {
		require.LessOrEqual(t, per[gw], omnicore.MaxAttachedDevices, gw)
		require.Greater(t, per[gw], n/4, "rendezvous spreads the devices: %v", per)
	}
	for _, m := range p.Members() {
		require.Equal(t, per[m.GatewayID], m.Devices)
		require.Equal(t, per[m.GatewayID], m.Stats.Attached)
	}
}

// publisher publishes numbered messages for devices until stopped,
// recording every message the pool reported delivered.
type publisher struct {
	p       *Pool
	devices []string
	phase   atomic.Value // string, part of every payload
	stop    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	acked   []string
	failed  []error
	n       atomic.Int64
}

func startPublisher(p *Pool, devices []string, workers int) *publisher {
	pb := &publisher{p: p, devices: devices, stop: make(chan struct{})}
	pb.phase.Store("before")
	for w := range workers {
		pb.wg.Add(1)
		go func() {
			defer pb.wg.Done()
			for i := 0; ; i++ {
				select {
				case <-pb.stop:
					return
				default:
				}
				d := devices[(i*workers+w)%len(devices)]
				payload := fmt.Sprintf("%s|%d|%d", pb.phase.Load(), w, i)
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				err := p.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte(payload), QoS: 1})
				cancel()
				pb.mu.Lock()
				if err != nil {
					pb.failed = append(pb.failed, err)
				} else {
					pb.acked = append(pb.acked, d+" "+payload)
				}
				pb.mu.Unlock()
				pb.n.Add(1)
			}
		}()
	}
	return pb
}

// waitProgress waits until n more messages were published.
func (pb *publisher) waitProgress(t testing.TB, n int64) {
	t.Helper()
	target := pb.n.Load() + n
	waitFor(t, time.Minute, "publishing progresses", func() bool { return pb.n.Load() >= target })
}

func (pb *publisher) finish() {
	close(pb.stop)
	pb.wg.Wait()
}

func TestEmulatorKeyRevokedDevicesMoveAndComeBack(t *testing.T) {
	const n = 300
	gws := []string{"gw-a", "gw-b", "gw-c"}
	b := newBridge(t, gws, n, nil)
	p := b.pool(t, Options{HealthInterval: 50 * time.Millisecond, MoveBackAfter: 300 * time.Millisecond, OpTimeout: 10 * time.Second})
	ds := devices(n)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, d := range ds {
		require.NoError(t, p.Attach(ctx, d))
	}
	home := map[string]string{}
	var onB []string
	for _, d := range ds {
		home[d] = p.Carrier(d)
		if home[d] == "gw-b" {
			onB = append(onB, d)
		}
	}
	require.NotEmpty(t, onB)

	// Commands reach the input once, from the device's carrier.
	var cmdMu sync.Mutex
	cmds := map[string][]string{} // payload -> gateways it came from
	sub := p.SubscribeAll(func(in gateway.Inbound) {
		if in.Kind == omnicore.KindCommands {
			cmdMu.Lock()
			cmds[string(in.Payload)] = append(cmds[string(in.Payload)], in.Gateway)
			cmdMu.Unlock()
		}
	})
	defer sub.Unsubscribe()
	sendCommands := func(tag string) {
		for _, d := range onB[:min(10, len(onB))] {
			payload := tag + "-" + d
			waitFor(t, 30*time.Second, "command for "+d, func() bool {
				return b.srv.SendCommand(testRegistry, d, "", []byte(payload)) == nil
			})
			waitFor(t, 30*time.Second, "command "+payload+" delivered", func() bool {
				cmdMu.Lock()
				defer cmdMu.Unlock()
				return len(cmds[payload]) > 0
			})
		}
	}
	sendCommands("home")

	pb := startPublisher(p, ds, 16)
	pb.waitProgress(t, 500)

	// Revoke gw-b: blocked, so its reconnects are refused.
	pb.phase.Store("revoked")
	require.NoError(t, b.srv.SetBlocked(testRegistry, "gw-b", true))
	require.True(t, b.srv.Kick(b.srv.ClientID(testRegistry, "gw-b")))
	waitFor(t, time.Minute, "gw-b's devices moved", func() bool {
		att := b.attachments()
		for _, d := range onB {
			if len(att[d]) != 1 || att[d][0] == "gw-b" {
				return false
			}
		}
		return true
	})
	require.False(t, p.Members()[1].Up)
	pb.waitProgress(t, 1000)
	sendCommands("moved")

	// Back: they move home.
	pb.phase.Store("back")
	require.NoError(t, b.srv.SetBlocked(testRegistry, "gw-b", false))
	waitFor(t, time.Minute, "devices back home", func() bool {
		att := b.attachments()
		for _, d := range ds {
			if len(att[d]) != 1 || att[d][0] != home[d] || p.Carrier(d) != home[d] {
				return false
			}
		}
		return true
	})
	pb.waitProgress(t, 1000)
	sendCommands("back")
	pb.finish()

	require.Empty(t, pb.failed)
	got := map[string]int{}
	for _, m := range b.srv.Received() {
		got[m.Device+" "+string(m.Payload)]++
	}
	lost, dups, dupsAfterBack := 0, 0, 0
	for _, k := range pb.acked {
		if got[k] == 0 {
			lost++
		}
	}
	for k, c := range got {
		if c > 1 {
			dups += c - 1
			if strings.Contains(k, " back|") {
				dupsAfterBack += c - 1
			}
		}
	}
	var resent, retries uint64
	for _, m := range p.Members() {
		resent += m.Resent
		retries += m.Stats.Retries
	}
	t.Logf("published %d, received %d distinct, lost %d, duplicated %d (resent after failover %d, session retries %d)",
		len(pb.acked), len(got), lost, dups, resent, retries)
	require.Zero(t, lost)
	require.Zero(t, dupsAfterBack, "moving back sends nothing twice")
	require.LessOrEqual(t, uint64(dups), resent+retries, "only unacknowledged messages are sent again")
	ms := p.Members()
	require.Equal(t, uint64(len(onB)), ms[1].MovedOut)
	require.Equal(t, uint64(len(onB)), ms[1].MovedIn)
	require.True(t, ms[1].Up)

	cmdMu.Lock()
	defer cmdMu.Unlock()
	for payload, from := range cmds {
		require.Len(t, from, 1, "command %s delivered %v", payload, from)
		want := "gw-b"
		if strings.HasPrefix(payload, "moved-") {
			want = p.members[order(p.hashes, strings.TrimPrefix(payload, "moved-"))[1]].id
		}
		require.Equal(t, want, from[0], payload)
	}
}

func TestEmulatorDeviceBoundToOneGatewayDelivers(t *testing.T) {
	gws := []string{"gw-a", "gw-b", "gw-c"}
	hs := hashesOf(gws...)
	// Devices whose first gateway is not gw-c, bound to gw-c only.
	var lonely []string
	for i := 0; len(lonely) < 5; i++ {
		if gws[order(hs, devName(i))[0]] != "gw-c" {
			lonely = append(lonely, devName(i))
		}
	}
	only := map[string]bool{}
	for _, d := range lonely {
		only[d] = true
	}
	b := newBridge(t, gws, 50, func(d, gw string) bool { return !only[d] || gw == "gw-c" })
	p := b.pool(t, Options{HealthInterval: 50 * time.Millisecond})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, d := range lonely {
		require.NoError(t, p.Publish(ctx, gateway.Message{Device: d, Kind: omnicore.KindEvents, Payload: []byte("hello " + d), QoS: 1}))
		require.Equal(t, "gw-c", p.Carrier(d))
	}
	var got []string
	for _, m := range b.srv.Received() {
		got = append(got, string(m.Payload))
	}
	sort.Strings(got)
	want := make([]string, 0, len(lonely))
	for _, d := range lonely {
		want = append(want, "hello "+d)
	}
	sort.Strings(want)
	require.Equal(t, want, got, "each delivered once")
	att := b.attachments()
	for _, d := range lonely {
		require.Equal(t, []string{"gw-c"}, att[d])
	}
	// Health checks later, the refusals stand: nothing moves.
	p.checkHealth()
	p.checkHealth()
	p.batches.Wait()
	att = b.attachments()
	for _, d := range lonely {
		require.Equal(t, []string{"gw-c"}, att[d])
	}
}
