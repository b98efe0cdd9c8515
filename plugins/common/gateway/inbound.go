package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/telegraf-omnicore/telegraf-omnicore/internal/redact"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// queued is an inbound message waiting in a subscriber's queue; replay
// marks a config replayed to a late subscriber.
type queued struct {
	in     Inbound
	replay bool
}

// subscriberQueue is how many inbound messages wait for one subscriber's
// handler. Past it, messages for that subscriber are dropped and counted
// (dropInboundQueueFull): a slow or blocked handler costs its own messages,
// never the connection's (see route).
const subscriberQueue = 1024

// handlerEntry is one subscriber: its filter, its handler, and its queue,
// drained in order by its own goroutine (deliver).
type handlerEntry struct {
	device string // "" for SubscribeAll and errors
	all    bool
	errors bool
	h      Handler

	queue chan queued
	stop  chan struct{} // closed by Unsubscribe

	// Touched only by the entry's goroutine: which devices' config this
	// handler has had, and configs replayed to it that the bridge may still
	// send too (the same payload arriving next is then not delivered twice).
	hadConfig map[string]bool
	replayed  map[string]string
}

// wants says whether in goes to this subscriber.
func (e *handlerEntry) wants(in Inbound) bool {
	if in.Kind == omnicore.KindErrors {
		return e.errors
	}
	return e.all || (!e.errors && e.device == in.Device)
}

// Subscribe implements Conn.
func (s *Session) Subscribe(ctx context.Context, device string, h Handler) (Subscription, error) {
	if err := omnicore.ValidateID(device); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	entry := &handlerEntry{device: device, h: h}
	sub := s.addHandler(entry)
	for {
		cs, err := s.ready(ctx)
		if err != nil {
			sub.Unsubscribe()
			return nil, err
		}
		if device != s.cfg.GatewayID {
			if err := s.attachOn(ctx, cs, device, true); err != nil {
				if errors.Is(err, ErrAttachRefused) || ctx.Err() != nil || errors.Is(err, ErrClosed) {
					// Keep the handler: the device is retried on reconnects
					// and on later attaches.
					return sub, err
				}
				continue
			}
		}
		s.mu.Lock()
		already := s.deviceLocked(device).subGen == cs.gen
		s.mu.Unlock()
		if err := s.subscribeDevice(cs, device); err != nil {
			if cs.isLost() {
				continue // restored by rebuild on the next connection
			}
			return sub, err
		}
		if already {
			// No new SUBSCRIBE, so the bridge sends no config: hand the
			// latest one to this subscriber, as the bridge would have.
			s.replayConfig(entry, device)
		}
		return sub, nil
	}
}

// SubscribeAll implements Conn.
func (s *Session) SubscribeAll(h Handler) Subscription {
	entry := &handlerEntry{all: true, h: h}
	sub := s.addHandler(entry)
	// Subscribe what is attached already; later attaches subscribe in
	// attachOn's callers via wantsSubscription.
	go func() {
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.Timeout*3)
		defer cancel()
		cs, err := s.ready(ctx)
		if err != nil {
			return
		}
		s.mu.Lock()
		ids := []string{s.cfg.GatewayID}
		for id, d := range s.devices {
			if d.attachedGen == cs.gen {
				ids = append(ids, id)
			}
		}
		var replay []string
		for _, id := range ids {
			if s.deviceLocked(id).subGen == cs.gen {
				replay = append(replay, id)
			}
		}
		s.mu.Unlock()
		for _, id := range replay {
			s.replayConfig(entry, id)
		}
		for _, id := range ids {
			if err := s.subscribeDevice(cs, id); err != nil {
				s.warn.Warnf("subscribe_failed", "Subscribing config and commands of %q failed: %v", id, err)
			}
		}
	}()
	return sub
}

// SubscribeErrors implements Conn.
func (s *Session) SubscribeErrors(h Handler) Subscription {
	return s.addHandler(&handlerEntry{errors: true, h: h})
}

type subscription struct {
	s  *Session
	id uint64
}

func (u subscription) Unsubscribe() {
	u.s.mu.Lock()
	defer u.s.mu.Unlock()
	if e, ok := u.s.handlers[u.id]; ok {
		delete(u.s.handlers, u.id)
		close(e.stop)
	}
}

// addHandler registers a subscriber and starts the goroutine that feeds
// its handler.
func (s *Session) addHandler(e *handlerEntry) Subscription {
	e.queue = make(chan queued, subscriberQueue)
	e.stop = make(chan struct{})
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextSubID++
	s.handlers[s.nextSubID] = e
	go s.deliver(e)
	return subscription{s: s, id: s.nextSubID}
}

