package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
)

// runner starts an outputRunner on a pipe and returns the pipe's writer and
// a channel with run's result.
type runnerHarness struct {
	out    *testOutput
	log    *testutil.CaptureLogger
	stdin  *io.PipeWriter
	read   *countingReader
	stop   chan struct{}
	result chan error
}

type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

func startRunner(t *testing.T, out *testOutput, batchSize int, batchTimeout time.Duration, tweak func(*outputRunner)) *runnerHarness {
	t.Helper()
	pr, pw := io.Pipe()
	h := &runnerHarness{
		out:    out,
		log:    &testutil.CaptureLogger{Name: "outputs.omnicore_test"},
		stdin:  pw,
		read:   &countingReader{r: pr},
		stop:   make(chan struct{}),
		result: make(chan error, 1),
	}
	r := newOutputRunner(out, h.log, batchSize, batchTimeout)
	r.minBackoff = 5 * time.Millisecond
	r.maxBackoff = 20 * time.Millisecond
	if tweak != nil {
		tweak(r)
	}
	go func() { h.result <- r.run(h.read, h.stop) }()
	t.Cleanup(func() {
		pw.Close()
		pr.Close()
	})
	return h
}

func (h *runnerHarness) write(t *testing.T, s string) {
	t.Helper()
	_, err := io.WriteString(h.stdin, s)
	require.NoError(t, err)
}

// wait returns run's result, failing the test when it takes longer than d.
func (h *runnerHarness) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case err := <-h.result:
		return err
	case <-time.After(d):
		require.FailNowf(t, "timeout", "the run loop did not return within %s", d)
		return nil
	}
}

func line(name string, i int) string {
	return fmt.Sprintf("%s,device_id=sensor-%02d value=%di %d\n", name, i, i, 1700000000000000000+int64(i))
}

func metricFor(name string, i int) telegraf.Metric {
	return metric.New(name, map[string]string{"device_id": fmt.Sprintf("sensor-%02d", i)},
		map[string]any{"value": int64(i)}, time.Unix(0, 1700000000000000000+int64(i)))
}

func flatten(batches [][]telegraf.Metric) []telegraf.Metric {
	var all []telegraf.Metric
	for _, b := range batches {
		all = append(all, b...)
	}
	return all
}

