package main

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// bridgeRate is the bridge's per-connection message limit assumed by
// benchmark 5 (docs/bridge.md: about 100 messages/s).
const bridgeRate = 100

// flushInterval is the Telegraf flush_interval benchmark 5 plays.
const flushInterval = 10 * time.Second

// ourRate is the max_message_rate ours runs with: 10% under the cap. The
// bridge measures the rate at arrival; a pause of the path (here: of this
// process, which also runs the emulator) delivers what was paced during it
// in one burst, which a client pacing at exactly the cap turns into a
// message over it.
const ourRate = 0.9 * bridgeRate

// rateWriteTimeout is the write_timeout of benchmark 5.
const rateWriteTimeout = 20 * time.Second

// rateResult is one layout's run under the cap.
type rateResult struct {
	rate      float64 // metrics/s from the first flush to the last receipt
	p50, p99  float64 // ms from metric time to the bridge's receipt
	messages  int     // events messages the bridge accepted
	overCap   int     // publishes throttled, or connections closed, for the rate
	delivered tally
}

// flushMetrics makes the metrics Telegraf would hold at one flush: perDevice
// metrics for each device, their times spread over the flush interval
// before the flush (set by stamp).
func flushMetrics(devices, perDevice int) []telegraf.Metric {
	ms := make([]telegraf.Metric, devices*perDevice)
	for i := range ms {
		ms[i] = metric.New("sensor",
			map[string]string{"device_id": deviceID(i % devices)},
			map[string]any{"temperature": 20 + float64(i%100)/10, "humidity": int64(40 + i%20), "status": "ok"},
			time.Time{})
	}
	return ms
}

// stamp gives ms distinct times evenly over the interval before at, oldest
// first, as metrics gathered during one flush interval.
func stamp(ms []telegraf.Metric, at time.Time) {
	step := flushInterval / time.Duration(len(ms))
	start := at.Add(-flushInterval)
	for i, m := range ms {
		m.SetTime(start.Add(time.Duration(i) * step))
	}
}

// rateRun plays Telegraf flushing every 10 s into outputs.omnicore with
// the given layout and max_message_rate = 100, against an emulator
// enforcing the cap with action. Each flush is one Write of everything
// gathered since the last one (metric_batch_size raised to a flush's
// worth, as the README advises for packing); a flush that finds the last
// one still running waits for it, as Telegraf's does.
func rateRun(ctx context.Context, pub []byte, id identity, devices int, action emulator.RateAction, layout string, flushes [][]telegraf.Metric) (rateResult, error) {
	rcv := newReceiver()
	emu, err := startEmulator(pub, devices, emulator.WithOnReceive(rcv.observeEmulator), emulator.WithRules(func(r *emulator.Rules) {
		r.MaxMessageRate = bridgeRate
		r.RateAction = action
	}))
	if err != nil {
		return rateResult{}, err
	}
	defer emu.Close()
	ids := deviceIDs(devices)
	o, err := newOurOutput(emu.URL, id, func(o *outomni.OmniCore) {
		o.Layout = layout
		o.MaxMessageRate = ourRate
		o.Devices = ids
		// One message per destination takes 11 s for 1,000 devices at
		// 90/s; with the default 2 s a Write ends after about 180 and
		// Telegraf writes the rest at the next flush.
		o.WriteTimeout = config.Duration(rateWriteTimeout)
	})
	if err != nil {
		return rateResult{}, err
	}
	if err := o.Connect(); err != nil {
		return rateResult{}, err
	}
	defer o.Close()
	// The devices option attaches them (within the rate) in the
	// background; wait, so that the timed part is telemetry only.
	wctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	if err := emu.WaitAttached(wctx, registryID, gatewayID, ids...); err != nil {
		return rateResult{}, fmt.Errorf("attaching the devices: %w", err)
	}
	before := emu.Stats()
	rcv.reset(true)
	var want []int64
	start := time.Now()
	next := start
	for _, ms := range flushes {
		if wait := time.Until(next); wait > 0 {
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return rateResult{}, ctx.Err()
			}
		}
		at := time.Now()
		stamp(ms, at)
		want = append(want, timestampsOf(ms)...)
		if err := o.Write(ms); err != nil {
			return rateResult{}, fmt.Errorf("Write: %w", err)
		}
		next = at.Add(flushInterval)
	}
	rcv.waitFor(ctx, len(want), receiverQuiet)
	after := emu.Stats()
	_, last := rcv.span()
	res := rateResult{
		delivered: rcv.count(want),
		messages:  after.EventsAccepted - before.EventsAccepted,
		overCap:   after.Throttled - before.Throttled + after.ConnectionsAccepted - before.ConnectionsAccepted,
	}
	if !res.delivered.ok() {
		return res, fmt.Errorf("at the receiver %s", res.delivered)
	}
	res.rate = float64(len(want)) / last.Sub(start).Seconds()
	lat := rcv.latencies()
	ms := make([]float64, len(lat))
	for i, l := range lat {
		ms[i] = float64(l) / float64(time.Millisecond)
	}
	res.p50, res.p99 = percentile(ms, 50), percentile(ms, 99)
	return res, nil
}

