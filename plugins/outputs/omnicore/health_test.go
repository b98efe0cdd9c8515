package omnicore

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/influxdata/telegraf/config"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// health_state_interval: off by default, at least 10s, and when on the
// gateway's health reaches the bridge as the gateway's state.
func TestHealthStateInterval(t *testing.T) {
	require.Zero(t, factoryPlugin(t).HealthStateInterval, "off by default")
	o := factoryPlugin(t)
	o.HealthStateInterval = config.Duration(time.Second)
	require.ErrorContains(t, o.Init(), "health_state_interval")

	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	o = factoryPlugin(t)
	o.Servers, o.SubscriptionID = []string{srv.URL}, srv.Subscription()
	o.PrivateKey = srv.AddTestGateway(t, o.RegistryID, o.GatewayID, omnicore.ES256)
	o.HealthStateInterval = config.Duration(time.Minute)
	require.NoError(t, o.Init())
	require.NoError(t, o.Connect())
	defer func() { require.NoError(t, o.Close()) }()

	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	var h gateway.Health
	require.NoError(t, srv.WaitFor(ctx, func() bool {
		for _, m := range srv.Received() {
			if m.Kind == omnicore.KindState && m.Device == o.GatewayID {
				return json.Unmarshal(m.Payload, &h) == nil
			}
		}
		return false
	}), "no health state from the output")
	require.Equal(t, gateway.RouteBuiltIn, h.Route)
	require.True(t, h.Connected)
}
