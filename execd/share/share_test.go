//go:build linux || darwin || freebsd

package share

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// ---------------------------------------------------------------------------
// Helpers

// shareDir is a short private temporary directory: Unix socket paths are
// limited to about 100 bytes, which t.TempDir() can exceed.
func shareDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ocs")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(dir) })
	rt := filepath.Join(dir, "rt")
	require.NoError(t, os.Mkdir(rt, 0o700))
	return rt
}

// ownerSession waits until conn (a shareConn) found its backend and returns
// it when this process owns the connection, nil when it is a client.
func ownerSession(t testing.TB, ctx context.Context, conn gateway.Conn) *gateway.Session {
	t.Helper()
	be, _, err := conn.(*shareConn).backend(ctx)
	require.NoError(t, err)
	s, _ := be.(*gateway.Session)
	return s
}

// acquireAcross is what Acquire does with the sharing installed for dir.
func acquireAcross(cfg *gateway.Config, dir string) (gateway.Conn, func(context.Context) error, error) {
	return (&sharer{dir: dir, settings: Settings{PluginFile: cfg.GatewayID + ".conf"}}).acquire(cfg)
}

func shareCtx(t testing.TB, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// shareFake is a Conn for the owner side of protocol tests: publishes can be
// held at a gate, attaches refused, and inbound messages injected.
type shareFake struct {
	gate    chan struct{}        // when non-nil, Publish waits for it to be closed
	entered chan gateway.Message // every Publish reports here first (buffered)

	mu        sync.Mutex
	published []gateway.Message
	refused   map[string]string
	handlers  map[int]shareFakeSub
	next      int
	drops     map[string]uint64
	gauges    map[string]map[string]int64
	canceled  atomic.Int64
	changed   chan struct{}
}

type shareFakeSub struct {
	device string // "" = all, "!errors" = errors
	h      gateway.Handler
}

func newShareFake() *shareFake {
	return &shareFake{
		entered:  make(chan gateway.Message, 10000),
		refused:  make(map[string]string),
		handlers: make(map[int]shareFakeSub),
		drops:    make(map[string]uint64),
		changed:  make(chan struct{}),
	}
}

func (f *shareFake) notifyLocked() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// waitFor blocks until cond (evaluated under the lock) holds.
func (f *shareFake) waitFor(t testing.TB, ctx context.Context, cond func() bool) {
	t.Helper()
	for {
		f.mu.Lock()
		ok, ch := cond(), f.changed
		f.mu.Unlock()
		if ok {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			require.FailNow(t, "condition not met before the deadline")
		}
	}
}

func (f *shareFake) GatewayID() string { return "fake-gw" }

func (f *shareFake) Attach(_ context.Context, device string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d, ok := f.refused[device]; ok {
		return fmt.Errorf("%w: device %q: %s", gateway.ErrAttachRefused, device, d)
	}
	return nil
}

func (f *shareFake) Detach(context.Context, string) error { return nil }

func (f *shareFake) Publish(ctx context.Context, msg gateway.Message) error {
	if err := omnicore.ValidateID(msg.Device); err != nil {
		return fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	if len(msg.Payload) > omnicore.MaxTelemetryBytes {
		return fmt.Errorf("%w: %d bytes", gateway.ErrTooLarge, len(msg.Payload))
	}
	f.entered <- msg
	if f.gate != nil {
		select {
		case <-f.gate:
		case <-ctx.Done():
			f.canceled.Add(1)
			f.mu.Lock()
			f.notifyLocked()
			f.mu.Unlock()
			return ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.published = append(f.published, msg)
	f.notifyLocked()
	return nil
}

func (f *shareFake) Subscribe(_ context.Context, device string, h gateway.Handler) (gateway.Subscription, error) {
	if err := f.Attach(context.Background(), device); err != nil {
		return f.add(device, h), err // kept, like the gateway.Session does
	}
	return f.add(device, h), nil
}

func (f *shareFake) SubscribeAll(h gateway.Handler) gateway.Subscription { return f.add("", h) }
func (f *shareFake) SubscribeErrors(h gateway.Handler) gateway.Subscription {
	return f.add("!errors", h)
}

func (f *shareFake) add(device string, h gateway.Handler) gateway.Subscription {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.next++
	id := f.next
	f.handlers[id] = shareFakeSub{device: device, h: h}
	f.notifyLocked()
	return shareFakeUnsub(func() {
		f.mu.Lock()
		defer f.mu.Unlock()
		delete(f.handlers, id)
		f.notifyLocked()
	})
}

type shareFakeUnsub func()

func (u shareFakeUnsub) Unsubscribe() { u() }

func (f *shareFake) subscribers() int {
	return len(f.handlers)
}

// deliver calls the matching handlers synchronously, like the session's
// dispatcher.
func (f *shareFake) deliver(in gateway.Inbound) {
	f.mu.Lock()
	var hs []gateway.Handler
	for _, s := range f.handlers {
		switch {
		case in.Kind == omnicore.KindErrors:
			if s.device == "!errors" {
				hs = append(hs, s.h)
			}
		case s.device == "" || s.device == in.Device:
			hs = append(hs, s.h)
		}
	}
	f.mu.Unlock()
	for _, h := range hs {
		h(in)
	}
}

func (f *shareFake) CountDrop(reason string, n uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.drops[reason] += n
	f.notifyLocked()
}

func (f *shareFake) ReportGauges(source string, gauges map[string]int64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.gauges == nil {
		f.gauges = make(map[string]map[string]int64)
	}
	f.gauges[source] = gauges
	f.notifyLocked()
}

func (f *shareFake) Stats() gateway.Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	drops := make(map[string]uint64)
	for k, v := range f.drops {
		drops[k] = v
	}
	return gateway.Stats{Connected: true, Acked: uint64(len(f.published)), ErrorsByType: map[string]uint64{}, DroppedByReason: drops, Gauges: sumGauges(f.gauges)}
}

func sumGauges(by map[string]map[string]int64) map[string]int64 {
	var out map[string]int64
	for _, g := range by {
		for k, v := range g {
			if out == nil {
				out = make(map[string]int64)
			}
			out[k] += v
		}
	}
	return out
}

// serveFake serves conn on a fresh rendezvous and holds its owner lock.
func serveFake(t testing.TB, conn gateway.Conn, tune func(*shareServer)) (*rendezvous, *shareServer) {
	t.Helper()
	rz, err := newRendezvous(shareDir(t), "fake-key")
	require.NoError(t, err)
	lock, err := lockOwner(rz, "fake", "")
	require.NoError(t, err)
	srv, err := newShareServer(conn, rz, testutil.Logger{Name: "owner"})
	require.NoError(t, err)
	if tune != nil {
		tune(srv)
	}
	srv.start()
	t.Cleanup(func() {
		srv.stopAccepting()
		srv.closeClients()
		lock.Close()
	})
	return rz, srv
}

func dialFake(t testing.TB, rz *rendezvous) *remoteConn {
	t.Helper()
	rc, err := dialOwner(shareCtx(t, 10*time.Second), rz, testutil.Logger{Name: "client"}, nil, "")
	require.NoError(t, err)
	t.Cleanup(func() { rc.fail(gateway.ErrClosed) })
	return rc
}

// fakeShareConn is a shareConn for a rendezvous whose owner is served by
// the test (it never takes over: the test holds the lock).
func fakeShareConn(t testing.TB, rz *rendezvous) *shareConn {
	t.Helper()
	cfg := &gateway.Config{SubscriptionID: "sub", RegistryID: "reg", GatewayID: "fake-gw", Timeout: 5 * time.Second, MaxInflight: 16}
	sc := newShareConn(cfg, Settings{}, rz, testutil.Logger{Name: "client"})
	go sc.run(nil)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		sc.Close(ctx)
	})
	return sc
}

// ---------------------------------------------------------------------------
// Protocol against a fake owner

func TestSharePublishesArePipelined(t *testing.T) {
	fake := newShareFake()
	fake.gate = make(chan struct{})
	rz, _ := serveFake(t, fake, nil)
	rc := dialFake(t, rz)
	ctx := shareCtx(t, 20*time.Second)

	const n = 64
	results := make(chan error, n)
	for i := range n {
		go func() {
			results <- rc.Publish(ctx, gateway.Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: fmt.Appendf(nil, "m%d", i), QoS: 1})
		}()
	}
	// All n reach the owner's session while none is acknowledged: the
	// client does not wait for one round trip before sending the next.
	for range n {
		select {
		case <-fake.entered:
		case <-ctx.Done():
			require.FailNow(t, "publishes were not pipelined")
		}
	}
	require.Never(t, func() bool { return len(results) > 0 }, 100*time.Millisecond, 10*time.Millisecond,
		"a publish returned before the owner's session did")
	close(fake.gate)
	for range n {
		require.NoError(t, <-results)
	}
	fake.mu.Lock()
	require.Len(t, fake.published, n)
	fake.mu.Unlock()
}

