package main

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/logger"
)

// logSink prints log lines the way Telegraf's execd plugins parse them:
// "E! ", "W! ", "I! ", "D! " or "T! ", then "[plugin] " and the message, with
// no timestamp (Telegraf adds its own). Every line of a multi-line message
// gets the prefix, so execd never mistakes a continuation line for an
// unprefixed error. Nothing is buffered.
//
// outputs.execd logs every stderr line of its child as an error ("E!
// [outputs.execd] stderr: I! ..."), and every stdout line at info level;
// inputs.execd maps the prefixes of stderr lines to its own levels. So an
// output process sends its info, debug and trace lines to stdout (quiet,
// which it does not otherwise use: useQuietOutput), for Telegraf to show them
// at info level, and its warnings and errors to stderr.
type logSink struct {
	mu    sync.Mutex
	w     io.Writer
	quiet atomic.Pointer[io.Writer] // info and below, when set
	level atomic.Int32              // a telegraf.LogLevel
}

// useQuietOutput sends the lines at info level and below to w.
func (s *logSink) useQuietOutput(w io.Writer) { s.quiet.Store(&w) }

func newLogSink(w io.Writer, level telegraf.LogLevel) *logSink {
	s := &logSink{w: w}
	s.setLevel(level)
	return s
}

func (s *logSink) setLevel(level telegraf.LogLevel) { s.level.Store(int32(level)) }

func (s *logSink) getLevel() telegraf.LogLevel { return telegraf.LogLevel(s.level.Load()) }

// callback is a logger.CallbackFunc. Telegraf's loggers call it for every
// message, before their own level check, so it filters by level itself.
func (s *logSink) callback(level telegraf.LogLevel, _ time.Time, source string, _ map[string]interface{}, args ...interface{}) {
	if !s.getLevel().Includes(level) {
		return
	}
	s.print(level, source, fmt.Sprint(args...))
}

func (s *logSink) print(level telegraf.LogLevel, source, msg string) {
	prefix := level.Indicator() + " "
	if source != "" {
		prefix += "[" + source + "] "
	}
	var b strings.Builder
	for _, line := range strings.Split(strings.TrimRight(msg, "\r\n"), "\n") {
		b.WriteString(prefix)
		b.WriteString(strings.TrimRight(line, "\r"))
		b.WriteByte('\n')
	}
	w := s.w
	if q := s.quiet.Load(); q != nil && level >= telegraf.Info {
		w = *q
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, _ = io.WriteString(w, b.String())
}

// installLogging routes every Telegraf logger of the process, and the
// standard library's log package (which Telegraf redirects to its loggers),
// to sink. Redirecting Telegraf's own handler to io.Discard also ends its
// "early logging" mode, in which every log call, suppressed or not, is kept
// in memory forever. The returned function removes the callback.
func installLogging(sink *logSink) (remove func(), err error) {
	logger.RedirectLogging(io.Discard)
	id, err := logger.AddCallback(sink.callback)
	if err != nil {
		return nil, fmt.Errorf("installing the log callback: %w", err)
	}
	return func() { logger.RemoveCallback(id) }, nil
}

// parseLogLevel accepts the names of -log_level and of a plugin's log_level.
func parseLogLevel(name string) (telegraf.LogLevel, error) {
	switch strings.ToLower(name) {
	case "error":
		return telegraf.Error, nil
	case "warn", "warning":
		return telegraf.Warn, nil
	case "info":
		return telegraf.Info, nil
	case "debug":
		return telegraf.Debug, nil
	case "trace":
		return telegraf.Trace, nil
	}
	return telegraf.None, fmt.Errorf("log level %q must be error, warn, info, debug or trace", name)
}

// pluginLogger returns the logger injected into the plugin: it names the
// plugin like Telegraf does ("outputs.omnicore" or "outputs.omnicore::alias")
// and reports the effective level, so that a plugin that asks its logger's
// Level() before doing expensive debug work gets the truth.
func pluginLogger(kind, name, alias string, level telegraf.LogLevel) telegraf.Logger {
	l := logger.New(kind, name, alias)
	l.SetLevel(level)
	return l
}
