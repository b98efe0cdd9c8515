package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"runtime/debug"
	"sort"
	"sync"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// The gateway's health state: a small JSON document published as the
// gateway's own state (/{registry}/{gateway}/state), so that the OmniCore
// console and REST API show each gateway's health without a login on its
// host. The schema is documented in docs/health.md; HealthSchema changes
// when a field changes meaning or goes away (new fields may be added).
//
// It is built from the Conn's exported API only (Stats, SubscribeErrors,
// Publish), so it works the same on a Session, on a connection shared with
// another process (execd/share) and on each member of a pool.

// HealthSchema is the health document's schema version.
const HealthSchema = 1

// Routes a health document names: how the plugin runs.
const (
	RouteExecd   = "execd"    // under Telegraf's execd, by the telegraf-omnicore program
	RouteBuiltIn = "built-in" // compiled into Telegraf
)

// MinHealthInterval is the shortest health_state_interval: the bridge takes
// one state per second per device, and the health state is a summary.
const MinHealthInterval = 10 * time.Second

// Health is the health document.
type Health struct {
	Schema  int    `json:"schema"`
	Version string `json:"version"`
	Route   string `json:"route"`
	// Time is when the document was made.
	Time      time.Time `json:"time"`
	Connected bool      `json:"connected"`
	// ConnectedSince is when the current connection was first seen up
	// (within a second); absent while disconnected.
	ConnectedSince *time.Time     `json:"connected_since,omitempty"`
	Devices        HealthDevices  `json:"devices"`
	Spool          *HealthSpool   `json:"spool,omitempty"`
	Messages       HealthMessages `json:"messages"`
	LastError      *HealthError   `json:"last_error,omitempty"`
}

// HealthDevices counts the gateway's devices.
type HealthDevices struct {
	Attached int `json:"attached"` // attached on the current connection
	// Refused counts attaches the bridge refused and devices refused over
	// max_devices, since start.
	Refused uint64 `json:"refused"`
	// RecentlyRefused are the last devices the bridge refused, newest
	// first, with its description (at most maxRecentRefused).
	RecentlyRefused []RefusedDevice `json:"recently_refused,omitempty"`
}

// RefusedDevice is one device the bridge refused to attach.
type RefusedDevice struct {
	Device string    `json:"device"`
	Reason string    `json:"reason"`
	Time   time.Time `json:"time"`
}

// HealthSpool is the execd output's spool (from ReportGauges), absent when
// no output reports one.
type HealthSpool struct {
	Bytes            int64 `json:"bytes"`
	Records          int64 `json:"records"`
	OldestAgeSeconds int64 `json:"oldest_age_s"`
}

// HealthMessages count messages since the connection's process started.
type HealthMessages struct {
	Acknowledged uint64 `json:"acknowledged"`
	// Resent counts messages sent again: after a timeout or reconnect, or
	// because the bridge reported them undelivered after acknowledging.
	Resent  uint64            `json:"resent"`
	Dropped map[string]uint64 `json:"dropped"`
}

// HealthError is the last error: the bridge's (errors topic) or the
// connection's.
type HealthError struct {
	Type    string    `json:"type"` // the bridge's error_type, or "CONNECTION"
	Device  string    `json:"device,omitempty"`
	Message string    `json:"message"`
	Time    time.Time `json:"time"`
}

// HealthSettings configure StartHealth.
type HealthSettings struct {
	Interval time.Duration // at least MinHealthInterval
	Route    string        // RouteExecd or RouteBuiltIn
	Log      telegraf.Logger
}

// Pacing of the publisher; variables for tests.
var (
	// healthPoll is how often the connection's figures are looked at, to
	// see a connect, a loss or a new error within about a second.
	healthPoll = time.Second
	// healthMinGap is the least time between two health documents, a
	// change or not: the bridge allows one state per second.
	healthMinGap = 5 * time.Second
)

const (
	maxRecentRefused  = 10
	maxHealthText     = 256 // bytes of a description kept
	healthPublishWait = 10 * time.Second
	// errorConnection is the type of a connection error in last_error.
	errorConnection = "CONNECTION"
)

// ConnectionOwner is implemented by a connection shared across processes
// (execd/share): only the process that owns the bridge connection publishes
// the health state, so that a gateway has one publisher.
type ConnectionOwner interface {
	OwnsConnection() bool
}

// healthPublishers has one publisher per connection of this process: two
// plugins sharing a connection (Acquire) share its publisher.
var healthPublishers = struct {
	mu     sync.Mutex
	byConn map[Conn]*healthPublisher
}{byConn: make(map[Conn]*healthPublisher)}