func TestShareCallOutcomes(t *testing.T) {
	fake := newShareFake()
	fake.refused["dev-refused"] = "device is not bound"
	rz, _ := serveFake(t, fake, nil)
	rc := dialFake(t, rz)
	ctx := shareCtx(t, 10*time.Second)

	tests := []struct {
		name    string
		call    func() error
		wantErr error
	}{
		{"publish", func() error {
			return rc.Publish(ctx, gateway.Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
		}, nil},
		{"publish for a hostile device", func() error {
			return rc.Publish(ctx, gateway.Message{Device: "a/+/#", Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
		}, gateway.ErrInvalidDevice},
		{"publish over the limit", func() error {
			return rc.Publish(ctx, gateway.Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: make([]byte, omnicore.MaxTelemetryBytes+1), QoS: 1})
		}, gateway.ErrTooLarge},
		{"attach", func() error { return rc.Attach(ctx, "dev-2") }, nil},
		{"attach refused", func() error { return rc.Attach(ctx, "dev-refused") }, gateway.ErrAttachRefused},
		{"detach", func() error { return rc.Detach(ctx, "dev-2") }, nil},
		{"subscribe refused keeps the subscription", func() error {
			sub, err := rc.Subscribe(ctx, "dev-refused", func(gateway.Inbound) {})
			require.NotNil(t, sub)
			return err
		}, gateway.ErrAttachRefused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if tt.wantErr == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tt.wantErr)
		})
	}

	rc.CountDrop("invalid_device", 2)
	st, err := rc.stats(ctx)
	require.NoError(t, err)
	require.True(t, st.Connected)
	require.Equal(t, uint64(1), st.Acked)
	require.Equal(t, uint64(2), st.DroppedByReason["invalid_device"], "a count_drop sent before stats is counted first")

	rc.ReportGauges("spool-1", map[string]int64{"spool_bytes": 4096, "spool_records": 9})
	st, err = rc.stats(ctx)
	require.NoError(t, err)
	require.Equal(t, map[string]int64{"spool_bytes": 4096, "spool_records": 9}, st.Gauges, "gauges reported before stats reach the owner first")
	require.Equal(t, int64(4096), st.Fields()["spool_bytes"])
}

func TestShareCancelReachesOwner(t *testing.T) {
	fake := newShareFake()
	fake.gate = make(chan struct{})
	defer close(fake.gate)
	rz, _ := serveFake(t, fake, nil)
	rc := dialFake(t, rz)

	tests := []struct {
		name   string
		ctx    func() (context.Context, context.CancelFunc)
		cancel bool // the caller cancels; else its deadline passes
		want   error
	}{
		{"deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), 100*time.Millisecond)
		}, false, context.DeadlineExceeded},
		{"cancel", func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }, true, context.Canceled},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := tt.ctx()
			defer cancel()
			done := make(chan error, 1)
			go func() {
				done <- rc.Publish(ctx, gateway.Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
			}()
			<-fake.entered
			if tt.cancel {
				cancel()
			}
			require.ErrorIs(t, <-done, tt.want)
			// The owner's session call ends too: it is not left waiting for
			// a caller that is gone.
			fake.waitFor(t, shareCtx(t, 10*time.Second), func() bool { return fake.canceled.Load() == int64(i+1) })
		})
	}
}

