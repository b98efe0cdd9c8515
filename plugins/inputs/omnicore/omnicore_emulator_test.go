package omnicore

// Integration tests: the plugin with the real gateway session against the
// bridge emulator on loopback. They run in every `go test` (no Docker, no
// network) and wait on events with bounded timeouts.

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/inputs"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// eventTimeout bounds every wait for something the bridge or the session does.
const eventTimeout = 15 * time.Second

// bridge is an emulator with a gateway bound to the given devices.
type bridge struct {
	srv *emulator.Server
	key string
}

func newBridge(t *testing.T, devices ...string) *bridge {
	t.Helper()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	key := srv.AddTestGateway(t, testRegistry, testGateway, omnicore.ES256, devices...)
	return &bridge{srv: srv, key: key}
}

// plugin builds the plugin from the factory with the real session.
func (b *bridge) plugin(t *testing.T, mutate func(*OmniCore)) *OmniCore {
	t.Helper()
	p := inputs.Inputs["omnicore"]().(*OmniCore)
	b.connectTo(&p.Options)
	p.Log = testutil.Logger{Name: "inputs.omnicore"}
	if mutate != nil {
		mutate(p)
	}
	require.NoError(t, p.Init())
	p.Host.Route = gateway.RouteExecd // as the execd binary sets it
	return p
}

// connectTo sets the connection options of a plugin (either) for the
// gateway of b.
func (b *bridge) connectTo(o *gateway.Options) {
	o.Servers = []string{b.srv.URL}
	o.SubscriptionID = b.srv.Subscription()
	o.RegistryID = testRegistry
	o.GatewayID = testGateway
	o.PrivateKey = b.key
	o.Algorithm = omnicore.ES256
	o.MaxReconnectInterval = config.Duration(time.Second)
}

func (b *bridge) waitSubscribed(t *testing.T, device string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	require.NoError(t, b.srv.WaitFor(ctx, func() bool {
		return b.srv.Subscribed(testRegistry, device, omnicore.KindCommands) &&
			b.srv.Subscribed(testRegistry, device, omnicore.KindConfig)
	}), "device %q was not subscribed", device)
}

// waitUntil waits, bounded, until cond holds, checking after every metric
// added to acc.
func waitUntil(t *testing.T, acc *testutil.Accumulator, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(eventTimeout)
	for {
		n := int(acc.NMetrics())
		if cond() {
			return
		}
		more := make(chan struct{})
		go func() {
			acc.Wait(n + 1)
			close(more)
		}()
		select {
		case <-more:
		case <-deadline:
			t.Fatalf("timed out waiting for %s; have %d metrics: %v", what, acc.NMetrics(), acc.GetTelegrafMetrics())
		}
	}
}

// waitForMetric waits until acc holds a metric that match accepts and
// returns the first one.
func waitForMetric(t *testing.T, acc *testutil.Accumulator, what string, match func(telegraf.Metric) bool) telegraf.Metric {
	t.Helper()
	var found telegraf.Metric
	waitUntil(t, acc, what, func() bool {
		for _, m := range acc.GetTelegrafMetrics() {
			if match(m) {
				found = m
				return true
			}
		}
		return false
	})
	return found
}

// payloadOf matches a raw metric by name, device and payload.
func payloadOf(name, device, payload string) func(telegraf.Metric) bool {
	return func(m telegraf.Metric) bool {
		d, _ := m.GetTag("device_id")
		v, _ := m.GetField("payload")
		return m.Name() == name && d == device && v == payload
	}
}

func count(acc *testutil.Accumulator, match func(telegraf.Metric) bool) int {
	n := 0
	for _, m := range acc.GetTelegrafMetrics() {
		if match(m) {
			n++
		}
	}
	return n
}

func gatherStats(t *testing.T, p *OmniCore) map[string]any {
	t.Helper()
	var acc testutil.Accumulator
	require.NoError(t, p.Gather(&acc))
	ms := acc.GetTelegrafMetrics()
	require.Len(t, ms, 1)
	return ms[0].Fields()
}

