package emulator

import (
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// conn is the bridge's view of one established (or admitted) connection.
type conn struct {
	s        *Server
	cl       *mqtt.Client
	clientID string
	registry string
	device   string
	gateway  bool
	tokenExp time.Time
	record   *ConnectionRecord // set once established; guarded by s.mu

	// Guarded by s.mu.
	attached    map[string]time.Time // device -> attach time
	subs        map[string]*deviceSubs
	outstanding map[uint16]configAck // QoS 1 config deliveries awaiting PUBACK
	reason      string               // why the bridge closed it ("" = not closed by the bridge)
	detail      string

	// Touched only by the connection's read goroutine (mochi calls the
	// packet hooks there, one packet at a time).
	initialConfigs []string // config subscriptions granted by the SUBSCRIBE being processed
	holdingWrite   bool     // writeMu held from OnSubscribe to OnPacketProcessed
	tokens         float64  // MaxMessageRate bucket
	tokensAt       time.Time

	lastActivity atomic.Int64 // unix nanoseconds of the last packet read
	done         chan struct{}
	doneOnce     sync.Once

	timersMu    sync.Mutex
	timersDone  bool
	tokenTimer  *time.Timer
	idleTimer   *time.Timer
	writeMu     sync.Mutex // orders config and command deliveries to this client
	ackMu       sync.Mutex
	acks        []ackItem // PUBACKs waiting for their due time, in order
	acksPending int       // queued or being written by ackSender
	ackLoop     bool
	ackWake     chan struct{}
}

// deviceSubs holds the QoS granted per subscription kind, -1 when absent.
type deviceSubs struct {
	config     int
	commands   int
	errors     int
	configSent int // config version last delivered on this connection
}

type configAck struct {
	device  string
	version int
}

type ackItem struct {
	id  uint16
	due time.Time
}

func newConn(s *Server, cl *mqtt.Client, registryID, deviceID string, gateway bool, exp time.Time) *conn {
	c := &conn{
		s: s, cl: cl, clientID: cl.ID, registry: registryID, device: deviceID, gateway: gateway,
		tokenExp: exp,
		attached: map[string]time.Time{}, subs: map[string]*deviceSubs{}, outstanding: map[uint16]configAck{},
		done: make(chan struct{}), ackWake: make(chan struct{}, 1),
	}
	c.lastActivity.Store(time.Now().UnixNano())
	return c
}

// bridgeClosed is the stop cause mochi stores when the bridge closes a connection.
type bridgeClosed struct{ reason string }

func (e bridgeClosed) Error() string { return "closed by the bridge: " + e.reason }

// close ends the connection. The first reason given wins.
func (c *conn) close(reason, detail string) {
	c.s.mu.Lock()
	if c.reason == "" {
		c.reason, c.detail = reason, detail
	}
	c.s.mu.Unlock()
	c.cl.Stop(bridgeClosed{reason})
	c.signalDone()
}

// signalDone stops the PUBACK sender and any throttling sleep.
func (c *conn) signalDone() { c.doneOnce.Do(func() { close(c.done) }) }

func (c *conn) startTimers(r *Rules) {
	c.timersMu.Lock()
	defer c.timersMu.Unlock()
	if r.CloseOnTokenExpiry {
		at := c.tokenExp.Add(r.ClockSkew)
		c.tokenTimer = time.AfterFunc(time.Until(at), func() {
			c.close(ReasonTokenExpired, "token exp "+c.tokenExp.UTC().Format(time.RFC3339)+" + skew "+r.ClockSkew.String())
		})
	}
	if idle := r.IdleTimeout; idle > 0 {
		c.idleTimer = time.AfterFunc(idle, func() { c.checkIdle(idle) })
	}
}

func (c *conn) checkIdle(idle time.Duration) {
	since := time.Since(time.Unix(0, c.lastActivity.Load()))
	if since >= idle {
		c.close(ReasonIdle, "no packet for "+since.Round(time.Millisecond).String())
		return
	}
	c.timersMu.Lock()
	defer c.timersMu.Unlock()
	if !c.timersDone {
		c.idleTimer.Reset(idle - since)
	}
}

// stop releases the timers and the PUBACK sender once the connection is gone.
func (c *conn) stop() {
	c.signalDone()
	c.timersMu.Lock()
	defer c.timersMu.Unlock()
	c.timersDone = true
	if c.tokenTimer != nil {
		c.tokenTimer.Stop()
	}
	if c.idleTimer != nil {
		c.idleTimer.Stop()
	}
}

// --- what the connection may touch ---------------------------------------

// mayUseLocked: the connection speaks for its own device and attached ones.
func (c *conn) mayUseLocked(deviceID string) bool {
	if deviceID == c.device {
		return true
	}
	_, ok := c.attached[deviceID]
	return ok
}

func (c *conn) attachedLocked() []string {
	out := make([]string, 0, len(c.attached))
	for d := range c.attached {
		out = append(out, d)
	}
	sort.Strings(out)
	return out
}

// subscribedLocked returns the granted QoS of a subscription, or -1.
func (c *conn) subscribedLocked(deviceID string, kind omnicore.Kind) int {
	ds := c.subs[deviceID]
	if ds == nil {
		return -1
	}
	switch kind {
	case omnicore.KindConfig:
		return ds.config
	case omnicore.KindCommands:
		return ds.commands
	case omnicore.KindErrors:
		return ds.errors
	}
	return -1
}

func (c *conn) setSubLocked(deviceID string, kind omnicore.Kind, qos int) {
	ds := c.subs[deviceID]
	if ds == nil {
		if qos < 0 {
			return
		}
		ds = &deviceSubs{config: -1, commands: -1, errors: -1}
		c.subs[deviceID] = ds
	}
	switch kind {
	case omnicore.KindConfig:
		ds.config = qos
		if qos < 0 {
			ds.configSent = 0
		}
	case omnicore.KindCommands:
		ds.commands = qos
	case omnicore.KindErrors:
		ds.errors = qos
	}
	if ds.config < 0 && ds.commands < 0 && ds.errors < 0 {
		delete(c.subs, deviceID)
	}
}

// dropDeviceLocked forgets a device's attachment and subscriptions and
// returns the MQTT filters to remove from mochi's index.
func (c *conn) dropDeviceLocked(deviceID string) []string {
	delete(c.attached, deviceID)
	ds := c.subs[deviceID]
	delete(c.subs, deviceID)
	if ds == nil {
		return nil
	}
	var filters []string
	if ds.config >= 0 {
		filters = append(filters, omnicore.Topic(c.registry, deviceID, omnicore.KindConfig, ""))
	}
	if ds.commands >= 0 {
		filters = append(filters, omnicore.Topic(c.registry, deviceID, omnicore.KindCommands, "#"))
	}
	return filters
}

// unsubscribeBroker keeps mochi's own subscription index in step with ours.
func (c *conn) unsubscribeBroker(filters []string) {
	for _, f := range filters {
		if c.s.broker.Topics.Unsubscribe(f, c.cl.ID) {
			atomic.AddInt64(&c.s.broker.Info.Subscriptions, -1)
		}
		c.cl.State.Subscriptions.Delete(f)
	}
}

// classifyFilter checks a SUBSCRIBE filter's shape. bad is non-empty when the
// filter is outside the bridge's topics, which closes the connection.
func (c *conn) classifyFilter(filter string) (deviceID string, kind omnicore.Kind, bad string) {
	pt, err := omnicore.ParseTopic(filter)
	if err != nil {
		return "", "", err.Error()
	}
	if pt.Registry != c.registry {
		return "", "", fmt.Sprintf("filter %s is not in the connection's registry %q", trunc(filter), c.registry)
	}
	if err := omnicore.ValidateID(pt.Device); err != nil {
		return "", "", fmt.Sprintf("filter %s: %v", trunc(filter), err)
	}
	switch {
	case pt.Kind == omnicore.KindConfig && pt.Subfolder == "":
	case pt.Kind == omnicore.KindCommands && pt.Subfolder == "#":
	case pt.Kind == omnicore.KindErrors && pt.Subfolder == "":
		if !c.gateway || pt.Device != c.device {
			return "", "", fmt.Sprintf("filter %s: only a gateway may subscribe, and only to its own errors topic", trunc(filter))
		}
	default:
		return "", "", fmt.Sprintf("filter %s is not /{registry}/{device}/config, /commands/# or /errors", trunc(filter))
	}
	return pt.Device, pt.Kind, ""
}

// checkPublish finds what makes a PUBLISH close the connection: QoS 2, a
// topic outside the bridge's, control messages from a non-gateway, payloads
// over the limit. It runs before mochi's own checks, which would otherwise
// drop some of these silently.
func (c *conn) checkPublish(pk packets.Packet, r *Rules) (reason, detail string) {
	if pk.FixedHeader.Qos > 1 {
		return ReasonQoS2, "topic " + trunc(pk.TopicName)
	}
	pt, err := omnicore.ParseTopic(pk.TopicName)
	if err != nil {
		return ReasonBadTopic, trunc(err.Error())
	}
	if pt.Registry != c.registry {
		return ReasonBadTopic, fmt.Sprintf("topic %s is not in the connection's registry %q", trunc(pk.TopicName), c.registry)
	}
	if err := omnicore.ValidateID(pt.Device); err != nil {
		return ReasonBadTopic, fmt.Sprintf("topic %s: %v", trunc(pk.TopicName), trunc(err.Error()))
	}
	size := len(pk.Payload)
	switch pt.Kind {
	case omnicore.KindEvents:
		if pt.Subfolder != "" {
			if err := omnicore.ValidateSubfolder(pt.Subfolder); err != nil {
				return ReasonBadTopic, fmt.Sprintf("topic %s: %v", trunc(pk.TopicName), trunc(err.Error()))
			}
		}
		if size > r.MaxEventsBytes {
			return ReasonPayloadTooLarge, fmt.Sprintf("events payload %d bytes > %d", size, r.MaxEventsBytes)
		}
	case omnicore.KindState:
		if pt.Subfolder != "" {
			return ReasonBadTopic, "state has no subfolders: " + trunc(pk.TopicName)
		}
		if size > r.MaxStateBytes {
			return ReasonPayloadTooLarge, fmt.Sprintf("state payload %d bytes > %d", size, r.MaxStateBytes)
		}
	case omnicore.KindAttach, omnicore.KindDetach:
		if pt.Subfolder != "" {
			return ReasonBadTopic, "control topics have no subfolders: " + trunc(pk.TopicName)
		}
		if !c.gateway {
			return ReasonNotGateway, "topic " + trunc(pk.TopicName)
		}
	default:
		return ReasonBadTopic, fmt.Sprintf("topic %s: %q cannot be published", trunc(pk.TopicName), pt.Kind)
	}
	return "", ""
}

// --- inbound PUBLISH ------------------------------------------------------

// handlePublish runs on the read goroutine for a PUBLISH checkPublish passed.
func (c *conn) handlePublish(pk packets.Packet) {
	r := c.s.rules.Load()
	if !c.admitRate(r) {
		return
	}
	pt, err := omnicore.ParseTopic(pk.TopicName)
	if err != nil {
		return // checked in OnPacketRead
	}
	switch pt.Kind {
	case omnicore.KindAttach:
		c.handleAttach(pk, pt, r)
	case omnicore.KindDetach:
		c.handleDetach(pk, pt)
	default:
		c.handleData(pk, pt, r)
	}
}

// admitRate applies MaxMessageRate with a token bucket (burst = one second's
// worth). Throttling sleeps on the read goroutine: the bridge stops reading,
// TCP pushes back, and the PUBACK comes late.
func (c *conn) admitRate(r *Rules) bool {
	rate := r.MaxMessageRate
	if rate <= 0 {
		return true
	}
	now := time.Now()
	if c.tokensAt.IsZero() {
		c.tokens = rate
	} else if elapsed := now.Sub(c.tokensAt); elapsed > 0 {
		c.tokens = min(rate, c.tokens+elapsed.Seconds()*rate)
	}
	c.tokensAt = now
	if c.tokens >= 1 {
		c.tokens--
		return true
	}
	if r.RateAction == RateClose {
		c.close(ReasonMessageRate, fmt.Sprintf("more than %g messages/s", rate))
		return false
	}
	wait := time.Duration((1 - c.tokens) / rate * float64(time.Second))
	c.tokens, c.tokensAt = 0, now.Add(wait)
	c.s.mu.Lock()
	c.s.stats.Throttled++
	c.s.mu.Unlock()
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.done:
		return false
	}
}

