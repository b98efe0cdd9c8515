package gateway

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// ackTickDivisor sets the acknowledgement clock's period: the ack timeout
// divided by this. A message without a PUBACK is given up on between the
// timeout and 1/8 more.
const ackTickDivisor = 8

// ackTick returns the channel the connection's acknowledgement clock closes
// next. Messages waiting for their PUBACK check their age when it closes.
//
// Why not a timer per message: with 100 messages in flight, creating and
// stopping a timer per message cost 5% of the process's CPU (the runtime's
// timer heap lock); one clock per connection costs a channel per tick.
func (cs *connection) ackTick() <-chan struct{} { return *cs.tick.Load() }

// startAckClock runs the connection's acknowledgement clock until the
// connection is lost.
func (cs *connection) startAckClock(timeout time.Duration) {
	first := make(chan struct{})
	cs.tick.Store(&first)
	period := max(timeout/ackTickDivisor, time.Millisecond)
	go func() {
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				next := make(chan struct{})
				close(*cs.tick.Swap(&next))
			case <-cs.lost:
				return
			}
		}
	}()
}

// publishRequest asks a publisher of a connection to hand a message to
// paho; the token comes back on reply (buffered, so a publisher never waits
// for a caller that gave up).
type publishRequest struct {
	topic   string
	qos     byte
	payload []byte
	reply   chan mqtt.Token
}

// publishersPerConn is how many goroutines of a connection hand messages to
// paho. paho takes one message at a time (its outbound channel is
// unbuffered, read by its single writer); several keep a message ready for
// the writer even when the machine is busy and a woken publisher waits to
// be scheduled.
const publishersPerConn = 8

// replyChans recycles the reply channels of publishRequest: only those
// whose token was received go back, so a recycled channel is always empty.
var replyChans = sync.Pool{New: func() any { return make(chan mqtt.Token, 1) }}

// startPublishers starts the goroutines that call paho's Publish for the
// connection. paho's Publish blocks while its writer is stalled (until the
// write timeout, even after the connection is gone); callers hand their
// message over and wait on the reply or on lost, so a lost connection or
// an ended context frees them at once. A few long-lived goroutines per
// connection do what a goroutine per message did, without its cost. They
// end with the connection (one stuck in paho ends when paho gives up).
func (cs *connection) startPublishers() {
	cs.publishes = make(chan publishRequest)
	for range publishersPerConn {
		go func() {
			for {
				select {
				case r := <-cs.publishes:
					r.reply <- cs.client.Publish(r.topic, r.qos, false, r.payload)
				case <-cs.lost:
					return
				}
			}
		}()
	}
}

const (
	// ackedWindow is how long an acknowledged message is kept in case the
	// bridge names it in an error after its PUBACK; ackedMax bounds how
	// many are kept (the oldest go first).
	ackedWindow = 5 * time.Second
	ackedMax    = 10000
)

// ackedRing keeps the data messages acknowledged in the last ackedWindow,
// oldest first, at most ackedMax. It is guarded by the connection's mu.
//
// Why a ring and not a map by packet ID: every acknowledged message is
// kept, and only an error after a PUBACK (rare) looks one up; a map insert
// and delete per message cost 3 to 6% of the process's CPU in the profile.
// A packet ID is reused once acknowledged, so the newest entry with an ID
// is the one an error names, as a map by ID would keep it.
type ackedRing struct {
	buf  []ackedEntry
	head int // the oldest entry
	n    int
}

type ackedEntry struct {
	id    uint16
	taken bool
	at    int64 // unix nanos of the PUBACK
	msg   Message
}

// keep records an acknowledged message, dropping those that are too old or
// too many.
func (r *ackedRing) keep(id uint16, msg Message, now time.Time) {
	at := now.UnixNano()
	for r.n > 0 && (r.n >= ackedMax || at-r.buf[r.head].at > int64(ackedWindow)) {
		r.buf[r.head] = ackedEntry{} // lets go of the payload
		r.head = (r.head + 1) % len(r.buf)
		r.n--
	}
	if r.n == len(r.buf) {
		grown := make([]ackedEntry, min(max(2*len(r.buf), 64), ackedMax))
		for i := range r.n {
			grown[i] = r.buf[(r.head+i)%len(r.buf)]
		}
		r.buf, r.head = grown, 0
	}
	r.buf[(r.head+r.n)%len(r.buf)] = ackedEntry{id: id, at: at, msg: msg}
	r.n++
}

