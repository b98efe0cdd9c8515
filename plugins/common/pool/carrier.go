package pool

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// Operations on a device's carrier.

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
			if err := p.waitMove(ctx, pl); err != nil {
				return nil, nil, nil, err
			}
			continue
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

// waitMove, called with p.mu held while pl moves, releases p.mu and waits
// until the move ends (nil: the caller looks at the device again) or ctx
// is done.
func (p *Pool) waitMove(ctx context.Context, pl *placement) error {
	ch := pl.moving
	p.mu.Unlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
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
