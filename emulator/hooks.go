package emulator

import (
	"crypto"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// hook plugs the bridge's rules into mochi. mochi calls the packet hooks on
// the client's read goroutine, one packet at a time, which is what gives the
// per-connection ordering the rules rely on (an error is written before the
// PUBACK of the packet that caused it; the first config after the SUBACK).
//
// Division of labour:
//   - OnPacketRead: CONNECT protocol check; every check that closes the
//     connection (before mochi's own checks, which would drop some packets
//     silently); activity for the idle timeout; PUBACKs of config deliveries.
//   - OnConnect: client ID, registry, JWT; writes its own CONNACK on refusal
//     so that it can choose the return code.
//   - OnPublish: all inbound PUBLISH semantics; always rejects the packet so
//     that mochi neither routes nor acknowledges it (the emulator writes its
//     own PUBACKs, which lets it delay, withhold and order them).
//   - OnSubscribe/OnACLCheck/OnSubscribed/OnPacketProcessed: QoS downgrade,
//     GATEWAY_DEVICE_NOT_FOUND + SUBACK 0x80, config right after the SUBACK.
type hook struct {
	mqtt.HookBase
	s *Server
}

func (h *hook) ID() string { return "omnicore-bridge" }

func (h *hook) Provides(b byte) bool {
	switch b {
	case mqtt.OnPacketRead, mqtt.OnConnect, mqtt.OnConnectAuthenticate, mqtt.OnSessionEstablish,
		mqtt.OnDisconnect, mqtt.OnACLCheck, mqtt.OnPublish,
		mqtt.OnSubscribe, mqtt.OnSubscribed, mqtt.OnUnsubscribed, mqtt.OnPacketProcessed:
		return true
	}
	return false
}

func (s *Server) connOf(cl *mqtt.Client) *conn {
	if v, ok := s.live.Load(cl); ok {
		return v.(*conn)
	}
	return nil
}

func (h *hook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	s := h.s
	if pk.FixedHeader.Type == packets.Connect {
		return s.onConnectPacket(cl, pk)
	}
	c := s.connOf(cl)
	if c == nil {
		return pk, nil
	}
	c.lastActivity.Store(time.Now().UnixNano())
	switch pk.FixedHeader.Type {
	case packets.Publish:
		if reason, detail := c.checkPublish(pk, s.rules.Load()); reason != "" {
			c.close(reason, detail)
			return pk, packets.ErrRejectPacket
		}
	case packets.Subscribe:
		for _, f := range pk.Filters {
			if _, _, bad := c.classifyFilter(f.Filter); bad != "" {
				c.close(ReasonBadSubscribe, bad)
				return pk, packets.ErrRejectPacket
			}
		}
	case packets.Puback:
		s.configAcked(c, pk.PacketID)
	}
	return pk, nil
}

// onConnectPacket refuses anything but MQTT 3.1.1 with return code 1 (mochi
// would accept MQTT 5, and answer some bad levels with a code 3.1.1 does not
// have), and makes every session clean and will-less: the bridge keeps no
// session state, and a will could publish to another device's topic.
func (s *Server) onConnectPacket(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if pk.ProtocolVersion != 4 || string(pk.Connect.ProtocolName) != "MQTT" {
		s.refuse(cl, pk.Connect.ClientIdentifier, 1, RefusedProtocol,
			fmt.Sprintf("protocol %q level %d", trunc(string(pk.Connect.ProtocolName)), pk.ProtocolVersion))
		return pk, packets.ErrRejectPacket
	}
	pk.Connect.Clean = true
	pk.Connect.WillFlag = false
	pk.Connect.WillTopic = ""
	pk.Connect.WillPayload = nil
	pk.Connect.WillQos = 0
	pk.Connect.WillRetain = false
	pk.Connect.WillProperties = packets.Properties{}
	return pk, nil
}

// refuse records a refused attempt and writes a CONNACK with a 3.1.1 return
// code (recorded first, so that a client that sees the CONNACK also finds the
// record).
func (s *Server) refuse(cl *mqtt.Client, clientID string, code byte, reason, detail string) {
	now := time.Now()
	s.mu.Lock()
	s.recordLocked(&ConnectionRecord{
		ClientID: clientID, Remote: cl.Net.Remote, Listener: cl.Net.Listener,
		Connected: now, Disconnected: now, Reason: reason, Detail: detail, Refused: true, ConnackCode: code,
	})
	s.stats.ConnectionsRefused++
	s.notifyLocked()
	s.mu.Unlock()
	s.log.Info("connection refused", "client", clientID, "remote", cl.Net.Remote, "connack", code, "reason", reason, "detail", detail)
	// The CONNACK is encoded as 3.1.1 whatever level the client asked for:
	// that is how a 3.1.1-only server answers an MQTT 5 client.
	cl.Properties.ProtocolVersion = 4
	_ = cl.WritePacket(packets.Packet{FixedHeader: packets.FixedHeader{Type: packets.Connack}, ReasonCode: code})
}

func (h *hook) OnConnect(cl *mqtt.Client, pk packets.Packet) error {
	s := h.s
	now := time.Now()
	r := s.rules.Load()

	s.mu.Lock()
	unavailable := false
	if s.refuseCount > 0 {
		s.refuseCount--
		unavailable = true
	} else if now.Before(s.refuseUntil) {
		unavailable = true
	}
	s.mu.Unlock()
	if unavailable {
		s.refuse(cl, cl.ID, 3, RefusedUnavailable, "refusing connections on request")
		return packets.ErrServerUnavailable
	}

	regID, devID, err := s.parseClientID(cl.ID)
	var (
		keys             []crypto.PublicKey
		blocked, gateway bool
	)
	if err == nil {
		s.mu.Lock()
		var dev *device
		if dev, err = s.deviceLocked(regID, devID); err == nil {
			keys, blocked, gateway = dev.usableKeys(now), dev.Blocked, dev.Gateway
		}
		s.mu.Unlock()
	}
	if err != nil {
		s.refuse(cl, cl.ID, 2, RefusedClientID, trunc(err.Error()))
		return packets.ErrClientIdentifierNotValid
	}
	return s.authenticate(cl, pk, r, now, regID, devID, keys, blocked, gateway)
}

// parseClientID accepts subscriptions/{this subscription}/registries/{reg}/devices/{dev}
// with valid IDs.
func (s *Server) parseClientID(clientID string) (regID, devID string, err error) {
	sub, regID, devID, err := omnicore.ParseClientID(clientID)
	switch {
	case err != nil:
		return "", "", err
	case sub != s.subscription:
		return "", "", fmt.Errorf("subscription %s is not %q", trunc(sub), s.subscription)
	}
	if err := omnicore.ValidateID(regID); err != nil {
		return "", "", fmt.Errorf("registry: %w", err)
	}
	if err := omnicore.ValidateID(devID); err != nil {
		return "", "", fmt.Errorf("device: %w", err)
	}
	return regID, devID, nil
}

// authenticate checks the JWT password (outside the lock: it is CPU work) and
// admits the connection as pending until its CONNACK is out.
func (s *Server) authenticate(cl *mqtt.Client, pk packets.Packet, r *Rules, now time.Time, regID, devID string, keys []crypto.PublicKey, blocked, gateway bool) error {
	code := r.badCredentialsCode()
	if !pk.Connect.PasswordFlag || len(pk.Connect.Password) == 0 {
		s.refuse(cl, cl.ID, code, RefusedCredentials, "no password (the password is the JWT)")
		return packets.ErrBadUsernameOrPassword
	}
	claims, err := omnicore.VerifyToken(string(pk.Connect.Password), s.subscription, keys, now, r.ClockSkew, r.MaxTokenLifetime)
	if err != nil {
		s.refuse(cl, cl.ID, code, RefusedCredentials, err.Error())
		return packets.ErrBadUsernameOrPassword
	}
	if blocked {
		s.refuse(cl, cl.ID, code, RefusedBlocked, "")
		return packets.ErrNotAuthorized
	}
	c := newConn(s, cl, regID, devID, gateway, claims.ExpiresAt)
	s.mu.Lock()
	s.pending[cl] = c
	s.byNet[cl.Net.Conn] = c
	s.mu.Unlock()
	return nil
}

// OnConnectAuthenticate only confirms what OnConnect decided.
func (h *hook) OnConnectAuthenticate(cl *mqtt.Client, _ packets.Packet) bool {
	h.s.mu.Lock()
	defer h.s.mu.Unlock()
	_, ok := h.s.pending[cl]
	return ok
}

// OnSessionEstablish runs after authentication and before mochi kicks an
// older connection with the same client ID and writes the CONNACK. The
// connection goes live here, so that a client that has its CONNACK finds
// itself in Connections(); the older one learns why it is about to end.
func (h *hook) OnSessionEstablish(cl *mqtt.Client, _ packets.Packet) {
	s := h.s
	s.mu.Lock()
	c := s.pending[cl]
	delete(s.pending, cl)
	if c == nil {
		s.mu.Unlock()
		return
	}
	if old := s.byClientID[c.clientID]; old != nil {
		if old.reason == "" {
			old.reason, old.detail = ReasonTakenOver, "new connection from "+cl.Net.Remote
		}
		old.signalDone() // wake a throttled read goroutine: mochi is about to stop it
	}
	c.record = &ConnectionRecord{
		ClientID: c.clientID, Remote: cl.Net.Remote, Listener: cl.Net.Listener,
		Registry: c.registry, Device: c.device, Gateway: c.gateway,
		Connected: time.Now(), TokenExpires: c.tokenExp,
	}
	s.recordLocked(c.record)
	s.conns[cl] = c
	s.byClientID[c.clientID] = c
	s.live.Store(cl, c)
	s.stats.ConnectionsAccepted++
	s.notifyLocked()
	s.mu.Unlock()
	c.startTimers(s.rules.Load())
	s.log.Info("connected", "client", c.clientID, "remote", cl.Net.Remote, "listener", cl.Net.Listener, "gateway", c.gateway, "token_expires", c.tokenExp.UTC().Format(time.RFC3339))
}

func (h *hook) OnDisconnect(cl *mqtt.Client, err error, _ bool) {
	s := h.s
	s.mu.Lock()
	c := s.conns[cl]
	if c == nil {
		c = s.pending[cl]
	}
	s.mu.Unlock()
	if c != nil {
		s.finish(c, err)
	}
}

// connEnded is called by the listener when mochi is done with a socket. It
// cleans up a connection mochi never reported as disconnected: one whose
// CONNACK could not be written.
func (s *Server) connEnded(nc net.Conn, err error) {
	s.mu.Lock()
	c := s.byNet[nc]
	s.mu.Unlock()
	if c != nil {
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		s.finish(c, err)
	}
}

// finish removes a connection and completes its record. Safe to call twice.
func (s *Server) finish(c *conn, err error) {
	now := time.Now()
	s.mu.Lock()
	if s.byNet[c.cl.Net.Conn] != c {
		s.mu.Unlock()
		return
	}
	delete(s.byNet, c.cl.Net.Conn)
	delete(s.pending, c.cl)
	delete(s.conns, c.cl)
	s.live.Delete(c.cl)
	if s.byClientID[c.clientID] == c {
		delete(s.byClientID, c.clientID)
	}
	reason, detail := c.reason, c.detail
	if reason == "" {
		reason, detail = disconnectReason(c.cl, err)
	}
	if c.record != nil {
		c.record.Disconnected, c.record.Reason, c.record.Detail = now, reason, detail
	}
	s.notifyLocked()
	s.mu.Unlock()
	c.stop()
	s.log.Info("disconnected", "client", c.clientID, "remote", c.cl.Net.Remote, "reason", reason, "detail", detail)
}

// disconnectReason explains a close the bridge did not decide itself.
func disconnectReason(cl *mqtt.Client, err error) (string, string) {
	cause := cl.StopCause()
	var code packets.Code
	var ne net.Error
	switch {
	case errors.Is(cause, packets.ErrSessionTakenOver):
		return ReasonTakenOver, ""
	case errors.Is(cause, packets.ErrServerShuttingDown):
		return ReasonServerStop, ""
	case err == nil && errors.Is(cause, packets.CodeDisconnect):
		return ReasonClientDisconnect, ""
	case err == nil:
		return ReasonConnectionLost, ""
	case errors.As(err, &ne) && ne.Timeout():
		return ReasonKeepalive, err.Error()
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrUnexpectedEOF):
		return ReasonConnectionLost, err.Error()
	case errors.As(err, &code):
		return ReasonProtocolError, code.Reason
	default:
		return ReasonConnectionLost, err.Error()
	}
}

