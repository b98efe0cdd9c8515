package gatewaystats

import (
	"sync"
	"time"

	"github.com/influxdata/telegraf/selfstat"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

// refreshInterval is how often the counters are copied into selfstat:
// selfstat holds values, it cannot ask for them when inputs.internal
// gathers, and its shortest useful interval is a second.
const refreshInterval = time.Second

// exporters holds one exporter per connection: the output and the input of
// one gateway share the connection and so its series.
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
	// the stats created so far, by field.
	refreshMu  sync.Mutex
	registered map[string]selfstat.Stat
}

// user is one Export call; fields is what its plugin adds (nil for none).
type user struct {
	fields func() map[string]int64
}

// ExportEach is Export for every gateway of a plugin's connection: one
// series per member of a pool (its gateway_id), with the pool's figures of
// that member, or the plugin's one gateway; own, the plugin's counters (may
// be nil), goes with the top-level gateway, as in Gather. The output and
// the input of one gateway share its series.
func ExportEach(conn gateway.Conn, registryID string, own func() map[string]int64) (stop func()) {
	var stops []func()
	for i, g := range pool.Gateways(conn) {
		stops = append(stops, Export(g.Conn, g.ID, registryID, plugin(g, i == 0, own)))
	}
	return func() {
		for _, s := range stops {
			s()
		}
	}
}

// Export publishes conn's counters under the gateway's tags, plus the
// plugin's fields (may be nil) in the same series, until the returned stop
// is called. Calls for the same conn share one exporter (their fields are
// merged as Gather would merge them), and the last stop removes the series,
// so that a reloaded Telegraf does not report a closed connection's
// figures.
func Export(conn gateway.Conn, gatewayID, registryID string, fields func() map[string]int64) (stop func()) {
	u := &user{fields: fields}
	exporters.mu.Lock()
	e, ok := exporters.m[conn]
	if !ok {
		e = &exporter{
			conn:       conn,
			tags:       Tags(gatewayID, registryID),
			stop:       make(chan struct{}),
			done:       make(chan struct{}),
			users:      make(map[*user]struct{}),
			registered: make(map[string]selfstat.Stat),
		}
		exporters.m[conn] = e
	}
	e.mu.Lock()
	e.users[u] = struct{}{}
	e.mu.Unlock()
	exporters.mu.Unlock()
	// A new user's fields show at once, not at the next tick.
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

// refresh copies a snapshot of the series into selfstat, and removes the
// fields that left it (the gauges of a reporter that stopped).
func (e *exporter) refresh() {
	e.refreshMu.Lock()
	defer e.refreshMu.Unlock()
	st := e.conn.Stats()
	var plugins []map[string]int64
	e.mu.Lock()
	for u := range e.users {
		if u.fields != nil {
			plugins = append(plugins, u.fields())
		}
	}
	e.mu.Unlock()
	f := fields(st, plugins...)
	for k, v := range f {
		s, ok := e.registered[k]
		if !ok {
			s = selfstat.Register(selfstatName, k, e.tags)
			e.registered[k] = s
		}
		s.Set(v)
	}
	for k := range e.registered {
		if _, ok := f[k]; !ok {
			selfstat.Unregister(selfstatName, k, e.tags)
			delete(e.registered, k)
		}
	}
}

func (e *exporter) unregister() {
	e.refreshMu.Lock()
	defer e.refreshMu.Unlock()
	for k := range e.registered {
		selfstat.Unregister(selfstatName, k, e.tags)
	}
	clear(e.registered)
}
