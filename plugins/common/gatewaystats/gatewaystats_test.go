package gatewaystats

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/selfstat"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// errorsConn adds bridge errors to the fake's counters.
type errorsConn struct {
	*gatewaytest.Conn
	errors map[string]uint64
}

func (c *errorsConn) Stats() gateway.Stats {
	s := c.Conn.Stats()
	s.ErrorsByType = c.errors
	return s
}

// series returns the internal_omnicore metrics of gateway gw, keyed by
// their reason or error_type tag ("" for the main series).
func series(t *testing.T, gw string) map[string]telegraf.Metric {
	t.Helper()
	out := make(map[string]telegraf.Metric)
	for _, m := range selfstat.Metrics() {
		if m.Name() != "internal_"+Measurement || m.Tags()["gateway_id"] != gw {
			continue
		}
		key := m.Tags()["reason"] + m.Tags()["error_type"]
		require.NotContains(t, out, key)
		out[key] = m
	}
	return out
}

func TestExport(t *testing.T) {
	conn := &errorsConn{Conn: gatewaytest.New("gw-stats"), errors: map[string]uint64{"GATEWAY_ATTACHMENT_ERROR": 3}}
	require.NoError(t, conn.Publish(context.Background(), gateway.Message{Device: "d1", Kind: omnicore.KindEvents, QoS: 1}))
	conn.CountDrop("too_large", 2)
	conn.CountDrop("invalid_device", 5)

	stopOut := Export(conn, "gw-stats", "reg", nil)
	stopIn := Export(conn, "gw-stats", "reg", func() map[string]int64 {
		return map[string]int64{"messages_received": 7, "undelivered": 1}
	})

	s := series(t, "gw-stats")
	require.Len(t, s, 4, "the gateway series, two drop reasons and one error type")
	main := s[""]
	require.Equal(t, map[string]string{"gateway_id": "gw-stats", "registry_id": "reg"}, main.Tags())
	for field, want := range map[string]int64{"connected": 1, "connects": 1, "published": 1, "acked": 1, "messages_received": 7, "undelivered": 1} {
		v, ok := main.GetField(field)
		require.True(t, ok, field)
		require.Equal(t, want, v, field)
	}
	for key, want := range map[string]struct {
		field string
		n     int64
		tag   string
	}{
		"too_large":                {"dropped", 2, "reason"},
		"invalid_device":           {"dropped", 5, "reason"},
		"GATEWAY_ATTACHMENT_ERROR": {"errors", 3, "error_type"},
	} {
		m := s[key]
		require.NotNil(t, m, key)
		require.Equal(t, key, m.Tags()[want.tag])
		require.Equal(t, map[string]any{want.field: want.n}, m.Fields(), key)
	}

	// One user leaving keeps the series; the last one removes them.
	stopOut()
	stopOut() // idempotent
	require.Len(t, series(t, "gw-stats"), 4)
	stopIn()
	require.Empty(t, series(t, "gw-stats"))
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
	v, _ := series(t, "gw-a")[""].GetField("messages_received")
	require.Equal(t, int64(3), v)
	v, _ = series(t, "gw-b")[""].GetField("messages_received")
	require.Equal(t, int64(10), v)
}