func TestOutputBatching(t *testing.T) {
	long := strings.Repeat("x", 1<<20) // a 1 MiB field: the shim's Scanner stops at 64 KiB
	type step struct {
		input string
		// waitWrites waits for this many successful Writes after input.
		waitWrites int
	}
	tests := []struct {
		name         string
		batchSize    int
		batchTimeout time.Duration
		steps        []step
		// expected are the batches written; with anyBoundaries only their
		// concatenation is compared (the timer decides the boundaries).
		expected      [][]telegraf.Metric
		anyBoundaries bool
		// errors are substrings of the expected error log lines.
		errors []string
	}{
		{
			name:         "partial batches flushed by the timer, again and again",
			batchSize:    100,
			batchTimeout: 10 * time.Millisecond,
			steps: []step{
				{input: line("m", 1) + line("m", 2) + line("m", 3), waitWrites: 1},
				// The shim would hold these until the next full batch.
				{input: line("m", 4) + line("m", 5)},
			},
			expected:      [][]telegraf.Metric{{metricFor("m", 1), metricFor("m", 2), metricFor("m", 3), metricFor("m", 4), metricFor("m", 5)}},
			anyBoundaries: true,
		},
		{
			name:         "full batches written without waiting for the timer",
			batchSize:    2,
			batchTimeout: time.Hour,
			steps: []step{
				{input: line("m", 1) + line("m", 2) + line("m", 3) + line("m", 4), waitWrites: 2},
				{input: line("m", 5)},
			},
			expected: [][]telegraf.Metric{
				{metricFor("m", 1), metricFor("m", 2)},
				{metricFor("m", 3), metricFor("m", 4)},
				{metricFor("m", 5)}, // at EOF
			},
		},
		{
			name:         "partial batch flushed at EOF",
			batchSize:    1000,
			batchTimeout: time.Hour,
			steps:        []step{{input: line("m", 1) + line("m", 2) + line("m", 3)}},
			expected:     [][]telegraf.Metric{{metricFor("m", 1), metricFor("m", 2), metricFor("m", 3)}},
		},
		{
			name:         "line of 1 MiB",
			batchSize:    2,
			batchTimeout: time.Hour,
			steps: []step{
				{input: "big,device_id=sensor-01 payload=\"" + long + "\" 1700000000000000000\n" + line("m", 2), waitWrites: 1},
			},
			expected: [][]telegraf.Metric{{
				metric.New("big", map[string]string{"device_id": "sensor-01"}, map[string]any{"payload": long}, time.Unix(0, 1700000000000000000)),
				metricFor("m", 2),
			}},
		},
		{
			name:         "lines that do not parse are skipped",
			batchSize:    1000,
			batchTimeout: time.Hour,
			steps: []step{{input: line("m", 1) +
				"this is not line protocol\n" +
				line("m", 3) +
				"m,device_id=x value= 1\n" +
				line("m", 5)}},
			expected: [][]telegraf.Metric{{metricFor("m", 1), metricFor("m", 3), metricFor("m", 5)}},
			errors:   []string{"Skipping line 2 of standard input", "Skipping line 4 of standard input"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := newTestOutput()
			h := startRunner(t, out, tt.batchSize, tt.batchTimeout, nil)
			for _, s := range tt.steps {
				h.write(t, s.input)
				if s.waitWrites > 0 {
					require.Eventually(t, func() bool { return len(out.getWritten()) >= s.waitWrites }, 10*time.Second, time.Millisecond)
				}
			}
			if tt.anyBoundaries {
				// No EOF: the timer alone must write everything.
				want := len(flatten(tt.expected))
				require.Eventually(t, func() bool { return len(flatten(out.getWritten())) >= want }, 10*time.Second, time.Millisecond)
			}
			require.NoError(t, h.stdin.Close())
			require.NoError(t, h.wait(t, 10*time.Second))
			require.True(t, out.isClosed())

			if tt.anyBoundaries {
				testutil.RequireMetricsEqual(t, flatten(tt.expected), flatten(out.getWritten()))
			} else {
				written := out.getWritten()
				require.Len(t, written, len(tt.expected))
				for i := range tt.expected {
					testutil.RequireMetricsEqual(t, tt.expected[i], written[i])
				}
			}
			require.Len(t, h.log.Errors(), len(tt.errors), "errors: %v", h.log.Errors())
			for i, e := range tt.errors {
				require.Contains(t, h.log.Errors()[i], e)
			}
		})
	}
}

// A failed Write is retried (the whole batch when its error does not say
// what was settled), and stdin is not read while
// it fails, so the backlog stays in Telegraf's buffer; nothing is lost.
func TestOutputRetriesTheSameBatchWithoutReading(t *testing.T) {
	out := newTestOutput()
	var failing atomic.Bool
	failing.Store(true)
	out.writeErr = func(int) error {
		if failing.Load() {
			return errors.New("bridge unreachable")
		}
		return nil
	}
	h := startRunner(t, out, 2, time.Hour, nil)

	first := line("m", 1) + line("m", 2)
	h.write(t, first)
	out.waitCalls(t, 2) // failed twice: retrying

	// One more line is read by the parser, which then holds its metric
	// until the batch is written...
	third := line("m", 3)
	h.write(t, third)
	// ...and nothing after it is read while the Write keeps failing.
	fourthDone := make(chan error, 1)
	go func() {
		_, err := io.WriteString(h.stdin, line("m", 4))
		fourthDone <- err
	}()
	out.waitCalls(t, 6)
	require.Equal(t, int64(len(first)+len(third)), h.read.n.Load(), "stdin was read while the batch was failing")
	select {
	case err := <-fourthDone:
		require.FailNowf(t, "stdin was read", "the fourth line was consumed while the batch was failing (err %v)", err)
	default:
	}

	// Every attempt carried the whole batch (the error did not say which
	// metrics were settled): the same metric objects.
	attempts := out.getAttempts()
	for i, a := range attempts {
		require.Len(t, a, 2, "attempt %d", i+1)
		require.Same(t, attempts[0][0], a[0], "attempt %d", i+1)
		require.Same(t, attempts[0][1], a[1], "attempt %d", i+1)
	}

	failing.Store(false)
	require.NoError(t, <-fourthDone)
	require.Eventually(t, func() bool { return len(flatten(out.getWritten())) >= 4 }, 10*time.Second, time.Millisecond)
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))

	written := out.getWritten()
	testutil.RequireMetricsEqual(t, []telegraf.Metric{metricFor("m", 1), metricFor("m", 2)}, written[0])
	testutil.RequireMetricsEqual(t,
		[]telegraf.Metric{metricFor("m", 1), metricFor("m", 2), metricFor("m", 3), metricFor("m", 4)},
		flatten(written))
	require.NotEmpty(t, h.log.Errors())
	require.Contains(t, h.log.Errors()[0], "Writing metrics failed (attempt 1), retrying the 2 not acknowledged")
}

