package gateway

import (
	"context"
	"errors"
	"fmt"
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

// ackedMsg is an acknowledged message kept for ackedWindow.
type ackedMsg struct {
	msg Message
	at  time.Time
}

const (
	// ackedWindow is how long an acknowledged message is kept in case the
	// bridge names it in an error after its PUBACK; ackedMax bounds how
	// many are kept (the oldest go first).
	ackedWindow = 5 * time.Second
	ackedMax    = 10000
)

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
	topic := omnicore.Topic(s.cfg.RegistryID, msg.Device, msg.Kind, msg.Subfolder)
	state := msg.Kind == omnicore.KindState
	for attempt := 0; ; attempt++ {
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
		if err == nil {
			s.touch(msg.Device)
			return nil
		}
		if errors.Is(err, errDeviceNotFound) {
			s.markDetached(cs, msg.Device)
			continue
		}
		if ctx.Err() != nil || errors.Is(err, ErrClosed) || errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		if !errors.Is(err, errConnLost) && !errors.Is(err, errAckTimeout) {
			// paho could not even queue the message: the connection is
			// wedged, replace it rather than spin on it.
			s.log.Warnf("Publishing to %q failed: %v; reconnecting", topic, err)
			s.lose(cs)
		}
	}
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
	select {
	case s.window <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-cs.lost:
		return errConnLost
	}
	defer func() { <-s.window }()
	if s.limiter != nil {
		if err := s.limiter.Wait(ctx); err != nil {
			// The limiter says so as soon as the wait would outlast ctx,
			// before ctx ends: a deadline, not a wedged connection.
			return fmt.Errorf("%w: waiting for max_message_rate: %v", context.DeadlineExceeded, err)
		}
	}
	cs.inflight.Add(1)
	defer cs.inflight.Add(-1)
	if cs.isLost() {
		return errConnLost
	}
	// paho's Publish blocks while its writer is stalled until its write
	// timeout, even after the connection is gone: a publisher of the
	// connection calls it, so that a lost connection or an ended context
	// frees the caller and its window slot at once.
	reply := replyChans.Get().(chan mqtt.Token)
	select {
	case cs.publishes <- publishRequest{topic: topic, qos: qos, payload: payload, reply: reply}:
	case <-cs.lost:
		replyChans.Put(reply) // never sent: still empty
		return errConnLost
	case <-ctx.Done():
		replyChans.Put(reply)
		return ctx.Err()
	}
	var tok mqtt.Token
	select {
	case tok = <-reply:
		replyChans.Put(reply)
	case <-cs.lost:
		return errConnLost
	case <-ctx.Done():
		return ctx.Err()
	}
	s.c.published.Add(1)
	var notFound chan struct{}
	if pt, ok := tok.(*mqtt.PublishToken); ok && qos > 0 && pt.MessageID() != 0 {
		notFound = make(chan struct{})
		cs.mu.Lock()
		cs.pending[pt.MessageID()] = notFound
		cs.mu.Unlock()
		defer func() {
			cs.mu.Lock()
			if cs.pending[pt.MessageID()] == notFound {
				delete(cs.pending, pt.MessageID())
			}
			cs.mu.Unlock()
		}()
	}
	sent := time.Now()
	for {
		tick := cs.ackTick()
		select {
		case <-tok.Done():
			if err := tok.Error(); err != nil {
				if cs.isLost() {
					return errConnLost
				}
				return err
			}
			if qos > 0 {
				// Let errors the bridge sent before this PUBACK reach us first.
				cs.waitRouted(cs.readPublishes.Load(), s.cfg.Timeout)
			}
			if notFound != nil {
				// The error may have been routed just before the PUBACK.
				select {
				case <-notFound:
					return errDeviceNotFound
				default:
				}
			}
			cs.lastAck.Store(time.Now().UnixNano())
			s.c.acked.Add(1)
			if keep != nil && notFound != nil {
				cs.keepAcked(tok.(*mqtt.PublishToken).MessageID(), *keep)
			}
			return nil
		case <-notFound:
			return errDeviceNotFound
		case <-cs.lost:
			return errConnLost
		case <-tick:
			if time.Since(sent) < s.cfg.Timeout {
				continue
			}
			// No PUBACK: the bridge may have dropped it (full buffer). Resend;
			// when nothing at all was acknowledged for a while the connection
			// is presumed dead and is replaced.
			if time.Since(time.Unix(0, cs.lastAck.Load())) > s.cfg.Timeout {
				s.log.Warnf("No acknowledgement from the bridge for %s; reconnecting", s.cfg.Timeout)
				s.lose(cs)
			}
			return errAckTimeout
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// keepAcked records an acknowledged data message under its packet ID.
func (cs *connection) keepAcked(id uint16, msg Message) {
	now := time.Now()
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for len(cs.ackedOrder) > 0 {
		old := cs.ackedOrder[0]
		m, ok := cs.acked[old]
		if ok && now.Sub(m.at) <= ackedWindow && len(cs.ackedOrder) < ackedMax {
			break
		}
		if ok && now.Sub(m.at) > ackedWindow || len(cs.ackedOrder) >= ackedMax {
			delete(cs.acked, old)
		}
		cs.ackedOrder = cs.ackedOrder[1:]
	}
	cs.acked[id] = &ackedMsg{msg: msg, at: now}
	cs.ackedOrder = append(cs.ackedOrder, id)
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
