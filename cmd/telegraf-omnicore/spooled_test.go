package main

import (
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

// startSpooled starts a spooledRunner with the spool in dir on a pipe.
func startSpooled(t *testing.T, out *testOutput, dir string, batchSize int, batchTimeout time.Duration, tweak func(*spooledRunner)) *runnerHarness {
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
	r := newSpooledRunner(out, h.log, batchSize, batchTimeout, spool.Options{Dir: dir, MaxSize: 1 << 20, SyncInterval: 10 * time.Millisecond})
	r.minBackoff = 5 * time.Millisecond
	r.maxBackoff = 20 * time.Millisecond
	if tweak != nil {
		tweak(r)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.result <- r.run(h.read, h.stop)
	}()
	t.Cleanup(func() {
		pw.Close()
		pr.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("the spooled runner did not stop")
		}
	})
	return h
}

func lines(name string, from, n int) string {
	var b strings.Builder
	for i := from; i < from+n; i++ {
		b.WriteString(line(name, i))
	}
	return b.String()
}

func metricsFor(name string, from, n int) []telegraf.Metric {
	out := make([]telegraf.Metric, n)
	for i := range out {
		out[i] = metricFor(name, from+i)
	}
	return out
}

func waitWritten(t *testing.T, out *testOutput, n int) {
	t.Helper()
	waitFor(t, 20*time.Second, fmt.Sprintf("%d metrics written", n), func() bool { return len(flatten(out.getWritten())) >= n })
}

func containsLine(lines []string, s string) bool {
	for _, l := range lines {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

func TestSpooledDeliversInOrder(t *testing.T) {
	tests := []struct {
		name      string
		batchSize int
		n         int
		writeErr  func(int) error
	}{
		{name: "full batches", batchSize: 10, n: 100},
		{name: "partial batch after the timeout", batchSize: 1000, n: 7},
		{name: "writes failing, retried from the spool", batchSize: 10, n: 100, writeErr: func(n int) error {
			if n%3 != 0 {
				return errors.New("bridge unreachable")
			}
			return nil
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out := newTestOutput()
			out.writeErr = tt.writeErr
			dir := filepath.Join(t.TempDir(), "spool")
			h := startSpooled(t, out, dir, tt.batchSize, 50*time.Millisecond, nil)
			h.write(t, lines("m", 0, tt.n))
			waitWritten(t, out, tt.n)
			testutil.RequireMetricsEqual(t, metricsFor("m", 0, tt.n), flatten(out.getWritten()))
			for _, b := range out.getWritten() {
				require.LessOrEqual(t, len(b), tt.batchSize)
			}
			require.NoError(t, h.stdin.Close())
			require.NoError(t, h.wait(t, 10*time.Second))
			require.True(t, out.isClosed())
			if tt.writeErr != nil {
				require.True(t, containsLine(h.log.Errors(), "they stay in the spool"), "%v", h.log.Errors())
			}
		})
	}
}

// While writes fail, stdin is still read: everything lands in the spool,
// then a new process replays it, first, before its own new metrics.
func TestSpooledReadsWhileTheBridgeIsDownAndReplays(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	down := newTestOutput()
	down.FailWrites = true
	h := startSpooled(t, down, dir, 50, 10*time.Millisecond, nil)
	const n = 3000
	h.write(t, lines("m", 0, n)) // returns once read: nothing holds stdin back
	waitFor(t, 10*time.Second, "all of stdin read", func() bool { return h.read.n.Load() == int64(len(lines("m", 0, n))) })
	down.waitCalls(t, 2)

	start := time.Now()
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))
	require.Less(t, time.Since(start), 3*time.Second, "the stop is not held up by the bridge (1 s, plus slack for a loaded machine)")
	require.Empty(t, down.getWritten())
	require.True(t, containsLine(texts(h.log), "Stopping with 3000 metrics in the spool"), "%v", texts(h.log))

	up := newTestOutput()
	h2 := startSpooled(t, up, dir, 500, 10*time.Millisecond, nil)
	h2.write(t, lines("m", n, 10))
	waitWritten(t, up, n+10)
	testutil.RequireMetricsEqual(t, metricsFor("m", 0, n+10), flatten(up.getWritten())) // the spool first, in order, then the new metrics
	require.True(t, containsLine(texts(h2.log), "Replaying 3000 metrics"), "%v", texts(h2.log))
}