func TestShareInboundReachesSubscribers(t *testing.T) {
	fake := newShareFake()
	rz, _ := serveFake(t, fake, nil)
	sc := fakeShareConn(t, rz)
	ctx := shareCtx(t, 10*time.Second)

	type got struct {
		who string
		in  gateway.Inbound
	}
	ch := make(chan got, 100)
	handler := func(who string) gateway.Handler { return func(in gateway.Inbound) { ch <- got{who, in} } }
	_, err := sc.Subscribe(ctx, "dev-1", handler("dev-1"))
	require.NoError(t, err)
	errSub := sc.SubscribeErrors(handler("errors"))
	allSub := sc.SubscribeAll(handler("all"))
	fake.waitFor(t, ctx, func() bool { return fake.subscribers() == 3 })

	received := time.Unix(1700000000, 5)
	tests := []struct {
		name string
		in   gateway.Inbound
		want []string
	}{
		{"config", gateway.Inbound{Device: "dev-1", Kind: omnicore.KindConfig, Topic: "/reg/dev-1/config", Payload: []byte("{}"), Received: received}, []string{"all", "dev-1"}},
		{"command of another device", gateway.Inbound{Device: "dev-2", Kind: omnicore.KindCommands, Subfolder: "x", Payload: []byte("c"), Received: received}, []string{"all"}},
		{"error", gateway.Inbound{Device: "fake-gw", Kind: omnicore.KindErrors, Payload: []byte(`{"error_type":"X"}`), Received: received}, []string{"errors"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fake.deliver(tt.in)
			var who []string
			for range tt.want {
				select {
				case g := <-ch:
					require.Equal(t, tt.in, g.in)
					who = append(who, g.who)
				case <-ctx.Done():
					require.FailNow(t, "message not delivered")
				}
			}
			slices.Sort(who)
			require.Equal(t, tt.want, who)
		})
	}

	errSub.Unsubscribe()
	allSub.Unsubscribe()
	fake.waitFor(t, ctx, func() bool { return fake.subscribers() == 1 })
	fake.deliver(gateway.Inbound{Device: "fake-gw", Kind: omnicore.KindErrors, Payload: []byte("e")})
	fake.deliver(gateway.Inbound{Device: "dev-1", Kind: omnicore.KindConfig, Payload: []byte("last")})
	g := <-ch
	require.Equal(t, "dev-1", g.who, "nothing reaches a handler after Unsubscribe")
	require.Equal(t, "last", string(g.in.Payload))
}

func TestShareSlowClientIsDisconnectedAndResubscribes(t *testing.T) {
	fake := newShareFake()
	rz, srv := serveFake(t, fake, func(s *shareServer) { s.maxMsgs, s.maxBytes = 4, 1<<20 })
	sc := fakeShareConn(t, rz)
	ctx := shareCtx(t, 20*time.Second)

	release := make(chan struct{})
	var calls atomic.Int64
	_, err := sc.Subscribe(ctx, "dev-1", func(gateway.Inbound) {
		if calls.Add(1) == 1 {
			<-release // the plugin's handler is stuck
		}
	})
	require.NoError(t, err)
	fake.waitFor(t, ctx, func() bool { return fake.subscribers() == 1 })

	// Deliver until the owner gives up on the client: the stuck handler,
	// the client's queue and the socket buffers fill, then the owner's
	// bounded queue overflows.
	big := make([]byte, 60<<10)
	for i := 0; ; i++ {
		fake.deliver(gateway.Inbound{Device: "dev-1", Kind: omnicore.KindCommands, Payload: big})
		fake.mu.Lock()
		dropped := fake.drops[dropSlowClient]
		fake.mu.Unlock()
		if dropped > 0 {
			break
		}
		require.Less(t, i, 100000, "the owner never disconnected the slow client")
	}
	close(release)
	// The client notices, reconnects and subscribes again.
	fake.waitFor(t, ctx, func() bool { return fake.next == 2 && fake.subscribers() == 1 })
	require.Equal(t, 1, srv.clientCount())
	sc.mu.Lock()
	gen := sc.gen
	sc.mu.Unlock()
	require.Equal(t, uint64(2), gen, "the client reconnected once")
	require.NoError(t, sc.Publish(ctx, gateway.Message{Device: "dev-1", Kind: omnicore.KindEvents, Payload: []byte("after"), QoS: 1}))
}

func TestShareHandshakeRefusals(t *testing.T) {
	t.Run("peer refused by credentials", func(t *testing.T) {
		var seen atomic.Pointer[peerCred]
		rz, _ := serveFake(t, newShareFake(), func(s *shareServer) {
			s.allow = func(c peerCred) error {
				seen.Store(&c)
				return checkPeer(c, c.UID+1) // as if the peer were another user
			}
		})
		_, err := dialOwner(shareCtx(t, 10*time.Second), rz, testutil.Logger{}, nil, "")
		require.ErrorContains(t, err, "handshake")
		c := seen.Load()
		require.NotNil(t, c)
		require.Equal(t, os.Geteuid(), c.UID, "the server reads the peer's real uid")
		require.Equal(t, os.Getpid(), c.PID)
	})
	t.Run("wrong gateway", func(t *testing.T) {
		rz, _ := serveFake(t, newShareFake(), nil)
		other := *rz
		other.name = "gw-other"
		_, err := dialOwner(shareCtx(t, 10*time.Second), &other, testutil.Logger{}, nil, "")
		require.ErrorContains(t, err, "socket of gateway")
	})
	t.Run("nobody listening", func(t *testing.T) {
		rz, err := newRendezvous(shareDir(t), "k")
		require.NoError(t, err)
		_, err = dialOwner(shareCtx(t, 10*time.Second), rz, testutil.Logger{}, nil, "")
		require.Error(t, err)
	})
}

