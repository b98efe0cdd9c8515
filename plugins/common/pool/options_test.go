package pool

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func TestConfigs(t *testing.T) {
	dir := t.TempDir()
	rsaKey, _ := emulator.NewDeviceKey(t, dir, "gw-a", omnicore.RS256)
	esKey, _ := emulator.NewDeviceKey(t, dir, "gw-b", omnicore.ES256)
	top := gateway.DefaultOptions()
	top.Servers = []string{"tls://bridge.example:8883"}
	top.SubscriptionID = "sub"
	top.RegistryID = "reg"
	top.GatewayID = "gw-a"
	top.PrivateKey = rsaKey
	top.MaxMessageRate = 90

	tests := []struct {
		name    string
		extra   []GatewayOptions
		wantErr string
		check   func(t *testing.T, cfgs []*gateway.Config)
	}{
		{name: "top-level only", check: func(t *testing.T, cfgs []*gateway.Config) {
			require.Len(t, cfgs, 1)
			require.Equal(t, "gw-a", cfgs[0].GatewayID)
		}},
		{name: "own key and algorithm, the rest from the top level", extra: []GatewayOptions{{GatewayID: "gw-b", PrivateKey: esKey, Algorithm: "ES256"}},
			check: func(t *testing.T, cfgs []*gateway.Config) {
				require.Len(t, cfgs, 2)
				require.Equal(t, "gw-b", cfgs[1].GatewayID)
				require.Equal(t, "reg", cfgs[1].RegistryID)
				require.InDelta(t, 90, cfgs[1].MaxMessageRate, 0)
				require.NotEqual(t, cfgs[0].ClientID(), cfgs[1].ClientID())
			}},
		{name: "algorithm defaults to the top level's", extra: []GatewayOptions{{GatewayID: "gw-b", PrivateKey: esKey}}, wantErr: `gateways[1] ("gw-b"): private_key`},
		{name: "missing gateway_id", extra: []GatewayOptions{{PrivateKey: esKey}}, wantErr: "gateways[1]: gateway_id is required"},
		{name: "missing key", extra: []GatewayOptions{{GatewayID: "gw-b"}}, wantErr: "private_key is required"},
		{name: "same as top level", extra: []GatewayOptions{{GatewayID: "gw-a", PrivateKey: rsaKey}}, wantErr: "already in the pool"},
		{name: "listed twice", extra: []GatewayOptions{{GatewayID: "gw-b", PrivateKey: rsaKey}, {GatewayID: "gw-b", PrivateKey: rsaKey}}, wantErr: `gateways[2] ("gw-b"): gateway_id is already`},
		{name: "bad id", extra: []GatewayOptions{{GatewayID: "gw/b", PrivateKey: rsaKey}}, wantErr: "gateway_id"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfgs, err := Configs(top, tt.extra, nil)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			tt.check(t, cfgs)
		})
	}
}
