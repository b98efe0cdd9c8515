package omnicore

import (
	"fmt"
	"testing"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

// TestGatewaysSubTables loads a plugin table with gateways sub-tables with
// Telegraf's config loader.
func TestGatewaysSubTables(t *testing.T) {
	conf := `
[[outputs.omnicore]]
  servers = ["tls://bridge.example:8883"]
  subscription_id = "sub"
  registry_id = "reg"
  gateway_id = "gw-a"
  private_key = "/keys/gw-a.key"
  algorithm = "ES256"
  data_format = "influx"

  [[outputs.omnicore.gateways]]
    gateway_id = "gw-b"
    private_key = "/keys/gw-b.key"

  [[outputs.omnicore.gateways]]
    gateway_id = "gw-c"
    private_key = "/keys/gw-c.key"
    algorithm = "RS256"
`
	c := config.NewConfig()
	require.NoError(t, c.LoadConfigData([]byte(conf), config.EmptySourcePath))
	require.Len(t, c.Outputs, 1)
	o := c.Outputs[0].Output.(*OmniCore)
	require.Equal(t, "gw-a", o.GatewayID)
	require.Equal(t, []pool.GatewayOptions{
		{GatewayID: "gw-b", PrivateKey: "/keys/gw-b.key"},
		{GatewayID: "gw-c", PrivateKey: "/keys/gw-c.key", Algorithm: "RS256"},
	}, o.Gateways)

	c = config.NewConfig()
	err := c.LoadConfigData([]byte(conf+"    key_id = \"x\"\n"), config.EmptySourcePath)
	require.ErrorContains(t, err, "key_id", "unknown keys of a sub-table are rejected")
}

func TestWriteThroughAPoolOfGateways(t *testing.T) {
	fakes := map[string]*gatewaytest.Conn{}
	o := factoryPlugin(t)
	o.Gateways = []pool.GatewayOptions{{GatewayID: "gw-b", PrivateKey: keyFile(t)}, {GatewayID: "gw-c", PrivateKey: keyFile(t)}}
	o.acquire = func(cfg *gateway.Config) (gateway.Conn, func(), error) {
		f := gatewaytest.New(cfg.GatewayID)
		fakes[cfg.GatewayID] = f
		return f, func() {}, nil
	}
	require.NoError(t, o.Init())
	require.NoError(t, o.Connect())
	t.Cleanup(func() { require.NoError(t, o.Close()) })
	require.Len(t, fakes, 3)

	const n = 300
	var ms []telegraf.Metric
	for i := range n {
		ms = append(ms, m("cpu", map[string]string{"device_id": fmt.Sprintf("dev-%03d", i)}, i))
	}
	ms = append(ms, m("cpu", map[string]string{"device_id": "gw-c"}, 1))
	require.NoError(t, o.Write(ms))

	carried := map[string]string{}
	for id, f := range fakes {
		for _, msg := range f.Published() {
			_, dup := carried[msg.Device]
			require.False(t, dup, "device %s published twice", msg.Device)
			carried[msg.Device] = id
		}
		require.Greater(t, len(f.Published()), n/6, "gateway %s carries a share", id)
	}
	require.Len(t, carried, n+1)
	require.Equal(t, "gw-c", carried["gw-c"], "a gateway's own telemetry goes through it")
	p := o.conn.(*pool.Pool)
	for d, gw := range carried {
		if d != "gw-c" {
			require.Equal(t, gw, p.Carrier(d))
			require.True(t, fakes[gw].Attached(d))
		}
	}
}
