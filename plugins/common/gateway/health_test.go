package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// fastHealth shortens the publisher's pacing for a test. The session's own
// pacing of state (one per omnicore.StateInterval) still applies.
func fastHealth(t *testing.T) {
	poll, gap := healthPoll, healthMinGap
	healthPoll, healthMinGap = 10*time.Millisecond, 50*time.Millisecond
	t.Cleanup(func() { healthPoll, healthMinGap = poll, gap })
}

// healthStates reads the gateway's states back through the emulator's
// admin API (GET /v1/telemetry), as an operator's tool would, decoded.
func healthStates(t *testing.T, srv *emulator.Server) ([]Health, []emulator.TelemetryMessage) {
	t.Helper()
	admin := httptest.NewServer(srv.AdminHandler())
	defer admin.Close()
	resp, err := http.Get(admin.URL + "/v1/telemetry?since=0&limit=10000")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var page emulator.TelemetryPage
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&page))
	var docs []Health
	var msgs []emulator.TelemetryMessage
	for _, m := range page.Messages {
		if m.Kind != omnicore.KindState || m.Device != testGateway {
			continue
		}
		var h Health
		require.NoError(t, json.Unmarshal([]byte(m.Payload), &h), "payload %q", m.Payload)
		docs = append(docs, h)
		msgs = append(msgs, m)
	}
	return docs, msgs
}

// healthWaiter waits for the gateway's health states in the emulator, each
// wait looking only at the states after the one the previous wait found.
type healthWaiter struct {
	srv  *emulator.Server
	next int // index of the first message not looked at
}

// wait waits until the emulator holds a new health state satisfying cond
// (on the emulator's change notifications, not a sleep) and returns it.
func (w *healthWaiter) wait(t *testing.T, cond func(Health) bool) Health {
	t.Helper()
	var found Health
	ctx := testCtx(t, 15*time.Second)
	err := w.srv.WaitFor(ctx, func() bool {
		msgs, next := w.srv.ReceivedSince(w.next)
		for _, m := range msgs {
			var h Health
			if m.Kind == omnicore.KindState && m.Device == testGateway && json.Unmarshal(m.Payload, &h) == nil && cond(h) {
				found = h
				w.next = m.Index + 1
				return true
			}
		}
		w.next = next
		return false
	})
	require.NoError(t, err, "no health state as expected")
	return found
}

func publishers() int {
	healthPublishers.mu.Lock()
	defer healthPublishers.mu.Unlock()
	return len(healthPublishers.byConn)
}

