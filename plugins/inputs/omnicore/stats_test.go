package omnicore

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/selfstat"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gatewaystats"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

// The statistics are one schema on both routes. Under execd the user sees
// the input's Gather (omnicore_gateway); built in the same Gather and, with
// inputs.internal, internal_omnicore through selfstat. The same events on
// each route (messages, a bridge error, drops, a reported spool gauge, on a
// pool of two gateways) give the same series in all three: tags, field
// names, types and values, every field an int64.
func TestStatisticsSameOnBothRoutes(t *testing.T) {
	devices := []string{"dev-1", "dev-2", "dev-3", "dev-4"}
	run := func(t *testing.T, execd bool) (gathered, internal []telegraf.Metric) {
		p, fakes := newPoolPlugin(t, func(p *OmniCore) {
			p.Devices = devices
			// The fake does not count bridge errors; gw-b's session would
			// have counted the one delivered below.
			acquire := p.acquire
			p.acquire = func(cfg *gateway.Config) (gateway.Conn, func(), error) {
				conn, release, err := acquire(cfg)
				if cfg.GatewayID == "gw-b" {
					conn = countedErrors{conn}
				}
				return conn, release, err
			}
		})
		if execd {
			p.Host.Route = gateway.RouteExecd // as the execd binary sets it
		}
		var acc testutil.Accumulator
		require.NoError(t, p.Start(&acc))
		t.Cleanup(p.Stop)
		pl := p.conn.(*pool.Pool)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		a, b := fakes[testGateway], fakes["gw-b"]
		require.NoError(t, gatewaytest.WaitForAll(ctx, func() bool {
			for _, d := range devices {
				if c := pl.Carrier(d); c == "" || !fakes[c].Attached(d) {
					return false
				}
			}
			return true
		}, a, b))
		for _, d := range devices {
			fakes[pl.Carrier(d)].Deliver(configMsg(d, "cfg"))
		}
		b.Deliver(errorMsg(`{"error_type":"GATEWAY_DEVICE_NOT_FOUND","device_id":"x"}`))
		waitMetrics(t, &acc, len(devices)+1)
		a.CountDrop("invalid_device", 2)
		b.CountDrop("too_large", 1)
		p.conn.ReportGauges("spool", map[string]int64{"spool_records": 7})

		var stats testutil.Accumulator
		require.NoError(t, p.Gather(&stats))
		gathered = stats.GetTelegrafMetrics()
		if execd {
			return gathered, nil
		}
		// selfstat holds values, refreshed every second: wait for the
		// refresh after the events above.
		require.Eventually(t, func() bool {
			internal = internalSeries(testGateway, "gw-b")
			return len(internal) == 2 && internal[0].Fields()["dropped_invalid_device"] == int64(2) &&
				internal[1].Fields()["dropped_too_large"] == int64(1) && internal[0].Fields()["messages_received"] == int64(len(devices)+1)
		}, 10*time.Second, 10*time.Millisecond)
		return gathered, internal
	}

	execd, _ := run(t, true)
	builtin, internal := run(t, false)

	require.Len(t, execd, 2, "one series per gateway of the pool")
	for i, gw := range []string{testGateway, "gw-b"} {
		want := execd[i]
		require.Equal(t, gatewaystats.Measurement, want.Name())
		require.Equal(t, map[string]string{"gateway_id": gw, "registry_id": testRegistry}, want.Tags())
		for k, v := range want.Fields() {
			require.IsType(t, int64(0), v, "%s of %s", k, gw)
		}
		for route, got := range map[string]telegraf.Metric{"built in, Gather": builtin[i], "built in, internal_omnicore": internal[i]} {
			require.Equal(t, want.Tags(), got.Tags(), "%s, %s", route, gw)
			require.Equal(t, want.Fields(), got.Fields(), "%s, %s", route, gw)
		}
		require.Equal(t, gatewaystats.Measurement, builtin[i].Name())
		require.Equal(t, "internal_omnicore", internal[i].Name())
	}
	top, second := execd[0].Fields(), execd[1].Fields()
	for field, want := range map[string]int64{
		"connected": 1, "pool_up": 1, "messages_received": int64(len(devices) + 1), "dropped_invalid_device": 2, "spool_records": 7,
	} {
		require.Equal(t, want, top[field], field)
	}
	require.Equal(t, int64(1), second["dropped_too_large"])
	require.Equal(t, int64(1), second["errors_gateway_device_not_found"])
	require.Equal(t, int64(len(devices)), top["pool_devices"].(int64)+second["pool_devices"].(int64))
	for _, field := range []string{"devices_known", "devices_refused", "resent_after_error"} {
		require.Contains(t, top, field)
	}
	require.NotContains(t, second, "messages_received", "the plugin's own counters on the top-level gateway only")

	// The README's table documents exactly these fields (a field per error
	// type, drop reason and spool gauge as one row each).
	emitted := map[string]bool{}
	for _, m := range execd {
		for k := range m.Fields() {
			for prefix, row := range map[string]string{"errors_": "errors_<error_type>", "dropped_": "dropped_<reason>", "spool_": "spool_*"} {
				if strings.HasPrefix(k, prefix) {
					k = row
				}
			}
			emitted[k] = true
		}
	}
	require.Equal(t, emitted, readmeStatisticsFields(t))
}

// readmeStatisticsFields are the fields the README's statistics table
// lists: the backticked names in the first column of its rows.
func readmeStatisticsFields(t *testing.T) map[string]bool {
	t.Helper()
	buf, err := os.ReadFile("README.md")
	require.NoError(t, err)
	section := string(buf)
	start := strings.Index(section, "\n### Gateway statistics\n")
	require.NotEqual(t, -1, start)
	section = section[start+1:]
	section = section[:strings.Index(section, "\n## ")]
	fields := map[string]bool{}
	for _, line := range strings.Split(section, "\n") {
		if !strings.HasPrefix(line, "| `") {
			continue
		}
		first := strings.Split(line, "|")[1]
		for _, name := range regexp.MustCompile("`([^`]+)`").FindAllStringSubmatch(first, -1) {
			fields[name[1]] = true
		}
	}
	return fields
}

// countedErrors is a fake that counted one GATEWAY_DEVICE_NOT_FOUND.
type countedErrors struct{ gateway.Conn }

func (c countedErrors) Stats() gateway.Stats {
	s := c.Conn.Stats()
	s.ErrorsByType = map[string]uint64{"GATEWAY_DEVICE_NOT_FOUND": 1}
	return s
}

// internalSeries returns the internal_omnicore series of the gateways, in
// their order, leaving out those that have none.
func internalSeries(gateways ...string) []telegraf.Metric {
	var out []telegraf.Metric
	for _, gw := range gateways {
		for _, m := range selfstat.Metrics() {
			if m.Name() == gatewaystats.InternalMeasurement && m.Tags()["gateway_id"] == gw {
				out = append(out, m)
			}
		}
	}
	return out
}