// StartHealth publishes conn's health as the gateway's state every
// set.Interval, and as soon as the pacing allows when it changes
// meaningfully (connected or disconnected, a new error). A second call for
// the same conn shares the running publisher (its settings are those of
// the first). Call stop once; the last stop ends the publisher.
func StartHealth(conn Conn, set HealthSettings) (stop func()) {
	healthPublishers.mu.Lock()
	defer healthPublishers.mu.Unlock()
	p, ok := healthPublishers.byConn[conn]
	if !ok {
		p = newHealthPublisher(conn, set)
		healthPublishers.byConn[conn] = p
		go p.run()
	}
	p.users++
	var once sync.Once
	return func() {
		once.Do(func() {
			healthPublishers.mu.Lock()
			p.users--
			last := p.users == 0
			if last {
				delete(healthPublishers.byConn, conn)
			}
			healthPublishers.mu.Unlock()
			if last {
				close(p.stop)
				<-p.done
			}
		})
	}
}

type healthPublisher struct {
	conn    Conn
	set     HealthSettings
	version string
	users   int // under healthPublishers.mu
	stop    chan struct{}
	done    chan struct{}
	changed chan struct{} // a new bridge error (buffered, 1)

	mu      sync.Mutex
	lastErr *HealthError
	refused []RefusedDevice

	// Owned by run.
	seen           bool
	connected      bool
	connectedSince time.Time
	connects       uint64
	failures       uint64
	lost           uint64
	refusedCount   uint64
}

func newHealthPublisher(conn Conn, set HealthSettings) *healthPublisher {
	if set.Log == nil {
		set.Log = DiscardLogger{}
	}
	return &healthPublisher{
		conn: conn, set: set, version: ModuleVersion(),
		stop: make(chan struct{}), done: make(chan struct{}), changed: make(chan struct{}, 1),
	}
}

func (p *healthPublisher) run() {
	defer close(p.done)
	sub := p.conn.SubscribeErrors(p.onError)
	defer sub.Unsubscribe()
	tick := time.NewTicker(healthPoll)
	defer tick.Stop()
	var last time.Time // of the last document published
	pending := true    // a document is due: the first, or a change not yet told
	for {
		select {
		case <-p.stop:
			return
		case <-tick.C:
		case <-p.changed:
			pending = true
		}
		now := time.Now()
		st := p.conn.Stats()
		if p.observe(st, now) {
			pending = true
		}
		if o, ok := p.conn.(ConnectionOwner); ok && !o.OwnsConnection() {
			continue // another process owns the connection and publishes
		}
		due := pending || now.Sub(last) >= p.set.Interval
		if !due || !st.Connected || now.Sub(last) < healthMinGap {
			continue
		}
		payload, err := json.Marshal(p.document(st, now))
		if err != nil {
			p.set.Log.Errorf("Encoding the health state: %v", err)
			continue
		}
		last = now // failed attempts count too: the bridge may have seen them
		if err := p.publish(payload); err != nil {
			p.set.Log.Warnf("Publishing the health state of gateway %q failed: %v", p.conn.GatewayID(), err)
			continue
		}
		pending = false
	}
}

