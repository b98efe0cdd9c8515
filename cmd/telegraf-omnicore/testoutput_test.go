package main

import (
	"errors"
	"os"
	"sync"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/plugins/outputs"
	"github.com/influxdata/telegraf/testutil"
)

// testOutput is an output plugin for the tests of the whole program and of
// the config loader: it records the serialized metrics of every successful
// Write, and a "closed" line on Close, in a file. (The runner's own tests,
// in execd/runner, have theirs.)
type testOutput struct {
	Topic    string        `toml:"topic"`
	Password config.Secret `toml:"password"`
	FailInit bool          `toml:"fail_init"`
	// FailWrites makes every Write fail.
	FailWrites bool `toml:"fail_writes"`
	// Record is the file of the successful Writes and the Close.
	Record string          `toml:"record"`
	Log    telegraf.Logger `toml:"-"`

	serializer telegraf.Serializer
	mu         sync.Mutex
}

func init() {
	outputs.Add("omnicore_test", func() telegraf.Output {
		return &testOutput{Log: testutil.Logger{Name: "outputs.omnicore_test"}}
	})
}

func (*testOutput) SampleConfig() string { return "" }

func (o *testOutput) SetSerializer(s telegraf.Serializer) { o.serializer = s }

func (o *testOutput) Init() error {
	if o.FailInit {
		return errors.New("fail_init is set")
	}
	return nil
}

// Connect logs an info line, as the real output does through its session.
func (o *testOutput) Connect() error {
	o.Log.Info("Connected")
	return nil
}

func (o *testOutput) Close() error {
	o.mu.Lock()
	defer o.mu.Unlock()
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
	if o.FailWrites {
		return errors.New("fail_writes is set")
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.Record == "" {
		return nil
	}
	b, err := o.serializer.SerializeBatch(batch)
	if err != nil {
		return err
	}
	o.Log.Debugf("Wrote %d metrics", len(batch))
	return o.record(b)
}
