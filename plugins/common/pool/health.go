package pool

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// Health of the members, and the moves it starts.

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
