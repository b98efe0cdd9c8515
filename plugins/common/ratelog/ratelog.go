// Package ratelog logs a warning or error of one kind at most once per
// interval. The lines in between go to debug level and are counted; the next
// line of the kind says how many were held back. Both plugins and the gateway
// session log through it wherever one event can repeat per metric or per
// device (a junk device ID, a refused attach, a bridge error), so that a
// burst of ten thousand costs one line, not ten thousand.
//
// Hand-written: Telegraf's logger has no rate limit, and x/time/rate's
// Sometimes counts nothing and cannot key by kind.
package ratelog

import (
	"fmt"
	"sync"
	"time"

	"github.com/influxdata/telegraf"
)

// Limiter rate-limits log lines by key. It is safe for concurrent use.
type Limiter struct {
	log      telegraf.Logger
	interval time.Duration
	now      func() time.Time // time.Now; tests replace it

	mu    sync.Mutex
	kinds map[string]*kind
}

type kind struct {
	last time.Time
	held int
}

// New returns a Limiter logging each key at most once per interval.
func New(log telegraf.Logger, interval time.Duration) *Limiter {
	return &Limiter{log: log, interval: interval, now: time.Now, kinds: make(map[string]*kind)}
}

// Warnf logs at W! unless a line of key was logged within the interval.
func (l *Limiter) Warnf(key, format string, args ...any) {
	if msg, ok := l.admit(key, format, args); ok {
		l.log.Warn(msg)
	}
}

// Errorf logs at E! unless a line of key was logged within the interval.
func (l *Limiter) Errorf(key, format string, args ...any) {
	if msg, ok := l.admit(key, format, args); ok {
		l.log.Error(msg)
	}
}

// admit returns the line to log, with the count held back since the last
// one, or false after logging it at debug level.
func (l *Limiter) admit(key, format string, args []any) (string, bool) {
	l.mu.Lock()
	now := l.now()
	k, seen := l.kinds[key]
	if !seen {
		k = &kind{}
		l.kinds[key] = k
	}
	if seen && now.Sub(k.last) < l.interval {
		k.held++
		l.mu.Unlock()
		l.log.Debugf(format, args...)
		return "", false
	}
	held, since := k.held, now.Sub(k.last)
	k.last, k.held = now, 0
	l.mu.Unlock()
	msg := fmt.Sprintf(format, args...)
	if held > 0 {
		msg += fmt.Sprintf(" (and %d more like it in the last %s)", held, since.Round(time.Second))
	}
	return msg, true
}
