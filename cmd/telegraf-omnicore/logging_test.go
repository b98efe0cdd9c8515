package main

import (
	"bytes"
	"runtime"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/logger"
	"github.com/stretchr/testify/require"
)

func TestLogSink(t *testing.T) {
	tests := []struct {
		name     string
		level    telegraf.LogLevel
		msgLevel telegraf.LogLevel
		source   string
		args     []any
		expected string
	}{
		{name: "error with plugin", level: telegraf.Info, msgLevel: telegraf.Error, source: "outputs.omnicore", args: []any{"boom"}, expected: "E! [outputs.omnicore] boom\n"},
		{name: "info without source", level: telegraf.Info, msgLevel: telegraf.Info, args: []any{"started"}, expected: "I! started\n"},
		{name: "warn", level: telegraf.Warn, msgLevel: telegraf.Warn, source: "inputs.omnicore", args: []any{"careful"}, expected: "W! [inputs.omnicore] careful\n"},
		{name: "debug shown at debug", level: telegraf.Debug, msgLevel: telegraf.Debug, args: []any{"detail"}, expected: "D! detail\n"},
		{name: "debug hidden at info", level: telegraf.Info, msgLevel: telegraf.Debug, args: []any{"detail"}},
		{name: "info hidden at warn", level: telegraf.Warn, msgLevel: telegraf.Info, args: []any{"chatter"}},
		{name: "trace", level: telegraf.Trace, msgLevel: telegraf.Trace, args: []any{"packet"}, expected: "T! packet\n"},
		{
			name:     "every line of a multi-line message is prefixed",
			level:    telegraf.Info,
			msgLevel: telegraf.Error,
			source:   "outputs.omnicore",
			args:     []any{"first\r\nsecond\nthird\n"},
			expected: "E! [outputs.omnicore] first\nE! [outputs.omnicore] second\nE! [outputs.omnicore] third\n",
		},
		{name: "arguments joined like log.Print", level: telegraf.Info, msgLevel: telegraf.Info, args: []any{"a", 1, "b"}, expected: "I! a1b\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var buf bytes.Buffer
			s := newLogSink(&buf, tt.level)
			s.callback(tt.msgLevel, time.Now(), tt.source, nil, tt.args...)
			require.Equal(t, tt.expected, buf.String())
		})
	}
}

func TestParseLogLevel(t *testing.T) {
	for name, level := range map[string]telegraf.LogLevel{
		"error": telegraf.Error, "warn": telegraf.Warn, "WARN": telegraf.Warn, "info": telegraf.Info,
		"debug": telegraf.Debug, "trace": telegraf.Trace,
	} {
		got, err := parseLogLevel(name)
		require.NoError(t, err, name)
		require.Equal(t, level, got, name)
	}
	_, err := parseLogLevel("verbose")
	require.ErrorContains(t, err, `log level "verbose" must be error, warn, info, debug or trace`)
}

// Telegraf's logger keeps every message in memory while it is in its "early
// logging" mode, which nothing ends in an external plugin; installLogging
// ends it. 200,000 suppressed debug lines must not stay on the heap (the
// early-log list holds about 200 bytes per call).
func TestLoggingKeepsNoMessages(t *testing.T) {
	var out bytes.Buffer
	sink := newLogSink(&out, telegraf.Info)
	remove, err := installLogging(sink)
	require.NoError(t, err)
	defer remove()
	l := pluginLogger("outputs", "omnicore_test", "", telegraf.Info)
	// A logger without a level of its own, like the shim's.
	plain := logger.New("", "", "")

	heap := func() uint64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	before := heap()
	for i := 0; i < 100000; i++ {
		l.Debugf("suppressed debug line %d with some text to make it weigh", i)
		plain.Debugf("suppressed debug line %d with some text to make it weigh", i)
	}
	after := heap()
	growth := int64(after) - int64(before)
	require.Less(t, growth, int64(8<<20), "the heap grew by %d bytes over 200000 log calls", growth)
	require.Empty(t, out.String())

	plain.Info("shown")
	require.Equal(t, "I! shown\n", out.String())
}
