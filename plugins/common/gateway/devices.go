package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

type device struct {
	id          string
	wanted      bool   // attached by request; re-attached after reconnects
	attachedGen uint64 // connection generation the device is attached on
	subGen      uint64 // connection generation its config/commands are subscribed on
	attempt     *attachAttempt
	failures    int
	retryAt     time.Time // refused: no new attach before this
	lastErr     error
	lastUsed    time.Time
	config      []byte // latest config received, for late subscribers
	hasConfig   bool
	// probation: admitted for a first attach that has not succeeded yet,
	// by a caller that does not listen to the device. It leaves devices
	// when that attach fails, so a junk ID holds its slot for one round
	// trip, never for detach_idle.
	probation bool
}

// refusal is what the session remembers of a device the bridge refused,
// outside the device table: enough to answer at once while it backs off
// and to lengthen the next back-off. At most maxRefusals are kept.
type refusal struct {
	failures int
	retryAt  time.Time
	err      error
}

type attachAttempt struct {
	gen     uint64
	done    chan struct{}
	err     error
	refused atomic.Pointer[string] // set by the errors handler
	signal  chan struct{}          // closed when refused is set
	once    sync.Once
}

// Attach implements Conn.
func (s *Session) Attach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	if device == s.cfg.GatewayID {
		return nil
	}
	s.attachCalls.Add(1)
	defer s.attachCalls.Add(-1)
	for {
		cs, err := s.ready(ctx)
		if err != nil {
			return err
		}
		err = s.attachOn(ctx, cs, device, true)
		// A timeout goes back to the caller too, which reports it and
		// tries again in its own way; only a lost connection is retried
		// here, on the next one.
		if err == nil || errors.Is(err, ErrAttachRefused) || errors.Is(err, errAckTimeout) || ctx.Err() != nil || errors.Is(err, ErrClosed) {
			return err
		}
	}
}

