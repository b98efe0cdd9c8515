package runner

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

// testOutput records every Write call (attempts included) and lets a test
// make Connect or Write fail or block.
type testOutput struct {
	mu           sync.Mutex
	connectFails int // Connect fails this many times
	connects     int
	closed       bool
	attempts     [][]telegraf.Metric // every Write call
	written      [][]telegraf.Metric // the successful ones
	failWrites   bool
	// writeErr decides the result of a Write call (1-based attempt number
	// over the whole run); nil means success.
	writeErr func(attempt int) error
	// block, when not nil, makes Write wait until it is closed;
	// connectGate the same for Connect.
	block       chan struct{}
	connectGate chan struct{}
	// calls receives the attempt number of every Write call.
	calls chan int
}

func newTestOutput() *testOutput { return &testOutput{calls: make(chan int, 100000)} }

func (*testOutput) SampleConfig() string { return "" }

func (o *testOutput) Connect() error {
	if o.connectGate != nil {
		<-o.connectGate
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.connects++
	if o.connects <= o.connectFails {
		return errors.New("bridge unreachable")
	}
	return nil
}

func (o *testOutput) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.closed = true
	return nil
}

func (o *testOutput) setFailing(f bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.failWrites = f
}

func (o *testOutput) Write(batch []telegraf.Metric) error {
	o.mu.Lock()
	o.attempts = append(o.attempts, batch)
	attempt := len(o.attempts)
	block := o.block
	var err error
	if o.writeErr != nil {
		err = o.writeErr(attempt)
	}
	if o.failWrites {
		err = errors.New("bridge unreachable")
	}
	o.mu.Unlock()
	o.calls <- attempt
	if block != nil {
		<-block
	}
	if err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.written = append(o.written, batch)
	return nil
}

func (o *testOutput) getWritten() [][]telegraf.Metric {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([][]telegraf.Metric(nil), o.written...)
}

func (o *testOutput) getAttempts() [][]telegraf.Metric {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([][]telegraf.Metric(nil), o.attempts...)
}

func (o *testOutput) isClosed() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.closed
}

// waitCalls waits for the Write call number n.
func (o *testOutput) waitCalls(t *testing.T, n int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case got := <-o.calls:
			if got >= n {
				return
			}
		case <-timeout:
			require.FailNowf(t, "timeout", "Write call %d did not happen within 10s (%d so far)", n, len(o.getAttempts()))
		}
	}
}

// harness runs a Runner on a pipe.
type harness struct {
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

// start runs a Runner for out with the spool in dir ("" for none).
func start(t *testing.T, out telegraf.Output, dir string, batchSize int, batchTimeout time.Duration, tweak func(*Runner)) *harness {
	t.Helper()
	pr, pw := io.Pipe()
	h := &harness{
		log:    &testutil.CaptureLogger{Name: "outputs.omnicore_test"},
		stdin:  pw,
		read:   &countingReader{r: pr},
		stop:   make(chan struct{}),
		result: make(chan error, 1),
	}
	cfg := Config{Output: out, Log: h.log, BatchSize: batchSize, BatchTimeout: batchTimeout}
	if dir != "" {
		cfg.Spool = &spool.Options{Dir: dir, MaxSize: 1 << 20, SyncInterval: 10 * time.Millisecond}
	}
	r := New(cfg)
	r.minBackoff = 5 * time.Millisecond
	r.maxBackoff = 20 * time.Millisecond
	if tweak != nil {
		tweak(r)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.result <- r.Run(h.read, h.stop)
	}()
	t.Cleanup(func() {
		pw.Close()
		pr.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("the runner did not stop")
		}
	})
	return h
}

func (h *harness) write(t *testing.T, s string) {
	t.Helper()
	_, err := io.WriteString(h.stdin, s)
	require.NoError(t, err)
}

// wait returns Run's result, failing the test when it takes longer than d.
func (h *harness) wait(t *testing.T, d time.Duration) error {
	t.Helper()
	select {
	case err := <-h.result:
		return err
	case <-time.After(d):
		require.FailNowf(t, "timeout", "the runner did not return within %s", d)
		return nil
	}
}

// count returns how many log lines of level ('E', 'W', ...; 0 for any)
// hold s.
func (h *harness) count(level byte, s string) int {
	n := 0
	for _, l := range h.log.Messages() {
		if (level == 0 || l.Level == level) && strings.Contains(l.Text, s) {
			n++
		}
	}
	return n
}

func (h *harness) texts() []string {
	var out []string
	for _, l := range h.log.Messages() {
		out = append(out, l.String())
	}
	return out
}

func line(name string, i int) string {
	return fmt.Sprintf("%s,device_id=sensor-%02d value=%di %d\n", name, i, i, 1700000000000000000+int64(i))
}

func lines(name string, from, n int) string {
	var b strings.Builder
	for i := from; i < from+n; i++ {
		b.WriteString(line(name, i))
	}
	return b.String()
}

func metricFor(name string, i int) telegraf.Metric {
	return metric.New(name, map[string]string{"device_id": fmt.Sprintf("sensor-%02d", i)},
		map[string]any{"value": int64(i)}, time.Unix(0, 1700000000000000000+int64(i)))
}

func metricsFor(name string, from, n int) []telegraf.Metric {
	out := make([]telegraf.Metric, n)
	for i := range out {
		out[i] = metricFor(name, from+i)
	}
	return out
}

func flatten(batches [][]telegraf.Metric) []telegraf.Metric {
	var all []telegraf.Metric
	for _, b := range batches {
		all = append(all, b...)
	}
	return all
}

// values returns the value fields of metrics, for counting.
func values(ms []telegraf.Metric) []int64 {
	out := make([]int64, 0, len(ms))
	for _, m := range ms {
		v, _ := m.GetField("value")
		out = append(out, v.(int64))
	}
	return out
}

// waitFor polls cond every few milliseconds until it holds, up to d.
// explain, when given, is logged on a timeout.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool, explain ...func() []string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			for _, e := range explain {
				t.Logf("%s", strings.Join(e(), "\n"))
			}
			require.FailNowf(t, "timeout", "%s did not happen within %s", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func waitWritten(t *testing.T, out *testOutput, n int) {
	t.Helper()
	waitFor(t, 20*time.Second, fmt.Sprintf("%d metrics written", n), func() bool { return len(flatten(out.getWritten())) >= n })
}

func itoa(v int64) string { return fmt.Sprint(v) }
