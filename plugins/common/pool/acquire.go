package pool

import (
	"errors"
	"fmt"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// AcquireFunc is gateway.Acquire's signature; tests pass fakes.
type AcquireFunc func(*gateway.Config) (gateway.Conn, func(), error)

// Acquire gets the connection of every gateway in cfgs with acquire
// (gateway.Acquire when nil: shared per gateway identity, in and across
// processes, as for a single gateway) and pools them, first config first.
// Each member's message budget is its config's MaxMessageRate and its
// capacity its MaxDevices, at most the bridge's limit. release
// closes the pool, then releases every connection.
func Acquire(cfgs []*gateway.Config, acquire AcquireFunc, opts Options) (p *Pool, release func(), err error) {
	if len(cfgs) == 0 {
		return nil, nil, errors.New("pool: no gateways")
	}
	if acquire == nil {
		acquire = gateway.Acquire
	}
	var releases []func()
	releaseAll := func() {
		for i := len(releases) - 1; i >= 0; i-- {
			releases[i]()
		}
	}
	members := make([]Member, 0, len(cfgs))
	for _, cfg := range cfgs {
		conn, rel, err := acquire(cfg)
		if err != nil {
			releaseAll()
			return nil, nil, fmt.Errorf("gateway %q: %w", cfg.GatewayID, err)
		}
		releases = append(releases, rel)
		maxDevices := omnicore.MaxAttachedDevices
		if cfg.MaxDevices > 0 {
			maxDevices = min(cfg.MaxDevices, maxDevices)
		}
		members = append(members, Member{Conn: conn, MaxDevices: maxDevices, MaxMessageRate: cfg.MaxMessageRate})
	}
	if opts.DetachIdle == 0 {
		opts.DetachIdle = cfgs[0].DetachIdle
	}
	p, err = New(members, opts)
	if err != nil {
		releaseAll()
		return nil, nil, err
	}
	return p, func() {
		p.Close()
		releaseAll()
	}, nil
}

// Connect returns a plugin's connection for its validated configs (from
// Configs): the gateway's own connection when there is one gateway, so that
// a plugin without gateways sub-tables runs exactly as before, or a pool of
// them all.
func Connect(cfgs []*gateway.Config, acquire AcquireFunc, log telegraf.Logger) (gateway.Conn, func(), error) {
	if len(cfgs) == 1 {
		if acquire == nil {
			acquire = gateway.Acquire
		}
		return acquire(cfgs[0])
	}
	p, release, err := Acquire(cfgs, acquire, Options{Log: log})
	if err != nil {
		return nil, nil, err
	}
	return p, release, nil
}

// Status reports conn's gateways: each member of a pool, or conn's one
// gateway.
func Status(conn gateway.Conn) []MemberStatus {
	if p, ok := conn.(*Pool); ok {
		return p.Members()
	}
	return []MemberStatus{{GatewayID: conn.GatewayID(), Up: true, Stats: conn.Stats()}}
}

// IDs lists conn's gateway IDs: every member of a pool, or conn's one.
func IDs(conn gateway.Conn) []string {
	if p, ok := conn.(*Pool); ok {
		return p.GatewayIDs()
	}
	return []string{conn.GatewayID()}
}

// Gateway is one gateway of a plugin's connection, for statistics: a
// member of a pool, or the plugin's single gateway.
type Gateway struct {
	ID   string
	Conn gateway.Conn
	// PoolFields returns the pool's figures of the gateway (pool_devices,
	// pool_moved_in, pool_moved_out, pool_resent); nil outside a pool.
	PoolFields func() map[string]int64
}

// Gateways lists conn's gateways, the top-level one first.
func Gateways(conn gateway.Conn) []Gateway {
	p, ok := conn.(*Pool)
	if !ok {
		return []Gateway{{ID: conn.GatewayID(), Conn: conn}}
	}
	out := make([]Gateway, len(p.members))
	for i, m := range p.members {
		out[i] = Gateway{ID: m.id, Conn: m.conn, PoolFields: func() map[string]int64 {
			p.mu.Lock()
			carried := m.carried
			p.mu.Unlock()
			return map[string]int64{
				"pool_devices":   int64(carried),
				"pool_moved_in":  int64(m.movedIn.Load()),
				"pool_moved_out": int64(m.movedOut.Load()),
				"pool_resent":    int64(m.resent.Load()),
			}
		}}
	}
	return out
}
