package omnicore

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// health_state_interval: at least 10s, and when on the gateway's health
// reaches the bridge as the gateway's state, naming the execd route.
func TestHealthStateInterval(t *testing.T) {
	b := newBridge(t)
	p := b.plugin(t, nil)
	require.Zero(t, p.HealthStateInterval, "off by default")
	p.HealthStateInterval = config.Duration(time.Second)
	require.ErrorContains(t, p.Init(), "health_state_interval")

	p = b.plugin(t, func(p *OmniCore) { p.HealthStateInterval = config.Duration(time.Minute) })
	var acc testutil.Accumulator
	require.NoError(t, p.Start(&acc))
	defer p.Stop()

	ctx, cancel := context.WithTimeout(context.Background(), eventTimeout)
	defer cancel()
	var h gateway.Health
	require.NoError(t, b.srv.WaitFor(ctx, func() bool {
		for _, m := range b.srv.Received() {
			if m.Kind == omnicore.KindState && m.Device == testGateway {
				return json.Unmarshal(m.Payload, &h) == nil
			}
		}
		return false
	}), "no health state from the input")
	require.Equal(t, gateway.RouteExecd, h.Route, "the plugin under execd")
	require.True(t, h.Connected)
}
