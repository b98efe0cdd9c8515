// Package pool spreads the devices of one plugin over several gateway
// connections: past one gateway's limits (10,000 attached devices, about 100
// messages/s per connection) and across a gateway's failure.
//
// Each device is carried by one member at a time. Its place follows
// rendezvous hashing of its ID over the members' gateway IDs: stable across
// restarts and hosts, and adding or removing a member moves only about 1/N of
// the devices. A member that is full (MaxDevices) or over its message budget
// hands a new device to the next member in that device's order. A member that
// cannot connect, or that the bridge refuses a device on, hands its devices
// to the next healthy member at once; they move back, detached from the
// member they leave, once their own member is healthy again.
//
// A move never loses a message and never sends one twice: a move back lets
// the device's messages in flight be acknowledged before the switch, and a
// failover re-sends on the new member only what the old one had not had
// acknowledged (as a reconnect would).
//
// *Pool implements gateway.Conn, so the plugins use it as they use one
// gateway. Inbound config and commands of a device are delivered once, from
// the member that carries it.
//
// Two pools over the same gateways (an input and an output, in one process
// or sharing the connections across processes) take the same decisions from
// the same hashes and the same connection health, so they agree on where a
// device is; while one of them moves a device before the other, the device
// may briefly be attached through both gateways, which is harmless as long as
// it is bound to both.
package pool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// MaxMembers bounds the pool's size (a device's order is kept as bytes).
const MaxMembers = 64

// Defaults of Options.
const (
	DefaultHealthInterval = time.Second
	DefaultFailoverAfter  = 30 * time.Second
	DefaultMoveBackAfter  = 30 * time.Second
	DefaultDrainTimeout   = 10 * time.Second
	DefaultRefusalRetry   = 30 * time.Second
	DefaultOpTimeout      = 30 * time.Second
	maxRefusalRetry       = 10 * time.Minute
	// moveWorkers bounds the moves run at once; the sessions pipeline the
	// attaches and detaches behind them.
	moveWorkers = 128
)

// Member is one gateway of the pool.
type Member struct {
	Conn gateway.Conn
	// MaxDevices is how many devices the pool places on this gateway;
	// 0 means the bridge's limit, omnicore.MaxAttachedDevices.
	MaxDevices int
	// MaxMessageRate is the gateway's message budget per second (its
	// max_message_rate); 0 when none is set. A gateway over its budget gets
	// no new devices while another has room.
	MaxMessageRate float64
}

// Options tune failure detection and moves; zero values take the defaults.
type Options struct {
	// HealthInterval is how often the members' connections are checked.
	HealthInterval time.Duration
	// FailoverAfter is how long a member may be disconnected before its
	// devices move, when no connect attempt failed meanwhile (a failed
	// attempt moves them at once). It rides out token renewals and kicks.
	FailoverAfter time.Duration
	// MoveBackAfter is how long a member that was down must stay connected
	// before its devices move back, so that a flapping gateway does not
	// bounce them.
	MoveBackAfter time.Duration
	// DrainTimeout bounds how long a move back waits for the device's
	// messages in flight on the member it leaves to be acknowledged; past
	// it they are abandoned there and sent on the new member.
	DrainTimeout time.Duration
	// RefusalRetry is the first wait before a member that refused a device
	// is tried for it again (doubling, up to 10 minutes).
	RefusalRetry time.Duration
	// OpTimeout bounds each attach, subscribe and detach a move makes.
	OpTimeout time.Duration
	// DetachIdle, when set, detaches and forgets devices that had no
	// traffic and no subscription for this long (the plugins' detach_idle),
	// so that devices seen once do not fill the members for ever.
	DetachIdle time.Duration
	Log        telegraf.Logger
}

// Pool is a set of gateway connections that carries devices as one. It
// implements gateway.Conn.
type Pool struct {
	members []*member
	byID    map[string]*member
	hashes  []uint64
	opts    Options
	log     telegraf.Logger

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	sem      chan struct{} // move workers
	healthMu sync.Mutex    // one checkHealth at a time
	batches  sync.WaitGroup

	mu        sync.Mutex
	devices   map[string]*placement
	displaced map[*placement]struct{} // moved off their first member by a failure
	nextSub   uint64
	closed    bool
}