func TestOutputConnectRetried(t *testing.T) {
	out := newTestOutput()
	out.connectFails = 2
	h := startRunner(t, out, 1000, time.Hour, nil)
	h.write(t, line("m", 1)) // read only once connected
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))
	testutil.RequireMetricsEqual(t, []telegraf.Metric{metricFor("m", 1)}, flatten(out.getWritten()))
	require.Len(t, h.log.Errors(), 2)
	require.Contains(t, h.log.Errors()[0], "Connecting the output failed")
}

// At stdin EOF or on a signal, the last batch is written and the output
// closed within the shutdown deadline; what cannot be written in time is
// reported and makes the exit status non-zero.
func TestOutputShutdown(t *testing.T) {
	yes, no := true, false
	tests := []struct {
		name string
		// writeErr and block configure the test output.
		writeErr func(int) error
		block    bool
		signal   bool // stop with the stop channel instead of EOF
		// lost is the number of metrics reported as not acknowledged.
		lost int
		// closed is whether Close must have been called; nil when it
		// depends on whether the last failing Write ended before the
		// deadline.
		closed *bool
		errors []string
	}{
		{
			name:   "EOF flushes the partial batch",
			closed: &yes,
		},
		{
			name:   "signal flushes the partial batch",
			signal: true,
			closed: &yes,
		},
		{
			name:     "EOF with the last Write failing until the deadline",
			writeErr: func(int) error { return errors.New("bridge unreachable") },
			lost:     3,
			errors:   []string{"Writing the last 3 metrics failed (attempt 1), retrying"},
		},
		{
			name: "EOF with the last Write failing once",
			writeErr: func(n int) error {
				if n == 1 {
					return errors.New("bridge unreachable")
				}
				return nil
			},
			closed: &yes,
			errors: []string{"Writing the last 3 metrics failed (attempt 1), retrying"},
		},
		{
			name:   "EOF with the last Write blocked past the deadline",
			block:  true,
			lost:   3,
			closed: &no, // never concurrently with Write
			errors: []string{"did not finish before the shutdown deadline", "Not closing the output"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := newTestOutput()
			out.writeErr = tt.writeErr
			if tt.block {
				out.block = make(chan struct{})
				defer close(out.block)
			}
			shutdown := time.Second
			h := startRunner(t, out, 1000, time.Hour, func(r *outputRunner) {
				r.shutdownTimeout = shutdown
				r.closeReserve = 200 * time.Millisecond
				r.minBackoff = 20 * time.Millisecond
			})
			h.write(t, line("m", 1)+line("m", 2)+line("m", 3))
			// An empty write returns once the parser asks for more input,
			// that is once the run loop received the three metrics: the
			// stop cannot overtake them.
			h.write(t, "")
			start := time.Now()
			if tt.signal {
				close(h.stop)
			} else {
				require.NoError(t, h.stdin.Close())
			}
			err := h.wait(t, 10*time.Second)
			elapsed := time.Since(start)
			if tt.lost > 0 {
				require.ErrorIs(t, err, errUnacknowledged)
				require.ErrorContains(t, err, fmt.Sprintf("%d metrics not acknowledged", tt.lost))
				// Bounded by the deadline (plus scheduling slack).
				require.Less(t, elapsed, shutdown+4*time.Second)
			} else {
				require.NoError(t, err)
				testutil.RequireMetricsEqual(t,
					[]telegraf.Metric{metricFor("m", 1), metricFor("m", 2), metricFor("m", 3)},
					flatten(out.getWritten()))
			}
			if tt.closed != nil {
				require.Equal(t, *tt.closed, out.isClosed())
			}
			for _, e := range tt.errors {
				require.Condition(t, func() bool {
					for _, got := range h.log.Errors() {
						if strings.Contains(got, e) {
							return true
						}
					}
					return false
				}, "no error log line contains %q: %v", e, h.log.Errors())
			}
		})
	}
}