func (c *conn) handleData(pk packets.Packet, pt omnicore.ParsedTopic, r *Rules) {
	s := c.s
	now := time.Now()
	qos1 := pk.FixedHeader.Qos == 1
	info := &omnicore.MessageInfo{MessageType: "PUBLISH", Topic: pk.TopicName, PacketID: pk.PacketID}

	s.mu.Lock()
	if !c.mayUseLocked(pt.Device) {
		s.stats.DroppedNotAttached++
		ack, after := r.NotAttachedPuback, r.NotAttachedErrorAfterPuback
		s.mu.Unlock()
		if after && qos1 {
			c.puback(pk.PacketID)
		}
		c.raise(omnicore.ErrorMessage{
			ErrorType:   omnicore.ErrorDeviceNotFound,
			Description: fmt.Sprintf("The specified device with ID '%s' is not attached to the gateway.", pt.Device),
			DeviceID:    pt.Device, MessageInfo: info,
		})
		if ack && !after && qos1 {
			c.puback(pk.PacketID)
		}
		return
	}
	dev := s.lookupLocked(c.registry, pt.Device) // nil when deleted since
	if pt.Kind == omnicore.KindState && r.StateInterval > 0 && dev != nil &&
		!dev.lastState.IsZero() && now.Sub(dev.lastState) < r.StateInterval {
		s.stats.DroppedStateRate++
		if pt.Device == c.device {
			s.mu.Unlock()
			c.close(ReasonStateRate, fmt.Sprintf("state %s after the previous one, limit %s", now.Sub(dev.lastState).Round(time.Millisecond), r.StateInterval))
			return
		}
		filters := c.dropDeviceLocked(pt.Device)
		s.stats.BridgeDetaches++
		s.notifyLocked()
		ack := r.DetachedStatePuback
		s.mu.Unlock()
		c.unsubscribeBroker(filters)
		c.raise(omnicore.ErrorMessage{
			ErrorType:   omnicore.ErrorDetachedByError,
			Description: "Device detached because of a device error.",
			DeviceID:    pt.Device, MessageInfo: info,
		})
		if ack && qos1 {
			c.puback(pk.PacketID)
		}
		return
	}
	if qos1 && s.withhold > 0 {
		s.withhold--
		s.stats.Withheld++
		s.notifyLocked()
		s.mu.Unlock()
		return
	}
	if dev != nil {
		dev.recordData(pt.Kind, pk.Payload, now)
	}
	msg := Message{
		Index: s.recvTotal, Time: now, ClientID: c.clientID, Registry: c.registry, Device: pt.Device,
		Kind: pt.Kind, Subfolder: pt.Subfolder, Topic: pk.TopicName, Payload: pk.Payload,
		QoS: pk.FixedHeader.Qos, PacketID: pk.PacketID, Dup: pk.FixedHeader.Dup,
	}
	s.recvTotal++
	s.storeLocked(msg)
	s.stats.MessagesAccepted++
	s.stats.BytesAccepted += int64(len(pk.Payload))
	if pt.Kind == omnicore.KindState {
		s.stats.StateAccepted++
	} else {
		s.stats.EventsAccepted++
	}
	s.notifyLocked()
	s.mu.Unlock()

	if s.onReceive != nil {
		s.onReceive(msg)
	}
	if qos1 {
		c.puback(pk.PacketID)
	}
}