// benchRateLimit is benchmark 5: under the bridge's 100 messages/s cap, in
// both of the emulator's modes, layout auto against batch and non-batch.
func (b *bench) benchRateLimit(ctx context.Context) error {
	n, perDevice, nFlushes := b.sz.rateDevices, b.sz.ratePerDevice, b.sz.rateFlushes
	// non-batch sends one message per metric: at most 100 metrics/s. It
	// gets one flush of one metric per device, which already takes a
	// flush interval at the cap.
	// Every flush reuses the same metrics with new times (a Write does
	// not keep them), which halves the memory of the run.
	var packed, single [][]telegraf.Metric
	one := flushMetrics(n, perDevice)
	for range nFlushes {
		packed = append(packed, one)
	}
	single = append(single, flushMetrics(n, 1))
	for _, action := range []emulator.RateAction{emulator.RateThrottle, emulator.RateClose} {
		label := fmt.Sprintf("under the bridge's %d messages/s cap (%s), %s devices, a flush every %s", bridgeRate, action, groupThousands(int64(n)), flushInterval)
		vsBatch := &row{id: "5", name: label + " — vs layout batch", unit: "metrics/s", oursLabel: "layout auto", peerLabel: "layout batch",
			slowerWhy: "auto packs each write to the same one message per destination as batch here; the difference is noise"}
		vsNon := &row{id: "5", name: label + " — vs layout non-batch", unit: "metrics/s", oursLabel: "layout auto", peerLabel: "layout non-batch"}
		p50 := &row{id: "5", name: label + " — latency p50, metric time to the bridge's receipt", unit: "ms", lowerIsBetter: true,
			oursLabel: "layout auto", peerLabel: "layout batch",
			slowerWhy: "both send a flush's metrics in one message per device over the same 10 s; the difference is noise"}
		p99 := &row{id: "5", name: label + " — latency p99", unit: "ms", lowerIsBetter: true, oursLabel: "layout auto", peerLabel: "layout batch",
			slowerWhy: p50.slowerWhy}
		var nonP50, nonP99 []float64
		msgs := map[string][]int{}
		over := map[string]int{}
		sums := map[string]*tally{"auto": {}, "batch": {}, "non-batch": {}}
		for run := 0; run < b.opts.runs; run++ {
			all := []string{"auto", "batch", "non-batch"}
			layouts := append(slices.Clone(all[run%3:]), all[:run%3]...)
			for _, layout := range layouts {
				flushes := packed
				if layout == "non-batch" {
					flushes = single
				}
				progress("  run %d/%d: %s, layout %s, %d flush(es) of %s metrics", run+1, b.opts.runs, action, layout, len(flushes), groupThousands(int64(len(flushes[0]))))
				res, err := rateRun(ctx, b.pub, b.id, n, action, layout, flushes)
				sums[layout].add(res.delivered)
				over[layout] += res.overCap
				if err == nil && res.overCap > 0 {
					err = fmt.Errorf("%d messages over the cap", res.overCap)
				}
				if err != nil {
					for _, r := range []*row{vsBatch, vsNon, p50, p99} {
						r.addProblem("%s: %v", layout, err)
						r.leftOut++
					}
					continue
				}
				msgs[layout] = append(msgs[layout], res.messages)
				progress("    %s, %d messages, latency p50 %.0f ms p99 %.0f ms, %d over the cap",
					formatValue(res.rate, "metrics/s"), res.messages, res.p50, res.p99, res.overCap)
				switch layout {
				case "auto":
					vsBatch.ours = append(vsBatch.ours, res.rate)
					vsNon.ours = append(vsNon.ours, res.rate)
					p50.ours = append(p50.ours, res.p50)
					p99.ours = append(p99.ours, res.p99)
				case "batch":
					vsBatch.peer = append(vsBatch.peer, res.rate)
					p50.peer = append(p50.peer, res.p50)
					p99.peer = append(p99.peer, res.p99)
				default:
					vsNon.peer = append(vsNon.peer, res.rate)
					nonP50 = append(nonP50, res.p50)
					nonP99 = append(nonP99, res.p99)
				}
			}
		}
		medianInt := func(v []int) float64 {
			f := make([]float64, len(v))
			for i, x := range v {
				f[i] = float64(x)
			}
			return median(f)
		}
		common := fmt.Sprintf("emulator Rules.MaxMessageRate = %d with RateAction %s, ours max_message_rate = %g (10%% under the cap: the bridge counts at arrival, and a pause on the path bunches paced messages), one connection; auto and batch: %d flush(es) of %s metrics (%d per device), each one Write (metric_batch_size raised to a flush's worth), write_timeout %s; non-batch: one flush of one metric per device (it sends one message per metric); messages per run auto %.0f, batch %.0f, non-batch %.0f; over the cap (throttled publishes or reconnects) auto %d, batch %d, non-batch %d; counted at the receiver, all runs: auto %s; batch %s; non-batch %s",
			bridgeRate, action, ourRate, nFlushes, groupThousands(int64(len(packed[0]))), perDevice, rateWriteTimeout,
			medianInt(msgs["auto"]), medianInt(msgs["batch"]), medianInt(msgs["non-batch"]),
			over["auto"], over["batch"], over["non-batch"], sums["auto"], sums["batch"], sums["non-batch"])
		vsBatch.note = "goal: at least 50,000 metrics/s; " + common
		vsNon.note = "rate from the first flush to the last receipt; " + common
		p50.note = fmt.Sprintf("from each metric's time (spread over the %s before its flush) to the emulator's receipt; non-batch p50 %s", flushInterval, formatValue(median(nonP50), "ms"))
		p99.note = fmt.Sprintf("the same samples; non-batch p99 %s", formatValue(median(nonP99), "ms"))
		b.rows = append(b.rows, vsBatch, vsNon, p50, p99)
	}
	return nil
}
