package pool

import "github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"

// StartHealth starts the health state publisher (gateway.StartHealth) of
// each gateway of conn, a pool's members or the one gateway, and returns
// the function that stops them all.
func StartHealth(conn gateway.Conn, set gateway.HealthSettings) (stop func()) {
	var stops []func()
	for _, g := range Gateways(conn) {
		stops = append(stops, gateway.StartHealth(g.Conn, set))
	}
	return func() {
		for _, s := range stops {
			s()
		}
	}
}