// ---------------------------------------------------------------------------
// Rendezvous files

func TestShareRendezvousFiles(t *testing.T) {
	rz, err := newRendezvous(shareDir(t), "client-id")
	require.NoError(t, err)
	lock, err := lockOwner(rz, "client-id", "")
	require.NoError(t, err)
	defer lock.Close()
	srv, err := listenShare(newShareFake(), rz, testutil.Logger{})
	require.NoError(t, err)
	for path, mode := range map[string]os.FileMode{rz.sock: 0o600, rz.lock: 0o600} {
		fi, err := os.Stat(path)
		require.NoError(t, err)
		require.Equal(t, mode, fi.Mode().Perm(), path)
	}
	srv.stopAccepting()
	srv.closeClients()
	_, err = os.Stat(rz.sock)
	require.ErrorIs(t, err, os.ErrNotExist, "the owner removes its socket when it stops")

	t.Run("directory of another user refused", func(t *testing.T) {
		if os.Geteuid() != 0 {
			t.Skip("needs root to create a directory owned by another user")
		}
		dir := filepath.Join(filepath.Dir(rz.dir), "other")
		require.NoError(t, os.MkdirAll(dir, 0o700))
		require.NoError(t, os.Chown(dir, 65534, 65534))
		_, err := newRendezvous(dir, "key")
		require.ErrorContains(t, err, "owned by uid 65534")
	})
}

func TestShareLockIsExclusive(t *testing.T) {
	rz, err := newRendezvous(shareDir(t), "key")
	require.NoError(t, err)
	first, err := lockOwner(rz, "a", "")
	require.NoError(t, err)
	_, err = lockOwner(rz, "b", "")
	require.ErrorIs(t, err, errLocked)
	content, err := os.ReadFile(rz.lock)
	require.NoError(t, err)
	require.Contains(t, string(content), fmt.Sprintf("pid %d\n", os.Getpid()))
	require.NoError(t, first.Close())
	second, err := lockOwner(rz, "b", "")
	require.NoError(t, err, "the lock is free once its holder closed it")
	second.Close()
}

// ---------------------------------------------------------------------------
// Against the bridge emulator

const (
	shareRegistry = "share-reg"
	shareGateway  = "share-gw"
)

type shareBridge struct {
	srv  *emulator.Server
	opts gateway.Options
	dir  string // rendezvous directory
}

func newShareBridge(t testing.TB, devices ...string) *shareBridge {
	t.Helper()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	key := srv.AddTestGateway(t, shareRegistry, shareGateway, omnicore.ES256, devices...)
	opts := gateway.DefaultOptions()
	opts.Servers = []string{srv.URL}
	opts.SubscriptionID = srv.Subscription()
	opts.RegistryID = shareRegistry
	opts.GatewayID = shareGateway
	opts.PrivateKey = key
	opts.Algorithm = omnicore.ES256
	return &shareBridge{srv: srv, opts: opts, dir: shareDir(t)}
}

// config is the gateway's Config as one process (name) would build it.
func (b *shareBridge) config(t testing.TB, name string) *gateway.Config {
	t.Helper()
	cfg, err := b.opts.Validate(testutil.Logger{Name: name})
	require.NoError(t, err)
	cfg.Timeout = 2 * time.Second
	cfg.MinReconnect = 20 * time.Millisecond
	cfg.MaxReconnect = 200 * time.Millisecond
	return cfg
}

// acquire is what one process's Acquire does, without the process registry,
// so that one test can play several processes.
func (b *shareBridge) acquire(t testing.TB, cfg *gateway.Config) (gateway.Conn, func()) {
	t.Helper()
	conn, closeFn, err := acquireAcross(cfg, b.dir)
	require.NoError(t, err)
	var once sync.Once
	release := func() {
		once.Do(func() {
			ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
			defer cancel()
			require.NoError(t, closeFn(ctx))
		})
	}
	t.Cleanup(release)
	return conn, release
}

func (b *shareBridge) clientID() string { return b.srv.ClientID(shareRegistry, shareGateway) }

// openConnections counts the bridge connections of the gateway.
func (b *shareBridge) openConnections() int {
	n := 0
	for _, c := range b.srv.Connections() {
		if c.ClientID == b.clientID() && c.Open() {
			n++
		}
	}
	return n
}

// connectionsMade counts every accepted connection of the gateway.
func (b *shareBridge) connectionsMade() int {
	n := 0
	for _, c := range b.srv.Connections() {
		if c.ClientID == b.clientID() && !c.Refused {
			n++
		}
	}
	return n
}

func (b *shareBridge) received(device, payload string) []emulator.Message {
	var out []emulator.Message
	for _, m := range b.srv.Received() {
		if m.Device == device && string(m.Payload) == payload {
			out = append(out, m)
		}
	}
	return out
}

// inbox collects inbound messages for a test.
type inbox struct {
	mu   sync.Mutex
	msgs []gateway.Inbound
	ch   chan struct{}
}

func newInbox() *inbox { return &inbox{ch: make(chan struct{})} }

func (b *inbox) handler(in gateway.Inbound) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.msgs = append(b.msgs, in)
	close(b.ch)
	b.ch = make(chan struct{})
}

// waitFor waits until n messages matching match arrived.
func (b *inbox) waitFor(t testing.TB, ctx context.Context, n int, match func(gateway.Inbound) bool) {
	t.Helper()
	for {
		b.mu.Lock()
		got := 0
		for _, in := range b.msgs {
			if match(in) {
				got++
			}
		}
		ch := b.ch
		b.mu.Unlock()
		if got >= n {
			return
		}
		select {
		case <-ch:
		case <-ctx.Done():
			require.FailNowf(t, "inbound messages missing", "%d of %d arrived", got, n)
		}
	}
}

