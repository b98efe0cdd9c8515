package main

import (
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
)

// overlapOutput is a testOutput that may be written with several Writes in
// flight (as outputs.omnicore), except for batches holding a "status"
// metric (standing in for a state message). It records how many Writes
// were running when each one started, and holds the Writes of the batches
// whose first metric has a gate until the gate is closed.
type overlapOutput struct {
	*testOutput

	mu     sync.Mutex
	active int
	starts []callStart
	gates  map[string]chan struct{} // by the batch's first metric
}

type callStart struct {
	first  string // the batch's first metric, name and value
	active int    // other Writes running when it started
}

func (o *overlapOutput) Overlappable(batch []telegraf.Metric) bool {
	for _, m := range batch {
		if m.Name() == "status" {
			return false
		}
	}
	return true
}

func (o *overlapOutput) Write(batch []telegraf.Metric) error {
	o.mu.Lock()
	v, _ := batch[0].GetField("value")
	first := batch[0].Name() + "/" + toString(v)
	o.starts = append(o.starts, callStart{first: first, active: o.active})
	o.active++
	gate := o.gates[first]
	o.mu.Unlock()
	if gate != nil {
		<-gate
	}
	err := o.testOutput.Write(batch)
	o.mu.Lock()
	o.active--
	o.mu.Unlock()
	return err
}

func (o *overlapOutput) getStarts() []callStart {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]callStart(nil), o.starts...)
}

func toString(v any) string {
	if i, ok := v.(int64); ok {
		return string(rune('0'+i/10)) + string(rune('0'+i%10))
	}
	return "?"
}

// Writes overlap: while the first batch's Write is held, the next ones are
// written; the spool releases only in order, so a stop with the first
// still unacknowledged keeps everything from it on, and the next process
// replays it all (duplicates, never a loss).
func TestSpooledOverlapsWritesAndReleasesInOrder(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	gate := make(chan struct{})
	defer close(gate)
	out := &overlapOutput{testOutput: newTestOutput(), gates: map[string]chan struct{}{"m/00": gate}}
	h := startSpooled(t, out.testOutput, dir, 10, time.Hour, func(r *spooledRunner) { r.output = out })
	h.write(t, lines("m", 0, 30))
	// Batches 2 and 3 are written while batch 1's Write is held.
	waitFor(t, 10*time.Second, "batches 2 and 3 written", func() bool { return len(out.getWritten()) == 2 })
	testutil.RequireMetricsEqual(t, metricsFor("m", 10, 20), flatten(out.getWritten()), testutil.SortMetrics())

	close(h.stop)
	require.NoError(t, h.wait(t, 10*time.Second))
	require.False(t, out.isClosed(), "never Close during a Write")

	up := newTestOutput()
	h2 := startSpooled(t, up, dir, 100, 10*time.Millisecond, nil)
	waitWritten(t, up, 30)
	// Batch 1 was never acknowledged: it and everything after it are
	// replayed.
	testutil.RequireMetricsEqual(t, metricsFor("m", 0, 30), flatten(up.getWritten()))
	require.NoError(t, h2.stdin.Close())
	require.NoError(t, h2.wait(t, 10*time.Second))
}

// A batch holding a state message is written alone: after every Write in
// flight ended, and the next waits for it.
func TestSpooledStateBatchIsWrittenAlone(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	gate := make(chan struct{})
	out := &overlapOutput{testOutput: newTestOutput(), gates: map[string]chan struct{}{"m/00": gate}}
	h := startSpooled(t, out.testOutput, dir, 10, time.Hour, func(r *spooledRunner) { r.output = out })
	h.write(t, lines("m", 0, 20))
	h.write(t, lines("status", 20, 10))
	h.write(t, lines("m", 30, 10))
	// The second batch overlaps the held first.
	waitFor(t, 10*time.Second, "2 Writes started", func() bool { return len(out.getStarts()) == 2 })
	close(gate)
	waitWritten(t, out.testOutput, 40)
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))

	starts := out.getStarts()
	require.Len(t, starts, 4)
	// The first two started while the first was held (in either order),
	// the state batch waited for both, and the last one for it.
	require.ElementsMatch(t, []string{"m/00", "m/10"}, []string{starts[0].first, starts[1].first})
	require.Equal(t, []callStart{{first: "status/20", active: 0}, {first: "m/30", active: 0}}, starts[2:])
	written := flatten(out.getWritten())
	require.Len(t, written, 40)
}

// settledWriteError is the error of a Write that settled some of its batch
// (as outputs.omnicore's does).
type settledWriteError struct{ accept, reject []int }

func (e *settledWriteError) Error() string                   { return "2 of 5 messages not acknowledged" }
func (e *settledWriteError) Settled() (accept, reject []int) { return e.accept, e.reject }

// A retry writes only what the failed Write left unsettled, in both runners.
func TestRetryWritesOnlyTheUnsettled(t *testing.T) {
	for _, spooled := range []bool{false, true} {
		name := "without spool"
		if spooled {
			name = "spooled"
		}
		t.Run(name, func(t *testing.T) {
			out := newTestOutput()
			out.writeErr = func(n int) error {
				if n == 1 {
					// 0 and 3 acknowledged, 1 given up on: 2 and 4 to retry.
					return &settledWriteError{accept: []int{0, 3}, reject: []int{1}}
				}
				return nil
			}
			var h *runnerHarness
			if spooled {
				h = startSpooled(t, out, filepath.Join(t.TempDir(), "spool"), 5, time.Hour, nil)
			} else {
				h = startRunner(t, out, 5, time.Hour, nil)
			}
			h.write(t, lines("m", 0, 5))
			waitFor(t, 10*time.Second, "the retry written", func() bool { return len(out.getWritten()) == 1 })
			attempts := out.getAttempts()
			require.Len(t, attempts, 2)
			testutil.RequireMetricsEqual(t, metricsFor("m", 0, 5), attempts[0])
			testutil.RequireMetricsEqual(t, []telegraf.Metric{metricFor("m", 2), metricFor("m", 4)}, attempts[1])
			require.NoError(t, h.stdin.Close())
			require.NoError(t, h.wait(t, 10*time.Second))
		})
	}
}

func TestUnsettled(t *testing.T) {
	batch := metricsFor("m", 0, 4)
	tests := []struct {
		name string
		err  error
		want []telegraf.Metric
	}{
		{"plain error: the whole batch", errors.New("down"), batch},
		{"nothing settled", &settledWriteError{}, batch},
		{"accepted and rejected removed", &settledWriteError{accept: []int{0}, reject: []int{2}}, []telegraf.Metric{batch[1], batch[3]}},
		{"wrapped", errors.Join(errors.New("x"), &settledWriteError{accept: []int{1, 2, 3}}), batch[:1]},
		{"indices out of range ignored", &settledWriteError{accept: []int{-1, 9, 3}}, batch[:3]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, unsettled(batch, tt.err))
		})
	}
}
