// Package gatewaystats is the statistics of a plugin's gateway connection:
// one series per gateway (each member of a pool, or the plugin's one
// gateway), in one schema on both routes, exported two ways:
//
//   - Gather adds them to an accumulator as the omnicore_gateway metric: it
//     is inputs.omnicore's Gather, built into Telegraf and under execd alike;
//   - Export and ExportEach publish them through Telegraf's selfstat when the
//     plugins run inside Telegraf, so that inputs.internal reports them as
//     internal_omnicore next to Telegraf's own internal_write,
//     internal_gather... (Under execd selfstat would stay in the plugin's
//     process, which nothing gathers.)
//
// Both take a series' fields from the same place: the connection's counters
// (gateway.Stats.Fields), the pool's figures of the gateway
// (pool.MemberStatus.Fields) and the plugin's own counters on the top-level
// gateway's series; tags gateway_id and registry_id. Every field is an
// int64, the only type selfstat carries. The schema is documented once, in
// the input plugin's README ("Metrics").
package gatewaystats

import (
	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

// Measurement is the statistics metric Gather emits.
const Measurement = "omnicore_gateway"

// selfstatName is the selfstat measurement of the same series;
// inputs.internal emits it as InternalMeasurement.
const selfstatName = "omnicore"

// InternalMeasurement is the name inputs.internal gives the series that
// Export publishes.
const InternalMeasurement = "internal_" + selfstatName

// Tags are the tags of gateway gatewayID's series.
func Tags(gatewayID, registryID string) map[string]string {
	return map[string]string{"gateway_id": gatewayID, "registry_id": registryID}
}

// Gather adds one Measurement metric per gateway of conn to acc, the
// top-level gateway first, with the plugin's own counters (own, may be nil)
// on the top-level gateway's series.
func Gather(acc telegraf.Accumulator, conn gateway.Conn, registryID string, own func() map[string]int64) {
	for i, g := range pool.Gateways(conn) {
		var extra []map[string]int64
		if add := plugin(g, i == 0, own); add != nil {
			extra = append(extra, add())
		}
		f := fields(g.Conn.Stats(), extra...)
		anyFields := make(map[string]any, len(f))
		for k, v := range f {
			anyFields[k] = v
		}
		acc.AddFields(Measurement, anyFields, Tags(g.ID, registryID))
	}
}

// plugin returns what one plugin adds to the series of gateway g of its
// connection: the pool's figures of g and, on the top-level gateway
// (first), the plugin's own counters. nil when nothing.
func plugin(g pool.Gateway, first bool, own func() map[string]int64) func() map[string]int64 {
	var parts []func() map[string]int64
	if g.PoolFields != nil {
		parts = append(parts, g.PoolFields)
	}
	if first && own != nil {
		parts = append(parts, own)
	}
	if len(parts) == 0 {
		return nil
	}
	return func() map[string]int64 {
		f := make(map[string]int64)
		for _, part := range parts {
			merge(f, part())
		}
		return f
	}
}

// fields are a gateway's series: its connection's counters plus what each
// plugin that uses the connection adds.
func fields(stats gateway.Stats, plugins ...map[string]int64) map[string]int64 {
	f := stats.Fields()
	for _, p := range plugins {
		merge(f, p)
	}
	return f
}

// merge adds src to dst: counters and gauges add up (two plugins' own
// counters, two pools' figures of one gateway, built in where the output
// and the input share the gateway's series); pool_up takes the lower, so
// that it is 1 only while the gateway is up in each pool.
func merge(dst, src map[string]int64) {
	for k, v := range src {
		old, ok := dst[k]
		switch {
		case !ok:
			dst[k] = v
		case k == pool.FieldUp:
			dst[k] = min(old, v)
		default:
			dst[k] = old + v
		}
	}
}