// take returns the message last acknowledged under id within ackedWindow
// when it is device's and was not taken yet, and marks it taken.
func (r *ackedRing) take(id uint16, device string, now time.Time) (Message, bool) {
	at := now.UnixNano()
	for i := r.n - 1; i >= 0; i-- {
		e := &r.buf[(r.head+i)%len(r.buf)]
		if at-e.at > int64(ackedWindow) {
			break
		}
		if e.id != id {
			continue
		}
		if e.taken || e.msg.Device != device {
			return Message{}, false
		}
		e.taken = true
		msg := e.msg
		e.msg = Message{}
		return msg, true
	}
	return Message{}, false
}

// markRouted records that the handler finished one inbound message.
func (cs *connection) markRouted() {
	cs.mu.Lock()
	cs.routed.Add(1)
	close(cs.routedCh)
	cs.routedCh = make(chan struct{})
	cs.mu.Unlock()
}

// waitRouted waits until the handler has processed target inbound messages
// (normally at once: the count only lags while a message is between paho's
// reader and router), the connection is lost, or timeout passes.
func (cs *connection) waitRouted(target uint64, timeout time.Duration) {
	if cs.routed.Load() >= target {
		return
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		cs.mu.Lock()
		ch := cs.routedCh
		cs.mu.Unlock()
		if cs.routed.Load() >= target {
			return
		}
		select {
		case <-ch:
		case <-cs.lost:
			return
		case <-timer.C:
			return
		}
	}
}

// Publish implements Conn. A state message goes through the state pacer,
// which sends it at once when its device's interval has passed and keeps it
// for later (returning at once) when not.
func (s *Session) Publish(ctx context.Context, msg Message) error {
	if err := s.checkMessage(msg); err != nil {
		return err
	}
	if msg.Kind == omnicore.KindState {
		return s.pacer.publish(ctx, msg)
	}
	return s.publish(ctx, msg)
}

// publish sends a checked message until it is acknowledged, attaching its
// device first, across reconnects and timeouts, until ctx ends.
func (s *Session) publish(ctx context.Context, msg Message) error {
	return s.publishFrom(ctx, msg, 0)
}

// publishFrom is publish from its attempt-th attempt on (the earlier ones
// failed and were told to retry by retryAfter).
func (s *Session) publishFrom(ctx context.Context, msg Message, attempt int) error {
	topic := omnicore.Topic(s.cfg.RegistryID, msg.Device, msg.Kind, msg.Subfolder)
	state := msg.Kind == omnicore.KindState
	for ; ; attempt++ {
		if attempt > 0 {
			s.c.retries.Add(1)
			if state {
				// The previous attempt may have reached the bridge.
				if wait := s.pacer.wait(msg.Device); wait > 0 && !sleepCtx(ctx, wait) {
					return ctx.Err()
				}
			}
		}
		cs, err := s.ready(ctx)
		if err != nil {
			return err
		}
		if msg.Device != s.cfg.GatewayID {
			if err := s.attachOn(ctx, cs, msg.Device, true); err != nil {
				if errors.Is(err, ErrAttachRefused) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
					return err
				}
				continue // connection lost or attach timed out: try again
			}
		}
		err = s.sendKeep(ctx, cs, topic, msg.QoS, msg.Payload, msg.Device, &msg)
		if state {
			// Attempts that failed count too: the bridge may have seen them.
			s.pacer.attempted(msg.Device)
		}
		if retry, err := s.retryAfter(ctx, cs, msg.Device, topic, err); !retry {
			return err
		}
	}
}

// retryAfter decides what follows an attempt to send a message of device
// on cs that ended with err: done (retry false, with the outcome), or
// another attempt.
func (s *Session) retryAfter(ctx context.Context, cs *connection, device, topic string, err error) (retry bool, _ error) {
	if err == nil {
		s.touch(device)
		return false, nil
	}
	if errors.Is(err, errDeviceNotFound) {
		s.markDetached(cs, device)
		return true, nil
	}
	if ctx.Err() != nil || errors.Is(err, ErrClosed) || errors.Is(err, context.DeadlineExceeded) {
		return false, err
	}
	if errors.Is(err, errConnLost) && !cs.isLost() {
		// paho failed the token before its handler marked cs lost
		// (pahoConnectionLost): wait for that rather than spin on cs.
		timer := time.NewTimer(s.cfg.Timeout)
		defer timer.Stop()
		select {
		case <-cs.lost:
		case <-ctx.Done():
			return false, ctx.Err()
		case <-timer.C:
			s.lose(cs)
		}
	}
	if !errors.Is(err, errConnLost) && !errors.Is(err, errAckTimeout) {
		// paho could not even queue the message: the connection is
		// wedged, replace it rather than spin on it.
		s.log.Warnf("Publishing to %q failed: %v; reconnecting", topic, err)
		s.lose(cs)
	}
	return true, nil
}

