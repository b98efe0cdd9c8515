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

// queued is an inbound message waiting for dispatch; to, when set, limits it
// to one handler (a config replayed to a late subscriber).
type queued struct {
	in Inbound
	to *handlerEntry
}

type handlerEntry struct {
	device string // "" for SubscribeAll and errors
	all    bool
	errors bool
	h      Handler

	// Touched only by the dispatch goroutine: which devices' config this
	// handler has had, and configs replayed to it that the bridge may still
	// send too (the same payload arriving next is then not delivered twice).
	hadConfig map[string]bool
	replayed  map[string]string
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
	delete(u.s.handlers, u.id)
}

func (s *Session) addHandler(e *handlerEntry) Subscription {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextSubID++
	s.handlers[s.nextSubID] = e
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
	s.enqueue(queued{in: in})
}

func (s *Session) enqueue(q queued) {
	select {
	case s.inbound <- q:
	case <-s.ctx.Done():
	}
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
	s.enqueue(queued{in: in, to: e})
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
			var resend *ackedMsg
			if ch, ok := cs.pending[e.MessageInfo.PacketID]; ok {
				delete(cs.pending, e.MessageInfo.PacketID)
				close(ch)
			} else if m, ok := cs.acked[e.MessageInfo.PacketID]; ok && m.msg.Device == e.DeviceID && time.Since(m.at) <= ackedWindow {
				// The error came after the PUBACK: the message was
				// acknowledged but dropped. Send it again.
				delete(cs.acked, e.MessageInfo.PacketID)
				resend = m
			}
			cs.mu.Unlock()
			if resend != nil {
				go s.resend(resend.msg, e.ErrorType)
			}
		}
		// A subscribed device the bridge detached is re-attached by
		// healLoop within healInterval; others on their next publish.
	default:
		s.warn.Warnf("bridge_error_"+e.ErrorType, "Bridge error %s for device %q: %s", e.ErrorType, e.DeviceID, e.Description)
	}
}

// dispatch hands inbound messages to the handlers, in order, off paho's
// router goroutine.
func (s *Session) dispatch() {
	for {
		var q queued
		select {
		case q = <-s.inbound:
		case <-s.ctx.Done():
			return
		}
		in := q.in
		s.mu.Lock()
		var es []*handlerEntry
		for _, e := range s.handlers {
			switch {
			case q.to != nil:
				if e == q.to {
					es = append(es, e)
				}
			case in.Kind == omnicore.KindErrors:
				if e.errors {
					es = append(es, e)
				}
			case e.all || (!e.errors && e.device == in.Device):
				es = append(es, e)
			}
		}
		s.mu.Unlock()
		for _, e := range es {
			if in.Kind == omnicore.KindConfig && !e.admitConfig(in, q.to != nil) {
				continue
			}
			e.h(in)
		}
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
