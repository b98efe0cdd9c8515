package gateway

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// StateCoalesced is the CountDrop reason of a state replaced by a newer
// state of the same device before it was sent (the output keeps the latest
// state of a device within a write). It is not a loss: the session counts
// it apart, as Stats.StatesCoalesced, never as dropped.
const StateCoalesced = "state_coalesced"

// stateMargin covers QoS 0, where "written" is all we know.
const stateMargin = 10 * time.Millisecond

// statePacer keeps every device's state messages at most one per
// omnicore.StateInterval (the bridge detaches a device, or drops the
// gateway's own connection, for faster state), without holding the caller:
// a state that is due is sent at once and Publish waits for its
// acknowledgement as for any message; one that is not due yet is kept, the
// latest per device (an older one kept is replaced and counted as
// coalesced), and sent by the pacer when its device's interval has passed,
// while Publish returns at once. So a Write never waits for pacing, however
// fast states come: the plugins do no pacing of their own.
type statePacer struct {
	s *Session

	mu      sync.Mutex
	devices map[string]*paced
	idle    *sync.Cond // signalled when a device's kept state is gone
}

// paced is the pacing of one device's state.
type paced struct {
	next    time.Time // earliest time the next state may go
	sending bool      // a state of the device is being sent
	kept    *Message  // the latest state waiting for next
	timer   *time.Timer
}

func newStatePacer(s *Session) *statePacer {
	p := &statePacer{s: s, devices: make(map[string]*paced)}
	p.idle = sync.NewCond(&p.mu)
	return p
}

// publish sends a state message, or keeps it for later (see statePacer).
func (p *statePacer) publish(ctx context.Context, msg Message) error {
	p.mu.Lock()
	d := p.devices[msg.Device]
	if d == nil {
		d = &paced{}
		p.devices[msg.Device] = d
	}
	if d.sending || d.kept != nil || time.Now().Before(d.next) {
		if d.kept != nil {
			p.s.c.statesCoalesced.Add(1)
			p.s.log.Debugf("State of device %q replaced by a newer one before its turn (coalesced)", msg.Device)
		}
		d.kept = &msg
		p.scheduleLocked(msg.Device, d)
		p.mu.Unlock()
		return nil
	}
	d.sending = true
	p.mu.Unlock()
	err := p.s.publish(ctx, msg)
	p.sent(msg.Device)
	return err
}

// attempted records that a state of device may have reached the bridge:
// the next one waits a full interval from now.
func (p *statePacer) attempted(device string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d := p.devices[device]; d != nil {
		d.next = time.Now().Add(omnicore.StateInterval + stateMargin)
	}
}

// wait returns how long a retry of a state of device must wait.
func (p *statePacer) wait(device string) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	if d := p.devices[device]; d != nil {
		return time.Until(d.next)
	}
	return 0
}

// sent ends a send: a state kept meanwhile goes when its turn comes.
func (p *statePacer) sent(device string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	d := p.devices[device]
	d.sending = false
	if d.kept != nil {
		p.scheduleLocked(device, d)
	}
	p.idle.Broadcast()
}

// scheduleLocked arms the device's timer for its kept state, unless a send
// is under way (sent schedules it) or the timer is armed already.
func (p *statePacer) scheduleLocked(device string, d *paced) {
	if d.sending || d.timer != nil {
		return
	}
	d.timer = time.AfterFunc(max(time.Until(d.next), 0), func() { p.sendKept(device) })
}

// sendKept sends the device's kept state. A failure that may pass (the
// connection is down, no acknowledgement in time) keeps it, unless a newer
// one came meanwhile, and tries again; one that does not is counted as
// dropped.
func (p *statePacer) sendKept(device string) {
	p.mu.Lock()
	d := p.devices[device]
	d.timer = nil
	msg := d.kept
	if msg == nil || d.sending {
		p.mu.Unlock()
		return
	}
	d.kept = nil
	d.sending = true
	p.mu.Unlock()

	ctx, cancel := context.WithTimeout(p.s.ctx, 3*p.s.cfg.Timeout)
	err := p.s.publish(ctx, *msg)
	cancel()

	p.mu.Lock()
	switch {
	case err == nil:
	case p.s.ctx.Err() != nil:
		// Closing: Close waited for what it could.
	case errors.Is(err, ErrAttachRefused), errors.Is(err, ErrInvalidDevice), errors.Is(err, ErrTooLarge):
		p.s.CountDrop(dropStateUnsent, 1)
		p.s.warn.Warnf(dropStateUnsent, "Dropping the state of device %q kept for its turn: %v", device, err)
	case d.kept == nil:
		d.kept = msg // a newer one replaces it, else it goes again
	}
	p.mu.Unlock()
	p.sent(device)
}

// flush waits until no state is kept or being sent, or ctx ends; it
// returns how many states are still kept.
func (p *statePacer) flush(ctx context.Context) int {
	stop := context.AfterFunc(ctx, func() {
		p.mu.Lock()
		p.idle.Broadcast()
		p.mu.Unlock()
	})
	defer stop()
	p.mu.Lock()
	defer p.mu.Unlock()
	for {
		busy, kept := false, 0
		for _, d := range p.devices {
			busy = busy || d.sending || d.kept != nil
			if d.kept != nil {
				kept++
			}
		}
		if !busy || ctx.Err() != nil {
			return kept
		}
		p.idle.Wait()
	}
}

// sweep forgets the devices whose interval has passed with nothing kept,
// so that the pacer holds only devices with recent states.
func (p *statePacer) sweep() {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, d := range p.devices {
		if !d.sending && d.kept == nil && d.timer == nil && now.After(d.next) {
			delete(p.devices, id)
		}
	}
}
