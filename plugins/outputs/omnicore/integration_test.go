package omnicore

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// These tests run the plugin with the real gateway session against the bridge
// emulator on loopback.

const (
	itRegistry = "reg"
	itGateway  = "gw"
)

// startBridge starts an emulator with a gateway and the given devices bound
// to it, and returns the gateway's key.
func startBridge(t *testing.T, devices ...string) (*emulator.Server, string) {
	t.Helper()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	key := srv.AddTestGateway(t, itRegistry, itGateway, omnicore.ES256, devices...)
	return srv, key
}

// connectPlugin runs the plugin against srv with the real session.
func connectPlugin(t *testing.T, srv *emulator.Server, key string, mutate ...func(*OmniCore)) *OmniCore {
	t.Helper()
	o := startPlugin(t, srv, key, mutate...)
	// A Write that starts before the first connect waits only
	// disconnectedWriteTimeout (1 s), and on a loaded machine the first
	// connect took longer than that (TestIntegrationBridgeRestartMidWrite
	// failed so in CI): the tests that expect a Write to complete start it
	// connected.
	require.Eventually(t, func() bool { return o.conn.Stats().Connected }, time.Minute, 5*time.Millisecond,
		"the plugin did not connect to the emulator; log:\n%s", logOf(o))
	return o
}

// startPlugin is connectPlugin without waiting for the connection.
func startPlugin(t *testing.T, srv *emulator.Server, key string, mutate ...func(*OmniCore)) *OmniCore {
	t.Helper()
	o := factoryPlugin(t)
	o.Servers = []string{srv.URL}
	o.SubscriptionID = srv.Subscription()
	o.RegistryID = itRegistry
	o.GatewayID = itGateway
	o.PrivateKey = key
	o.MaxReconnectInterval = config.Duration(time.Second)
	o.WriteTimeout = config.Duration(time.Minute)
	for _, f := range mutate {
		f(o)
	}
	require.NoError(t, o.Init())
	require.NoError(t, o.Connect())
	t.Cleanup(func() { require.NoError(t, o.Close()) })
	return o
}

func deviceIDs(n int) []string {
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("dev-%04d", i)
	}
	return ids
}

// sentKeys is what the plugin should deliver: one "device kind\nline" per
// metric, without the device tag.
func sentKeys(t *testing.T, kind omnicore.Kind, ms []telegraf.Metric) []string {
	keys := make([]string, 0, len(ms))
	for _, m := range ms {
		dev, _ := m.GetTag("device_id")
		keys = append(keys, fmt.Sprintf("%s %s\n%s", dev, kind, canonical(t, stripped(m))))
	}
	return keys
}

// receivedKeys is what the emulator accepted, in the form of sentKeys, and
// how many of its metrics arrived more than once.
func receivedKeys(t *testing.T, msgs []emulator.Message) (keys []string, duplicates int) {
	seen := make(map[string]bool)
	for _, msg := range msgs {
		for _, m := range parse(t, msg.Payload) {
			k := fmt.Sprintf("%s %s\n%s", msg.Device, msg.Kind, canonical(t, m))
			if seen[k] {
				duplicates++
				continue
			}
			seen[k] = true
			keys = append(keys, k)
		}
	}
	return keys, duplicates
}

func gatewayConnections(srv *emulator.Server) []emulator.ConnectionRecord {
	var out []emulator.ConnectionRecord
	for _, c := range srv.Connections() {
		if c.ClientID == srv.ClientID(itRegistry, itGateway) && !c.Refused {
			out = append(out, c)
		}
	}
	return out
}

func stats(o *OmniCore) gateway.Stats { return o.conn.Stats() }

func TestIntegrationThousandDevicesOneConnection(t *testing.T) {
	for _, layout := range []string{layoutNonBatch, layoutBatch} {
		t.Run(layout, func(t *testing.T) {
			devices := deviceIDs(1000)
			srv, key := startBridge(t, devices...)
			start := time.Now()
			o := connectPlugin(t, srv, key, func(o *OmniCore) {
				o.Devices = devices
				o.Layout = layout
			})
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			require.NoError(t, srv.WaitAttached(ctx, itRegistry, itGateway, devices...))
			attached := time.Since(start)

			// Three metrics per device, in Telegraf-sized batches of 1000
			// (so about 333 devices per Write).
			var all []telegraf.Metric
			for _, d := range devices {
				for round := range 3 {
					all = append(all, m("sensor", map[string]string{"device_id": d, "host": "edge"}, round))
				}
			}
			start = time.Now()
			for batch := range slices.Chunk(all, 1000) {
				require.NoError(t, o.Write(batch))
			}
			written := time.Since(start)

			received := srv.Received()
			got, dups := receivedKeys(t, received)
			require.ElementsMatch(t, sentKeys(t, omnicore.KindEvents, all), got)
			if layout == layoutBatch {
				// One message per device and Write (a device's metrics may
				// straddle two Writes).
				require.LessOrEqual(t, len(received), len(devices)+3+dups)
			}
			conns := gatewayConnections(srv)
			require.Len(t, conns, 1, "the gateway used more than one connection")
			require.True(t, conns[0].Open())
			require.Len(t, srv.Attachments(itRegistry, itGateway), len(devices))
			require.Empty(t, srv.ErrorsSent())
			t.Logf("%s: 1000 devices attached in %s; 3000 metrics in %d messages acknowledged in %s (%d duplicates)",
				layout, attached.Round(time.Millisecond), len(received), written.Round(time.Millisecond), dups)
		})
	}
}

