package pool

import (
	"context"
	"fmt"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// Placement: which member carries a device, and moves between members.

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
