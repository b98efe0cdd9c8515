package runner

import (
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// gauges are the queue's figures as omnicore_gateway fields.
func (r *Runner) gauges() map[string]int64 {
	st := r.q.Stats()
	down := int64(0)
	if r.cfg.Spool != nil && (!st.hasSpool || st.spoolDown) {
		down = 1
	}
	return map[string]int64{
		"spool_bytes":             st.spool.Bytes,
		"spool_records":           st.spool.Records,
		"spool_oldest_age_ms":     st.spool.OldestAge.Milliseconds(),
		"spool_replayed":          st.spool.Replayed,
		"spool_truncated_bytes":   st.spool.TruncatedBytes,
		"spool_dropped_full":      st.spool.DroppedFull,
		"spool_dropped_too_large": st.tooLarge,
		"spool_corrupt_segments":  st.spool.CorruptSegments,
		"spool_disk_failed":       down,
		"memory_records":          st.memRecords,
		"memory_bytes":            st.memBytes,
		"memory_dropped":          st.droppedMemory,
		"input_dropped_too_long":  r.tooLong.Load(),
	}
}

// reportLoop reports the gauges through the gateway connection every
// reportEvery (well within gateway.GaugeTTL/4) once connected, until stop.
func (r *Runner) reportLoop(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	source := "memory queue"
	if r.cfg.Spool != nil {
		source = "spool " + r.cfg.Spool.Dir
	}
	// Every 100 ms until connected, so that the gauges show at once.
	t := time.NewTimer(100 * time.Millisecond)
	defer t.Stop()
	report := func() {
		c := r.connected.Load()
		if c == nil {
			t.Reset(100 * time.Millisecond)
			return
		}
		t.Reset(min(r.reportEvery, gateway.GaugeTTL/4))
		g := r.gauges()
		(*c).ReportGauges(source, g)
		r.reportMu.Lock()
		r.lastReport = g
		r.reportMu.Unlock()
	}
	for {
		select {
		case <-t.C:
			report()
		case <-stop:
			return
		}
	}
}