// --- outbound --------------------------------------------------------------

// raise records an error for the connection's gateway and, if it subscribed
// to its errors topic, sends it (QoS 0). Callers raise before they PUBACK the
// packet that caused the error, so the client sees the error first.
func (c *conn) raise(em omnicore.ErrorMessage) {
	s := c.s
	topic := omnicore.Topic(c.registry, c.device, omnicore.KindErrors, "")
	s.mu.Lock()
	delivered := c.gateway && c.subscribedLocked(c.device, omnicore.KindErrors) >= 0
	if len(s.errorsSent) >= maxErrorsKept {
		s.errorsSent = slices.Delete(s.errorsSent, 0, maxErrorsKept/2)
	}
	s.errorsSent = append(s.errorsSent, SentError{
		Time: time.Now(), ClientID: c.clientID, Registry: c.registry, Gateway: c.device,
		Topic: topic, Error: em, Delivered: delivered,
	})
	s.stats.ErrorsRaised++
	if delivered {
		s.stats.ErrorsDelivered++
	}
	s.notifyLocked()
	s.mu.Unlock()
	s.log.Info("error raised", "client", c.clientID, "type", em.ErrorType, "device", em.DeviceID, "delivered", delivered)
	if !delivered {
		return
	}
	payload, err := json.Marshal(em)
	if err != nil {
		return
	}
	_, _ = c.publish(topic, payload, 0)
}

