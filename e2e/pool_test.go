package e2e

import (
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// A pool of two gateways through a real Telegraf, both routes: the output
// spreads 20 devices over both, each device attached once; the input listens
// through both and emits a device's config and commands once, tagged with
// the gateway that carries it; the plugins share each gateway's connection.
func TestPoolOfTwoGateways(t *testing.T) {
	for _, r := range routes {
		t.Run(r.name, func(t *testing.T) { testPoolOfTwoGateways(t, r) })
	}
}

func testPoolOfTwoGateways(t *testing.T, r route) {
	s := newSetup(t)
	devices := deviceNames("meter", 20)
	gwA := s.gatewayFor("plant", "gw-a", devices...)
	gwB := s.gatewayFor("plant", "gw-b", devices...) // binds the same devices
	pool := []string{
		"[[outputs.omnicore.gateways]]",
		"  gateway_id = " + Quote(gwB.ID),
		"  private_key = " + Quote(gwB.PrivateKey),
	}
	inPool := slices.Clone(pool)
	inPool[0] = "[[inputs.omnicore.gateways]]"

	received := filepath.Join(s.dir, "received.lp")
	tg := s.startBin(r.bin(), Agent(500*time.Millisecond, 100*time.Millisecond)+
		fileInput(s.telemetryFile(devices))+
		s.output(r, gwA, pool...)+
		s.input(r, gwA, devices, inPool...)+
		fileOutput(received, "omnicore_*", r.stats()))

	// carrier is the gateway each device is attached on (every device on
	// exactly one).
	carrier := func() map[string]string {
		out := map[string]string{}
		for _, set := range s.srv.AllAttachments() {
			for _, d := range set.Devices {
				if _, dup := out[d]; dup {
					out[d] = "twice"
					continue
				}
				out[d] = set.Gateway
			}
		}
		return out
	}
	s.waitEmulator(60*time.Second, "telemetry of every device, each attached once, subscribed", func() bool {
		counts := perDevice(s.srv.Received())
		c := carrier()
		for _, d := range devices {
			if counts[d] == 0 || (c[d] != "gw-a" && c[d] != "gw-b") || !s.srv.Subscribed("plant", d, omnicore.KindCommands) {
				return false
			}
		}
		return true
	})
	c := carrier()
	perGateway := map[string]int{}
	for _, d := range devices {
		perGateway[c[d]]++
	}
	require.Positive(t, perGateway["gw-a"], "both gateways carry devices: %v", perGateway)
	require.Positive(t, perGateway["gw-b"], "both gateways carry devices: %v", perGateway)

	// One device of each gateway gets a config and a command.
	var onA, onB string
	for _, d := range devices {
		switch {
		case c[d] == "gw-a" && onA == "":
			onA = d
		case c[d] == "gw-b" && onB == "":
			onB = d
		}
	}
	for _, d := range []string{onA, onB} {
		_, err := s.srv.SetConfig("plant", d, []byte(`{"rate":`+d[len(d)-2:]+`}`))
		require.NoError(t, err)
		require.NoError(t, s.srv.SendCommand("plant", d, "reset", []byte("now-"+d)))
	}
	find := func(ms []telegraf.Metric, name, device, payload string) []telegraf.Metric {
		var out []telegraf.Metric
		for _, m := range ms {
			dev, _ := m.GetTag("device_id")
			p, _ := m.GetField("payload")
			if m.Name() == name && dev == device && p == payload {
				out = append(out, m)
			}
		}
		return out
	}
	// The gateways' statistics series (not the per-reason ones).
	isStats := func(m telegraf.Metric) bool {
		return m.Name() == r.stats() && !m.HasTag("reason") && !m.HasTag("error_type")
	}
	gatewaySeries := func(ms []telegraf.Metric) map[string]bool {
		out := map[string]bool{}
		for _, m := range ms {
			if isStats(m) {
				if _, ok := m.GetField("pool_devices"); ok {
					out[m.Tags()["gateway_id"]] = true
				}
			}
		}
		return out
	}
	metrics := s.waitFile(60*time.Second, received, "configs, commands and both gateways' statistics", func(ms []telegraf.Metric) bool {
		for _, d := range []string{onA, onB} {
			if len(find(ms, "omnicore_config", d, `{"rate":`+d[len(d)-2:]+`}`)) == 0 || len(find(ms, "omnicore_command", d, "now-"+d)) == 0 {
				return false
			}
		}
		g := gatewaySeries(ms)
		return g["gw-a"] && g["gw-b"]
	})
	for _, d := range []string{onA, onB} {
		cfgs := find(metrics, "omnicore_config", d, `{"rate":`+d[len(d)-2:]+`}`)
		require.Len(t, cfgs, 1, "config of %s once", d)
		require.Equal(t, c[d], cfgs[0].Tags()["gateway_id"], "config of %s from its carrier", d)
		cmds := find(metrics, "omnicore_command", d, "now-"+d)
		require.Len(t, cmds, 1, "command of %s once", d)
		require.Equal(t, c[d], cmds[0].Tags()["gateway_id"])
		require.Equal(t, "reset", cmds[0].Tags()["subfolder"])
	}
	for _, m := range metrics {
		if isStats(m) {
			_, ok := m.GetField("pool_devices")
			require.True(t, ok, "pool fields in %s", m)
		}
	}

	// One connection per gateway for both plugins.
	for _, gw := range []string{"gw-a", "gw-b"} {
		recs := connections(s.srv, s.srv.ClientID("plant", gw))
		require.Len(t, recs, 1, "connections of %s: %+v", gw, recs)
		require.True(t, recs[0].Open())
	}
	require.Empty(t, errorLines(tg.Log()))

	// Every line written was delivered: the last gather's metrics arrive.
	before := perDevice(s.srv.Received())
	s.waitEmulator(30*time.Second, "more telemetry of every device", func() bool {
		now := perDevice(s.srv.Received())
		for _, d := range devices {
			if now[d] <= before[d] {
				return false
			}
		}
		return true
	})
	elapsed, err := tg.Stop(10 * time.Second)
	require.NoError(t, err, "Telegraf stopped in %s", elapsed)
	t.Logf("devices per gateway: %v", perGateway)
}
