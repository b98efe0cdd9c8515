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
			if err := p.waitMove(ctx, pl); err != nil {
				return err
			}
			continue
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
