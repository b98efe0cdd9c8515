package runner

import (
	"sync"
	"time"

	"github.com/influxdata/telegraf"
)

// outage logs an outage of the bridge as one line per change of state: E!
// when it begins (with the reason and where the backlog is kept), W! at most
// once a minute while it lasts (with the backlog), I! when it ends (with its
// length and the backlog replayed). Every failed attempt of every Write in
// flight and of Connect reports here, so concurrent Writes make one story.
//
// While the gateway's connection is down, its session tells the outage (one
// E!, a W! a minute, one I!, each with this runner's backlog, which it reads
// from the gauges the runner reports): the failures of the Writes are then
// at debug, so that one outage is one story in Telegraf's log.
type outage struct {
	log         telegraf.Logger
	where       func() string
	backlog     func() int64
	retry       time.Duration
	gatewayDown func() bool

	mu       sync.Mutex
	active   bool
	since    time.Time
	lastWarn time.Time
}

// fail reports a failed attempt (what: "Connecting to the bridge", ...).
func (o *outage) fail(what string, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	now := time.Now()
	switch {
	case !o.active && o.gatewayDown != nil && o.gatewayDown():
		o.log.Debugf("%s failed: %v; the gateway is not connected (its session tells the outage)", what, err)
	case !o.active:
		o.active, o.since, o.lastWarn = true, now, now
		o.log.Errorf("%s failed: %v; retrying every %s at most, metrics kept %s (%d now)", what, err, o.retry, o.where(), o.backlog())
	case now.Sub(o.lastWarn) >= time.Minute:
		o.lastWarn = now
		o.log.Warnf("The bridge has not acknowledged for %s: %d metrics kept %s; last error: %v",
			now.Sub(o.since).Round(time.Second), o.backlog(), o.where(), err)
	default:
		o.log.Debugf("%s failed: %v", what, err)
	}
}

// isActive reports whether an outage is going on.
func (o *outage) isActive() bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.active
}

// ok reports a successful Write: it ends an outage.
func (o *outage) ok() {
	o.mu.Lock()
	defer o.mu.Unlock()
	if !o.active {
		return
	}
	o.active = false
	o.log.Infof("The bridge acknowledges again after %s of outage; replaying the %d metrics kept meanwhile",
		time.Since(o.since).Round(time.Second), o.backlog())
}

// rateLog reports a repeated loss: E! the first time, then W! at most once
// every `every`, each with the total.
type rateLog struct {
	log   telegraf.Logger
	every time.Duration

	mu    sync.Mutex
	total int64
	last  time.Time
}

func (l *rateLog) errorOnce(n int, msg func(total int64) string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	first := l.total == 0
	l.total += int64(n)
	switch {
	case first:
		l.last = time.Now()
		l.log.Error(msg(l.total))
	case time.Since(l.last) >= l.every:
		l.last = time.Now()
		l.log.Warn(msg(l.total))
	}
}
