package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"github.com/influxdata/telegraf/config"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// poolSizes are the pool sizes of benchmark 8; the first is the baseline.
var poolSizes = []int{1, 2, 4}

// extraGateways registers gateways 2..n of the pool in emu (bench-gateway is
// the first), each with its own key and every device bound to it, and
// returns their gateways sub-tables.
func extraGateways(emu *emulator.Server, dir string, n int, devices []string) ([]pool.GatewayOptions, error) {
	var out []pool.GatewayOptions
	for i := 2; i <= n; i++ {
		id := fmt.Sprintf("%s-%d", gatewayID, i)
		priv, pub, err := omnicore.WriteKeyPair(dir, id, keyAlg)
		if err != nil {
			return nil, err
		}
		pem, err := os.ReadFile(pub)
		if err != nil {
			return nil, err
		}
		if err := emu.AddDevice(registryID, emulator.Device{ID: id, Gateway: true, AuthMethod: emulator.AssociationOnly,
			PublicKeys: []emulator.PublicKey{{Algorithm: keyAlg, PEM: pem}}}); err != nil {
			return nil, err
		}
		for _, d := range devices {
			if err := emu.Bind(registryID, id, d); err != nil {
				return nil, err
			}
		}
		out = append(out, pool.GatewayOptions{GatewayID: id, PrivateKey: priv})
	}
	return out, nil
}

// poolRun writes the timed metrics through a pool of gateways (the first
// len(gateways)+1 of the pool), one message per metric, with
// max_message_rate = 100 on each connection, and returns metrics/s and the
// publishes the emulator had to throttle.
func poolRun(ctx context.Context, emu *emulator.Server, id identity, gateways []pool.GatewayOptions, devices []string, metrics int) (float64, int, error) {
	o, err := newOurOutput(emu.URL, id, func(o *outomni.OmniCore) {
		o.Layout = "non-batch"
		o.MaxMessageRate = bridgeRate
		o.Gateways = gateways
		// A Write of 1000 metrics at 100 messages/s takes 10 s on one
		// gateway: longer than the default write_timeout, which is sized
		// for Telegraf's flush, not for a benchmark's Writes.
		o.WriteTimeout = config.Duration(10 * time.Minute)
	})
	if err != nil {
		return 0, 0, err
	}
	if err := o.Connect(); err != nil {
		return 0, 0, err
	}
	defer o.Close()
	if err := waitConnected(ctx, o); err != nil {
		return 0, 0, err
	}
	start := time.Unix(1_700_000_000, 0)
	// Untimed: one metric per device places and attaches every device.
	if err := writeAll(ctx, o, batches(genMetrics(len(devices), len(devices), start), 1000)); err != nil {
		return 0, 0, fmt.Errorf("warm-up: %w", err)
	}
	timed := batches(genMetrics(metrics, len(devices), start.Add(time.Hour)), 1000)
	throttled := emu.Stats().Throttled
	began := time.Now()
	if err := writeAll(ctx, o, timed); err != nil {
		return 0, 0, err
	}
	took := time.Since(began)
	return float64(metrics) / took.Seconds(), emu.Stats().Throttled - throttled, nil
}

// waitConnected waits until every gateway of o is connected: a Write that
// starts before gives up within a second (Telegraf would write it again),
// which is not what a throughput figure measures.
func waitConnected(ctx context.Context, o *outomni.OmniCore) error {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for !o.GatewayConn().Stats().Connected {
		select {
		case <-t.C:
		case <-ctx.Done():
			return fmt.Errorf("the gateways did not connect: %w", ctx.Err())
		}
	}
	return nil
}

// benchPool is benchmark 8: a pool of 1, 2 and 4 gateways under the bridge's
// 100 messages/s per connection.
func (b *bench) benchPool(ctx context.Context) error {
	n := b.sz.poolDevices
	emu, err := startEmulator(b.pub, n, emulator.WithRules(func(r *emulator.Rules) {
		r.MaxMessageRate = bridgeRate
		r.RateAction = emulator.RateThrottle
	}))
	if err != nil {
		return err
	}
	defer emu.Close()
	devices := deviceIDs(n)
	extra, err := extraGateways(emu, b.dir, poolSizes[len(poolSizes)-1], devices)
	if err != nil {
		return err
	}
	results := map[int][]float64{}
	totalThrottled := 0
	for run := 0; run < b.opts.runs; run++ {
		for _, k := range poolSizes {
			metrics := b.sz.poolMetricsPerGateway * k
			progress("  run %d/%d: %d gateway(s), %d metrics", run+1, b.opts.runs, k, metrics)
			v, th, err := poolRun(ctx, emu, b.id, extra[:k-1], devices, metrics)
			if err != nil {
				return fmt.Errorf("%d gateways: %w", k, err)
			}
			results[k] = append(results[k], v)
			totalThrottled += th
			progress("    %s (the emulator throttled %d publishes)", formatValue(v, "metrics/s"), th)
		}
	}
	base := poolSizes[0]
	for _, k := range poolSizes[1:] {
		r := &row{id: "8", name: fmt.Sprintf("pool of gateways under the bridge's %d messages/s per connection, %d devices, one message per metric", bridgeRate, n),
			unit: "metrics/s", oursLabel: fmt.Sprintf("%d gateways", k), peerLabel: fmt.Sprintf("%d gateway", base),
			ours: results[k], peer: results[base]}
		r.note = fmt.Sprintf("goal: linear, a ratio of %d; emulator Rules.MaxMessageRate = %d with RateAction throttle, max_message_rate = %d on each connection; devices placed by rendezvous hashing, so the busiest gateway (not the mean) sets the pace; %d metrics per gateway per run; the emulator throttled %d publishes in all runs",
			k/base, bridgeRate, bridgeRate, b.sz.poolMetricsPerGateway, totalThrottled)
		r.slowerWhy = "unexpected: more connections carry more messages; check the problems"
		b.rows = append(b.rows, r)
	}
	return nil
}
