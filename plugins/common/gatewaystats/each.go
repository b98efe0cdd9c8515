package gatewaystats

import (
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

// ExportEach is Export for every gateway of a plugin's connection: one
// series per member of a pool (its gateway_id), with the pool's figures of
// that member, or the plugin's one gateway. own, the plugin's counters, goes
// with the first (top-level) gateway. The output and the input of one
// gateway share its series, so its pool figures are the sum of both
// plugins' pools.
func ExportEach(conn gateway.Conn, registryID string, own func() map[string]int64) (stop func()) {
	var stops []func()
	for i, g := range pool.Gateways(conn) {
		fields := g.PoolFields
		if i == 0 && own != nil {
			poolFields := fields
			fields = func() map[string]int64 {
				f := own()
				if poolFields != nil {
					for k, v := range poolFields() {
						f[k] += v
					}
				}
				return f
			}
		}
		stops = append(stops, Export(g.Conn, g.ID, registryID, fields))
	}
	return func() {
		for _, s := range stops {
			s()
		}
	}
}