// publish sends one document, giving up when stopped.
func (p *healthPublisher) publish(payload []byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), healthPublishWait)
	defer cancel()
	go func() {
		select {
		case <-p.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	return p.conn.Publish(ctx, Message{Device: p.conn.GatewayID(), Kind: omnicore.KindState, Payload: payload, QoS: 1})
}

// observe follows the connection from the counters and reports whether it
// changed meaningfully: connected, disconnected, a connect failed, a device
// refused.
func (p *healthPublisher) observe(st Stats, now time.Time) bool {
	if !p.seen {
		p.seen = true
		p.connected, p.connects, p.failures, p.lost = st.Connected, st.Connects, st.ConnectFailures, st.ConnectionLost
		p.refusedCount = st.AttachesFailed + st.DevicesRefused
		if st.Connected {
			p.connectedSince = now
		}
		return true
	}
	changed := false
	if st.ConnectFailures > p.failures || st.ConnectionLost > p.lost {
		what := "the connection to the bridge was lost"
		if st.ConnectFailures > p.failures {
			what = "connecting to the bridge failed"
		}
		if h, ok := p.conn.(interface{ Health() (bool, error) }); ok {
			if _, err := h.Health(); err != nil {
				what += ": " + err.Error()
			}
		}
		p.setError(&HealthError{Type: errorConnection, Message: what, Time: now})
		changed = true
	}
	if st.Connected && (!p.connected || st.Connects > p.connects) {
		p.connectedSince = now
		changed = true
	}
	if !st.Connected && p.connected {
		changed = true
	}
	// A refused device: the bridge's error may have been published before
	// the session counted the refusal.
	if refused := st.AttachesFailed + st.DevicesRefused; refused > p.refusedCount {
		p.refusedCount = refused
		changed = true
	}
	p.connected, p.connects, p.failures, p.lost = st.Connected, st.Connects, st.ConnectFailures, st.ConnectionLost
	return changed
}

// onError keeps the bridge's errors (it runs on the session's dispatch
// goroutine: it only records and signals).
func (p *healthPublisher) onError(in Inbound) {
	var e omnicore.ErrorMessage
	if err := json.Unmarshal(in.Payload, &e); err != nil || e.ErrorType == "" {
		return // counted by the session as UNPARSEABLE
	}
	he := &HealthError{Type: e.ErrorType, Device: e.DeviceID, Message: clip(e.Description), Time: in.Received}
	if he.Time.IsZero() {
		he.Time = time.Now()
	}
	p.setError(he)
	if e.ErrorType == omnicore.ErrorAttachment && e.DeviceID != "" {
		p.mu.Lock()
		rd := RefusedDevice{Device: e.DeviceID, Reason: he.Message, Time: he.Time}
		kept := []RefusedDevice{rd}
		for _, r := range p.refused {
			if r.Device != e.DeviceID && len(kept) < maxRecentRefused {
				kept = append(kept, r)
			}
		}
		p.refused = kept
		p.mu.Unlock()
	}
	select {
	case p.changed <- struct{}{}:
	default:
	}
}

func (p *healthPublisher) setError(e *HealthError) {
	p.mu.Lock()
	p.lastErr = e
	p.mu.Unlock()
}

// document builds the health document from a Stats snapshot.
func (p *healthPublisher) document(st Stats, now time.Time) Health {
	h := Health{
		Schema:    HealthSchema,
		Version:   p.version,
		Route:     p.set.Route,
		Time:      now.UTC(),
		Connected: st.Connected,
		Devices: HealthDevices{
			Attached: st.Attached,
			Refused:  st.AttachesFailed + st.DevicesRefused,
		},
		Messages: HealthMessages{
			Acknowledged: st.Acked,
			Resent:       st.Retries + st.ResentAfterError,
			Dropped:      st.DroppedByReason,
		},
	}
	if h.Messages.Dropped == nil {
		h.Messages.Dropped = map[string]uint64{}
	}
	if st.Connected && !p.connectedSince.IsZero() {
		since := p.connectedSince.UTC()
		h.ConnectedSince = &since
	}
	if b, ok := st.Gauges["spool_bytes"]; ok {
		h.Spool = &HealthSpool{Bytes: b, Records: st.Gauges["spool_records"], OldestAgeSeconds: st.Gauges["spool_oldest_age_ms"] / 1000}
	}
	p.mu.Lock()
	if p.lastErr != nil {
		e := *p.lastErr
		e.Time = e.Time.UTC()
		h.LastError = &e
	}
	h.Devices.RecentlyRefused = append([]RefusedDevice(nil), p.refused...)
	p.mu.Unlock()
	sort.SliceStable(h.Devices.RecentlyRefused, func(i, j int) bool {
		return h.Devices.RecentlyRefused[i].Time.After(h.Devices.RecentlyRefused[j].Time)
	})
	return h
}

// clip bounds a text from the bridge, so that the document stays small
// (at most maxRecentRefused+1 descriptions: far below the 64 KB of a state).
func clip(s string) string {
	if len(s) <= maxHealthText {
		return s
	}
	cut := maxHealthText
	for cut > 0 && s[cut]&0xC0 == 0x80 { // not inside a UTF-8 sequence
		cut--
	}
	return s[:cut] + "…"
}

// modulePath is this product's Go module.
const modulePath = "github.com/telegraf-omnicore/telegraf-omnicore"

// ModuleVersion is the version of this product's module in the running
// binary: the main module in telegraf-omnicore, a dependency in a Telegraf
// built with the plugins; "dev" for a build from a work tree.
func ModuleVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "dev"
	}
	v := ""
	if bi.Main.Path == modulePath {
		v = bi.Main.Version
	}
	for _, d := range bi.Deps {
		if d.Path == modulePath {
			v = d.Version
			if d.Replace != nil && d.Replace.Version != "" {
				v = d.Replace.Version
			}
		}
	}
	if v == "" || v == "(devel)" {
		return "dev"
	}
	return v
}

// ValidateHealthInterval checks health_state_interval (0: off).
func ValidateHealthInterval(d time.Duration) error {
	if d != 0 && d < MinHealthInterval {
		return fmt.Errorf("health_state_interval %s must be 0 (off) or at least %s", d, MinHealthInterval)
	}
	return nil
}