func TestEmulatorConfigAndCommands(t *testing.T) {
	b := newBridge(t, "dev1", "dev2")
	// Set before Start: delivered when the subscription is made.
	_, err := b.srv.SetConfig(testRegistry, "dev1", []byte(`{"interval":10}`))
	require.NoError(t, err)

	p := b.plugin(t, func(p *OmniCore) { p.Devices = []string{"dev1", "dev2"} })
	var acc testutil.Accumulator
	require.NoError(t, p.Start(&acc))
	defer p.Stop()

	waitForMetric(t, &acc, "the config set before Start", payloadOf("omnicore_config", "dev1", `{"interval":10}`))
	// dev2 and the gateway have no config: the bridge sends an empty one.
	waitForMetric(t, &acc, "dev2's empty config", payloadOf("omnicore_config", "dev2", ""))
	waitForMetric(t, &acc, "the gateway's empty config", payloadOf("omnicore_config", testGateway, ""))
	b.waitSubscribed(t, "dev1")
	b.waitSubscribed(t, testGateway)

	_, err = b.srv.SetConfig(testRegistry, "dev1", []byte(`{"interval":20}`))
	require.NoError(t, err)
	require.NoError(t, b.srv.SendCommand(testRegistry, "dev1", "", []byte("reboot")))
	require.NoError(t, b.srv.SendCommand(testRegistry, "dev1", "valve", []byte("open")))
	require.NoError(t, b.srv.SendCommand(testRegistry, "dev1", "pump/2/speed", []byte("1500")))
	require.NoError(t, b.srv.SendCommand(testRegistry, testGateway, "", []byte("ping")))
	last := waitForMetric(t, &acc, "the gateway's command", payloadOf("omnicore_command", testGateway, "ping"))
	require.Equal(t, "command", last.Tags()["kind"])

	// One connection delivers in order, so everything sent before the
	// gateway's command is in; each exactly once.
	want := []telegraf.Metric{
		metric.New("omnicore_config", tags("dev1", "config"), map[string]any{"payload": `{"interval":10}`}, time.Time{}),
		metric.New("omnicore_config", tags("dev2", "config"), map[string]any{"payload": ""}, time.Time{}),
		metric.New("omnicore_config", tags(testGateway, "config"), map[string]any{"payload": ""}, time.Time{}),
		metric.New("omnicore_config", tags("dev1", "config"), map[string]any{"payload": `{"interval":20}`}, time.Time{}),
		metric.New("omnicore_command", tags("dev1", "command"), map[string]any{"payload": "reboot"}, time.Time{}),
		metric.New("omnicore_command", tags("dev1", "command", "subfolder", "valve"), map[string]any{"payload": "open"}, time.Time{}),
		metric.New("omnicore_command", tags("dev1", "command", "subfolder", "pump/2/speed"), map[string]any{"payload": "1500"}, time.Time{}),
		metric.New("omnicore_command", tags(testGateway, "command"), map[string]any{"payload": "ping"}, time.Time{}),
	}
	testutil.RequireMetricsEqual(t, want, acc.GetTelegrafMetrics(), testutil.SortMetrics(), testutil.IgnoreTime())

	stats := gatherStats(t, p)
	require.Equal(t, int64(1), stats["connected"])
	require.Equal(t, int64(len(want)), stats["messages_received"])
	require.Equal(t, int64(2), stats["attached"])
}

func TestEmulatorAttachErrorBecomesMetric(t *testing.T) {
	b := newBridge(t, "dev1")
	// Registered but not bound to the gateway: the attach is refused.
	require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{ID: "ghost"}))

	p := b.plugin(t, func(p *OmniCore) {
		p.Devices = []string{"dev1", "ghost"}
		p.Listen = listenConfigured
	})
	var acc testutil.Accumulator
	require.NoError(t, p.Start(&acc))
	defer p.Stop()

	m := waitForMetric(t, &acc, "the attachment error", func(m telegraf.Metric) bool { return m.Name() == "omnicore_error" })
	require.Equal(t, tags("ghost", "error", "error_type", omnicore.ErrorAttachment), m.Tags())
	fields := m.Fields()
	require.Contains(t, fields["description"], "'ghost' is not bound to the gateway 'gw'")
	require.Equal(t, "PUBLISH", fields["message_type"])
	require.Equal(t, "/reg/ghost/attach", fields["topic"])
	require.IsType(t, int64(0), fields["packet_id"])
	require.NotZero(t, fields["packet_id"])

	// The refused device does not keep the others from working.
	b.waitSubscribed(t, "dev1")
	require.NoError(t, b.srv.SendCommand(testRegistry, "dev1", "", []byte("still here")))
	waitForMetric(t, &acc, "dev1's command", payloadOf("omnicore_command", "dev1", "still here"))
	require.Zero(t, count(&acc, func(m telegraf.Metric) bool {
		d, _ := m.GetTag("device_id")
		return d == "ghost" && m.Name() != "omnicore_error"
	}))
}

