package gatewaystats

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/selfstat"
	"github.com/influxdata/telegraf/testutil"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

// errorsConn adds bridge errors to the fake's counters, and can hide its
// gauges as a session does once their reporter went quiet.
type errorsConn struct {
	*gatewaytest.Conn
	errors   map[string]uint64
	noGauges atomic.Bool
}

func (c *errorsConn) Stats() gateway.Stats {
	s := c.Conn.Stats()
	s.ErrorsByType = c.errors
	if c.noGauges.Load() {
		s.Gauges = nil
	}
	return s
}

// internal returns the internal_omnicore series of gateway gw, nil when
// there is none; there is never more than one.
func internal(t *testing.T, gw string) telegraf.Metric {
	t.Helper()
	var found telegraf.Metric
	for _, m := range selfstat.Metrics() {
		if m.Name() != InternalMeasurement || m.Tags()["gateway_id"] != gw {
			continue
		}
		require.Nil(t, found, "one series per gateway")
		found = m
	}
	return found
}

func TestExport(t *testing.T) {
	conn := &errorsConn{Conn: gatewaytest.New("gw-stats"), errors: map[string]uint64{"GATEWAY_ATTACHMENT_ERROR": 3}}
	require.NoError(t, conn.Publish(context.Background(), gateway.Message{Device: "d1", Kind: omnicore.KindEvents, QoS: 1}))
	conn.CountDrop("too_large", 2)
	conn.CountDrop("invalid_device", 5)
	conn.ReportGauges("spool", map[string]int64{"spool_bytes": 4096})

	stopOut := Export(conn, "gw-stats", "reg", nil)
	stopIn := Export(conn, "gw-stats", "reg", func() map[string]int64 {
		return map[string]int64{"messages_received": 7, "undelivered": 1}
	})

	m := internal(t, "gw-stats")
	require.NotNil(t, m)
	require.Equal(t, map[string]string{"gateway_id": "gw-stats", "registry_id": "reg"}, m.Tags())
	want := map[string]any{
		"connected": int64(1), "connects": int64(1), "published": int64(1), "acked": int64(1), "attached": int64(1),
		"connect_failures": int64(0), "connection_lost": int64(0), "token_renewals": int64(0),
		"attaches_ok": int64(0), "attaches_failed": int64(0), "detaches": int64(0), "retries": int64(0), "received": int64(0),
		"devices_known": int64(0), "devices_refused": int64(0), "resent_after_error": int64(0),
		"duplicate_suspected": int64(0), "states_coalesced": int64(0),
		"errors_gateway_attachment_error": int64(3), "dropped_too_large": int64(2), "dropped_invalid_device": int64(5),
		"spool_bytes": int64(4096), "messages_received": int64(7), "undelivered": int64(1),
	}
	require.Equal(t, want, m.Fields())

	// A gauge whose reporter went quiet leaves the series at the next
	// refresh.
	conn.noGauges.Store(true)
	exporters.mu.Lock()
	e := exporters.m[conn]
	exporters.mu.Unlock()
	e.refresh()
	require.NotContains(t, internal(t, "gw-stats").Fields(), "spool_bytes")

	// One user leaving keeps the series; the last one removes it.
	stopOut()
	stopOut() // idempotent
	require.NotNil(t, internal(t, "gw-stats"))
	stopIn()
	require.Nil(t, internal(t, "gw-stats"))
}

// Two plugins' own counters are summed; a second connection is a second
// exporter.
func TestExportSharedAndSeparate(t *testing.T) {
	a, b := gatewaytest.New("gw-a"), gatewaytest.New("gw-b")
	own := func(n int64) func() map[string]int64 {
		return func() map[string]int64 { return map[string]int64{"messages_received": n} }
	}
	stops := []func(){
		Export(a, "gw-a", "reg", own(1)),
		Export(a, "gw-a", "reg", own(2)),
		Export(b, "gw-b", "reg", own(10)),
	}
	defer func() {
		for _, s := range stops {
			s()
		}
	}()
	v, _ := internal(t, "gw-a").GetField("messages_received")
	require.Equal(t, int64(3), v)
	v, _ = internal(t, "gw-b").GetField("messages_received")
	require.Equal(t, int64(10), v)
}