func (h *hook) OnACLCheck(cl *mqtt.Client, topic string, write bool) bool {
	if write {
		return true // publishes are judged in OnPacketRead/OnPublish
	}
	c := h.s.connOf(cl)
	if c == nil {
		return false
	}
	dev, _, bad := c.classifyFilter(topic)
	if bad != "" {
		return false
	}
	h.s.mu.Lock()
	defer h.s.mu.Unlock()
	return c.mayUseLocked(dev)
}

func (h *hook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if c := h.s.connOf(cl); c != nil {
		c.handlePublish(pk)
	}
	return pk, packets.ErrRejectPacket
}

func (h *hook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	c := h.s.connOf(cl)
	if c == nil {
		return pk
	}
	for i := range pk.Filters {
		f := &pk.Filters[i]
		if f.Qos > 1 {
			f.Qos = 1 // the bridge grants QoS 2 subscriptions as QoS 1
		}
		dev, kind, bad := c.classifyFilter(f.Filter)
		if bad != "" {
			continue // closed in OnPacketRead already
		}
		if kind == omnicore.KindConfig && !c.holdingWrite {
			// Until the first config is out (OnPacketProcessed), no command
			// or config update may come between the SUBACK and it.
			c.writeMu.Lock()
			c.holdingWrite = true
		}
		h.s.mu.Lock()
		ok := c.mayUseLocked(dev)
		h.s.mu.Unlock()
		if !ok {
			// Raised here, before mochi writes the SUBACK (0x80 via OnACLCheck).
			c.raise(omnicore.ErrorMessage{
				ErrorType:   omnicore.ErrorDeviceNotFound,
				Description: fmt.Sprintf("The specified device with ID '%s' is not attached to the gateway.", dev),
				DeviceID:    dev,
				MessageInfo: &omnicore.MessageInfo{MessageType: "SUBSCRIBE", Topic: f.Filter, PacketID: pk.PacketID},
			})
		}
	}
	return pk
}