var _ gateway.Conn = (*Pool)(nil)

type member struct {
	idx        int
	conn       gateway.Conn
	id         string
	maxDevices int
	maxRate    float64
	sent       atomic.Uint64 // operations routed to it, for its message rate
	movedIn    atomic.Uint64
	movedOut   atomic.Uint64
	resent     atomic.Uint64 // messages abandoned on it by a failover and sent again elsewhere

	// Guarded by Pool.mu.
	carried           int // devices placed on it, moves to it included
	down              bool
	downReason        string
	connectedSince    time.Time
	disconnectedSince time.Time
	failuresSeen      uint64
	windowStart       time.Time // message rate: the current window
	windowSent        uint64    // sent at windowStart
	lastRate          float64   // the previous window's rate
}

// rateWindow is the least span a message rate is measured over.
const rateWindow = time.Second

// rateLocked is m's message rate: the last full window's, or the current
// one's so far when higher (counted over at least rateWindow, so that a
// burst right after a window starts does not look like a huge rate).
func (m *member) rateLocked(now time.Time) float64 {
	el := max(now.Sub(m.windowStart), rateWindow).Seconds()
	return max(m.lastRate, float64(m.sent.Load()-m.windowSent)/el)
}

// placement is where one device is carried. Guarded by Pool.mu.
type placement struct {
	id       string
	order    []uint8 // members, best first
	carrier  int     // member index; -1 while no member will take it
	actx     context.Context
	acancel  context.CancelFunc // cancelled when the device leaves its carrier
	inflight int                // operations running on the carrier
	idle     chan struct{}      // closed when inflight drops to 0, while a move waits
	moving   chan struct{}      // non-nil during a move; closed at its end
	wanted   bool               // attached on request: restored after a move
	refusals []refusal          // by member; nil until a refusal
	lastErr  error              // the last refusal
	epoch    uint64             // moves so far, for config dedupe
	placed   bool               // has had a carrier
	lastUsed time.Time

	// Per-device subscriptions (Subscribe): one member subscription fans
	// out to the handlers.
	handlers    map[uint64]gateway.Handler
	msub        gateway.Subscription
	msubOn      int
	config      []byte // latest config, for handlers that subscribe late
	configTopic string
	hasConfig   bool
	cfgHash     uint64
	cfgEpoch    uint64
}

type refusal struct {
	until    time.Time
	failures int
}

// New builds a pool of members (at least one; the first is the plugin's
// top-level gateway) and starts watching their health. It does no network
// I/O of its own.
func New(members []Member, opts Options) (*Pool, error) {
	if len(members) == 0 {
		return nil, errors.New("pool: no gateways")
	}
	if len(members) > MaxMembers {
		return nil, fmt.Errorf("pool: %d gateways, at most %d", len(members), MaxMembers)
	}
	setDefault(&opts.HealthInterval, DefaultHealthInterval)
	setDefault(&opts.FailoverAfter, DefaultFailoverAfter)
	setDefault(&opts.MoveBackAfter, DefaultMoveBackAfter)
	setDefault(&opts.DrainTimeout, DefaultDrainTimeout)
	setDefault(&opts.RefusalRetry, DefaultRefusalRetry)
	setDefault(&opts.OpTimeout, DefaultOpTimeout)
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{
		byID:      make(map[string]*member, len(members)),
		opts:      opts,
		log:       opts.Log,
		ctx:       ctx,
		cancel:    cancel,
		sem:       make(chan struct{}, moveWorkers),
		devices:   make(map[string]*placement),
		displaced: make(map[*placement]struct{}),
	}
	if p.log == nil {
		p.log = discard{}
	}
	now := time.Now()
	for i, mb := range members {
		if mb.Conn == nil {
			cancel()
			return nil, fmt.Errorf("pool: gateway %d has no connection", i+1)
		}
		id := mb.Conn.GatewayID()
		if _, dup := p.byID[id]; dup {
			cancel()
			return nil, fmt.Errorf("pool: gateway %q is listed twice", id)
		}
		if mb.MaxDevices < 0 || mb.MaxMessageRate < 0 {
			cancel()
			return nil, fmt.Errorf("pool: gateway %q: negative limit", id)
		}
		m := &member{idx: i, conn: mb.Conn, id: id, maxDevices: mb.MaxDevices, maxRate: mb.MaxMessageRate, windowStart: now}
		if m.maxDevices == 0 {
			m.maxDevices = omnicore.MaxAttachedDevices
		}
		p.members = append(p.members, m)
		p.byID[id] = m
		p.hashes = append(p.hashes, hashID(id))
	}
	p.wg.Add(1)
	go p.healthLoop()
	return p, nil
}

