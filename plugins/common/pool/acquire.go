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

// IDs lists conn's gateway IDs: every member of a pool, or conn's one.
func IDs(conn gateway.Conn) []string {
	if p, ok := conn.(*Pool); ok {
		return p.GatewayIDs()
	}
	return []string{conn.GatewayID()}
}