func TestHealthState(t *testing.T) {
	fastHealth(t)
	b := newTestBridge(t, 1)
	require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{ID: "dev-unbound"}))
	s := startSession(t, b.cfg)
	s.ReportGauges("output", map[string]int64{"spool_bytes": 4096, "spool_records": 7, "spool_oldest_age_ms": 61_500})
	require.NoError(t, s.Publish(testCtx(t, 5*time.Second), Message{Device: deviceName(0), Kind: omnicore.KindEvents, Payload: []byte("x"), QoS: 1}))
	s.CountDrop("missing_device", 3)

	// Two plugins of the process share the connection: one publisher.
	stop1 := StartHealth(s, HealthSettings{Interval: time.Hour, Route: RouteExecd})
	t.Cleanup(stop1)
	stop2 := StartHealth(s, HealthSettings{Interval: time.Hour, Route: RouteBuiltIn})
	t.Cleanup(stop2)
	require.Equal(t, 1, publishers())
	w := &healthWaiter{srv: b.srv}

	first := w.wait(t, func(Health) bool { return true })
	require.Equal(t, HealthSchema, first.Schema)
	require.Equal(t, RouteExecd, first.Route, "the first plugin's settings")
	require.NotEmpty(t, first.Version)
	require.True(t, first.Connected)
	require.NotNil(t, first.ConnectedSince)
	require.Equal(t, 1, first.Devices.Attached)
	require.Equal(t, &HealthSpool{Bytes: 4096, Records: 7, OldestAgeSeconds: 61}, first.Spool)
	require.GreaterOrEqual(t, first.Messages.Acknowledged, uint64(1))
	require.Equal(t, map[string]uint64{"missing_device": 3}, first.Messages.Dropped)
	require.Nil(t, first.LastError)

	// A lost connection is a meaningful change: the next document (after
	// the reconnect, long before the hour's interval) names it, with a
	// later connected_since.
	b.srv.KickAll()
	again := w.wait(t, func(h Health) bool { return h.LastError != nil && h.LastError.Type == errorConnection })
	require.True(t, again.Connected)
	require.True(t, again.ConnectedSince.After(*first.ConnectedSince))
	require.Contains(t, again.LastError.Message, "lost")

	// So is a refused device.
	require.ErrorIs(t, s.Attach(testCtx(t, 5*time.Second), "dev-unbound"), ErrAttachRefused)
	refused := w.wait(t, func(h Health) bool { return h.Devices.Refused == 1 })
	require.Equal(t, omnicore.ErrorAttachment, refused.LastError.Type)
	require.Equal(t, "dev-unbound", refused.LastError.Device)
	require.Contains(t, refused.LastError.Message, "not bound")
	require.Equal(t, uint64(1), refused.Devices.Refused)
	require.Len(t, refused.Devices.RecentlyRefused, 1)
	require.Equal(t, "dev-unbound", refused.Devices.RecentlyRefused[0].Device)

	stop1()
	require.Equal(t, 1, publishers(), "still used by the second plugin")
	stop2()
	require.Zero(t, publishers())

	// Read back through the admin API: within the bridge's limits, and
	// never two states closer than the bridge allows (the emulator would
	// have closed the connection for it, too).
	docs, msgs := healthStates(t, b.srv)
	require.GreaterOrEqual(t, len(docs), 3)
	for i, m := range msgs {
		require.LessOrEqual(t, m.Size, omnicore.MaxStateBytes)
		if i > 0 {
			require.GreaterOrEqual(t, m.Time.Sub(msgs[i-1].Time), omnicore.StateInterval, "state %d", i)
		}
	}
	for _, c := range b.srv.Connections() {
		require.NotEqual(t, emulator.ReasonStateRate, c.Reason)
	}
}

// fakeConn counts Stats calls and signals Publish calls; OwnsConnection
// says whether this process owns the connection (execd/share's shareConn).
type fakeConn struct {
	Conn
	owns      atomic.Bool
	stats     atomic.Int64
	looked    chan struct{} // signalled from the fifth Stats call on
	published chan struct{}
}

type noSubscription struct{}

func (noSubscription) Unsubscribe() {}

func (f *fakeConn) GatewayID() string                    { return testGateway }
func (f *fakeConn) OwnsConnection() bool                 { return f.owns.Load() }
func (f *fakeConn) SubscribeErrors(Handler) Subscription { return noSubscription{} }

func (f *fakeConn) Publish(context.Context, Message) error {
	f.published <- struct{}{}
	return nil
}

func (f *fakeConn) Stats() Stats {
	if f.stats.Add(1) >= 5 {
		select {
		case f.looked <- struct{}{}:
		default:
		}
	}
	return Stats{Connected: true}
}

// A process that uses another process's connection publishes no health:
// the owner does.
func TestHealthOnlyFromTheConnectionOwner(t *testing.T) {
	fastHealth(t)
	f := &fakeConn{looked: make(chan struct{}, 1), published: make(chan struct{}, 10)}
	stop := StartHealth(f, HealthSettings{Interval: MinHealthInterval, Route: RouteExecd})
	defer stop()
	select {
	case <-f.looked: // five looks at the connection, each a chance to publish
	case <-time.After(10 * time.Second):
		t.Fatal("the publisher did not look at the connection")
	}
	require.Empty(t, f.published, "not the owner: nothing published")
	f.owns.Store(true)
	select {
	case <-f.published: // the owner publishes at once: the first document is due
	case <-time.After(10 * time.Second):
		t.Fatal("the owner did not publish")
	}
}

func TestValidateHealthInterval(t *testing.T) {
	for _, tc := range []struct {
		d  time.Duration
		ok bool
	}{{0, true}, {MinHealthInterval, true}, {time.Hour, true}, {time.Second, false}, {-time.Minute, false}} {
		err := ValidateHealthInterval(tc.d)
		if tc.ok {
			require.NoError(t, err, tc.d)
		} else {
			require.ErrorContains(t, err, "health_state_interval", tc.d)
		}
	}
}