func setDefault(d *time.Duration, def time.Duration) {
	if *d <= 0 {
		*d = def
	}
}

// Close stops the pool's own work and abandons operations in flight. It does
// not close the members' connections: their owner releases them.
func (p *Pool) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.cancel()
	p.wg.Wait()
}

// GatewayID implements gateway.Conn: the first member's, the plugin's
// top-level gateway.
func (p *Pool) GatewayID() string { return p.members[0].id }

// GatewayIDs lists the members' gateway IDs, first member first.
func (p *Pool) GatewayIDs() []string {
	ids := make([]string, len(p.members))
	for i, m := range p.members {
		ids[i] = m.id
	}
	return ids
}

// Publish implements gateway.Conn: on the device's carrier. A gateway's own
// messages go through that gateway.
func (p *Pool) Publish(ctx context.Context, msg gateway.Message) error {
	if m, ok := p.byID[msg.Device]; ok {
		m.sent.Add(1)
		return m.conn.Publish(ctx, msg)
	}
	if err := omnicore.ValidateID(msg.Device); err != nil {
		return fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	return p.onCarrier(ctx, msg.Device, func(ctx context.Context, _ *placement, m *member) error {
		m.sent.Add(1)
		return m.conn.Publish(ctx, msg)
	})
}

// Attach implements gateway.Conn: on the device's carrier.
func (p *Pool) Attach(ctx context.Context, device string) error {
	if _, ok := p.byID[device]; ok {
		return nil
	}
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	return p.onCarrier(ctx, device, p.restoreOn)
}

// Detach implements gateway.Conn: from the device's carrier; the pool then
// forgets the device unless someone is subscribed to it.
func (p *Pool) Detach(ctx context.Context, device string) error {
	if _, ok := p.byID[device]; ok {
		return nil
	}
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	for {
		p.mu.Lock()
		pl, ok := p.devices[device]
		if !ok {
			p.mu.Unlock()
			return nil
		}
		if pl.moving != nil {
			ch := pl.moving
			p.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		from := pl.carrier
		pl.wanted = false
		keep := len(pl.handlers) > 0
		if !keep {
			p.unplaceLocked(pl)
		}
		p.mu.Unlock()
		if from < 0 || keep {
			return nil
		}
		return p.members[from].conn.Detach(ctx, device)
	}
}

// CountDrop implements gateway.Conn, on the first member.
func (p *Pool) CountDrop(reason string, n uint64) { p.members[0].conn.CountDrop(reason, n) }

// ReportGauges implements gateway.Conn, on the first member (reporting on
// every member would count the gauges once per member).
func (p *Pool) ReportGauges(source string, gauges map[string]int64) {
	p.members[0].conn.ReportGauges(source, gauges)
}

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

// MemberConns returns the members' connections, first member first.
func (p *Pool) MemberConns() []gateway.Conn {
	out := make([]gateway.Conn, len(p.members))
	for i, m := range p.members {
		out[i] = m.conn
	}
	return out
}

// Carrier returns the gateway ID of the member carrying device, "" when none.
func (p *Pool) Carrier(device string) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	pl, ok := p.devices[device]
	if !ok || pl.carrier < 0 {
		return ""
	}
	return p.members[pl.carrier].id
}

// ---------------------------------------------------------------------------
// Operations on a device's carrier

type op func(ctx context.Context, pl *placement, m *member) error

// onCarrier runs fn on the device's carrier, placing the device first. When
// the device moves meanwhile fn's context is cancelled and fn runs again on
// the new carrier; when the carrier refuses the device, the device fails
// over to the next member and fn runs there.
func (p *Pool) onCarrier(ctx context.Context, device string, fn op) error {
	for {
		pl, m, actx, err := p.enter(ctx, device)
		if err != nil {
			return err
		}
		cctx, cancel := context.WithCancel(ctx)
		stop := context.AfterFunc(actx, cancel)
		err = fn(cctx, pl, m)
		stop()
		cancel()
		p.leave(pl, err == nil)
		switch {
		case err == nil:
			return nil
		case ctx.Err() != nil:
			return err
		case actx.Err() != nil:
			if p.ctx.Err() != nil {
				return gateway.ErrClosed
			}
			m.resent.Add(1)
			continue // moved: again on the new carrier
		case errors.Is(err, gateway.ErrAttachRefused):
			p.refused(pl, m, err)
			continue
		default:
			return err
		}
	}
}

// enter waits for a move of the device to end, places it when needed and
// counts an operation in flight on its carrier.
func (p *Pool) enter(ctx context.Context, device string) (*placement, *member, context.Context, error) {
	for {
		p.mu.Lock()
		if p.closed {
			p.mu.Unlock()
			return nil, nil, nil, gateway.ErrClosed
		}
		pl := p.placementLocked(device)
		if pl.moving != nil {
			ch := pl.moving
			p.mu.Unlock()
			select {
			case <-ch:
				continue
			case <-ctx.Done():
				return nil, nil, nil, ctx.Err()
			}
		}
		if pl.carrier < 0 {
			idx := p.chooseLocked(pl, time.Now(), !pl.placed, true)
			if idx < 0 {
				err := pl.lastErr
				if err == nil {
					err = fmt.Errorf("%w: every gateway of the pool is full", gateway.ErrAttachRefused)
				}
				p.mu.Unlock()
				return nil, nil, nil, fmt.Errorf("no gateway of the pool takes device %q now: %w", device, err)
			}
			p.members[idx].carried++
			p.setCarrierLocked(pl, idx)
		}
		pl.inflight++
		pl.lastUsed = time.Now()
		m := p.members[pl.carrier]
		actx := pl.actx
		p.mu.Unlock()
		return pl, m, actx, nil
	}
}

// placementLocked returns device's placement, creating it unplaced.
func (p *Pool) placementLocked(device string) *placement {
	pl, ok := p.devices[device]
	if !ok {
		pl = &placement{id: device, order: order(p.hashes, device), carrier: -1, msubOn: -1}
		p.devices[device] = pl
	}
	return pl
}

func (p *Pool) leave(pl *placement, ok bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pl.inflight--
	if ok {
		pl.wanted = true
	}
	if pl.inflight == 0 && pl.idle != nil {
		close(pl.idle)
		pl.idle = nil
	}
}

// restoreOn makes the device attached on m, with its per-device
// subscription when it has handlers.
func (p *Pool) restoreOn(ctx context.Context, pl *placement, m *member) error {
	p.mu.Lock()
	needSub := len(pl.handlers) > 0 && !(pl.msub != nil && pl.msubOn == m.idx)
	p.mu.Unlock()
	if !needSub {
		return m.conn.Attach(ctx, pl.id)
	}
	sub, err := m.conn.Subscribe(ctx, pl.id, p.deviceHandler(m, pl))
	if err != nil {
		if sub != nil {
			sub.Unsubscribe() // the pool retries, not the session
		}
		return err
	}
	p.mu.Lock()
	if pl.carrier == m.idx && pl.msub == nil {
		pl.msub, pl.msubOn = sub, m.idx
		sub = nil
	}
	p.mu.Unlock()
	if sub != nil {
		sub.Unsubscribe()
	}
	return nil
}

// ---------------------------------------------------------------------------
// Placement

// chooseLocked picks the member for pl: the first in its order that has not
// refused it lately, is up and has room; for a new device (fresh) also under
// its message budget when another one is. With fallback, when no member that
// is up has room, the first with room even if down (the device then waits
// there for the member to recover). -1 when none: every member refused the
// device lately or is full.
func (p *Pool) chooseLocked(pl *placement, now time.Time, fresh, fallback bool) int {
	passes := 2
	if fallback {
		passes = 3
	}
	for pass := 0; pass < passes; pass++ {
		for _, i := range pl.order {
			m := p.members[i]
			switch {
			case pl.refusedLocked(int(i), now):
				continue
			case int(i) != pl.carrier && m.carried >= m.maxDevices:
				continue
			case pass < 2 && m.down:
				continue
			case pass == 0 && fresh && m.maxRate > 0 && m.rateLocked(now) >= m.maxRate:
				continue
			}
			return int(i)
		}
	}
	return -1
}

func (pl *placement) refusedLocked(i int, now time.Time) bool {
	return pl.refusals != nil && now.Before(pl.refusals[i].until)
}

func (pl *placement) rank(i int) int {
	for r, j := range pl.order {
		if int(j) == i {
			return r
		}
	}
	return len(pl.order)
}

// setCarrierLocked makes idx pl's carrier (its count already includes pl)
// with a fresh context for the operations on it. A device is displaced when
// a member before its carrier is down or refused it: it moves back later.
func (p *Pool) setCarrierLocked(pl *placement, idx int) {
	pl.carrier = idx
	pl.placed = true
	pl.actx, pl.acancel = context.WithCancel(p.ctx)
	displaced := false
	now := time.Now()
	for _, i := range pl.order {
		if int(i) == idx {
			break
		}
		if p.members[i].down || pl.refusedLocked(int(i), now) {
			displaced = true
			break
		}
	}
	if displaced {
		p.displaced[pl] = struct{}{}
	} else {
		delete(p.displaced, pl)
	}
}

// unplaceLocked forgets pl.
func (p *Pool) unplaceLocked(pl *placement) {
	if pl.carrier >= 0 {
		p.members[pl.carrier].carried--
		pl.acancel()
	}
	pl.carrier = -1
	delete(p.devices, pl.id)
	delete(p.displaced, pl)
}

// refused records that m refused pl's device and, when m carries it, moves
// it to the next member at once.
func (p *Pool) refused(pl *placement, m *member, err error) {
	p.mu.Lock()
	now := time.Now()
	if pl.refusals == nil {
		pl.refusals = make([]refusal, len(p.members))
	}
	r := &pl.refusals[m.idx]
	r.failures++
	r.until = now.Add(min(p.opts.RefusalRetry<<min(r.failures-1, 20), maxRefusalRetry))
	pl.lastErr = err
	if pl.carrier != m.idx || pl.moving != nil {
		p.mu.Unlock()
		// Not (or no longer) its carrier: make sure m does not keep it.
		p.forget(m, pl.id)
		return
	}
	to := p.chooseLocked(pl, now, false, true)
	p.claimLocked(pl, to)
	p.mu.Unlock()
	p.log.Debugf("Gateway %q refused device %q: moving it to %s", m.id, pl.id, p.name(to))
	p.switchTo(pl, to, 0, nil)
}

func (p *Pool) name(i int) string {
	if i < 0 {
		return "no gateway (every gateway of the pool refused it)"
	}
	return fmt.Sprintf("gateway %q", p.members[i].id)
}

// claimLocked starts a move of pl to member to (-1: to none): new
// operations on the device wait until it ends.
func (p *Pool) claimLocked(pl *placement, to int) {
	pl.moving = make(chan struct{})
	if to >= 0 {
		p.members[to].carried++
	}
}

// switchTo ends a move claimed by claimLocked: it lets operations in flight
// on the old carrier finish for up to wait, abandons the rest (they run
// again on the new carrier), detaches the device from the member it leaves,
// and opens the device on the new carrier, with newSub as its per-device
// subscription there when the caller made one.
func (p *Pool) switchTo(pl *placement, to int, wait time.Duration, newSub gateway.Subscription) {
	p.mu.Lock()
	from := pl.carrier
	p.mu.Unlock()
	if wait > 0 {
		p.waitIdle(pl, wait)
	}
	p.mu.Lock()
	if pl.acancel != nil {
		pl.acancel()
	}
	p.mu.Unlock()
	p.waitIdle(pl, p.opts.OpTimeout)

	p.mu.Lock()
	oldSub := pl.msub // on from, normally
	pl.msub, pl.msubOn = nil, -1
	p.mu.Unlock()
	if oldSub != nil {
		oldSub.Unsubscribe()
	}
	if from >= 0 {
		p.forget(p.members[from], pl.id)
	}

	p.mu.Lock()
	if from >= 0 {
		p.members[from].carried--
		if to != from && to >= 0 {
			p.members[from].movedOut.Add(1)
		}
	}
	pl.epoch++
	if to >= 0 {
		if to != from {
			p.members[to].movedIn.Add(1)
		}
		p.setCarrierLocked(pl, to)
		if newSub != nil {
			pl.msub, pl.msubOn = newSub, to
		}
	} else {
		pl.carrier = -1
		if pl.wanted || len(pl.handlers) > 0 {
			p.displaced[pl] = struct{}{} // retried by the health loop
		} else {
			delete(p.displaced, pl)
		}
	}
	close(pl.moving)
	pl.moving = nil
	p.mu.Unlock()
}

// forget detaches device from m; when m is not connected this only makes
// its session forget the device, so that it is not attached again on the
// next connect.
func (p *Pool) forget(m *member, device string) {
	ctx, cancel := context.WithTimeout(p.ctx, p.opts.OpTimeout)
	defer cancel()
	if err := m.conn.Detach(ctx, device); err != nil && p.ctx.Err() == nil {
		p.log.Debugf("Detaching device %q from gateway %q: %v", device, m.id, err)
	}
}

// waitIdle waits until no operation of pl is in flight, or d passes.
func (p *Pool) waitIdle(pl *placement, d time.Duration) {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		p.mu.Lock()
		if pl.inflight == 0 {
			p.mu.Unlock()
			return
		}
		if pl.idle == nil {
			pl.idle = make(chan struct{})
		}
		ch := pl.idle
		p.mu.Unlock()
		select {
		case <-ch:
		case <-timer.C:
			return
		}
	}
}

