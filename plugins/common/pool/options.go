package pool

import (
	"errors"
	"fmt"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// GatewayOptions is one [[outputs.omnicore.gateways]] (or
// [[inputs.omnicore.gateways]]) sub-table: one more gateway identity of the
// plugin's pool. Every other connection setting (servers, subscription_id,
// registry_id, TLS, limits, device_auth and device_key_dir: device keys
// belong to the devices, not to a gateway) is the plugin's top-level one.
type GatewayOptions struct {
	GatewayID  string `toml:"gateway_id"`
	PrivateKey string `toml:"private_key"`
	// Algorithm defaults to the top-level algorithm.
	Algorithm string `toml:"algorithm"`
}

// Configs validates the plugin's top-level gateway and its gateways
// sub-tables, without network I/O: the pool's members, top-level first.
func Configs(top gateway.Options, extra []GatewayOptions, log telegraf.Logger) ([]*gateway.Config, error) {
	first, err := top.Validate(log)
	if err != nil {
		return nil, err
	}
	if len(extra)+1 > MaxMembers {
		return nil, fmt.Errorf("gateways: %d gateways in all, at most %d", len(extra)+1, MaxMembers)
	}
	cfgs := []*gateway.Config{first}
	seen := map[string]bool{first.GatewayID: true}
	for i, g := range extra {
		where := fmt.Sprintf("gateways[%d]", i+1)
		if g.GatewayID == "" {
			return nil, errors.New(where + ": gateway_id is required")
		}
		where += fmt.Sprintf(" (%q)", g.GatewayID)
		if seen[g.GatewayID] {
			return nil, fmt.Errorf("%s: gateway_id is already in the pool (the top-level gateway is its first member)", where)
		}
		seen[g.GatewayID] = true
		if g.PrivateKey == "" {
			return nil, fmt.Errorf("%s: private_key is required: the path of this gateway's own PEM private key", where)
		}
		o := top
		o.GatewayID, o.PrivateKey = g.GatewayID, g.PrivateKey
		if g.Algorithm != "" {
			o.Algorithm = g.Algorithm
		}
		cfg, err := o.Validate(log)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		cfgs = append(cfgs, cfg)
	}
	return cfgs, nil
}
