package pool

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
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

func TestAcquireReleasesEveryMember(t *testing.T) {
	dir := t.TempDir()
	keyA, _ := emulator.NewDeviceKey(t, dir, "gw-a", omnicore.ES256)
	keyB, _ := emulator.NewDeviceKey(t, dir, "gw-b", omnicore.ES256)
	top := gateway.DefaultOptions()
	top.Servers = []string{"tls://bridge.example:8883"}
	top.SubscriptionID, top.RegistryID, top.GatewayID, top.PrivateKey, top.Algorithm = "sub", "reg", "gw-a", keyA, omnicore.ES256
	top.MaxDevices = 50
	top.MaxMessageRate = 7
	cfgs, err := Configs(top, []GatewayOptions{{GatewayID: "gw-b", PrivateKey: keyB}}, nil)
	require.NoError(t, err)

	released := map[string]int{}
	fakes := map[string]*gatewaytest.Conn{}
	acquire := func(cfg *gateway.Config) (gateway.Conn, func(), error) {
		f := gatewaytest.New(cfg.GatewayID)
		fakes[cfg.GatewayID] = f
		return f, func() { released[cfg.GatewayID]++ }, nil
	}
	p, release, err := Acquire(cfgs, acquire, Options{HealthInterval: time.Hour})
	require.NoError(t, err)
	require.Equal(t, []string{"gw-a", "gw-b"}, p.GatewayIDs())
	require.Equal(t, 50, p.members[1].maxDevices)
	require.InDelta(t, 7, p.members[1].maxRate, 0)
	release()
	require.Equal(t, map[string]int{"gw-a": 1, "gw-b": 1}, released)

	// A member that cannot start releases those acquired before it.
	released = map[string]int{}
	_, _, err = Acquire(cfgs, func(cfg *gateway.Config) (gateway.Conn, func(), error) {
		if cfg.GatewayID == "gw-b" {
			return nil, nil, errors.New("conflict")
		}
		return acquire(cfg)
	}, Options{})
	require.ErrorContains(t, err, `gateway "gw-b": conflict`)
	require.Equal(t, map[string]int{"gw-a": 1}, released)
}
