// Package gatewaystats publishes a gateway connection's counters through
// Telegraf's selfstat when the plugins run inside Telegraf, so that
// inputs.internal reports them as the internal_omnicore measurement next to
// Telegraf's own internal_write, internal_gather... (Under the execd binary
// selfstat would stay in the plugin's process; there the input's Gather
// emits omnicore_gateway instead.)
//
// One series per gateway (tags gateway_id, registry_id) carries the
// counters and gauges as fields; drops and bridge errors are one series per
// reason and error type (tags reason, error_type) with a "dropped" or
// "errors" field, so that a new reason is a new series, not a new field.
package gatewaystats

import (
	"maps"
	"sync"
	"time"

	"github.com/influxdata/telegraf/selfstat"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// Measurement is the selfstat measurement; inputs.internal prefixes it with
// "internal_".
const Measurement = "omnicore"

// refreshInterval is how often the counters are copied into selfstat:
// selfstat holds values, it cannot ask for them when inputs.internal
// gathers, and its shortest useful interval is a second.
const refreshInterval = time.Second

// exporters holds one exporter per connection: the output and the input of
// one gateway share the connection and so its counters.
var exporters = struct {
	mu sync.Mutex
	m  map[gateway.Conn]*exporter
}{m: make(map[gateway.Conn]*exporter)}

type exporter struct {
	conn gateway.Conn
	tags map[string]string
	stop chan struct{}
	done chan struct{}

	mu    sync.Mutex
	users map[*user]struct{}

	// refreshMu serialises refresh and unregister, which own registered:
	// the stats created so far, keyed by field and the extra tag value.
	refreshMu  sync.Mutex
	registered map[statKey]selfstat.Stat
}

// user is one Export call; own is its plugin's counters (nil for none).
type user struct {
	own func() map[string]int64
}

type statKey struct {
	field, tagKey, tagValue string
}

// Export publishes conn's counters under the gateway's tags, plus the
// plugin's own counters (own, may be nil) as more fields of the same series,
// until the returned stop is called. Calls for the same conn share one
// exporter (the fields of several own functions are summed), and the last
// stop removes the series, so that a reloaded Telegraf does not report a
// closed connection's figures.
func Export(conn gateway.Conn, gatewayID, registryID string, own func() map[string]int64) (stop func()) {
	u := &user{own: own}
	exporters.mu.Lock()
	e, ok := exporters.m[conn]
	if !ok {
		e = &exporter{
			conn:       conn,
			tags:       map[string]string{"gateway_id": gatewayID, "registry_id": registryID},
			stop:       make(chan struct{}),
			done:       make(chan struct{}),
			users:      make(map[*user]struct{}),
			registered: make(map[statKey]selfstat.Stat),
		}
		exporters.m[conn] = e
	}
	e.mu.Lock()
	e.users[u] = struct{}{}
	e.mu.Unlock()
	exporters.mu.Unlock()
	// A new user's own fields show at once, not at the next tick.
	e.refresh()
	if !ok {
		go e.loop()
	}

	var once sync.Once
	return func() {
		once.Do(func() {
			exporters.mu.Lock()
			e.mu.Lock()
			delete(e.users, u)
			last := len(e.users) == 0
			e.mu.Unlock()
			if last {
				delete(exporters.m, conn)
			}
			exporters.mu.Unlock()
			if last {
				close(e.stop)
				<-e.done
				e.unregister()
			}
		})
	}
}

func (e *exporter) loop() {
	defer close(e.done)
	t := time.NewTicker(refreshInterval)
	defer t.Stop()
	for {
		select {
		case <-e.stop:
			return
		case <-t.C:
			e.refresh()
		}
	}
}

// refresh copies a snapshot of the counters into selfstat.
func (e *exporter) refresh() {
	e.refreshMu.Lock()
	defer e.refreshMu.Unlock()
	s := e.conn.Stats()
	connected := int64(0)
	if s.Connected {
		connected = 1
	}
	fields := map[string]int64{
		"connected":        connected,
		"connects":         int64(s.Connects),
		"connect_failures": int64(s.ConnectFailures),
		"connection_lost":  int64(s.ConnectionLost),
		"token_renewals":   int64(s.TokenRenewals),
		"attaches_ok":      int64(s.AttachesOK),
		"attaches_failed":  int64(s.AttachesFailed),
		"detaches":         int64(s.Detaches),
		"attached":         int64(s.Attached),
		"published":        int64(s.Published),
		"acked":            int64(s.Acked),
		"retries":          int64(s.Retries),
		"received":         int64(s.Received),
	}
	maps.Copy(fields, s.Gauges)
	e.mu.Lock()
	for u := range e.users {
		if u.own == nil {
			continue
		}
		for k, v := range u.own() {
			fields[k] += v
		}
	}
	e.mu.Unlock()
	for f, v := range fields {
		e.stat(statKey{field: f}).Set(v)
	}
	for reason, n := range s.DroppedByReason {
		e.stat(statKey{field: "dropped", tagKey: "reason", tagValue: reason}).Set(int64(n))
	}
	for typ, n := range s.ErrorsByType {
		e.stat(statKey{field: "errors", tagKey: "error_type", tagValue: typ}).Set(int64(n))
	}
}

func (e *exporter) tagsOf(k statKey) map[string]string {
	tags := maps.Clone(e.tags)
	if k.tagKey != "" {
		tags[k.tagKey] = k.tagValue
	}
	return tags
}

func (e *exporter) stat(k statKey) selfstat.Stat {
	s, ok := e.registered[k]
	if !ok {
		s = selfstat.Register(Measurement, k.field, e.tagsOf(k))
		e.registered[k] = s
	}
	return s
}

func (e *exporter) unregister() {
	e.refreshMu.Lock()
	defer e.refreshMu.Unlock()
	for k := range e.registered {
		selfstat.Unregister(Measurement, k.field, e.tagsOf(k))
	}
}
