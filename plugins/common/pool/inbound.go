package pool

import (
	"context"
	"fmt"
	"time"

	"github.com/cespare/xxhash/v2"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Inbound config and commands: each member delivers those of the devices
// attached through it. A device is attached through one member at a time,
// except during a move, when the member it goes to may deliver before the
// switch and the bridge sends the latest config again on the new member's
// subscription. So a message counts only from the device's carrier, and the
// first config after a move is dropped when it is the one already delivered.

// SubscribeAll implements gateway.Conn: the config and commands of every
// device attached through any member, and of the members themselves.
func (p *Pool) SubscribeAll(h gateway.Handler) gateway.Subscription {
	e := &allEntry{h: h, seen: make(map[string]*seen)}
	subs := make(multiSub, 0, len(p.members))
	for _, m := range p.members {
		subs = append(subs, m.conn.SubscribeAll(func(in gateway.Inbound) { p.fromMember(m, in, e) }))
	}
	return subs
}

// SubscribeErrors implements gateway.Conn: every member's errors topic;
// Inbound.Device and Inbound.Gateway name the member.
func (p *Pool) SubscribeErrors(h gateway.Handler) gateway.Subscription {
	subs := make(multiSub, 0, len(p.members))
	for _, m := range p.members {
		subs = append(subs, m.conn.SubscribeErrors(func(in gateway.Inbound) {
			in.Gateway = m.id
			h(in)
		}))
	}
	return subs
}

// Subscribe implements gateway.Conn: device's config and commands through
// its carrier, following its moves. The handler is kept when the device is
// refused; it starts receiving once a member takes the device.
func (p *Pool) Subscribe(ctx context.Context, device string, h gateway.Handler) (gateway.Subscription, error) {
	if m, ok := p.byID[device]; ok {
		return m.conn.Subscribe(ctx, device, func(in gateway.Inbound) {
			in.Gateway = m.id
			h(in)
		})
	}
	if err := omnicore.ValidateID(device); err != nil {
		return nil, fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	p.mu.Lock()
	pl := p.placementLocked(device)
	p.nextSub++
	id := p.nextSub
	if pl.handlers == nil {
		pl.handlers = make(map[uint64]gateway.Handler)
	}
	pl.handlers[id] = h
	var replay *gateway.Inbound
	if pl.hasConfig && pl.carrier >= 0 {
		// The member's subscription exists already, so no config comes
		// again: hand the latest one to the new handler, as the bridge
		// would have.
		replay = &gateway.Inbound{
			Device: device, Kind: omnicore.KindConfig, Topic: pl.configTopic,
			Payload: append([]byte(nil), pl.config...), Received: time.Now(), Gateway: p.members[pl.carrier].id,
		}
	}
	p.mu.Unlock()
	if replay != nil {
		go h(*replay)
	}
	sub := &deviceSub{p: p, pl: pl, id: id}
	return sub, p.onCarrier(ctx, device, p.restoreOn)
}

type deviceSub struct {
	p  *Pool
	pl *placement
	id uint64
}

func (s *deviceSub) Unsubscribe() {
	p, pl := s.p, s.pl
	p.mu.Lock()
	delete(pl.handlers, s.id)
	var msub gateway.Subscription
	if len(pl.handlers) == 0 {
		msub = pl.msub
		pl.msub, pl.msubOn = nil, -1
	}
	p.mu.Unlock()
	if msub != nil {
		msub.Unsubscribe()
	}
}

// deviceHandler is the member subscription of one device on m: it fans out
// to the device's handlers while m carries it.
func (p *Pool) deviceHandler(m *member, pl *placement) gateway.Handler {
	return func(in gateway.Inbound) {
		in.Gateway = m.id
		p.mu.Lock()
		if pl.carrier != m.idx || p.devices[pl.id] != pl {
			p.mu.Unlock()
			return
		}
		if in.Kind == omnicore.KindConfig {
			h := xxhash.Sum64(in.Payload)
			if pl.hasConfig && pl.cfgEpoch != pl.epoch && pl.cfgHash == h {
				pl.cfgEpoch = pl.epoch // the bridge's copy after a move
				p.mu.Unlock()
				return
			}
			pl.config = append(pl.config[:0], in.Payload...)
			pl.configTopic = in.Topic
			pl.hasConfig, pl.cfgHash, pl.cfgEpoch = true, h, pl.epoch
		}
		hs := make([]gateway.Handler, 0, len(pl.handlers))
		for _, h := range pl.handlers {
			hs = append(hs, h)
		}
		p.mu.Unlock()
		for _, h := range hs {
			h(in)
		}
	}
}

// allEntry is one SubscribeAll handler with what it has been given, per
// device.
type allEntry struct {
	h    gateway.Handler
	seen map[string]*seen // guarded by Pool.mu
}

type seen struct {
	hasConfig bool
	cfgHash   uint64
	cfgEpoch  uint64
	// For devices the pool does not place itself (attached through a member
	// by another plugin): the member that delivered last and the latest
	// messages, to drop the second copy of a message during that plugin's
	// move.
	from   int
	recent [4]recentMsg
	next   int
}

type recentMsg struct {
	hash uint64
	at   time.Time
}

// copyWindow is how long after a message its copy through another member is
// recognised as one (the overlap of a move is far shorter).
const copyWindow = 30 * time.Second

func (p *Pool) fromMember(m *member, in gateway.Inbound, e *allEntry) {
	in.Gateway = m.id
	if in.Device == m.id {
		e.h(in) // the member's own config and commands
		return
	}
	if _, ok := p.byID[in.Device]; ok {
		return // another member's own: delivered by that member
	}
	isConfig := in.Kind == omnicore.KindConfig
	p.mu.Lock()
	s := e.seen[in.Device]
	if s == nil {
		s = &seen{from: -1}
		e.seen[in.Device] = s
	}
	var h uint64
	if isConfig {
		h = xxhash.Sum64(in.Payload)
	} else {
		h = xxhash.Sum64String(in.Subfolder + "\x00" + string(in.Payload))
	}
	if pl, ok := p.devices[in.Device]; ok {
		if pl.carrier != m.idx {
			p.mu.Unlock()
			return
		}
		if isConfig {
			if s.hasConfig && s.cfgEpoch != pl.epoch && s.cfgHash == h {
				s.cfgEpoch = pl.epoch
				p.mu.Unlock()
				return
			}
			s.hasConfig, s.cfgHash, s.cfgEpoch = true, h, pl.epoch
		}
		p.mu.Unlock()
		e.h(in)
		return
	}
	now := time.Now()
	if s.from >= 0 && s.from != m.idx {
		dup := isConfig && s.hasConfig && s.cfgHash == h
		if !isConfig {
			for _, r := range s.recent {
				if r.hash == h && now.Sub(r.at) < copyWindow {
					dup = true
				}
			}
		}
		if dup {
			p.mu.Unlock()
			return
		}
	}
	s.from = m.idx
	if isConfig {
		s.hasConfig, s.cfgHash = true, h
	} else {
		s.recent[s.next] = recentMsg{hash: h, at: now}
		s.next = (s.next + 1) % len(s.recent)
	}
	p.mu.Unlock()
	e.h(in)
}

type multiSub []gateway.Subscription

func (ms multiSub) Unsubscribe() {
	for _, s := range ms {
		if s != nil {
			s.Unsubscribe()
		}
	}
}