func isConfig(payload string) func(gateway.Inbound) bool {
	return func(in gateway.Inbound) bool { return in.Kind == omnicore.KindConfig && string(in.Payload) == payload }
}

func TestShareOneBridgeConnectionForTwoProcesses(t *testing.T) {
	b := newShareBridge(t, "dev-a", "dev-b")
	ctx := shareCtx(t, 30*time.Second)

	owner, _ := b.acquire(t, b.config(t, "output"))
	s := ownerSession(t, ctx, owner)
	require.NotNil(t, s, "the first process owns the connection")
	require.NoError(t, s.WaitReady(ctx))

	client, _ := b.acquire(t, b.config(t, "input"))
	sc, ok := client.(*shareConn)
	require.True(t, ok, "the second process shares it")
	require.Equal(t, shareGateway, client.GatewayID())

	tests := []struct {
		name string
		conn gateway.Conn
		msg  gateway.Message
	}{
		{"client, device events", client, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("c1"), QoS: 1}},
		{"client, device state", client, gateway.Message{Device: "dev-b", Kind: omnicore.KindState, Payload: []byte("c2"), QoS: 1}},
		{"client, gateway subfolder", client, gateway.Message{Device: shareGateway, Kind: omnicore.KindEvents, Subfolder: "x/y", Payload: []byte("c3"), QoS: 1}},
		{"client, qos 0", client, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("c4"), QoS: 0}},
		{"owner", owner, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("o1"), QoS: 1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, tt.conn.Publish(ctx, tt.msg))
			if tt.msg.QoS == 1 {
				got := b.received(tt.msg.Device, string(tt.msg.Payload))
				require.Len(t, got, 1, "acknowledged means the bridge has it")
				require.Equal(t, tt.msg.Kind, got[0].Kind)
				require.Equal(t, tt.msg.Subfolder, got[0].Subfolder)
			}
		})
	}
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return len(b.received("dev-a", "c4")) == 1 }))

	require.Equal(t, 1, b.openConnections())
	require.Equal(t, 1, b.connectionsMade(), "no second connection, no kick")
	st := client.Stats()
	require.True(t, st.Connected)
	require.Equal(t, s.Stats().Acked, st.Acked, "stats through the socket are the owner's")
	require.GreaterOrEqual(t, st.Acked, uint64(4))
	require.False(t, sc.owns())

	err := client.Attach(ctx, "not-registered")
	require.ErrorIs(t, err, gateway.ErrAttachRefused, "the owner's refusal crosses the socket")
}

func TestSharePublishWaitsForTheBridge(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 30*time.Second)
	owner, _ := b.acquire(t, b.config(t, "output"))
	require.NoError(t, ownerSession(t, ctx, owner).WaitReady(ctx))
	client, _ := b.acquire(t, b.config(t, "input"))
	require.NoError(t, client.Attach(ctx, "dev-a"))

	t.Run("PUBACK withheld", func(t *testing.T) {
		b.srv.WithholdPubacks(1)
		done := make(chan error, 1)
		go func() {
			done <- client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("withheld"), QoS: 1})
		}()
		require.NoError(t, b.srv.WaitFor(ctx, func() bool { return b.srv.Stats().Withheld == 1 }))
		select {
		case err := <-done:
			require.FailNowf(t, "publish returned without a PUBACK", "err=%v", err)
		default:
		}
		require.NoError(t, <-done)
		require.Len(t, b.received("dev-a", "withheld"), 1, "returned only once the bridge accepted the resend")
	})

	t.Run("PUBACK delayed", func(t *testing.T) {
		const delay = 400 * time.Millisecond
		b.srv.SetPubackDelay(delay)
		defer b.srv.SetPubackDelay(0)
		start := time.Now()
		require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("delayed"), QoS: 1}))
		require.GreaterOrEqual(t, time.Since(start), delay)
		require.Len(t, b.received("dev-a", "delayed"), 1)
	})
}

func TestShareInboundThroughTheSocket(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 30*time.Second)
	_, err := b.srv.SetConfig(shareRegistry, "dev-a", []byte("cfg-1"))
	require.NoError(t, err)
	owner, _ := b.acquire(t, b.config(t, "output"))
	require.NoError(t, ownerSession(t, ctx, owner).WaitReady(ctx))
	client, _ := b.acquire(t, b.config(t, "input"))

	box := newInbox()
	_, err = client.Subscribe(ctx, "dev-a", box.handler)
	require.NoError(t, err)
	errBox := newInbox()
	client.SubscribeErrors(errBox.handler)

	box.waitFor(t, ctx, 1, isConfig("cfg-1"))
	_, err = b.srv.SetConfig(shareRegistry, "dev-a", []byte("cfg-2"))
	require.NoError(t, err)
	box.waitFor(t, ctx, 1, isConfig("cfg-2"))
	require.NoError(t, b.srv.SendCommand(shareRegistry, "dev-a", "reboot", []byte("now")))
	box.waitFor(t, ctx, 1, func(in gateway.Inbound) bool {
		return in.Kind == omnicore.KindCommands && in.Subfolder == "reboot" && string(in.Payload) == "now" && in.Device == "dev-a"
	})

	require.ErrorIs(t, client.Attach(ctx, "unknown-dev"), gateway.ErrAttachRefused)
	errBox.waitFor(t, ctx, 1, func(in gateway.Inbound) bool { return in.Kind == omnicore.KindErrors })
	require.Equal(t, 1, b.openConnections())
}