// puback acknowledges an inbound QoS 1 PUBLISH, after SetPubackDelay if set,
// always in the order the PUBLISHes arrived (MQTT 3.1.1 section 4.6).
func (c *conn) puback(id uint16) {
	delay := time.Duration(c.s.pubackDelay.Load())
	c.ackMu.Lock()
	if delay <= 0 && c.acksPending == 0 {
		c.ackMu.Unlock()
		c.writeAck(id)
		return
	}
	c.acks = append(c.acks, ackItem{id: id, due: time.Now().Add(delay)})
	c.acksPending++
	if !c.ackLoop {
		c.ackLoop = true
		go c.ackSender()
	}
	c.ackMu.Unlock()
	select {
	case c.ackWake <- struct{}{}:
	default:
	}
}

func (c *conn) ackSender() {
	for {
		c.ackMu.Lock()
		if len(c.acks) == 0 {
			c.ackMu.Unlock()
			select {
			case <-c.ackWake:
				continue
			case <-c.done:
				return
			}
		}
		it := c.acks[0]
		c.acks = c.acks[1:]
		c.ackMu.Unlock()
		if d := time.Until(it.due); d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-c.done:
				t.Stop()
				return
			}
		}
		c.writeAck(it.id)
		c.ackMu.Lock()
		c.acksPending--
		c.ackMu.Unlock()
	}
}