// attachOn makes sure device is attached on cs, joining an attempt already
// under way for it. Attaches of different devices run concurrently, bounded
// by the in-flight window, so thousands are pipelined through one connection.
// use says the attach is for a plugin's call, which makes the device
// active (lastUsed); the session's own re-attaches do not.
func (s *Session) attachOn(ctx context.Context, cs *connection, id string, use bool) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if r, ok := s.refused[id]; ok && !s.wantsSubscriptionLocked(id) {
		if wait := time.Until(r.retryAt); wait > 0 {
			s.mu.Unlock()
			return fmt.Errorf("%w (next attempt in %s)", r.err, wait.Round(time.Second))
		}
	}
	d, err := s.admitDeviceLocked(ctx, id)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if r, ok := s.refused[id]; ok {
		// Back from its back-off: the next refusal waits longer.
		d.failures = max(d.failures, r.failures)
		delete(s.refused, id)
	}
	d.wanted = true
	if use || d.lastUsed.IsZero() {
		d.lastUsed = time.Now()
	}
	if d.attachedGen == cs.gen {
		s.mu.Unlock()
		return nil
	}
	if d.attempt != nil && d.attempt.gen == cs.gen {
		a := d.attempt
		s.mu.Unlock()
		select {
		case <-a.done:
			return a.err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if wait := time.Until(d.retryAt); wait > 0 && d.lastErr != nil {
		err := d.lastErr
		s.mu.Unlock()
		return fmt.Errorf("%w (next attempt in %s)", err, wait.Round(time.Second))
	}
	a := &attachAttempt{gen: cs.gen, done: make(chan struct{}), signal: make(chan struct{})}
	d.attempt = a
	s.mu.Unlock()

	a.err = s.doAttach(cs, id, a)

	s.mu.Lock()
	switch {
	case a.err == nil:
		d.attachedGen = cs.gen
		d.failures = 0
		d.lastErr = nil
		s.endProbationLocked(d)
		s.c.attachesOK.Add(1)
	case errors.Is(a.err, ErrAttachRefused):
		// Refused devices wait before the next attempt, so that a device
		// the bridge will not take costs little, yet heals by itself.
		d.failures++
		d.lastErr = a.err
		d.retryAt = time.Now().Add(retryBackoff(d.failures))
		s.c.attachesFailed.Add(1)
		s.log.Debugf("Attaching device %q failed: %v", id, a.err)
	case errors.Is(a.err, errAckTimeout):
		// Neither PUBACK nor error: try again at once on the next call.
		s.c.attachesFailed.Add(1)
		s.log.Debugf("Attaching device %q failed: %v", id, a.err)
	}
	// Failed attaches are counted here and logged at debug only: the
	// session is shared by the plugins of a gateway (and under execd by
	// their processes), and its logger is that of the plugin that started
	// it. The error goes back to the plugin that asked for the device,
	// which reports it through its own logger, at its own pace (the input:
	// one W!, further attempts at debug; the output: its drop warnings);
	// the session's own re-attaches (reconnects, healLoop) are told in
	// the connect line and in the statistics (attaches_failed).
	if d.attempt == a {
		d.attempt = nil
		if a.err != nil {
			s.settleFailedAttachLocked(id, d)
		}
	}
	subscribe := a.err == nil && s.wantsSubscriptionLocked(id)
	s.mu.Unlock()
	close(a.done)
	if subscribe {
		// Config and commands of devices attached for telemetry reach
		// SubscribeAll handlers too; not awaited, so telemetry is not held.
		go func() {
			if err := s.subscribeDevice(cs, id); err != nil && !cs.isLost() {
				s.warn.Warnf("subscribe_failed", "Subscribing config and commands of %q failed: %v", id, err)
			}
		}()
	}
	return a.err
}

func (s *Session) doAttach(cs *connection, id string, a *attachAttempt) error {
	payload, err := s.attachPayload(id)
	if err != nil {
		return fmt.Errorf("%w: device %q: %w", ErrAttachRefused, id, err)
	}
	topic := omnicore.Topic(s.cfg.RegistryID, id, omnicore.KindAttach, "")
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	go func() {
		select {
		case <-a.signal:
			cancel()
		case <-ctx.Done():
		}
	}()
	err = s.send(ctx, cs, topic, 1, payload, id)
	if r := a.refused.Load(); r != nil {
		return fmt.Errorf("%w: device %q: %s", ErrAttachRefused, id, *r)
	}
	if errors.Is(err, errAckTimeout) {
		return fmt.Errorf("attach of device %q: %w", id, errAckTimeout)
	}
	return err
}

// attachPayload is {} when the bridge checks the gateway binding, or carries
// a device JWT signed with the device's own key.
func (s *Session) attachPayload(id string) ([]byte, error) {
	if s.cfg.DeviceAuth != DeviceAuthToken {
		return []byte("{}"), nil
	}
	path := filepath.Join(s.cfg.DeviceKeyDir, id+".pem")
	signer, err := omnicore.LoadSigner(path, s.cfg.DeviceAlgorithm)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("no device key %q", path)
		}
		return nil, err
	}
	tok, err := signer.Token(s.cfg.SubscriptionID, time.Now(), time.Hour)
	if err != nil {
		return nil, err
	}
	return json.Marshal(map[string]string{"authorization": tok})
}

// Detach implements Conn.
func (s *Session) Detach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	if device == s.cfg.GatewayID {
		return nil
	}
	s.mu.Lock()
	d, ok := s.devices[device]
	cs := s.conn
	attached := ok && cs != nil && d.attachedGen == cs.gen
	if ok {
		d.wanted = false
		d.attachedGen = 0
		d.subGen = 0
		if !s.wantsSubscriptionLocked(device) {
			s.forgetLocked(device, d)
		}
	}
	s.mu.Unlock()
	if !attached {
		return nil
	}
	err := s.send(ctx, cs, omnicore.Topic(s.cfg.RegistryID, device, omnicore.KindDetach, ""), 1, []byte("{}"), device)
	if err == nil {
		s.c.detaches.Add(1)
	}
	return err
}