func TestShareTakeoverWhenTheOwnerGoes(t *testing.T) {
	b := newShareBridge(t, "dev-a", "dev-b")
	ctx := shareCtx(t, 40*time.Second)
	_, err := b.srv.SetConfig(shareRegistry, "dev-a", []byte("cfg-1"))
	require.NoError(t, err)

	ownerCfg := b.config(t, "output")
	ownerCfg.Timeout = 20 * time.Second // no resend of its own during the test
	owner, closeOwner, err := acquireAcross(ownerCfg, b.dir)
	require.NoError(t, err)
	require.NoError(t, ownerSession(t, ctx, owner).WaitReady(ctx))

	client, _ := b.acquire(t, b.config(t, "input"))
	sc := client.(*shareConn)
	box := newInbox()
	_, err = client.Subscribe(ctx, "dev-a", box.handler)
	require.NoError(t, err)
	errBox := newInbox()
	client.SubscribeErrors(errBox.handler)
	require.NoError(t, client.Attach(ctx, "dev-b"))
	box.waitFor(t, ctx, 1, isConfig("cfg-1"))

	// A publish in flight at the owner when it goes away.
	b.srv.WithholdPubacks(1)
	done := make(chan error, 1)
	go func() {
		done <- client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("in-flight"), QoS: 1})
	}()
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return b.srv.Stats().Withheld == 1 }))

	// The owner goes away without waiting for anything in flight, as
	// when its process ends abruptly (the real kill -9 is in
	// TestShareTwoProcesses).
	gone := time.Now()
	expired, cancel := context.WithCancel(context.Background())
	cancel()
	require.NoError(t, closeOwner(expired))

	require.NoError(t, <-done, "the publish is retried on the new owner")
	box.waitFor(t, ctx, 2, isConfig("cfg-1")) // re-delivered to the restored subscription
	took := time.Since(gone)
	t.Logf("takeover: config re-delivered %s after the owner went away", took.Round(time.Millisecond))
	require.True(t, sc.owns(), "the client took over")

	var newConn emulator.ConnectionRecord
	for _, c := range b.srv.Connections() {
		if c.ClientID == b.clientID() && c.Open() {
			newConn = c
		}
	}
	msgs := b.received("dev-a", "in-flight")
	require.NotEmpty(t, msgs)
	require.False(t, msgs[len(msgs)-1].Time.Before(newConn.Connected), "accepted on the new owner's connection")
	require.NoError(t, b.srv.WaitAttached(ctx, shareRegistry, shareGateway, "dev-a", "dev-b"), "wanted attachments replayed")

	require.ErrorIs(t, client.Attach(ctx, "unknown-dev"), gateway.ErrAttachRefused)
	errBox.waitFor(t, ctx, 1, func(in gateway.Inbound) bool { return in.Kind == omnicore.KindErrors })
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-b", Kind: omnicore.KindEvents, Payload: []byte("after"), QoS: 1}))
	require.Len(t, b.received("dev-b", "after"), 1)
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return b.openConnections() == 1 }), "the old connection is gone")
	require.Equal(t, 2, b.connectionsMade())

	// A third process now shares the new owner's connection.
	third, _ := b.acquire(t, b.config(t, "third"))
	require.IsType(t, &shareConn{}, third)
	require.NoError(t, third.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("third"), QoS: 1}))
	require.Equal(t, 1, b.openConnections())
}

func TestShareGracefulHandover(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 30*time.Second)
	_, err := b.srv.SetConfig(shareRegistry, "dev-a", []byte("cfg-1"))
	require.NoError(t, err)
	owner, releaseOwner := b.acquire(t, b.config(t, "output"))
	require.NoError(t, ownerSession(t, ctx, owner).WaitReady(ctx))
	client, _ := b.acquire(t, b.config(t, "input"))
	box := newInbox()
	_, err = client.Subscribe(ctx, "dev-a", box.handler)
	require.NoError(t, err)
	box.waitFor(t, ctx, 1, isConfig("cfg-1"))

	start := time.Now()
	releaseOwner()
	box.waitFor(t, ctx, 2, isConfig("cfg-1"))
	t.Logf("graceful handover: config re-delivered %s after release", time.Since(start).Round(time.Millisecond))
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("after"), QoS: 1}))
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return b.openConnections() == 1 }))
	require.Equal(t, 2, b.connectionsMade())
}

func TestShareStaleFilesOfADeadOwner(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 30*time.Second)
	cfg := b.config(t, "output")
	rz, err := newRendezvous(b.dir, cfg.ClientID())
	require.NoError(t, err)

	// What a killed owner leaves: its lock file (unlocked, the kernel
	// released it) and a socket file nobody listens on.
	require.NoError(t, os.WriteFile(rz.lock, []byte("pid 1\n"), 0o600))
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: rz.sock, Net: "unix"})
	require.NoError(t, err)
	ln.SetUnlinkOnClose(false)
	require.NoError(t, ln.Close())
	_, err = os.Stat(rz.sock)
	require.NoError(t, err, "the stale socket file is there")
	_, err = net.Dial("unix", rz.sock)
	require.Error(t, err, "and dead")

	owner, _ := b.acquire(t, cfg)
	require.NotNil(t, ownerSession(t, ctx, owner), "a stale socket does not make an owner")
	client, _ := b.acquire(t, b.config(t, "input"))
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	require.Len(t, b.received("dev-a", "x"), 1)
}