func (s *Session) hasAllHandlersLocked() bool {
	for _, e := range s.handlers {
		if e.all {
			return true
		}
	}
	return false
}

func (s *Session) wantsSubscriptionLocked(id string) bool {
	for _, e := range s.handlers {
		if e.all || (!e.errors && e.device == id) {
			return true
		}
	}
	return false
}

func (s *Session) wantsSubscription(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.wantsSubscriptionLocked(id)
}

// subscribeDevice subscribes device's config and commands on cs once per
// connection. The bridge answers a config subscription with the latest config.
func (s *Session) subscribeDevice(cs *connection, id string) error {
	s.mu.Lock()
	d := s.deviceLocked(id)
	if d.subGen == cs.gen {
		s.mu.Unlock()
		return nil
	}
	d.subGen = cs.gen
	s.mu.Unlock()
	err := s.subscribe(cs, map[string]byte{
		omnicore.Topic(s.cfg.RegistryID, id, omnicore.KindConfig, ""):    1,
		omnicore.Topic(s.cfg.RegistryID, id, omnicore.KindCommands, "#"): 1,
	})
	if err != nil {
		s.mu.Lock()
		if d.subGen == cs.gen {
			d.subGen = 0
		}
		s.mu.Unlock()
	}
	return err
}

func (s *Session) subscribe(cs *connection, filters map[string]byte) error {
	tok := cs.client.SubscribeMultiple(filters, nil)
	select {
	case <-tok.Done():
	case <-cs.lost:
		return errConnLost
	case <-time.After(s.cfg.Timeout):
		return fmt.Errorf("no SUBACK within %s", s.cfg.Timeout)
	}
	if err := tok.Error(); err != nil {
		return err
	}
	if st, ok := tok.(*mqtt.SubscribeToken); ok {
		for topic, code := range st.Result() {
			if code == 0x80 {
				return fmt.Errorf("bridge refused subscription to %q", topic)
			}
		}
	}
	return nil
}

// onMessage runs on paho's router goroutine: it updates session state for
// errors at once (so attach outcomes are seen quickly) and queues the message
// for the handlers.
func (s *Session) onMessage(cs *connection, m mqtt.Message) {
	p, err := omnicore.ParseTopic(m.Topic())
	if err != nil || p.Registry != s.cfg.RegistryID {
		s.CountDrop(dropInboundUnroutable, 1)
		s.warn.Warnf(dropInboundUnroutable, "Dropping a message on unexpected topic %q", m.Topic())
		return
	}
	in := Inbound{
		Device:    p.Device,
		Kind:      p.Kind,
		Subfolder: p.Subfolder,
		Topic:     m.Topic(),
		Payload:   m.Payload(),
		Received:  time.Now(),
	}
	switch p.Kind {
	case omnicore.KindErrors:
		s.handleBridgeError(cs, m.Payload())
	case omnicore.KindCommands, omnicore.KindConfig:
	default:
		s.CountDrop(dropInboundUnroutable, 1)
		s.warn.Warnf(dropInboundUnroutable, "Dropping a message on unexpected topic %q", m.Topic())
		return
	}
	if p.Kind == omnicore.KindConfig {
		s.mu.Lock()
		if d, ok := s.devices[p.Device]; ok {
			d.config = append(d.config[:0], in.Payload...)
			d.hasConfig = true
		}
		s.mu.Unlock()
	}
	s.c.received.Add(1)
	s.route(in)
}

// route queues in for every subscriber that wants it. It runs on paho's
// router goroutine and never blocks: a QoS 1 Publish waits until what paho
// read before its PUBACK is routed (waitRouted, so that a bridge error
// about the message is seen first), and a blocked router would stall paho's
// reader, so a slow handler would hold every outbound publish. A subscriber
// whose queue is full loses the message instead, counted and logged.
func (s *Session) route(in Inbound) {
	full := 0
	s.mu.Lock()
	for _, e := range s.handlers {
		if e.wants(in) && !e.offer(queued{in: in}) {
			full++
		}
	}
	s.mu.Unlock()
	if full > 0 {
		s.dropFull(in, full)
	}
}

// offer queues q for the subscriber unless its queue is full.
func (e *handlerEntry) offer(q queued) bool {
	select {
	case e.queue <- q:
		return true
	default:
		return false
	}
}

// dropFull counts and reports a message n subscribers' full queues lost.
func (s *Session) dropFull(in Inbound, n int) {
	s.CountDrop(dropInboundQueueFull, uint64(n))
	s.warn.Warnf(dropInboundQueueFull, "Dropping a %s message of device %q for %d subscribers: their queue of %d messages is full (their handler is slow or blocked)",
		in.Kind, in.Device, n, subscriberQueue)
}