// ---------------------------------------------------------------------------
// Health and moves

func (p *Pool) healthLoop() {
	defer p.wg.Done()
	t := time.NewTicker(p.opts.HealthInterval)
	defer t.Stop()
	p.checkHealth()
	for {
		select {
		case <-p.ctx.Done():
			return
		case <-t.C:
		}
		p.checkHealth()
	}
}

// checkHealth updates each member's state from its connection, then moves
// devices off members that are down and back to members that recovered.
func (p *Pool) checkHealth() {
	p.healthMu.Lock()
	defer p.healthMu.Unlock()
	stats := make([]gateway.Stats, len(p.members))
	for i, m := range p.members {
		stats[i] = m.conn.Stats()
	}
	now := time.Now()
	var wentDown, cameBack []*member
	p.mu.Lock()
	anyDown := false
	for i, m := range p.members {
		st := stats[i]
		if el := now.Sub(m.windowStart); el >= rateWindow {
			sent := m.sent.Load()
			m.lastRate = float64(sent-m.windowSent) / el.Seconds()
			m.windowSent, m.windowStart = sent, now
		}
		if st.Connected {
			m.failuresSeen = st.ConnectFailures
			m.disconnectedSince = time.Time{}
			if m.connectedSince.IsZero() {
				m.connectedSince = now
			}
			if m.down && now.Sub(m.connectedSince) >= p.opts.MoveBackAfter {
				m.down = false
				cameBack = append(cameBack, m)
			}
		} else {
			m.connectedSince = time.Time{}
			if m.disconnectedSince.IsZero() {
				m.disconnectedSince = now
			}
			if !m.down {
				switch {
				case st.ConnectFailures > m.failuresSeen:
					m.down, m.downReason = true, "connecting failed"
				case now.Sub(m.disconnectedSince) >= p.opts.FailoverAfter:
					m.down, m.downReason = true, fmt.Sprintf("disconnected for %s", p.opts.FailoverAfter)
				}
				if m.down {
					wentDown = append(wentDown, m)
				}
			}
		}
		anyDown = anyDown || m.down
	}
	// Devices on members that are down go to the next member that is up
	// with room; devices that failed over go back as soon as a better
	// member takes them.
	var failover []move
	if anyDown {
		for _, pl := range p.devices {
			if pl.moving != nil || pl.carrier < 0 || !p.members[pl.carrier].down {
				continue
			}
			if to := p.chooseLocked(pl, now, false, false); to >= 0 && to != pl.carrier {
				p.claimLocked(pl, to)
				failover = append(failover, move{pl, to})
			}
		}
	}
	var back []move
	for pl := range p.displaced {
		if pl.moving != nil {
			continue
		}
		to := p.chooseLocked(pl, now, false, false)
		if to < 0 || (pl.carrier >= 0 && pl.rank(to) >= pl.rank(pl.carrier)) {
			continue
		}
		p.claimLocked(pl, to)
		back = append(back, move{pl, to})
	}
	var idle []*placement
	if p.opts.DetachIdle > 0 {
		cutoff := now.Add(-p.opts.DetachIdle)
		for _, pl := range p.devices {
			if pl.moving == nil && pl.inflight == 0 && len(pl.handlers) == 0 && pl.lastUsed.Before(cutoff) {
				idle = append(idle, pl)
			}
		}
		for _, pl := range idle {
			if pl.carrier >= 0 {
				p.claimLocked(pl, -1)
			} else {
				p.unplaceLocked(pl)
			}
		}
	}
	p.mu.Unlock()

	if len(idle) > 0 {
		p.log.Debugf("Detaching %d devices idle for %s", len(idle), p.opts.DetachIdle)
		var mvs []move
		for _, pl := range idle {
			if pl.carrier >= 0 {
				mvs = append(mvs, move{pl, -1})
			}
		}
		p.runMoves(mvs, p.detachIdle)
	}
	for _, m := range wentDown {
		p.log.Warnf("Gateway %q of the pool is down (%s): its devices move to the next gateways in their order", m.id, m.downReason)
	}
	for _, m := range cameBack {
		p.log.Infof("Gateway %q of the pool is healthy again: its devices move back to it", m.id)
	}
	if len(failover) > 0 {
		p.log.Infof("Failing over %d devices", len(failover))
		p.runMoves(failover, p.failover)
	}
	if len(back) > 0 {
		p.log.Infof("Moving %d devices back to their first gateway", len(back))
		p.runMoves(back, p.moveBack)
	}
}