// Case 7: the rendezvous directory is checked, never re-moded: one that is
// not private is an error naming it, and its mode stays as it was.
func TestShareDir(t *testing.T) {
	base := shareDir(t)
	tests := []struct {
		name    string
		setup   func(dir string)
		wantErr string
		mode    os.FileMode // expected afterwards
	}{
		{"created private", func(string) {}, "", 0o700},
		{"existing private kept", func(dir string) { require.NoError(t, os.Mkdir(dir, 0o700)) }, "", 0o700},
		{"sticky world-writable refused, not re-moded", func(dir string) {
			require.NoError(t, os.Mkdir(dir, 0o700))
			require.NoError(t, os.Chmod(dir, 0o777|os.ModeSticky))
		}, "mode", 0o777},
		{"group-readable refused, not re-moded", func(dir string) {
			require.NoError(t, os.Mkdir(dir, 0o750))
		}, "mode 0750", 0o750},
		{"symlink refused", func(dir string) {
			require.NoError(t, os.Mkdir(dir+"-target", 0o700))
			require.NoError(t, os.Symlink(dir+"-target", dir))
		}, "not a directory", 0},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(base, fmt.Sprint(i))
			tt.setup(dir)
			t.Setenv(EnvRuntimeDir, dir)
			got, err := Dir()
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				require.ErrorContains(t, err, dir)
			} else {
				require.NoError(t, err)
				require.Equal(t, dir, got)
			}
			if tt.mode != 0 {
				fi, err := os.Lstat(dir)
				require.NoError(t, err)
				require.Equal(t, tt.mode, fi.Mode().Perm(), "the directory's mode is never changed")
			}
		})
	}
	t.Run("relative path refused", func(t *testing.T) {
		t.Setenv(EnvRuntimeDir, "relative/dir")
		_, err := Dir()
		require.ErrorContains(t, err, "absolute")
	})
	t.Run("socket path too long", func(t *testing.T) {
		long := filepath.Join(base, "a-directory-name-long-enough-to-overflow-the-unix-socket-path-limit-of-the-kernel")
		t.Setenv(EnvRuntimeDir, long)
		_, err := Dir()
		require.ErrorContains(t, err, EnvRuntimeDir)
	})
	t.Run("under the state directory", func(t *testing.T) {
		state := filepath.Join(base, "state")
		require.NoError(t, os.Mkdir(state, 0o755))
		t.Setenv(EnvRuntimeDir, "")
		t.Setenv(statedir.EnvStateDirectory, state)
		got, err := Dir()
		require.NoError(t, err)
		require.Equal(t, filepath.Join(state, "share"), got)
		require.NoError(t, os.Chmod(got, 0o777))
		_, err = Dir()
		require.ErrorContains(t, err, "0777", "a squatted or opened share directory is refused")
		fi, err := os.Stat(got)
		require.NoError(t, err)
		require.Equal(t, os.FileMode(0o777), fi.Mode().Perm())
	})
	t.Run("sharing off installs nothing", func(t *testing.T) {
		t.Setenv(EnvSharing, "off")
		t.Setenv(EnvRuntimeDir, filepath.Join(base, "never"))
		connect, dir, err := Install(Settings{})
		require.NoError(t, err)
		require.Nil(t, connect)
		require.Empty(t, dir)
		_, err = os.Stat(filepath.Join(base, "never"))
		require.ErrorIs(t, err, os.ErrNotExist)
	})
}