// writeAck counts the PUBACK before writing it, so that a client that has
// it never finds Stats().Pubacks behind.
func (c *conn) writeAck(id uint16) {
	c.s.pubacks.Add(1)
	if err := c.write(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Puback}, PacketID: id}); err != nil {
		c.s.pubacks.Add(-1)
	}
}

// publish sends a server-to-client PUBLISH to this connection only, with a
// fresh packet ID at QoS 1.
func (c *conn) publish(topic string, payload []byte, qos byte) (uint16, error) {
	var id uint16
	if qos > 0 {
		var err error
		if id, err = c.nextPacketID(); err != nil {
			return 0, err
		}
	}
	return id, c.publishID(topic, payload, qos, id)
}

// nextPacketID picks the packet ID of a QoS 1 PUBLISH, so that a caller can
// register what it waits for before the packet is written (see publishID).
func (c *conn) nextPacketID() (uint16, error) {
	id, err := c.cl.NextPacketID()
	return uint16(id), err
}

// publishID writes a PUBLISH with a packet ID from nextPacketID (0 at QoS 0).
// Whatever tracks the PUBACK must be registered before: the PUBACK can be
// read before this returns.
func (c *conn) publishID(topic string, payload []byte, qos byte, id uint16) error {
	return c.write(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: qos},
		TopicName:   topic,
		Payload:     payload,
		PacketID:    id,
	})
}

// write writes one packet synchronously (every write has a deadline, see
// deadlineConn) and closes the connection if it fails.
func (c *conn) write(pk packets.Packet) error {
	err := c.cl.WritePacket(pk)
	if err != nil && !c.cl.Closed() {
		c.close(ReasonWriteFailed, err.Error())
	}
	return err
}

// trunc quotes a client-supplied string for a log or detail field, cut to a
// readable length.
func trunc(s string) string {
	const n = 200
	if len(s) > n {
		return fmt.Sprintf("%q...", s[:n])
	}
	return fmt.Sprintf("%q", s)
}
