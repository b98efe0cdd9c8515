package emulator

import (
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Gateway attach and detach, on the connection's read goroutine.

func (c *conn) handleAttach(pk packets.Packet, pt omnicore.ParsedTopic, r *Rules) {
	s := c.s
	devID := pt.Device
	desc := ""
	var (
		keys   []crypto.PublicKey
		method AuthMethod
		bound  bool
	)
	now := time.Now()
	s.mu.Lock()
	dev := s.lookupLocked(c.registry, devID)
	gw := s.lookupLocked(c.registry, c.device)
	switch {
	case devID == c.device:
		desc = fmt.Sprintf("The gateway '%s' cannot attach itself; it speaks for itself without attaching.", devID)
	case dev == nil:
		desc = fmt.Sprintf("The device with ID '%s' does not exist in registry '%s'.", devID, c.registry)
	case dev.Gateway:
		desc = fmt.Sprintf("The device with ID '%s' is a gateway; gateways cannot be attached.", devID)
	case dev.Blocked:
		desc = fmt.Sprintf("The device with ID '%s' is blocked.", devID)
	case gw == nil:
		desc = fmt.Sprintf("The gateway '%s' no longer exists.", c.device)
	default:
		keys, method, bound = dev.usableKeys(now), gw.AuthMethod, dev.boundTo[c.device]
	}
	s.mu.Unlock()

	// The JWT check is CPU work; it runs without the lock so an attach storm
	// does not stall other connections.
	if desc == "" {
		authz, err := parseAttachPayload(pk.Payload)
		switch {
		case err != nil:
			desc = fmt.Sprintf("The attach payload for '%s' is not valid: %v.", devID, err)
		case method.needsBinding() && !bound:
			desc = fmt.Sprintf("The device with ID '%s' is not bound to the gateway '%s' (auth method %s).", devID, c.device, method)
		case method.needsToken() && authz == "":
			desc = fmt.Sprintf("The gateway's auth method %s needs the device's JWT in the attach payload {\"authorization\": \"<JWT>\"}.", method)
		case method.needsToken():
			if _, err := omnicore.VerifyToken(authz, s.subscription, keys, now, r.ClockSkew, r.MaxTokenLifetime); err != nil {
				desc = fmt.Sprintf("The JWT in the attach payload for '%s' was rejected: %v.", devID, err)
			}
		}
	}

	s.mu.Lock()
	if desc == "" {
		if _, already := c.attached[devID]; !already && len(c.attached) >= r.MaxAttached {
			desc = fmt.Sprintf("The gateway '%s' already has %d devices attached, the maximum.", c.device, len(c.attached))
		}
	}
	if desc == "" {
		c.attached[devID] = time.Now()
		s.stats.Attaches++
	} else {
		s.stats.AttachFailures++
	}
	s.notifyLocked()
	s.mu.Unlock()

	qos1 := pk.FixedHeader.Qos == 1
	if desc != "" {
		c.raise(omnicore.ErrorMessage{
			ErrorType: omnicore.ErrorAttachment, Description: desc, DeviceID: devID,
			MessageInfo: &omnicore.MessageInfo{MessageType: "PUBLISH", Topic: pk.TopicName, PacketID: pk.PacketID},
		})
		if qos1 && r.AttachFailurePuback {
			c.puback(pk.PacketID)
		}
		return
	}
	s.log.Debug("attached", "client", c.clientID, "device", devID)
	if qos1 {
		c.puback(pk.PacketID)
	}
}

// parseAttachPayload accepts what ASSOCIATION_ONLY gateways send in practice
// (nothing, {}, {"authorization": ""}) and returns the authorization JWT.
func parseAttachPayload(payload []byte) (string, error) {
	if len(trimSpace(payload)) == 0 {
		return "", nil
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(payload, &obj); err != nil {
		return "", errors.New("not a JSON object")
	}
	raw, ok := obj["authorization"]
	if !ok || string(raw) == "null" {
		return "", nil
	}
	var authz string
	if err := json.Unmarshal(raw, &authz); err != nil {
		return "", errors.New(`"authorization" is not a string`)
	}
	return authz, nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[0] == ' ' || b[0] == '\t' || b[0] == '\n' || b[0] == '\r') {
		b = b[1:]
	}
	for len(b) > 0 && (b[len(b)-1] == ' ' || b[len(b)-1] == '\t' || b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

func (c *conn) handleDetach(pk packets.Packet, pt omnicore.ParsedTopic) {
	s := c.s
	s.mu.Lock()
	var filters []string
	if _, ok := c.attached[pt.Device]; ok {
		filters = c.dropDeviceLocked(pt.Device)
		s.stats.Detaches++
		s.notifyLocked()
	}
	s.mu.Unlock()
	c.unsubscribeBroker(filters)
	if pk.FixedHeader.Qos == 1 {
		c.puback(pk.PacketID) // also for a device that was not attached: ignored, acknowledged
	}
}