func (s *Session) markDetached(cs *connection, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.devices[id]; ok && d.attachedGen == cs.gen {
		d.attachedGen = 0
		d.subGen = 0
	}
}

func (s *Session) touch(id string) {
	s.mu.Lock()
	if d, ok := s.devices[id]; ok {
		d.lastUsed = time.Now()
	}
	s.mu.Unlock()
}

func (s *Session) deviceLocked(id string) *device {
	d, ok := s.devices[id]
	if !ok {
		d = &device{id: id}
		s.devices[id] = d
	}
	return d
}

// admitDeviceLocked is deviceLocked for a device about to be attached. A
// device the session does not know yet takes a slot on probation. When
// max_devices are known already it waits (until ctx ends) while some of
// them are on probation, whose slots free within a round trip; when none
// are, it is refused (counted, with a warning at most once per
// warnInterval). It unlocks s.mu while it waits.
func (s *Session) admitDeviceLocked(ctx context.Context, id string) (*device, error) {
	for {
		if d, ok := s.devices[id]; ok {
			return d, nil
		}
		if s.closed {
			return nil, ErrClosed
		}
		if s.cfg.MaxDevices <= 0 || len(s.devices) < s.cfg.MaxDevices {
			d := s.deviceLocked(id)
			if !s.wantsSubscriptionLocked(id) {
				d.probation = true
				s.probation++
			}
			return d, nil
		}
		if s.probation == 0 {
			s.c.devicesRefused.Add(1)
			s.warn.Warnf("max_devices", "Refusing device %q: the gateway already handles max_devices = %d devices (%d refused so far); idle devices are forgotten after detach_idle = %s",
				id, s.cfg.MaxDevices, s.c.devicesRefused.Load(), s.cfg.DetachIdle)
			return nil, fmt.Errorf("%w: device %q: %w (%d)", ErrAttachRefused, id, ErrTooManyDevices, s.cfg.MaxDevices)
		}
		freed := s.slotFreed
		s.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
		case <-s.ctx.Done():
		}
		s.mu.Lock()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

// endProbationLocked makes d a full member of the device table.
func (s *Session) endProbationLocked(d *device) {
	if d.probation {
		d.probation = false
		s.probation--
	}
}

// settleFailedAttachLocked decides where a device goes after its attach
// failed. A device someone listens to stays in the table (healLoop retries
// it). Any other device the bridge refused leaves it for the refused
// table, where it waits out its back-off without holding a max_devices
// slot; one on probation that failed otherwise (timeout, connection lost)
// leaves it too, to be admitted again on its next message.
func (s *Session) settleFailedAttachLocked(id string, d *device) {
	if s.wantsSubscriptionLocked(id) {
		s.endProbationLocked(d)
		return
	}
	refused := d.lastErr != nil && time.Now().Before(d.retryAt)
	if refused {
		s.rememberRefusalLocked(id, &refusal{failures: d.failures, retryAt: d.retryAt, err: d.lastErr})
	}
	if refused || d.probation {
		s.forgetLocked(id, d)
	}
}

// maxRefusals bounds the refused table. Past it, entries whose back-off
// has ended go first, then any: a device forgotten early is only tried
// again sooner.
const maxRefusals = 16384

func (s *Session) rememberRefusalLocked(id string, r *refusal) {
	if len(s.refused) >= maxRefusals {
		now := time.Now()
		for k, old := range s.refused {
			if now.After(old.retryAt) {
				delete(s.refused, k)
			}
		}
		for k := range s.refused {
			if len(s.refused) < maxRefusals*3/4 {
				break
			}
			delete(s.refused, k)
		}
	}
	s.refused[id] = r
}

// forgetLocked removes a device and wakes the callers waiting for a slot.
// Its state pacing (statePacer) is kept apart, so it survives.
func (s *Session) forgetLocked(id string, d *device) {
	if s.devices[id] != d {
		return
	}
	s.endProbationLocked(d)
	delete(s.devices, id)
	close(s.slotFreed)
	s.slotFreed = make(chan struct{})
}

// healInterval is how often subscribed devices that lost their attachment
// (refused earlier, detached by the bridge) are tried again.
const healInterval = time.Second

// healLoop re-attaches and re-subscribes devices someone listens to but that
// are not attached on the current connection: a device refused at start (not
// bound yet) or detached by the bridge starts delivering its config and
// commands once it can, without waiting for a reconnect or a publish.
func (s *Session) healLoop() {
	s.every(healInterval, func() {
		s.pacer.sweep()
		s.mu.Lock()
		cs := s.conn
		var ids []string
		if cs != nil && !cs.draining.Load() {
			now := time.Now()
			for id, d := range s.devices {
				if id == s.cfg.GatewayID || !d.wanted || d.attempt != nil || now.Before(d.retryAt) {
					continue
				}
				if (d.attachedGen != cs.gen || d.subGen != cs.gen) && s.wantsSubscriptionLocked(id) {
					ids = append(ids, id)
				}
			}
		}
		s.mu.Unlock()
		if len(ids) == 0 {
			return
		}
		select {
		case <-cs.ready:
		default:
			return // rebuild is restoring everything anyway
		}
		for _, id := range ids {
			go func() {
				ctx, cancel := context.WithTimeout(s.ctx, 3*s.cfg.Timeout)
				defer cancel()
				if err := s.attachOn(ctx, cs, id, false); err == nil {
					_ = s.subscribeDevice(cs, id)
				}
			}()
		}
	})
}

// detachIdleLoop detaches devices that published nothing for DetachIdle and
// have no subscriptions, freeing their slot of the bridge's attach limit.
func (s *Session) detachIdleLoop() {
	s.every(min(max(s.cfg.DetachIdle/4, 50*time.Millisecond), time.Minute), func() {
		cutoff := time.Now().Add(-s.cfg.DetachIdle)
		var idle []string
		s.mu.Lock()
		for id, d := range s.devices {
			if id == s.cfg.GatewayID || !d.lastUsed.Before(cutoff) || s.wantsSubscriptionLocked(id) || d.attempt != nil {
				continue
			}
			if d.wanted {
				idle = append(idle, id)
			} else {
				s.forgetLocked(id, d) // known but never attached: just forget
			}
		}
		s.mu.Unlock()
		for _, id := range idle {
			ctx, cancel := context.WithTimeout(s.ctx, s.cfg.Timeout)
			if err := s.Detach(ctx, id); err != nil {
				s.log.Debugf("Detaching idle device %q: %v", id, err)
			} else {
				s.log.Debugf("Detached device %q after %s without traffic", id, s.cfg.DetachIdle)
			}
			cancel()
		}
	})
}

// every runs f every period until the session closes.
func (s *Session) every(period time.Duration, f func()) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
			f()
		}
	}
}

// AttachedDevices lists the devices attached on the current connection.
func (s *Session) AttachedDevices() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return nil
	}
	var ids []string
	for id, d := range s.devices {
		if d.attachedGen == s.conn.gen {
			ids = append(ids, id)
		}
	}
	return ids
}

// retryBackoff is the wait before re-attaching a refused device: 1 s doubling
// to a minute, so a misconfigured device costs little but heals by itself.
func retryBackoff(failures int) time.Duration {
	d := time.Second << min(failures-1, 9)
	return jitter(min(d, maxRefusedBackoff))
}

// maxRefusedBackoff caps the wait before a refused device is tried again, so
// that a device bound just now delivers again within a minute.
const maxRefusedBackoff = time.Minute
