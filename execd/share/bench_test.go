//go:build linux || darwin || freebsd

package share

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// BenchmarkShareSocketOverhead publishes the same QoS 1 load through the
// owner's session directly and through the sharing socket of a second
// "process", in one run, and reports the ratio (socket/direct, 1 = no cost).
func BenchmarkShareSocketOverhead(b *testing.B) {
	br := newShareBridge(b, "dev-a", "dev-b", "dev-c", "dev-d")
	ctx := shareCtx(b, 10*time.Minute)
	ownerCfg := br.config(b, "output")
	ownerCfg.MaxInflight = 256
	owner, _ := br.acquire(b, ownerCfg)
	require.NoError(b, ownerSession(b, ctx, owner).WaitReady(ctx))
	client, _ := br.acquire(b, br.config(b, "input"))
	devices := []string{"dev-a", "dev-b", "dev-c", "dev-d"}
	payload := make([]byte, 200)

	run := func(conn gateway.Conn, n int) time.Duration {
		const workers = 128
		var wg sync.WaitGroup
		start := time.Now()
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += workers {
					msg := gateway.Message{Device: devices[i%len(devices)], Kind: omnicore.KindEvents, Payload: payload, QoS: 1}
					if err := conn.Publish(ctx, msg); err != nil {
						panic(fmt.Sprintf("publish: %v", err))
					}
				}
			}()
		}
		wg.Wait()
		return time.Since(start)
	}
	run(owner, 1000) // warm up: attaches
	run(client, 1000)
	b.ResetTimer()
	direct := run(owner, b.N)
	shared := run(client, b.N)
	b.StopTimer()
	b.ReportMetric(float64(b.N)/direct.Seconds(), "direct_msgs/s")
	b.ReportMetric(float64(b.N)/shared.Seconds(), "socket_msgs/s")
	b.ReportMetric(direct.Seconds()/shared.Seconds(), "socket/direct")
}