// TestIntegrationStateRate writes states faster than the bridge allows: the
// bridge must never see two states of a device less than 1 s apart (it would
// detach the device), the latest state of the first and of the last write
// arrive, no Write waits for pacing (Telegraf would log "did not complete
// within its flush interval"), and every state not sent is counted as
// coalesced, none as dropped.
func TestIntegrationStateRate(t *testing.T) {
	devices := deviceIDs(20)
	srv, key := startBridge(t, devices...)
	o := connectPlugin(t, srv, key, func(o *OmniCore) { o.StateMetrics = []string{"status"} })

	const writes = 5
	var first, last []telegraf.Metric
	var slowest time.Duration
	for w := range writes {
		var batch, latests []telegraf.Metric
		for _, d := range devices {
			older := m("status", map[string]string{"device_id": d}, 10*w)
			latest := m("status", map[string]string{"device_id": d}, 10*w+1)
			batch = append(batch, latest, older, m("temp", map[string]string{"device_id": d}, w))
			latests = append(latests, latest)
		}
		start := time.Now()
		require.NoError(t, o.Write(batch))
		slowest = max(slowest, time.Since(start))
		if w == 0 {
			first = latests
		}
		last = latests
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	states := func() []emulator.Message {
		var out []emulator.Message
		for _, msg := range srv.Received() {
			if msg.Kind == omnicore.KindState {
				out = append(out, msg)
			}
		}
		return out
	}
	want := append(sentKeys(t, omnicore.KindState, first), sentKeys(t, omnicore.KindState, last)...)
	require.NoError(t, srv.WaitFor(ctx, func() bool { return len(states()) >= len(want) }))
	got, dups := receivedKeys(t, states())
	require.Subset(t, got, want)
	require.Zero(t, dups)
	prev := make(map[string]time.Time)
	for _, msg := range states() {
		if p, ok := prev[msg.Device]; ok {
			require.GreaterOrEqual(t, msg.Time.Sub(p), omnicore.StateInterval, "device %s", msg.Device)
		}
		prev[msg.Device] = msg.Time
	}
	for _, e := range srv.ErrorsSent() {
		require.NotEqual(t, omnicore.ErrorDetachedByError, e.Error.ErrorType, "%+v", e)
	}
	st := stats(o)
	t.Logf("%d writes of 2 states per device for %d devices: slowest Write %s; the bridge got %d states, %d coalesced, dropped %v",
		writes, len(devices), slowest.Round(time.Microsecond), len(got), st.StatesCoalesced, st.DroppedByReason)
	require.Less(t, slowest, omnicore.StateInterval/2, "no Write waits for pacing")
	require.Zero(t, srv.Stats().BridgeDetaches)
	require.Zero(t, srv.Stats().DroppedStateRate)
	require.Equal(t, uint64(2*writes*len(devices)-len(got)), st.StatesCoalesced)
	require.Zero(t, st.DroppedByReason[dropStateCoalesced])
}

// TestIntegrationBridgeRestartMidWrite stops the bridge while a Write waits
// for acknowledgements and starts it again: the Write completes and every
// metric arrives at least once.
func TestIntegrationBridgeRestartMidWrite(t *testing.T) {
	devices := deviceIDs(100)
	srv, key := startBridge(t, devices...)
	o := connectPlugin(t, srv, key)

	var batch []telegraf.Metric
	for i := range 10 {
		for _, d := range devices {
			batch = append(batch, m("sensor", map[string]string{"device_id": d}, i))
		}
	}
	// The bridge drops the first 50 messages without a PUBACK, so the Write
	// cannot finish before the restart (the session resends them only
	// after the 10 s acknowledgement timeout).
	srv.WithholdPubacks(50)
	done := make(chan error, 1)
	go func() { done <- o.Write(batch) }()

	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	_, err := srv.WaitReceived(ctx, 500)
	require.NoError(t, err)
	srv.Stop()
	select {
	case err := <-done:
		t.Fatalf("Write returned before the bridge came back: %v", err)
	default:
	}
	require.NoError(t, srv.Restart())

	select {
	case err := <-done:
		require.NoError(t, err)
	case <-ctx.Done():
		t.Fatalf("Write did not complete after the bridge restarted; stats %+v; bridge %+v; errors %+v; log:\n%s", stats(o), srv.Stats(), srv.ErrorsSent(), logOf(o))
	}
	got, dups := receivedKeys(t, srv.Received())
	require.ElementsMatch(t, sentKeys(t, omnicore.KindEvents, batch), got)
	require.GreaterOrEqual(t, len(gatewayConnections(srv)), 2)
	require.Equal(t, 50, srv.Stats().Withheld)
	t.Logf("%d metrics delivered across a restart, %d duplicates, %d retries", len(batch), dups, stats(o).Retries)
}

// TestIntegrationRefusedDevice: devices the bridge refuses to attach (not
// bound, unknown) are counted and dropped without holding up the others,
// whether or not the bridge acknowledges the failed attach.
func TestIntegrationRefusedDevice(t *testing.T) {
	for _, puback := range []bool{true, false} {
		t.Run(fmt.Sprintf("attach failure puback %v", puback), func(t *testing.T) {
			devices := deviceIDs(50)
			srv, key := startBridge(t, devices...)
			srv.SetRules(func(r *emulator.Rules) { r.AttachFailurePuback = puback })
			require.NoError(t, srv.AddDevice(itRegistry, emulator.Device{ID: "stranger"}))
			o := connectPlugin(t, srv, key)

			var good, batch []telegraf.Metric
			for i, d := range devices {
				mt := m("sensor", map[string]string{"device_id": d}, i)
				good = append(good, mt)
				batch = append(batch, mt)
				if i%10 == 0 {
					batch = append(batch,
						m("sensor", map[string]string{"device_id": "stranger"}, i),
						m("sensor", map[string]string{"device_id": "ghost"}, i))
				}
			}
			start := time.Now()
			require.NoError(t, o.Write(batch))
			elapsed := time.Since(start)

			got, _ := receivedKeys(t, srv.Received())
			require.ElementsMatch(t, sentKeys(t, omnicore.KindEvents, good), got)
			require.Equal(t, uint64(len(batch)-len(good)), stats(o).DroppedByReason[dropAttachRefused])
			require.GreaterOrEqual(t, logOf(o).count("W", "attach refused"), 1, logOf(o).String())
			t.Logf("Write with refused devices took %s", elapsed.Round(time.Millisecond))
		})
	}
}

func TestIntegrationQoS0(t *testing.T) {
	devices := deviceIDs(100)
	srv, key := startBridge(t, devices...)
	o := connectPlugin(t, srv, key, func(o *OmniCore) { o.QoS = 0 })

	var batch []telegraf.Metric
	for i, d := range devices {
		batch = append(batch, m("sensor", map[string]string{"device_id": d}, i))
	}
	require.NoError(t, o.Write(batch))
	// At QoS 0 a Write ends when the messages are written, not received.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	msgs, err := srv.WaitReceived(ctx, len(batch))
	require.NoError(t, err)
	for _, msg := range msgs {
		require.Zero(t, msg.QoS)
	}
	got, _ := receivedKeys(t, msgs)
	require.ElementsMatch(t, sentKeys(t, omnicore.KindEvents, batch), got)
}

func TestIntegrationTLS(t *testing.T) {
	devices := deviceIDs(10)
	batch := make([]telegraf.Metric, 0, len(devices))
	for i, d := range devices {
		batch = append(batch, m("sensor", map[string]string{"device_id": d}, i))
	}

	t.Run("emulator CA", func(t *testing.T) {
		srv, key := startBridge(t, devices...)
		ca, err := srv.WriteCAFile(t.TempDir())
		require.NoError(t, err)
		o := connectPlugin(t, srv, key, func(o *OmniCore) {
			o.Servers = []string{srv.TLSURL}
			o.TLSCA = ca
		})
		require.NoError(t, o.Write(batch))
		got, _ := receivedKeys(t, srv.Received())
		require.ElementsMatch(t, sentKeys(t, omnicore.KindEvents, batch), got)
		conns := gatewayConnections(srv)
		require.Len(t, conns, 1)
		require.Equal(t, "tls", conns[0].Listener)
	})

	t.Run("unknown CA is refused", func(t *testing.T) {
		srv, key := startBridge(t, devices...)
		other := emulator.NewServer()
		defer other.Close()
		ca, err := other.WriteCAFile(t.TempDir())
		require.NoError(t, err)
		o := startPlugin(t, srv, key, func(o *OmniCore) {
			o.Servers = []string{srv.TLSURL}
			o.TLSCA = ca
			o.WriteTimeout = config.Duration(2 * time.Second)
		})
		err = o.Write(batch)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		require.Empty(t, srv.Received())
		require.Empty(t, gatewayConnections(srv))
		require.GreaterOrEqual(t, logOf(o).count("E", "certificate"), 1, logOf(o).String())
	})
}

// TestIntegrationSessionRetriesAtOnceAfterConnectionLoss shows a bug of the
// gateway session (plugins/common/gateway): Session.send calls paho's
// Publish, which blocks while paho's writer is busy, for up to paho's write
// timeout (the timeout option). When the connection drops, the publishes
// queued there are neither failed nor retried until that timeout ends, so a
// Write that could finish right after the reconnect waits the whole timeout
// (60 s here, 10 s by default) although the bridge is reachable again.
func TestIntegrationSessionRetriesAtOnceAfterConnectionLoss(t *testing.T) {
	srv, key := startBridge(t, "dev1")
	proxy := newTCPProxy(t, strings.TrimPrefix(srv.URL, "tcp://"))
	o := connectPlugin(t, srv, key, func(o *OmniCore) {
		o.Servers = []string{proxy.URL()}
		o.Timeout = config.Duration(time.Minute)
		o.WriteTimeout = config.Duration(3 * time.Minute)
	})
	tags := map[string]string{"device_id": "dev1"}
	require.NoError(t, o.Write([]telegraf.Metric{m("cpu", tags, 0)}))

	// The link stops carrying data: 25 MB of telemetry fill the socket
	// buffers, paho's writer blocks, the session's publishers block in
	// paho's Publish and the other publishes queue behind them.
	proxy.pause()
	batch := repeatSized(t, "big", tags, 250_000, 100)
	done := make(chan error, 1)
	go func() { done <- o.Write(batch) }()
	waitForGoroutines(t, "paho%2emqtt%2egolang.(*client).Publish(", 1)
	waitForGoroutines(t, "gateway.(*Session).sendKeep(", 30)

	// The connection drops and the bridge is reachable again at once.
	proxy.cut()
	proxy.resume()
	cut := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	require.NoError(t, srv.WaitFor(ctx, func() bool { return len(gatewayConnections(srv)) >= 2 }))
	select {
	case err := <-done:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatalf("the Write is still waiting %s after the reconnect (%d goroutines blocked in paho's Publish): "+
			"publishes queued in paho's Publish when the connection dropped are retried only when the timeout option (1m) ends",
			time.Since(cut).Round(time.Second), countGoroutines("paho%2emqtt%2egolang.(*client).Publish("))
	}
	got, _ := receivedKeys(t, srv.Received())
	require.Len(t, got, len(batch)+1)
}

// waitForGoroutines waits until at least n goroutines have frame in their
// stack (at most 20 s).
func waitForGoroutines(t *testing.T, frame string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for countGoroutines(frame) < n {
		if time.Now().After(deadline) {
			t.Fatalf("fewer than %d goroutines in %s", n, frame)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func countGoroutines(frame string) int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return strings.Count(string(buf[:n]), frame)
		}
		buf = make([]byte, 2*len(buf))
	}
}

// TestIntegrationLayoutAutoUnderTheRateCap runs layout auto against a bridge
// that closes any connection above 100 messages/s: 4,000 metrics of 100
// devices in one Write arrive exactly once, on one connection that was never
// closed, in about one message per device.
func TestIntegrationLayoutAutoUnderTheRateCap(t *testing.T) {
	devices := deviceIDs(100)
	srv := emulator.NewServer(emulator.WithRules(func(r *emulator.Rules) {
		r.MaxMessageRate = 100
		r.RateAction = emulator.RateClose
	}))
	t.Cleanup(srv.Close)
	key := srv.AddTestGateway(t, itRegistry, itGateway, omnicore.ES256, devices...)
	o := connectPlugin(t, srv, key, func(o *OmniCore) {
		o.Devices = devices
		o.Layout = layoutAuto
		o.MaxMessageRate = 100
	})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	require.NoError(t, srv.WaitAttached(ctx, itRegistry, itGateway, devices...))

	var all []telegraf.Metric
	for round := range 40 {
		for _, d := range devices {
			all = append(all, m("sensor", map[string]string{"device_id": d}, round))
		}
	}
	require.NoError(t, o.Write(all))

	received := srv.Received()
	got, dups := receivedKeys(t, received)
	require.Zero(t, dups)
	require.ElementsMatch(t, sentKeys(t, omnicore.KindEvents, all), got)
	require.LessOrEqual(t, len(received), 100, "4,000 metrics fit in a second of the budget only packed")
	conns := gatewayConnections(srv)
	require.Len(t, conns, 1, "the bridge closed the connection for its rate")
	require.True(t, conns[0].Open())
}
