package omnicore

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/models"
	"github.com/influxdata/telegraf/selfstat"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
)

// TestPartialWriteIndices: inside Telegraf a Write that cannot deliver
// everything in time reports which metrics of the batch were acknowledged
// and which were given up on; the rest is to be kept. Nothing is remembered
// between Writes (Telegraf keeps only the rest).
func TestPartialWriteIndices(t *testing.T) {
	conn := &blockingConn{Conn: gatewaytest.New("gw"), blocked: map[string]bool{"slow": true}}
	o := newPlugin(t, conn, func(o *OmniCore) {
		o.WriteTimeout = config.Duration(100 * time.Millisecond)
		o.StateMetrics = []string{"status"}
	})
	batch := []telegraf.Metric{
		m("cpu", map[string]string{"device_id": "fast"}, 1),    // 0 acked
		m("cpu", map[string]string{"device_id": "slow"}, 1),    // 1 kept
		m("status", map[string]string{"device_id": "fast"}, 1), // 2 coalesced: rejected
		m("status", map[string]string{"device_id": "fast"}, 2), // 3 acked
		m("cpu", map[string]string{"device_id": "bad/id"}, 1),  // 4 invalid: rejected
		m("cpu", map[string]string{"device_id": "slow"}, 2),    // 5 kept
	}
	err := o.Write(batch)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	var werr *writeError
	require.ErrorAs(t, err, &werr)
	require.Equal(t, []int{0, 3}, werr.accept)
	require.Equal(t, []int{2, 4}, werr.reject)
}

// partialTarget has the shape of Telegraf's internal.PartialWriteError.
type partialTarget struct {
	Err                 error
	MetricsAccept       []int
	MetricsReject       []int
	MetricsRejectErrors []error
}

type wrongShape struct {
	Err           error
	MetricsAccept []string
}

func TestWriteErrorFill(t *testing.T) {
	base := errors.New("not acknowledged")
	e := &writeError{err: base, accept: []int{0, 2}, reject: []int{1}}
	const self = "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"

	var p *partialTarget
	require.True(t, e.fill(&p, self+".partialTarget"))
	require.Equal(t, &partialTarget{Err: base, MetricsAccept: []int{0, 2}, MetricsReject: []int{1}}, p)

	tests := []struct {
		name   string
		target any
		typ    string
	}{
		{"other type name", new(*partialTarget), self + ".other"},
		{"wrong field type", new(*wrongShape), self + ".wrongShape"},
		{"not a pointer to pointer", new(partialTarget), self + ".partialTarget"},
		{"nil", nil, self + ".partialTarget"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.False(t, e.fill(tt.target, tt.typ))
		})
	}
}

// TestPartialWriteInTelegrafsBuffer runs the plugin in Telegraf's own
// RunningOutput: after a partial write the buffer holds exactly the metrics
// that were not acknowledged, and the next write sends only those.
func TestPartialWriteInTelegrafsBuffer(t *testing.T) {
	conn := &blockingConn{Conn: gatewaytest.New("gw"), blocked: map[string]bool{"slow": true}}
	o := newPlugin(t, conn, func(o *OmniCore) {
		o.WriteTimeout = config.Duration(100 * time.Millisecond)
	})
	ro := models.NewRunningOutput(o, &models.OutputConfig{Name: "omnicore_partial_test"}, 100, 1000)
	t.Cleanup(func() {
		selfstat.Unregister("write", "errors", map[string]string{"output": "omnicore_partial_test", "_id": ""})
	})
	for i := range 10 {
		dev := "fast"
		if i%3 == 0 {
			dev = "slow"
		}
		ro.AddMetric(m("cpu", map[string]string{"device_id": dev}, i))
	}
	ro.AddMetric(m("cpu", map[string]string{"device_id": "bad/id"}, 99))
	require.Equal(t, 11, ro.BufferLength())

	require.Error(t, ro.WriteBatch())
	require.Len(t, conn.Published(), 6)
	require.Equal(t, 4, ro.BufferLength(), "the 4 metrics of the slow device stay; 6 acknowledged and 1 rejected leave")

	conn.unblock("slow")
	require.NoError(t, ro.WriteBatch())
	require.Len(t, conn.Published(), 10, "only the 4 kept metrics are sent again")
	require.Equal(t, 0, ro.BufferLength())
}

// downConn is a gateway whose connection is down: nothing is acknowledged.
type downConn struct{ *blockingConn }

func (c downConn) Stats() gateway.Stats {
	s := c.blockingConn.Stats()
	s.Connected = false
	return s
}

// A Write that starts while the gateway is not connected gives up after
// disconnectedWriteTimeout, not write_timeout, keeping every metric: Telegraf's
// flush, and its stop, are not held for write_timeout while the bridge is
// down.
func TestWriteWhileDisconnected(t *testing.T) {
	conn := downConn{&blockingConn{Conn: gatewaytest.New("gw"), blocked: map[string]bool{"dev": true}}}
	o := newPlugin(t, conn, func(o *OmniCore) {
		o.WriteTimeout = config.Duration(time.Hour)
	})
	result := make(chan error, 1)
	go func() { result <- o.Write([]telegraf.Metric{m("cpu", map[string]string{"device_id": "dev"}, 1)}) }()
	var err error
	select {
	case err = <-result:
	case <-time.After(time.Minute):
		t.Fatal("Write waited for write_timeout while the gateway was down")
	}
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "the gateway is not connected to the bridge")
	var werr *writeError
	require.ErrorAs(t, err, &werr)
	require.Empty(t, werr.accept)
	require.Empty(t, werr.reject)
}
