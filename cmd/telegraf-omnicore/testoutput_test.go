package main

import (
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/plugins/outputs"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
)

// testOutput is an output plugin for the run loop and config tests. It
// records every Write call (attempts included) and lets a test make Connect
// or Write fail or block.
type testOutput struct {
	Topic    string        `toml:"topic"`
	Password config.Secret `toml:"password"`
	FailInit bool          `toml:"fail_init"`
	// FailWrites makes every Write fail.
	FailWrites bool `toml:"fail_writes"`
	// Record is a file that gets the serialized metrics of every successful
	// Write and a "closed" line on Close (for tests of the whole program).
	Record string          `toml:"record"`
	Log    telegraf.Logger `toml:"-"`

	serializer telegraf.Serializer

	mu           sync.Mutex
	connectFails int // Connect fails this many times
	connects     int
	closed       bool
	attempts     [][]telegraf.Metric // every Write call
	written      [][]telegraf.Metric // the successful ones
	// writeErr decides the result of a Write call (1-based attempt number
	// over the whole run); nil means success.
	writeErr func(attempt int) error
	// block, when not nil, makes Write wait until it is closed.
	block chan struct{}
	// calls receives the attempt number of every Write call.
	calls chan int
}

func newTestOutput() *testOutput {
	return &testOutput{calls: make(chan int, 1000), Log: testutil.Logger{Name: "outputs.omnicore_test"}}
}

func init() {
	outputs.Add("omnicore_test", func() telegraf.Output { return newTestOutput() })
}

func (*testOutput) SampleConfig() string { return "" }

func (o *testOutput) SetSerializer(s telegraf.Serializer) { o.serializer = s }

func (o *testOutput) Init() error {
	if o.FailInit {
		return errors.New("fail_init is set")
	}
	return nil
}

func (o *testOutput) Connect() error {
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
	o.Log.Info("Closed the test output")
	return o.record([]byte("closed\n"))
}

func (o *testOutput) record(b []byte) error {
	if o.Record == "" {
		return nil
	}
	f, err := os.OpenFile(o.Record, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	return f.Close()
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
	if o.FailWrites {
		err = errors.New("fail_writes is set")
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
	if o.Record != "" {
		b, err := o.serializer.SerializeBatch(batch)
		if err != nil {
			return err
		}
		o.Log.Debugf("Wrote %d metrics", len(batch))
		return o.record(b)
	}
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
