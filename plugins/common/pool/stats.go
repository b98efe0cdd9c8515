package pool

import "github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"

// MemberStatus is one member as the plugins report it (one omnicore_gateway
// metric per member).
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
	// Pooled is false for a plugin's single gateway (no pool fields).
	Pooled bool
}

// PoolFields are the pool's own figures of the member, nil when not pooled.
func (s MemberStatus) PoolFields() map[string]int64 {
	if !s.Pooled {
		return nil
	}
	up := int64(0)
	if s.Up {
		up = 1
	}
	return map[string]int64{
		"pool_up":        up,
		"pool_devices":   int64(s.Devices),
		"pool_moved_in":  int64(s.MovedIn),
		"pool_moved_out": int64(s.MovedOut),
		"pool_resent":    int64(s.Resent),
	}
}

// Fields are the member's connection counters plus, in a pool, the pool's,
// for a metric.
func (s MemberStatus) Fields() map[string]any {
	f := s.Stats.Fields()
	if !s.Pooled {
		return f
	}
	f["pool_up"] = s.Up
	f["pool_devices"] = int64(s.Devices)
	f["pool_moved_in"] = s.MovedIn
	f["pool_moved_out"] = s.MovedOut
	f["pool_resent"] = s.Resent
	return f
}

// Members reports every member, first member first.
func (p *Pool) Members() []MemberStatus {
	stats := make([]gateway.Stats, len(p.members))
	for i, m := range p.members {
		stats[i] = m.conn.Stats()
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]MemberStatus, len(p.members))
	for i, m := range p.members {
		out[i] = MemberStatus{
			GatewayID: m.id, Up: !m.down, Devices: m.carried,
			MovedIn: m.movedIn.Load(), MovedOut: m.movedOut.Load(), Resent: m.resent.Load(),
			Stats: stats[i], Pooled: true,
		}
	}
	return out
}

// Stats implements gateway.Conn: the members' counters summed; Connected
// only while every member is.
func (p *Pool) Stats() gateway.Stats {
	sum := gateway.Stats{Connected: true, ErrorsByType: map[string]uint64{}, DroppedByReason: map[string]uint64{}}
	for _, m := range p.members {
		st := m.conn.Stats()
		sum.Connected = sum.Connected && st.Connected
		sum.Connects += st.Connects
		sum.ConnectFailures += st.ConnectFailures
		sum.ConnectionLost += st.ConnectionLost
		sum.TokenRenewals += st.TokenRenewals
		sum.AttachesOK += st.AttachesOK
		sum.AttachesFailed += st.AttachesFailed
		sum.Detaches += st.Detaches
		sum.Attached += st.Attached
		sum.Published += st.Published
		sum.Acked += st.Acked
		sum.Retries += st.Retries
		sum.Received += st.Received
		for k, v := range st.ErrorsByType {
			sum.ErrorsByType[k] += v
		}
		for k, v := range st.DroppedByReason {
			sum.DroppedByReason[k] += v
		}
		for k, v := range st.Gauges {
			if sum.Gauges == nil {
				sum.Gauges = make(map[string]int64)
			}
			sum.Gauges[k] += v
		}
	}
	return sum
}
