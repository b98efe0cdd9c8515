package main

import (
	"context"
	"fmt"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// bridgeRate is the bridge's per-connection message limit assumed by
// benchmark 5 (docs/bridge.md: about 100 messages/s).
const bridgeRate = 100

// rateRun writes ms in Writes of 1000 with the given layout and
// max_message_rate = 100 against an emulator that throttles above 100
// messages/s, and returns metrics/s and the publishes the emulator had to
// throttle.
func rateRun(ctx context.Context, emu *emulator.Server, id identity, devices []string, layout string, ms []telegraf.Metric) (float64, int, error) {
	o, err := newOurOutput(emu.URL, id, func(o *outomni.OmniCore) {
		o.Layout = layout
		o.MaxMessageRate = bridgeRate
		o.Devices = devices
	})
	if err != nil {
		return 0, 0, err
	}
	if err := o.Connect(); err != nil {
		return 0, 0, err
	}
	defer o.Close()
	// The devices option attaches them in the background; wait for it, so
	// that the timed part is telemetry only.
	wctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := emu.WaitAttached(wctx, registryID, gatewayID, devices...); err != nil {
		return 0, 0, fmt.Errorf("attaching the devices: %w", err)
	}
	throttled := emu.Stats().Throttled
	start := time.Now()
	if err := writeAll(ctx, o, batches(ms, 1000)); err != nil {
		return 0, 0, err
	}
	took := time.Since(start)
	return float64(len(ms)) / took.Seconds(), emu.Stats().Throttled - throttled, nil
}

// benchRateLimit is benchmark 5.
func (b *bench) benchRateLimit(ctx context.Context) error {
	n := b.sz.rateDevices
	emu, err := startEmulator(b.pub, n, emulator.WithRules(func(r *emulator.Rules) {
		r.MaxMessageRate = bridgeRate
		r.RateAction = emulator.RateThrottle
	}))
	if err != nil {
		return err
	}
	defer emu.Close()
	devices := deviceIDs(n)
	start := time.Unix(1_700_000_000, 0)
	nonBatch := genMetrics(b.sz.rateNonBatch, n, start)
	batch := genMetrics(b.sz.rateBatchWrites*1000, n, start)

	r := &row{id: "5", name: fmt.Sprintf("under the bridge's %d messages/s limit, %d devices, Writes of 1000 metrics", bridgeRate, n),
		unit: "metrics/s", oursLabel: "layout batch", peerLabel: "layout non-batch"}
	var throttled []int
	for run := 0; run < b.opts.runs; run++ {
		order := []string{"batch", "non-batch"}
		if run%2 == 1 {
			order = []string{"non-batch", "batch"}
		}
		for _, layout := range order {
			ms := batch
			if layout == "non-batch" {
				ms = nonBatch
			}
			progress("  run %d/%d: layout %s, %d metrics", run+1, b.opts.runs, layout, len(ms))
			v, th, err := rateRun(ctx, emu, b.id, devices, layout, ms)
			if err != nil {
				r.addProblem("%s: %v", layout, err)
				continue
			}
			throttled = append(throttled, th)
			if layout == "batch" {
				r.ours = append(r.ours, v)
			} else {
				r.peer = append(r.peer, v)
			}
			progress("    %s (the emulator throttled %d publishes)", formatValue(v, "metrics/s"), th)
		}
	}
	total := 0
	for _, t := range throttled {
		total += t
	}
	r.note = fmt.Sprintf("emulator Rules.MaxMessageRate = %d with RateAction throttle, ours max_message_rate = %d; batch sends one message per device per Write (%d metrics each), non-batch one per metric; the emulator throttled %d publishes in all runs (0 = our pacing kept under the limit)",
		bridgeRate, bridgeRate, 1000/n, total)
	r.slowerWhy = "unexpected: batch sends fewer messages; check the problems"
	b.rows = append(b.rows, r)
	return nil
}
