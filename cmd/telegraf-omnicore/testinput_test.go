package main

import (
	"sync/atomic"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/plugins/inputs"
)

// testInput is a service input for the input-mode tests: it emits one
// metric from Start (parsed from payload with the data_format parser when
// payload is set) and one per Gather, and its Stop can hang.
type testInput struct {
	Payload   string          `toml:"payload"`
	HangStop  bool            `toml:"hang_stop"`
	FailStart bool            `toml:"fail_start"`
	Log       telegraf.Logger `toml:"-"`

	parserFunc telegraf.ParserFunc
	gathers    atomic.Int64
}

func init() {
	inputs.Add("omnicore_test", func() telegraf.Input { return &testInput{} })
}

func (*testInput) SampleConfig() string { return "" }

func (i *testInput) SetParserFunc(f telegraf.ParserFunc) { i.parserFunc = f }

func (i *testInput) Start(acc telegraf.Accumulator) error {
	if i.FailStart {
		return errFailStart
	}
	i.Log.Info("Started")
	i.Log.Debug("A debug line")
	if i.Payload == "" {
		acc.AddFields("test_start", map[string]any{"ok": true}, nil)
		return nil
	}
	parser, err := i.parserFunc()
	if err != nil {
		return err
	}
	metrics, err := parser.Parse([]byte(i.Payload))
	if err != nil {
		return err
	}
	for _, m := range metrics {
		acc.AddMetric(m)
	}
	return nil
}

func (i *testInput) Gather(acc telegraf.Accumulator) error {
	acc.AddFields("test_gather", map[string]any{"n": i.gathers.Add(1)}, nil)
	return nil
}

func (i *testInput) Stop() {
	if i.HangStop {
		select {}
	}
	i.Log.Info("Stopped the test input")
}

type constError string

func (e constError) Error() string { return string(e) }

const errFailStart = constError("fail_start is set")