type move struct {
	pl *placement
	to int
}

// runMoves runs claimed moves in the background with bounded concurrency.
func (p *Pool) runMoves(moves []move, fn func(move)) {
	p.wg.Add(1)
	p.batches.Add(1)
	go func() {
		defer p.wg.Done()
		defer p.batches.Done()
		var wg sync.WaitGroup
		for _, mv := range moves {
			select {
			case p.sem <- struct{}{}:
			case <-p.ctx.Done():
				// Closing: end the claims without moving.
				p.abandon(mv)
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-p.sem }()
				fn(mv)
			}()
		}
		wg.Wait()
	}()
}

func (p *Pool) abandon(mv move) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if mv.to >= 0 {
		p.members[mv.to].carried--
	}
	close(mv.pl.moving)
	mv.pl.moving = nil
}

// detachIdle detaches an idle device from its carrier and forgets it,
// unless it was used again meanwhile.
func (p *Pool) detachIdle(mv move) {
	p.switchTo(mv.pl, -1, 0, nil)
	p.mu.Lock()
	defer p.mu.Unlock()
	if pl := mv.pl; pl.carrier < 0 && pl.moving == nil && len(pl.handlers) == 0 && p.devices[pl.id] == pl {
		pl.wanted = false
		p.unplaceLocked(pl)
	}
}