func (h *hook) OnSubscribed(cl *mqtt.Client, pk packets.Packet, reasonCodes []byte) {
	s := h.s
	c := s.connOf(cl)
	if c == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, f := range pk.Filters {
		if i >= len(reasonCodes) || reasonCodes[i] >= 0x80 {
			s.stats.SubscribeFailures++
			continue
		}
		dev, kind, bad := c.classifyFilter(f.Filter)
		if bad != "" {
			continue
		}
		c.setSubLocked(dev, kind, int(reasonCodes[i]))
		if kind == omnicore.KindConfig {
			c.initialConfigs = append(c.initialConfigs, dev)
		}
		s.stats.Subscribes++
	}
	s.notifyLocked()
}

// OnPacketProcessed runs after mochi has written the SUBACK: the moment to
// send the latest config of every config subscription just granted.
func (h *hook) OnPacketProcessed(cl *mqtt.Client, pk packets.Packet, err error) {
	if pk.FixedHeader.Type != packets.Subscribe {
		return
	}
	c := h.s.connOf(cl)
	if c == nil {
		return
	}
	devs := c.initialConfigs
	c.initialConfigs = nil
	if err == nil {
		for _, dev := range devs {
			if c.holdingWrite {
				h.s.deliverConfigHeld(c, dev, true)
			} else {
				h.s.deliverConfig(c, dev, true)
			}
		}
	}
	if c.holdingWrite {
		c.holdingWrite = false
		c.writeMu.Unlock()
	}
}

func (h *hook) OnUnsubscribed(cl *mqtt.Client, pk packets.Packet) {
	s := h.s
	c := s.connOf(cl)
	if c == nil {
		return // mochi also calls this when it cleans up a closed connection
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range pk.Filters {
		if dev, kind, bad := c.classifyFilter(f.Filter); bad == "" {
			c.setSubLocked(dev, kind, -1)
		}
	}
	s.notifyLocked()
}
