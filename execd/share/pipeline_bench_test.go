//go:build linux || darwin || freebsd

package share

import (
	"context"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// instantConn is an owner's Conn whose Publish returns at once: what is left
// of a publish through the socket is the socket's own cost.
type instantConn struct{ shareFake }

func (c *instantConn) Publish(context.Context, gateway.Message) error { return nil }

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkShareSocketPublish measures the socket's own cost per publish:
// 200 callers (the output's workers) publish through one client connection
// to an owner whose session acknowledges at once. cpu-µs/msg is the CPU of
// both ends (one process here) per message.
func BenchmarkShareSocketPublish(b *testing.B) {
	rz, _ := serveFake(b, &instantConn{*newShareFake()}, nil)
	rc := dialFake(b, rz)
	ctx := shareCtx(b, 10*time.Minute)
	payload := make([]byte, 200)
	const workers = 200
	run := func(n int) {
		var wg sync.WaitGroup
		for w := range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := w; i < n; i += workers {
					msg := gateway.Message{Device: "device-0042", Kind: omnicore.KindEvents, Payload: payload, QoS: 1}
					if err := rc.Publish(ctx, msg); err != nil {
						b.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	run(2000)
	b.ResetTimer()
	cpu0, t0 := cpuTime(), time.Now()
	run(b.N)
	cpu, wall := cpuTime()-cpu0, time.Since(t0)
	b.StopTimer()
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/msg")
	b.ReportMetric(float64(b.N)/wall.Seconds(), "msgs/s")
}
