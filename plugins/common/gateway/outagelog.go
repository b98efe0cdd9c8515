package gateway

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// The session's lines about its connection, as a Telegraf operator reads
// them: one line per change of state. A healthy start is one I! (connected,
// devices attached); an outage is one E! when it begins, at most one W! a
// minute while it lasts and one I! when it ends, each saying where the
// metrics not acknowledged wait on the route the plugins run on.

// connectOutage is a time without a connection, told as one line per change
// of state. A connection lost and made again at the first attempt is one W!.
// Otherwise the first failed connect is one E! (with the reason and where the
// metrics not acknowledged wait), a W! follows at most once a minute while it
// lasts (with their number), the attempts in between at debug, and the
// connect that ends it is one I! (how long, the devices re-attached, what is
// replayed).
type connectOutage struct {
	failures int
	since    time.Time
	// lost is why the connection before the outage ended; nil when no
	// connection was made yet.
	lost     error
	lastWarn time.Time
}

// outageWarnInterval is how often a lasting outage is told again (a
// variable for the test that checks it without waiting minutes).
var outageWarnInterval = time.Minute

func (o *connectOutage) failed(s *Session, err error, retry time.Duration) {
	now := time.Now()
	o.failures++
	switch {
	case o.failures == 1:
		if o.since.IsZero() {
			o.since = now
		}
		o.lastWarn = now
		lost := ""
		if o.lost != nil {
			lost = fmt.Sprintf("Connection to the bridge lost (%v). ", o.lost)
		}
		s.log.Errorf("%sConnecting to the bridge as %q failed: %v; %s, retrying at most every %s",
			lost, s.clientID, err, s.backlog(), s.cfg.MaxReconnect)
	case now.Sub(o.lastWarn) >= outageWarnInterval:
		o.lastWarn = now
		s.log.Warnf("Still not connected to the bridge as %q after %s (%d attempts): %v; %s",
			s.clientID, now.Sub(o.since).Round(time.Second), o.failures, err, s.backlog())
	default:
		s.log.Debugf("Connecting to the bridge as %q failed: %v; retrying in %s", s.clientID, err, retry.Round(time.Millisecond))
	}
}

// ended tells the end of the outage, once connected and rebuilt.
func (o *connectOutage) ended(s *Session, re reattached) {
	if o.failures == 0 {
		// Lost, and connected again at the first attempt.
		s.warn.Warnf("connection_lost", "Connection to the bridge lost (%v) and made again at once as %q; re-attached %s",
			o.lost, s.clientID, re)
		return
	}
	s.log.Infof("Connected to the bridge as %q after %s of outage (%d failed attempts); re-attached %s%s",
		s.clientID, time.Since(o.since).Round(time.Second), o.failures, re, s.replaying())
}

// reattached counts the devices a rebuild attached again.
type reattached struct{ tried, failed int }

func (r reattached) String() string {
	return fmt.Sprintf("%d of %s", r.tried-r.failed, devicesText(r.tried))
}

// devicesText is "1 device" or "n devices".
func devicesText(n int) string {
	if n == 1 {
		return "1 device"
	}
	return fmt.Sprintf("%d devices", n)
}

// lossReason is the error the connection was lost with, as paho reported it.
func (s *Session) lossReason() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastErr != nil {
		return s.lastErr
	}
	return errClosedByBridge
}

var errClosedByBridge = errors.New("closed without a reason")

// The line of the first connect waits at least startReportSettle and at most
// startReportWait for the plugins' first attaches.
const (
	startReportSettle = time.Second
	startReportWait   = 10 * time.Second
)

// reportStart logs the first connect as one line with the devices attached.
// The plugins ask for their devices as they start: Telegraf connects its
// outputs, then starts its inputs, and the execd processes start side by
// side. The line waits a little for them (startReportSettle), then until
// their attaches are done (the Attach calls in progress), so that it tells
// how many devices the gateway has. It polls: this happens once per session.
func (s *Session) reportStart(cs *connection, down connectOutage) {
	settled := time.Now().Add(startReportSettle)
	deadline := time.Now().Add(startReportWait)
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for (time.Now().Before(settled) || s.attachCalls.Load() > 0) && time.Now().Before(deadline) {
		select {
		case <-t.C:
		case <-cs.lost:
			return
		case <-s.ctx.Done():
			return
		}
	}
	after := ""
	if down.failures > 0 {
		after = fmt.Sprintf(" after %s and %d failed attempts", time.Since(down.since).Round(time.Second), down.failures)
	}
	s.log.Infof("Connected to the bridge as %q%s; %s attached%s", s.clientID, after, devicesText(s.attachedOn(cs)), s.replaying())
}

// attachedOn counts the devices attached on cs.
func (s *Session) attachedOn(cs *connection) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, d := range s.devices {
		if d.attachedGen == cs.gen {
			n++
		}
	}
	return n
}

// backlog says where the metrics the bridge has not acknowledged wait, for
// the outage lines: "the metrics not acknowledged wait in ...". The execd
// output reports its queue (ReportGauges): the spool, memory while the
// spool's disk fails, or Telegraf's buffer with spool = false. Built in they
// wait in Telegraf's buffer.
func (s *Session) backlog() string {
	spool, records, disk, ok := s.c.gauges.queues(time.Now())
	switch {
	case !ok && s.cfg.Route == RouteExecd:
		// No report yet (an outage at start comes before the output's
		// first), or only the input runs.
		return "the metrics not acknowledged wait with the output process (in its spool, unless spool = false)"
	case !ok:
		return "the metrics not acknowledged wait in Telegraf's buffer"
	case disk:
		return metricsText(records) + " wait in memory while the spool's disk fails"
	case spool:
		return metricsText(records) + " wait in the spool"
	}
	return "the metrics not acknowledged wait in Telegraf's buffer (spool = false)"
}

// metricsText is the count of a backlog the gauges report: they are a few
// seconds old, and a backlog that just began may not be counted yet.
func metricsText(n int64) string {
	if n == 0 {
		return "the metrics not acknowledged"
	}
	return fmt.Sprintf("%d metrics", n)
}

// replaying is the end of the line of a connect after an outage under
// execd: how many spooled metrics are sent now.
func (s *Session) replaying() string {
	if spool, n, _, ok := s.c.gauges.queues(time.Now()); ok && spool && n > 0 {
		return fmt.Sprintf("; replaying the %d metrics kept in the spool", n)
	}
	return ""
}

// queues reads the execd output's queue from the live gauge sources (see
// execd/runner's gauges): whether a spool reports (spool), the metrics
// queued (records in the spool and in memory), and whether the spool's disk
// failed; ok is false when no queue reports.
func (b *gaugeBook) queues(now time.Time) (spool bool, records int64, disk, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for src, r := range b.sources {
		if now.Sub(r.at) > GaugeTTL {
			continue
		}
		if _, queue := r.gauges["memory_records"]; !queue {
			continue
		}
		ok = true
		spool = spool || strings.HasPrefix(src, "spool ")
		disk = disk || r.gauges["spool_disk_failed"] > 0
		records += r.gauges["spool_records"] + r.gauges["memory_records"]
	}
	return spool, records, disk, ok
}