// failover moves a device off a member that is down at once, then attaches
// it on its new carrier when it was attached before.
func (p *Pool) failover(mv move) {
	p.switchTo(mv.pl, mv.to, 0, nil)
	p.restore(mv.pl)
}

// restore attaches (and subscribes) a device that was attached before its
// move, on its new carrier, following further failovers.
func (p *Pool) restore(pl *placement) {
	p.mu.Lock()
	wanted := pl.wanted || len(pl.handlers) > 0
	p.mu.Unlock()
	if !wanted {
		return
	}
	ctx, cancel := context.WithTimeout(p.ctx, p.opts.OpTimeout)
	defer cancel()
	if err := p.onCarrier(ctx, pl.id, p.restoreOn); err != nil && p.ctx.Err() == nil {
		p.log.Warnf("Attaching device %q after its move: %v", pl.id, err)
	}
}

// moveBack moves a device to a better member (its first, normally) make
// before break: attached (and subscribed) there first, then its messages in
// flight on the old member drain, then it is detached there.
func (p *Pool) moveBack(mv move) {
	pl, to := mv.pl, p.members[mv.to]
	if pl.carrier < 0 {
		// No carrier (every member had refused it): nothing to drain.
		p.switchTo(pl, mv.to, 0, nil)
		p.restore(pl)
		return
	}
	p.mu.Lock()
	wanted := pl.wanted
	subscribe := len(pl.handlers) > 0
	p.mu.Unlock()
	ctx, cancel := context.WithTimeout(p.ctx, p.opts.OpTimeout)
	defer cancel()
	var sub gateway.Subscription
	var err error
	switch {
	case subscribe:
		sub, err = to.conn.Subscribe(ctx, pl.id, p.deviceHandler(to, pl))
	case wanted:
		err = to.conn.Attach(ctx, pl.id)
	}
	if err != nil {
		if sub != nil {
			sub.Unsubscribe()
		}
		p.forget(to, pl.id)
		p.mu.Lock()
		if errors.Is(err, gateway.ErrAttachRefused) {
			if pl.refusals == nil {
				pl.refusals = make([]refusal, len(p.members))
			}
			r := &pl.refusals[to.idx]
			r.failures++
			r.until = time.Now().Add(min(p.opts.RefusalRetry<<min(r.failures-1, 20), maxRefusalRetry))
			pl.lastErr = err
		}
		p.mu.Unlock()
		p.abandon(mv)
		if p.ctx.Err() == nil {
			p.log.Debugf("Moving device %q back to gateway %q: %v", pl.id, to.id, err)
		}
		return
	}
	p.switchTo(pl, mv.to, p.opts.DrainTimeout, sub)
}

type discard struct{}

func (discard) Level() telegraf.LogLevel         { return telegraf.Error }
func (discard) AddAttribute(string, interface{}) {}
func (discard) Errorf(string, ...interface{})    {}
func (discard) Error(...interface{})             {}
func (discard) Warnf(string, ...interface{})     {}
func (discard) Warn(...interface{})              {}
func (discard) Infof(string, ...interface{})     {}
func (discard) Info(...interface{})              {}
func (discard) Debugf(string, ...interface{})    {}
func (discard) Debug(...interface{})             {}
func (discard) Tracef(string, ...interface{})    {}
func (discard) Trace(...interface{})             {}
