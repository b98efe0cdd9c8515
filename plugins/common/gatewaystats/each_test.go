package gatewaystats

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

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
		main := series(t, gw)[""]
		require.NotNil(t, main, gw)
		require.Equal(t, map[string]string{"gateway_id": gw, "registry_id": "reg"}, main.Tags())
		n, ok := main.GetField("pool_devices")
		require.True(t, ok)
		devices += n.(int64)
		_, own := main.GetField("messages_received")
		require.Equal(t, i == 0, own, "the plugin's own counters with the top-level gateway only")
		published, _ := main.GetField("published")
		require.Equal(t, n, published, "each device published once, on its gateway")
	}
	require.Equal(t, int64(6), devices)

	stop()
	require.Empty(t, series(t, "gw-each-a"))
	require.Empty(t, series(t, "gw-each-b"))
}
