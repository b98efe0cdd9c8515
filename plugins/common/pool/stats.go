package pool

import "github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"

// MemberStatus is one member as the pool sees it.
type MemberStatus struct {
	GatewayID string
	// Up is false while the pool has moved devices away from it.
	Up bool
	// Devices is how many devices the pool places on it.
	Devices  int
	MovedIn  uint64 // devices moved to it from another member
	MovedOut uint64 // devices moved from it to another member
	Resent   uint64 // messages not acknowledged by it, sent again on another member
	Stats    gateway.Stats
}

// FieldUp is the field of MemberStatus.Fields that says whether the pool
// places devices on the member (1) or has moved them away (0).
const FieldUp = "pool_up"

// Fields are the pool's own figures of the member as statistics fields
// (int64, like gateway.Stats.Fields; pool_up is 0 or 1). The member's
// connection counters are not in them: they are its Stats.
func (s MemberStatus) Fields() map[string]int64 {
	up := int64(0)
	if s.Up {
		up = 1
	}
	return map[string]int64{
		FieldUp:          up,
		"pool_devices":   int64(s.Devices),
		"pool_moved_in":  int64(s.MovedIn),
		"pool_moved_out": int64(s.MovedOut),
		"pool_resent":    int64(s.Resent),
	}
}

// Members reports every member, first member first.
func (p *Pool) Members() []MemberStatus {
	out := make([]MemberStatus, len(p.members))
	for i, m := range p.members {
		out[i] = p.status(m)
		out[i].Stats = m.conn.Stats()
	}
	return out
}

// status reports the pool's figures of member m, without its Stats.
func (p *Pool) status(m *member) MemberStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	return MemberStatus{
		GatewayID: m.id, Up: !m.down, Devices: m.carried,
		MovedIn: m.movedIn.Load(), MovedOut: m.movedOut.Load(), Resent: m.resent.Load(),
	}
}

// Stats implements gateway.Conn: the members' counters summed; Connected
// only while every member is.
func (p *Pool) Stats() gateway.Stats {
	sum := gateway.Stats{Connected: true, ErrorsByType: map[string]uint64{}, DroppedByReason: map[string]uint64{}}
	for _, m := range p.members {
		sum.Add(m.conn.Stats())
	}
	return sum
}

// Gateway is one gateway of a plugin's connection, for statistics: a
// member of a pool, or the plugin's single gateway.
type Gateway struct {
	ID   string
	Conn gateway.Conn
	// PoolFields returns the pool's figures of the gateway (MemberStatus's
	// Fields); nil outside a pool.
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
			return p.status(m).Fields()
		}}
	}
	return out
}