// pahoConnectionLost reports whether err is how paho fails a token when its
// connection drops: the tokens in flight ("connection lost before Publish
// completed", messageids.go cleanUp, which has no sentinel, hence the text)
// and a publish taken meanwhile (ErrNotConnected). paho does both before it
// calls the connection-lost handler that marks cs lost, so the error can
// come first. Taken for a wedged connection, it logged a W! per message in
// flight at every outage.
func pahoConnectionLost(err error) bool {
	return errors.Is(err, mqtt.ErrNotConnected) || strings.HasPrefix(err.Error(), "connection lost before ")
}

var (
	errDeviceNotFound = errors.New("bridge: device not attached")
	errConnLost       = errors.New("connection lost before acknowledgement")
	errAckTimeout     = errors.New("no acknowledgement in time")
)

func (s *Session) checkMessage(msg Message) error {
	if err := omnicore.ValidateID(msg.Device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	switch msg.Kind {
	case omnicore.KindEvents:
		if msg.Subfolder != "" {
			if err := omnicore.ValidateSubfolder(msg.Subfolder); err != nil {
				return fmt.Errorf("events subfolder: %w", err)
			}
		}
		if len(msg.Payload) > omnicore.MaxTelemetryBytes {
			return fmt.Errorf("%w: telemetry of %d bytes, limit %d", ErrTooLarge, len(msg.Payload), omnicore.MaxTelemetryBytes)
		}
	case omnicore.KindState:
		if msg.Subfolder != "" {
			return errors.New("state has no subfolders")
		}
		if len(msg.Payload) > omnicore.MaxStateBytes {
			return fmt.Errorf("%w: state of %d bytes, limit %d", ErrTooLarge, len(msg.Payload), omnicore.MaxStateBytes)
		}
	default:
		return fmt.Errorf("cannot publish %q messages", msg.Kind)
	}
	if msg.QoS > 1 {
		return errors.New("QoS 2 is not supported by the bridge (it closes the connection)")
	}
	return nil
}

// send publishes once on cs and waits for the outcome. It holds a slot of the
// in-flight window for the duration.
func (s *Session) send(ctx context.Context, cs *connection, topic string, qos byte, payload []byte, device string) error {
	return s.sendKeep(ctx, cs, topic, qos, payload, device, nil)
}

// sendKeep is send that, for a data message (keep not nil) acknowledged at
// QoS 1, keeps the message for ackedWindow (see handleBridgeError).
func (s *Session) sendKeep(ctx context.Context, cs *connection, topic string, qos byte, payload []byte, device string, keep *Message) error {
	if err := s.takeSlot(ctx, cs); err != nil {
		return err
	}
	defer s.releaseSlot(cs)
	tok, err := cs.handOver(ctx, topic, qos, payload)
	if err != nil {
		return err
	}
	f := s.track(cs, tok, qos)
	defer cs.untrack(f)
	for {
		tick := cs.ackTick()
		select {
		case <-tok.Done():
			return s.landed(cs, f, keep)
		case <-f.notFound:
			return errDeviceNotFound
		case <-cs.lost:
			return errConnLost
		case <-tick:
			if err := s.overdue(cs, f); err != nil {
				return err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// handOver has a publisher of cs hand a message to paho and returns its
// token.
//
// Why not call paho's Publish here: it blocks while paho's writer is
// stalled until its write timeout, even after the connection is gone; a
// publisher of the connection calls it, so that a lost connection or an
// ended context frees the caller (and its window slot) at once.
func (cs *connection) handOver(ctx context.Context, topic string, qos byte, payload []byte) (mqtt.Token, error) {
	reply := replyChans.Get().(chan mqtt.Token)
	select {
	case cs.publishes <- publishRequest{topic: topic, qos: qos, payload: payload, reply: reply}:
	case <-cs.lost:
		replyChans.Put(reply) // never sent: still empty
		return nil, errConnLost
	case <-ctx.Done():
		replyChans.Put(reply)
		return nil, ctx.Err()
	}
	select {
	case tok := <-reply:
		replyChans.Put(reply)
		return tok, nil
	case <-cs.lost:
		return nil, errConnLost
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// takeSlot takes a slot of the in-flight window for a message to send on
// cs, after max_message_rate allows it. releaseSlot gives it back.
func (s *Session) takeSlot(ctx context.Context, cs *connection) error {
	select {
	case s.window <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-cs.lost:
		return errConnLost
	}
	if s.limiter != nil {
		if err := s.limiter.Wait(ctx); err != nil {
			<-s.window
			// The limiter says so as soon as the wait would outlast ctx,
			// before ctx ends: a deadline, not a wedged connection.
			return fmt.Errorf("%w: waiting for max_message_rate: %v", context.DeadlineExceeded, err)
		}
	}
	cs.inflight.Add(1)
	if cs.isLost() {
		s.releaseSlot(cs)
		return errConnLost
	}
	return nil
}

func (s *Session) releaseSlot(cs *connection) {
	cs.inflight.Add(-1)
	<-s.window
}

// flight is a message paho has taken, waiting for its outcome.
type flight struct {
	tok mqtt.Token
	qos byte
	// id is the packet ID of a QoS 1 message (0 otherwise); notFound is
	// closed when the bridge reports the device not attached for it.
	id       uint16
	notFound chan struct{}
	sent     time.Time
}

// track counts a message paho has taken and registers it for the
// bridge's errors naming its packet ID; untrack ends the registration.
func (s *Session) track(cs *connection, tok mqtt.Token, qos byte) *flight {
	s.c.published.Add(1)
	f := &flight{tok: tok, qos: qos}
	if pt, ok := tok.(*mqtt.PublishToken); ok && qos > 0 && pt.MessageID() != 0 {
		f.id = pt.MessageID()
		f.notFound = make(chan struct{})
		cs.mu.Lock()
		cs.pending[f.id] = f.notFound
		cs.mu.Unlock()
	}
	f.sent = time.Now()
	return f
}

func (cs *connection) untrack(f *flight) {
	if f.notFound == nil {
		return
	}
	cs.mu.Lock()
	if cs.pending[f.id] == f.notFound {
		delete(cs.pending, f.id)
	}
	cs.mu.Unlock()
}

// landed is the outcome of a message whose token completed.
func (s *Session) landed(cs *connection, f *flight, keep *Message) error {
	if err := f.tok.Error(); err != nil {
		if cs.isLost() || pahoConnectionLost(err) {
			return errConnLost
		}
		return err
	}
	if f.qos > 0 {
		// Let errors the bridge sent before this PUBACK reach us first.
		cs.waitRouted(cs.readPublishes.Load(), s.cfg.Timeout)
	}
	if f.notFound != nil {
		// The error may have been routed just before the PUBACK.
		select {
		case <-f.notFound:
			return errDeviceNotFound
		default:
		}
	}
	cs.lastAck.Store(time.Now().UnixNano())
	s.c.acked.Add(1)
	if keep != nil && f.notFound != nil {
		cs.keepAcked(f.id, *keep)
	}
	return nil
}

// overdue checks a message still waiting for its outcome when the
// acknowledgement clock ticks: errAckTimeout once it waited Timeout.
func (s *Session) overdue(cs *connection, f *flight) error {
	if time.Since(f.sent) < s.cfg.Timeout {
		return nil
	}
	// No PUBACK: the bridge may have dropped it (full buffer). Resend;
	// when nothing at all was acknowledged for a while the connection
	// is presumed dead and is replaced.
	if time.Since(time.Unix(0, cs.lastAck.Load())) > s.cfg.Timeout {
		s.log.Warnf("No acknowledgement from the bridge for %s; reconnecting", s.cfg.Timeout)
		s.lose(cs)
	}
	return errAckTimeout
}

// keepAcked records an acknowledged data message under its packet ID.
func (cs *connection) keepAcked(id uint16, msg Message) {
	now := time.Now()
	cs.mu.Lock()
	cs.acked.keep(id, msg, now)
	cs.mu.Unlock()
}

// resend publishes again a message the bridge acknowledged and then named
// in an error (the device was not attached): Publish attaches it first.
func (s *Session) resend(msg Message, errType string) {
	s.c.resentAfterError.Add(1)
	ctx, cancel := context.WithTimeout(s.ctx, 3*s.cfg.Timeout)
	defer cancel()
	if err := s.Publish(ctx, msg); err != nil {
		s.CountDrop(dropErrorAfterAck, 1)
		s.warn.Errorf(dropErrorAfterAck, "The bridge acknowledged a message of device %q and then reported %s for it; sending it again failed: %v", msg.Device, errType, err)
		return
	}
	s.log.Debugf("Sent a message of device %q again: the bridge reported %s after acknowledging it", msg.Device, errType)
}