// Cases 1 and 4: identity is the client ID, so a process whose options
// differ (servers spelled another way, other device_auth...) meets the owner
// and is refused with every differing option and both plugin files named;
// it never connects, so there is no kick war.
func TestShareConflictingOptions(t *testing.T) {
	tests := []struct {
		name    string
		tweak   func(*gateway.Options)
		differs []string
	}{
		{"same options share", func(*gateway.Options) {}, nil},
		{"server spelled another way", func(o *gateway.Options) {
			o.Servers = []string{strings.Replace(o.Servers[0], "127.0.0.1", "localhost", 1)}
		}, []string{"servers"}},
		{"other device_auth", func(o *gateway.Options) {
			o.DeviceAuth = gateway.DeviceAuthToken
			o.DeviceKeyDir = os.TempDir()
		}, []string{"device_auth", "device_key_dir"}},
		{"other max_inflight and keep_alive", func(o *gateway.Options) {
			o.MaxInflight = 7
			o.KeepAlive = config.Duration(30 * time.Second)
		}, []string{"keep_alive", "max_inflight"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := newShareBridge(t)
			ctx := shareCtx(t, 20*time.Second)
			ownerLog := &testutil.CaptureLogger{Name: "output"}
			ocfg := b.config(t, "output")
			ocfg.Log = ownerLog
			owner, _, err := (&sharer{dir: b.dir, settings: Settings{PluginFile: "/etc/output.conf"}}).acquire(ocfg)
			require.NoError(t, err)
			t.Cleanup(func() { _ = owner.(*shareConn).Close(shareCtx(t, 5*time.Second)) })
			require.NoError(t, ownerSession(t, ctx, owner).WaitReady(ctx))

			opts := b.opts
			tt.tweak(&opts)
			log := &testutil.CaptureLogger{Name: "input"}
			cfg, err := opts.Validate(log)
			require.NoError(t, err)
			conflicts := make(chan error, 1)
			client, closeFn, err := (&sharer{dir: b.dir, settings: Settings{PluginFile: "/etc/input.conf", OnConflict: func(err error) { conflicts <- err }}}).acquire(cfg)
			require.NoError(t, err)
			t.Cleanup(func() { _ = closeFn(shareCtx(t, 5*time.Second)) })
			err = client.Publish(ctx, gateway.Message{Device: shareGateway, Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
			if tt.differs == nil {
				require.NoError(t, err)
				require.Empty(t, conflicts)
				return
			}
			require.ErrorIs(t, err, gateway.ErrConflict)
			select {
			case cerr := <-conflicts:
				require.Equal(t, err, cerr)
			case <-ctx.Done():
				require.FailNow(t, "OnConflict was not called")
			}
			var line string
			for _, e := range log.Errors() {
				if strings.Contains(e, "other connection options") {
					line = e
				}
			}
			require.NotEmpty(t, line, "an E! line: %v", log.Errors())
			for _, want := range append([]string{`"/etc/output.conf"`, `"/etc/input.conf"`}, tt.differs...) {
				require.Contains(t, line, want)
			}
			require.NotContains(t, line, "BEGIN", "no key material")
			require.Equal(t, 1, b.connectionsMade(), "the refused process never connects")
			found := false
			for _, w := range ownerLog.Warnings() {
				found = found || strings.Contains(w, "Refused process")
			}
			require.True(t, found, "the owner says it refused: %v", ownerLog.Warnings())
		})
	}
}

func TestShareOwnerKeepsItsFiles(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 20*time.Second)
	cfg := b.config(t, "output")
	log := &testutil.CaptureLogger{Name: "output"}
	cfg.Log = log
	rz, err := newRendezvous(b.dir, cfg.ClientID())
	require.NoError(t, err)
	lock, err := lockOwner(rz, "owner", "")
	require.NoError(t, err)
	o, err := startOwner(cfg, Settings{}, rz, lock, 10*time.Millisecond, nil)
	require.NoError(t, err)
	t.Cleanup(func() { _ = o.close(shareCtx(t, 5*time.Second)) })

	// A /tmp cleaner's view: everything untouched for a month...
	month := time.Now().Add(-30 * 24 * time.Hour)
	for _, p := range []string{rz.dir, rz.lock, rz.sock} {
		require.NoError(t, os.Chtimes(p, month, month))
	}
	// ...and the socket deleted.
	require.NoError(t, os.Remove(rz.sock))

	fresh := func(p string) bool {
		fi, err := os.Lstat(p)
		return err == nil && fi.ModTime().After(month.Add(24*time.Hour))
	}
	private := func(p string) bool {
		fi, err := os.Stat(p)
		return err == nil && fi.Mode().Perm() == 0o600
	}
	// The new socket is made 0600 just after it is created (in the 0700
	// directory), so wait for both.
	require.Eventually(t, func() bool { return fresh(rz.dir) && fresh(rz.lock) && fresh(rz.sock) && private(rz.sock) }, 10*time.Second, 5*time.Millisecond)

	client, _ := b.acquire(t, b.config(t, "input"))
	require.IsType(t, &shareConn{}, client)
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	require.Equal(t, 1, b.connectionsMade())

	require.NoError(t, os.Remove(rz.lock))
	require.Eventually(t, func() bool {
		for _, e := range log.Errors() {
			if strings.Contains(e, "lock file") {
				return true
			}
		}
		return false
	}, 10*time.Second, 5*time.Millisecond, "removing the lock file is reported")
}

func TestShareLeavesNoFilesBehind(t *testing.T) {
	b := newShareBridge(t)
	ctx := shareCtx(t, 20*time.Second)
	owner, releaseOwner := b.acquire(t, b.config(t, "output"))
	require.NoError(t, ownerSession(t, ctx, owner).WaitReady(ctx))
	client, releaseClient := b.acquire(t, b.config(t, "input"))
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: shareGateway, Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	entries, err := os.ReadDir(b.dir)
	require.NoError(t, err)
	require.Len(t, entries, 2, "a lock file and a socket")

	releaseOwner()
	require.NoError(t, client.Publish(ctx, gateway.Message{Device: shareGateway, Kind: omnicore.KindEvents, Payload: []byte("y"), QoS: 1}))
	require.True(t, client.(*shareConn).owns(), "the client took over")
	releaseClient()
	entries, err = os.ReadDir(b.dir)
	require.NoError(t, err)
	require.Empty(t, entries, "the last owner removes its lock file and socket")
}

// Case 6: owners that start and stop in quick succession hand the gateway
// over without the bridge ever kicking a connection for a duplicate client
// ID: each owner's MQTT connection (or its connect in progress) is gone
// before it releases the lock.
func TestShareRapidRestartsNeverKick(t *testing.T) {
	b := newShareBridge(t, "dev-a")
	ctx := shareCtx(t, 60*time.Second)
	const rounds = 15
	conns := make([]func(context.Context) error, 0, rounds)
	for i := range rounds {
		conn, closeFn, err := acquireAcross(b.config(t, fmt.Sprint("p", i)), b.dir)
		require.NoError(t, err)
		conns = append(conns, closeFn)
		if i%3 == 0 {
			require.NoError(t, conn.Publish(ctx, gateway.Message{Device: "dev-a", Kind: omnicore.KindEvents, Payload: fmt.Appendf(nil, "m%d", i), QoS: 1}))
		}
		if i%2 == 1 { // stop the oldest while its successor may be connecting
			require.NoError(t, conns[0](shareCtx(t, closeTimeout)))
			conns = conns[1:]
		}
	}
	for _, c := range conns {
		require.NoError(t, c(shareCtx(t, closeTimeout)))
	}
	kicks := 0
	for _, c := range b.srv.Connections() {
		if c.Reason == emulator.ReasonTakenOver {
			kicks++
		}
	}
	t.Logf("%d connections made, %d kicked for a duplicate client ID", b.connectionsMade(), kicks)
	require.Zero(t, kicks)
}

// A client whose owner cannot connect hears the owner's reason and logs it
// at debug level at most once a minute (the owner tells the outage), and a publish that makes no
// progress says why long before any write timeout.
func TestShareClientHearsTheOwnersProblem(t *testing.T) {
	saved := stallReport
	stallReport = 5 * time.Second
	t.Cleanup(func() { stallReport = saved })
	b := newShareBridge(t)
	// Both plugin files name a key the bridge does not know.
	b.opts.PrivateKey, _ = emulator.NewDeviceKey(t, t.TempDir(), "other-gateway", omnicore.ES256)
	ctx := shareCtx(t, 30*time.Second)
	owner, _ := b.acquire(t, b.config(t, "output"))
	require.NotNil(t, ownerSession(t, ctx, owner))
	cfg := b.config(t, "input")
	log := &testutil.CaptureLogger{Name: "input"}
	cfg.Log = log
	client, _ := b.acquire(t, cfg)
	pctx, cancel := context.WithTimeout(ctx, 8*time.Second)
	defer cancel()
	err := client.Publish(pctx, gateway.Message{Device: shareGateway, Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	var ownerErr, stall int
	for _, e := range log.Messages() {
		if strings.Contains(e.Text, "cannot connect to the bridge: not Authorized") {
			switch {
			case e.Level == 'E' && strings.Contains(e.Text, "are waiting"):
				stall++
			case e.Level == 'D':
				// The owner's log tells the outage; here it is debug.
				ownerErr++
			}
		}
	}
	require.Equal(t, 1, ownerErr, "the owner's reason, once a minute, at debug: %v", log.Messages())
	require.Equal(t, 1, stall, "the stalled publish says why: %v", log.Errors())
}