func TestSpooledStopsWithinASecond(t *testing.T) {
	tests := []struct {
		name   string
		signal bool
		block  bool
	}{
		{name: "EOF, Write blocked", block: true},
		{name: "signal, Write blocked", signal: true, block: true},
		{name: "EOF, Write failing"},
		{name: "signal, Write failing", signal: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "spool")
			out := newTestOutput()
			if tt.block {
				out.block = make(chan struct{})
				defer close(out.block)
			} else {
				out.FailWrites = true
			}
			h := startSpooled(t, out, dir, 10, 10*time.Millisecond, nil)
			h.write(t, lines("m", 0, 25))
			out.waitCalls(t, 1)
			start := time.Now()
			if tt.signal {
				close(h.stop)
			} else {
				require.NoError(t, h.stdin.Close())
			}
			require.NoError(t, h.wait(t, 10*time.Second))
			t.Logf("stopped in %s", time.Since(start))
			require.Less(t, time.Since(start), 3*time.Second, "1 s, plus slack for a loaded machine")
			if tt.block {
				require.False(t, out.isClosed(), "never Close during a Write")
			}

			// Everything is still in the spool.
			up := newTestOutput()
			h2 := startSpooled(t, up, dir, 100, 10*time.Millisecond, nil)
			waitWritten(t, up, 25)
			testutil.RequireMetricsEqual(t, metricsFor("m", 0, 25), flatten(up.getWritten()))
			require.NoError(t, h2.stdin.Close())
			require.NoError(t, h2.wait(t, 10*time.Second))
		})
	}
}

func TestSpooledFullBackpressure(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	out := newTestOutput()
	var mu sync.Mutex
	failing := true
	out.writeErr = func(int) error {
		mu.Lock()
		defer mu.Unlock()
		if failing {
			return errors.New("bridge unreachable")
		}
		return nil
	}
	h := startSpooled(t, out, dir, 100, 10*time.Millisecond, func(r *spooledRunner) { r.opts.MaxSize = spool.MinMaxSize })
	const n = 2000 // about 120 KB of line protocol: far over 16 KiB
	written := make(chan struct{})
	go func() {
		defer close(written)
		_, _ = io.WriteString(h.stdin, lines("m", 0, n))
	}()
	waitFor(t, 10*time.Second, "the full warning", func() bool { return containsLine(h.log.Warnings(), "The spool is full") })
	read := h.read.n.Load()
	select {
	case <-written:
		t.Fatal("all of stdin was read into a full spool")
	case <-time.After(200 * time.Millisecond):
	}
	require.Less(t, h.read.n.Load(), int64(len(lines("m", 0, n))), "stdin is not read while full")
	require.Less(t, read, int64(len(lines("m", 0, n))))
	mu.Lock()
	failing = false
	mu.Unlock()
	waitWritten(t, out, n)
	<-written
	testutil.RequireMetricsEqual(t, metricsFor("m", 0, n), flatten(out.getWritten())) // nothing lost, in order
	full := 0
	for _, w := range h.log.Warnings() {
		if strings.Contains(w, "The spool is full") {
			full++
		}
	}
	require.Equal(t, 1, full, "the warning is logged once")
}

// fakeConn records the gauges reported through it.
type fakeConn struct {
	gateway.Conn
	mu     sync.Mutex
	gauges map[string]int64
	source string
}

func (c *fakeConn) ReportGauges(source string, g map[string]int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.source, c.gauges = source, g
}

func (c *fakeConn) get() (string, map[string]int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.source, c.gauges
}

func TestSpooledReportsGauges(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	out := newTestOutput()
	out.FailWrites = true
	conn := &fakeConn{}
	h := startSpooled(t, out, dir, 10, 10*time.Millisecond, func(r *spooledRunner) {
		r.conn = func() gateway.Conn { return conn }
		r.source = "spool test"
		r.reportEvery = 20 * time.Millisecond
	})
	h.write(t, lines("m", 0, 30))
	waitFor(t, 10*time.Second, "30 spooled records reported", func() bool {
		_, g := conn.get()
		return g["spool_records"] == 30
	})
	src, g := conn.get()
	require.Equal(t, "spool test", src)
	for _, name := range []string{"spool_bytes", "spool_records", "spool_oldest_age_ms", "spool_replayed", "spool_truncated_bytes", "spool_dropped_full", "spool_corrupt_segments"} {
		require.Contains(t, g, name)
	}
	require.Positive(t, g["spool_bytes"])
}

// metricReader drops its parser's buffer after a huge line, and keeps
// numbering lines across the replacement.
func TestMetricReaderReleasesLargeBuffer(t *testing.T) {
	huge := "big,device_id=d s=\"" + strings.Repeat("x", 10<<20) + "\" 1\n"
	in := line("m", 1) + huge + line("m", 2) + "not line protocol\n" + line("m", 3)
	log := &testutil.CaptureLogger{}
	mr := newMetricReader(strings.NewReader(in), log, nil)
	var got []string
	for {
		m, err := mr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		require.NoError(t, err)
		got = append(got, m.Name())
	}
	require.Equal(t, []string{"m", "big", "m", "m"}, got)
	require.Equal(t, 1, mr.replaced, "the parser was replaced after the huge line")
	require.True(t, containsLine(log.Errors(), "Skipping line 4 of standard input"), "%v", log.Errors())
	require.False(t, containsLine(log.Errors(), "not line protocol"), "no line text in the log")
}

func texts(log *testutil.CaptureLogger) []string {
	var out []string
	for _, e := range log.Messages() {
		out = append(out, e.Text)
	}
	return out
}