// replayConfig queues device's latest config for one handler.
func (s *Session) replayConfig(e *handlerEntry, device string) {
	s.mu.Lock()
	d, ok := s.devices[device]
	if !ok || !d.hasConfig {
		s.mu.Unlock()
		return
	}
	in := Inbound{
		Device:   device,
		Kind:     omnicore.KindConfig,
		Topic:    omnicore.Topic(s.cfg.RegistryID, device, omnicore.KindConfig, ""),
		Payload:  append([]byte(nil), d.config...),
		Received: time.Now(),
	}
	s.mu.Unlock()
	if !e.offer(queued{in: in, replay: true}) {
		s.dropFull(in, 1)
	}
}

// handleBridgeError reacts to the errors topic: attachment errors fail the
// device's attach attempt, not-found and detachment errors make the device
// re-attach on its next use.
func (s *Session) handleBridgeError(cs *connection, payload []byte) {
	var e omnicore.ErrorMessage
	if err := json.Unmarshal(payload, &e); err != nil || e.ErrorType == "" {
		s.countError("UNPARSEABLE")
		why := "no error_type"
		if err != nil {
			why = redact.Error(err, payload)
		}
		// The size, never the bytes (no payload in any log).
		s.warn.Warnf("errors_unparseable", "Unparseable message of %d bytes on the errors topic: %s", len(payload), why)
		return
	}
	s.countError(e.ErrorType)
	switch e.ErrorType {
	case omnicore.ErrorAttachment:
		s.mu.Lock()
		if d, ok := s.devices[e.DeviceID]; ok {
			if a := d.attempt; a != nil && a.gen == cs.gen {
				desc := e.Description
				a.refused.Store(&desc)
				a.once.Do(func() { close(a.signal) })
			} else if d.attachedGen == cs.gen {
				// The error lost the race against the attach's PUBACK.
				d.attachedGen = 0
				d.failures++
				d.lastErr = fmt.Errorf("%w: device %q: %s", ErrAttachRefused, e.DeviceID, e.Description)
				d.retryAt = time.Now().Add(retryBackoff(d.failures))
				s.c.attachesFailed.Add(1)
			}
		}
		s.mu.Unlock()
	case omnicore.ErrorDeviceNotFound, omnicore.ErrorDetachedByError:
		s.warn.Warnf("bridge_error_"+e.ErrorType, "Bridge error %s for device %q: %s", e.ErrorType, e.DeviceID, e.Description)
		s.markDetached(cs, e.DeviceID)
		if e.MessageInfo != nil && e.MessageInfo.PacketID != 0 {
			cs.mu.Lock()
			var resend Message
			found := false
			if ch, ok := cs.pending[e.MessageInfo.PacketID]; ok {
				delete(cs.pending, e.MessageInfo.PacketID)
				close(ch)
			} else {
				// The error came after the PUBACK: the message was
				// acknowledged but dropped. Send it again.
				resend, found = cs.acked.take(e.MessageInfo.PacketID, e.DeviceID, time.Now())
			}
			cs.mu.Unlock()
			if found {
				go s.resend(resend, e.ErrorType)
			}
		}
		// A subscribed device the bridge detached is re-attached by
		// healLoop within healInterval; others on their next publish.
	default:
		s.warn.Warnf("bridge_error_"+e.ErrorType, "Bridge error %s for device %q: %s", e.ErrorType, e.DeviceID, e.Description)
	}
}

// deliver hands the subscriber's messages to its handler, in order, off
// paho's router goroutine, until Unsubscribe or Close.
func (s *Session) deliver(e *handlerEntry) {
	for {
		var q queued
		select {
		case q = <-e.queue:
		case <-e.stop:
			return
		case <-s.ctx.Done():
			return
		}
		if q.in.Kind == omnicore.KindConfig && !e.admitConfig(q.in, q.replay) {
			continue
		}
		e.h(q.in)
	}
}

// admitConfig decides whether a config goes to this handler: a replay only
// when the handler has had no config of the device yet, and the bridge's
// copy of a config just replayed not a second time.
func (e *handlerEntry) admitConfig(in Inbound, replay bool) bool {
	if e.hadConfig == nil {
		e.hadConfig = make(map[string]bool)
		e.replayed = make(map[string]string)
	}
	if replay {
		if e.hadConfig[in.Device] {
			return false
		}
		e.replayed[in.Device] = string(in.Payload)
	} else if p, ok := e.replayed[in.Device]; ok {
		delete(e.replayed, in.Device)
		if p == string(in.Payload) {
			return false
		}
	}
	e.hadConfig[in.Device] = true
	return true
}
