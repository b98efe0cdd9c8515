package gateway

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Config errors a new user meets are caught at start and say what to fix.
func TestValidateStartErrors(t *testing.T) {
	key, _, err := omnicore.WriteKeyPair(t.TempDir(), "gw", omnicore.ES256)
	require.NoError(t, err)
	base := DefaultOptions()
	base.Servers = []string{"tls://mqtt.example.com:8883"}
	base.SubscriptionID, base.RegistryID, base.GatewayID = "sub", "reg", "gw"
	base.PrivateKey, base.Algorithm = key, omnicore.ES256
	_, err = base.Validate(nil)
	require.NoError(t, err, "the base options must be valid")

	tests := []struct {
		name    string
		set     func(*Options)
		wantErr string
	}{
		{"placeholder", func(o *Options) { o.Servers = []string{"tls://<hostprefix>.mqtt.korewireless.com:8883"} },
			`still holds a placeholder such as <hostprefix>: replace it with your subscription's host prefix`},
		{"no port", func(o *Options) { o.Servers = []string{"tls://mqtt.example.com"} },
			`server "tls://mqtt.example.com" has no port: add it, e.g. tls://mqtt.example.com:8883`},
		{"empty port", func(o *Options) { o.Servers = []string{"tls://mqtt.example.com:"} }, "has no port"},
		{"port out of range", func(o *Options) { o.Servers = []string{"tls://mqtt.example.com:70000"} }, "port must be 1-65535"},
		{"no host", func(o *Options) { o.Servers = []string{"tls://:8883"} }, "has no host name"},
		{"one missing", func(o *Options) { o.RegistryID = "" }, "registry_id is required"},
		{"all missing, in a fixed order", func(o *Options) { *o = DefaultOptions() },
			"servers, subscription_id, registry_id, gateway_id, private_key are required"},
		{"some missing, in a fixed order", func(o *Options) { o.PrivateKey, o.SubscriptionID, o.GatewayID = "", "", "" },
			"subscription_id, gateway_id, private_key are required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			opt := base
			tt.set(&opt)
			for range 5 { // the same message every time
				_, err := opt.Validate(nil)
				require.ErrorContains(t, err, tt.wantErr)
			}
		})
	}
}