func TestExportEachGatewayOfAPool(t *testing.T) {
	a, b := gatewaytest.New("gw-each-a"), gatewaytest.New("gw-each-b")
	p, err := pool.New([]pool.Member{{Conn: a}, {Conn: b}}, pool.Options{HealthInterval: time.Hour})
	require.NoError(t, err)
	defer p.Close()
	for _, d := range []string{"d1", "d2", "d3", "d4", "d5", "d6"} {
		require.NoError(t, p.Publish(context.Background(), gateway.Message{Device: d, Kind: omnicore.KindEvents, QoS: 1}))
	}
	stop := ExportEach(p, "reg", func() map[string]int64 { return map[string]int64{"messages_received": 4} })
	defer stop()

	devices := int64(0)
	for i, gw := range []string{"gw-each-a", "gw-each-b"} {
		m := internal(t, gw)
		require.NotNil(t, m, gw)
		require.Equal(t, map[string]string{"gateway_id": gw, "registry_id": "reg"}, m.Tags())
		n, ok := m.GetField("pool_devices")
		require.True(t, ok)
		devices += n.(int64)
		up, _ := m.GetField("pool_up")
		require.Equal(t, int64(1), up)
		_, own := m.GetField("messages_received")
		require.Equal(t, i == 0, own, "the plugin's own counters with the top-level gateway only")
		published, _ := m.GetField("published")
		require.Equal(t, n, published, "each device published once, on its gateway")
	}
	require.Equal(t, int64(6), devices)

	stop()
	require.Nil(t, internal(t, "gw-each-a"))
	require.Nil(t, internal(t, "gw-each-b"))
}

// The two exports of the same connection carry the same series: the same
// tags, field names, types and values, on each gateway of a pool, with
// counters, drops, bridge errors, reported gauges and the plugin's own
// counters.
func TestGatherAndExportAgree(t *testing.T) {
	a := &errorsConn{Conn: gatewaytest.New("gw-agree-a"), errors: map[string]uint64{"GATEWAY_DEVICE_NOT_FOUND": 2}}
	b := gatewaytest.New("gw-agree-b")
	p, err := pool.New([]pool.Member{{Conn: a}, {Conn: b}}, pool.Options{HealthInterval: time.Hour})
	require.NoError(t, err)
	defer p.Close()
	for _, d := range []string{"d1", "d2", "d3", "d4"} {
		require.NoError(t, p.Publish(context.Background(), gateway.Message{Device: d, Kind: omnicore.KindEvents, QoS: 1}))
	}
	p.CountDrop("invalid_device", 3)
	b.CountDrop("too_large", 1)
	p.ReportGauges("spool", map[string]int64{"spool_records": 12})
	own := func() map[string]int64 { return map[string]int64{"messages_received": 5, "parse_errors": 1} }

	stop := ExportEach(p, "reg", own)
	defer stop()
	var acc testutil.Accumulator
	Gather(&acc, p, "reg", own)

	gathered := acc.GetTelegrafMetrics()
	require.Len(t, gathered, 2)
	for i, gw := range []string{"gw-agree-a", "gw-agree-b"} {
		g := gathered[i]
		require.Equal(t, Measurement, g.Name())
		require.Equal(t, gw, g.Tags()["gateway_id"], "the top-level gateway first")
		in := internal(t, gw)
		require.NotNil(t, in, gw)
		require.Equal(t, InternalMeasurement, in.Name())
		require.Equal(t, g.Tags(), in.Tags(), gw)
		require.Equal(t, g.Fields(), in.Fields(), gw)
		for k, v := range g.Fields() {
			require.IsType(t, int64(0), v, "%s of %s", k, gw)
		}
	}
	top := gathered[0].Fields()
	require.Equal(t, int64(2), top["errors_gateway_device_not_found"])
	require.Equal(t, int64(3), top["dropped_invalid_device"])
	require.Equal(t, int64(12), top["spool_records"])
	require.Equal(t, int64(5), top["messages_received"])
	require.Equal(t, int64(1), gathered[1].Fields()["dropped_too_large"])
	require.NotContains(t, gathered[1].Fields(), "messages_received")
}

// The output's and the input's pools of one gateway share its series built
// in: their figures add up, and pool_up is 1 only while both have it up.
func TestMerge(t *testing.T) {
	f := fields(gateway.Stats{Connected: true},
		map[string]int64{pool.FieldUp: 1, "pool_devices": 2, "messages_received": 3},
		map[string]int64{pool.FieldUp: 0, "pool_devices": 5})
	require.Equal(t, int64(0), f[pool.FieldUp])
	require.Equal(t, int64(7), f["pool_devices"])
	require.Equal(t, int64(3), f["messages_received"])
	require.Equal(t, int64(1), f["connected"])
}

// Gather without a pool: one series, the plugin's own counters on it.
func TestGatherOneGateway(t *testing.T) {
	conn := gatewaytest.New("gw-one")
	var acc testutil.Accumulator
	Gather(&acc, conn, "reg", func() map[string]int64 { return map[string]int64{"undelivered": 2} })
	ms := acc.GetTelegrafMetrics()
	require.Len(t, ms, 1)
	require.Equal(t, map[string]string{"gateway_id": "gw-one", "registry_id": "reg"}, ms[0].Tags())
	fields := conn.Stats().Fields()
	fields["undelivered"] = 2
	want := make(map[string]any, len(fields))
	for k, v := range fields {
		want[k] = v
	}
	require.Equal(t, want, ms[0].Fields())
	require.NotContains(t, ms[0].Fields(), "pool_devices")
}