func TestEmulatorSubscriptionsSurviveRestart(t *testing.T) {
	b := newBridge(t, "dev1")
	_, err := b.srv.SetConfig(testRegistry, "dev1", []byte("v1"))
	require.NoError(t, err)

	p := b.plugin(t, func(p *OmniCore) {
		p.Devices = []string{"dev1"}
		p.Listen = listenConfigured
	})
	var acc testutil.Accumulator
	require.NoError(t, p.Start(&acc))
	defer p.Stop()
	config1 := payloadOf("omnicore_config", "dev1", "v1")
	waitForMetric(t, &acc, "the first config", config1)
	b.waitSubscribed(t, "dev1")

	b.srv.Stop()
	require.NoError(t, b.srv.Restart())

	// The session reconnects, re-attaches and re-subscribes; the bridge then
	// sends the config again.
	waitUntil(t, &acc, "the config delivered again", func() bool { return count(&acc, config1) >= 2 })
	b.waitSubscribed(t, "dev1")
	require.NoError(t, b.srv.SendCommand(testRegistry, "dev1", "after/restart", []byte("x")))
	cmd := waitForMetric(t, &acc, "the command after the restart", payloadOf("omnicore_command", "dev1", "x"))
	require.Equal(t, "after/restart", cmd.Tags()["subfolder"])
	require.Equal(t, 2, count(&acc, config1), "the config is delivered once per connection")

	stats := gatherStats(t, p)
	require.Equal(t, int64(2), stats["connects"])
	require.GreaterOrEqual(t, stats["connection_lost"], int64(1))
}

// With listen = "attached" the input must also receive the config and
// commands of a device that another user of the same session (the output
// plugin) attaches after the input started.
func TestEmulatorListenAttachedFollowsOutputAttaches(t *testing.T) {
	b := newBridge(t, "dev1", "late")
	p := b.plugin(t, func(p *OmniCore) { p.Devices = []string{"dev1"} })
	var acc testutil.Accumulator
	require.NoError(t, p.Start(&acc))
	defer p.Stop()
	b.waitSubscribed(t, "dev1")

	// The output plugin of the same process shares the session and
	// publishes telemetry for a device the input was not told about.
	conn, release, err := gateway.Acquire(p.cfg)
	require.NoError(t, err)
	defer release()
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	require.NoError(t, conn.Publish(ctx, gateway.Message{Device: "late", Kind: omnicore.KindEvents, Payload: []byte("t=1"), QoS: 1}))

	b.waitSubscribed(t, "late")
	require.NoError(t, b.srv.SendCommand(testRegistry, "late", "", []byte("hello late")))
	waitForMetric(t, &acc, "the late device's command", payloadOf("omnicore_command", "late", "hello late"))
}

func TestEmulatorStopLeavesNoSubscription(t *testing.T) {
	b := newBridge(t, "dev1")
	p := b.plugin(t, func(p *OmniCore) { p.Devices = []string{"dev1"} })
	var acc testutil.Accumulator
	require.NoError(t, p.Start(&acc))
	b.waitSubscribed(t, "dev1")

	stopped := make(chan struct{})
	go func() {
		p.Stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(eventTimeout):
		t.Fatal("Stop did not return")
	}
	// The last user released the session: the connection is closed.
	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	require.NoError(t, b.srv.WaitFor(ctx, func() bool {
		for _, c := range b.srv.Connections() {
			if c.Open() && strings.HasSuffix(c.ClientID, "/devices/"+testGateway) {
				return false
			}
		}
		return true
	}))
}
