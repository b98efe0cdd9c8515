package omnicore

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gatewaystats"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

// newPoolPlugin is the plugin with the top-level gateway and gw-b, each on
// its own fake.
func newPoolPlugin(t *testing.T, mutate func(*OmniCore)) (*OmniCore, map[string]*gatewaytest.Conn) {
	t.Helper()
	fakes := map[string]*gatewaytest.Conn{}
	p, _ := newPlugin(t, func(p *OmniCore) {
		p.Gateways = []pool.GatewayOptions{{GatewayID: "gw-b", PrivateKey: writeKey(t)}}
		p.acquire = func(cfg *gateway.Config) (gateway.Conn, func(), error) {
			f := gatewaytest.New(cfg.GatewayID)
			fakes[cfg.GatewayID] = f
			return f, func() {}, nil
		}
		if mutate != nil {
			mutate(p)
		}
	})
	return p, fakes
}

func TestPoolListensThroughEveryGateway(t *testing.T) {
	tests := []struct {
		listen string
		// subscribers per fake once started: errors plus SubscribeAll, or
		// errors plus the gateway's own and the devices it carries.
		wantSubs func(devicesCarried int) int
	}{
		{listenAttached, func(int) int { return 2 }},
		{listenConfigured, func(n int) int { return 2 + n }},
	}
	for _, tt := range tests {
		t.Run(tt.listen, func(t *testing.T) {
			devices := []string{"dev-1", "dev-2", "dev-3", "dev-4", "dev-5", "dev-6"}
			p, fakes := newPoolPlugin(t, func(p *OmniCore) {
				p.Listen = tt.listen
				p.Devices = devices
			})
			var acc testutil.Accumulator
			require.NoError(t, p.Start(&acc))
			t.Cleanup(p.Stop)
			pl := p.conn.(*pool.Pool)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			// Every device placed and attached on its carrier, and each
			// gateway's subscriptions made. The condition reads the pool
			// and both fakes, so it is checked after a change of either
			// fake: waiting on one fake alone missed the last change when
			// it happened on the other (the test then timed out with the
			// condition true, about 1 run in 15).
			listening := func(id string) bool {
				f, n := fakes[id], 0
				for _, d := range devices {
					switch pl.Carrier(d) {
					case "":
						return false
					case id:
						if !f.Attached(d) {
							return false
						}
						n++
					}
				}
				return f.Subscribers() == tt.wantSubs(n)
			}
			require.NoError(t, gatewaytest.WaitForAll(ctx, func() bool {
				return listening(testGateway) && listening("gw-b")
			}, fakes[testGateway], fakes["gw-b"]), "%d and %d subscribers", fakes[testGateway].Subscribers(), fakes["gw-b"].Subscribers())
			// Config and commands of each device from its carrier only; each
			// gateway's own config from itself.
			for _, d := range devices {
				for id, f := range fakes {
					f.Deliver(configMsg(d, "cfg-"+d+"-via-"+id))
				}
			}
			fakes[testGateway].Deliver(configMsg(testGateway, "own-a"))
			fakes["gw-b"].Deliver(configMsg("gw-b", "own-b"))
			fakes["gw-b"].Deliver(errorMsg(`{"error_type":"X","device_id":"d"}`))
			waitMetrics(t, &acc, len(devices)+3)
			got := map[string]string{}
			for _, m := range acc.GetTelegrafMetrics() {
				dev, _ := m.GetTag("device_id")
				gw, _ := m.GetTag("gateway_id")
				payload, _ := m.GetField("payload")
				if m.Name() == measurementError {
					require.Equal(t, "gw-b", gw)
					continue
				}
				got[dev] = gw
				if s, ok := payload.(string); ok && dev != testGateway && dev != "gw-b" {
					require.Equal(t, "cfg-"+dev+"-via-"+gw, s)
				}
			}
			for _, d := range devices {
				require.Equal(t, pl.Carrier(d), got[d], d)
			}
			require.Equal(t, testGateway, got[testGateway])
			require.Equal(t, "gw-b", got["gw-b"])
			require.Equal(t, uint64(len(devices)+3), acc.NMetrics(), "nothing twice")

			var stats testutil.Accumulator
			require.NoError(t, p.Gather(&stats))
			require.Len(t, stats.GetTelegrafMetrics(), 2)
			for i, m := range stats.GetTelegrafMetrics() {
				require.Equal(t, gatewaystats.Measurement, m.Name())
				require.Equal(t, []string{testGateway, "gw-b"}[i], m.Tags()["gateway_id"])
				require.Contains(t, m.Fields(), "pool_devices")
				_, own := m.GetField("messages_received")
				require.Equal(t, i == 0, own, "the plugin's own counters once, with the top-level gateway")
			}
		})
	}
}

func TestPoolDevicesLimit(t *testing.T) {
	devices := make([]string, 10001)
	for i := range devices {
		devices[i] = fmt.Sprintf("dev-%05d", i)
	}
	// Over one gateway's limit, within two gateways'.
	p, _ := newPoolPlugin(t, func(p *OmniCore) { p.Devices = devices })
	require.Len(t, p.cfgs, 2)
}
