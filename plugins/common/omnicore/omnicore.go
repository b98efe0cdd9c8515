// Package omnicore holds the OmniCore MQTT bridge protocol as both sides of this
// project speak it: identifier rules, topic names, client IDs, the errors-topic
// payload, size and rate limits, and JWT minting and checking. The gateway
// session (plugins/common/gateway) and the bridge emulator (emulator) both build
// on it, so a rule lives in exactly one place.
package omnicore

import (
	"errors"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

// Limits of the bridge (docs/bridge.md).
const (
	MaxIDLength        = 256        // bytes, device and registry IDs
	MaxTelemetryBytes  = 256 * 1024 // events payload
	MaxStateBytes      = 64 * 1024  // state payload
	MaxConfigBytes     = 64 * 1024  // config payload
	MaxSubfolderLength = 256        // events and commands subfolder, bytes
	MaxAttachedDevices = 10000      // per gateway connection
	MaxTokenLifetime   = 24 * time.Hour
	ClockSkew          = 10 * time.Minute
	StateInterval      = time.Second // at most one state update per device per second
	IdleTimeout        = 20 * time.Minute
	ConnectionMsgRate  = 100 // inbound messages per second per connection (bridge side)
)

// Error types seen on the gateway errors topic. Others may appear: handle them
// as opaque strings.
const (
	ErrorAttachment      = "GATEWAY_ATTACHMENT_ERROR"
	ErrorDeviceNotFound  = "GATEWAY_DEVICE_NOT_FOUND"
	ErrorDetachedByError = "GATEWAY_DETACHMENT_DEVICE_ERROR"
)

// MQTT usernames are ignored by the bridge but some clients only send a password
// together with a username.
const Username = "unused"

// ErrorMessage is the JSON payload of /{registry}/{gateway}/errors.
type ErrorMessage struct {
	ErrorType   string       `json:"error_type"`
	Description string       `json:"description"`
	DeviceID    string       `json:"device_id"`
	MessageInfo *MessageInfo `json:"mqtt_message_info,omitempty"`
}

// MessageInfo names the MQTT packet that caused an error.
type MessageInfo struct {
	MessageType string `json:"message_type"`
	Topic       string `json:"topic"`
	PacketID    uint16 `json:"packet_id"`
}

// ValidateID checks a device, gateway or registry ID before it is used in a topic
// or client ID. The bridge's rule is: starts with a letter, then letters, digits
// and - . _ ~ % (Google also allowed '+', which is an MQTT wildcard and so never
// safe in a topic), at most 256 bytes. On top of that ".." is refused so that an
// ID never looks like a path step to tools that treat topics as paths.
func ValidateID(id string) error {
	switch {
	case id == "":
		return errors.New("empty ID")
	case len(id) > MaxIDLength:
		return fmt.Errorf("ID is %d bytes, longer than %d", len(id), MaxIDLength)
	case !utf8.ValidString(id):
		return fmt.Errorf("ID %q is not valid UTF-8", id)
	case strings.Contains(id, ".."):
		return fmt.Errorf("ID %q contains %q", id, "..")
	}
	if c := id[0]; !isLetter(c) {
		return fmt.Errorf("ID %q must start with a letter", id)
	}
	for i := 0; i < len(id); i++ {
		c := id[i]
		if isLetter(c) || (c >= '0' && c <= '9') || strings.IndexByte("-._~%", c) >= 0 {
			continue
		}
		r, _ := utf8.DecodeRuneInString(id[i:]) // the character, not its first byte
		return fmt.Errorf("ID %q contains %q; allowed are letters, digits and - . _ ~ %%", id, r)
	}
	return nil
}

// ValidateSubfolder checks an events or commands subfolder: one or more topic
// levels of printable characters without wildcards or empty levels.
func ValidateSubfolder(sub string) error {
	switch {
	case sub == "":
		return errors.New("empty subfolder")
	case len(sub) > MaxSubfolderLength:
		return fmt.Errorf("subfolder is %d bytes, longer than %d", len(sub), MaxSubfolderLength)
	case !utf8.ValidString(sub):
		return fmt.Errorf("subfolder %q is not valid UTF-8", sub)
	}
	for _, level := range strings.Split(sub, "/") {
		if level == "" || level == "." || level == ".." {
			return fmt.Errorf("subfolder %q has an empty, %q or %q level", sub, ".", "..")
		}
	}
	for _, r := range sub {
		if r == '+' || r == '#' || r < 0x20 || r == 0x7f {
			return fmt.Errorf("subfolder %q contains %q", sub, r)
		}
	}
	return nil
}

func isLetter(c byte) bool { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') }

// ClientID is the MQTT client ID of a device (or gateway) connection.
func ClientID(subscription, registry, device string) string {
	return "subscriptions/" + subscription + "/registries/" + registry + "/devices/" + device
}

// ParseClientID splits a client ID built by ClientID. It does not validate the parts.
func ParseClientID(clientID string) (subscription, registry, device string, err error) {
	parts := strings.Split(clientID, "/")
	if len(parts) != 6 || parts[0] != "subscriptions" || parts[2] != "registries" || parts[4] != "devices" ||
		parts[1] == "" || parts[3] == "" || parts[5] == "" {
		return "", "", "", fmt.Errorf("client ID %q is not subscriptions/{subscription}/registries/{registry}/devices/{device}", clientID)
	}
	return parts[1], parts[3], parts[5], nil
}

// Kind is the last part of a device topic.
type Kind string

const (
	KindEvents   Kind = "events"
	KindState    Kind = "state"
	KindConfig   Kind = "config"
	KindCommands Kind = "commands"
	KindAttach   Kind = "attach"
	KindDetach   Kind = "detach"
	KindErrors   Kind = "errors"
)

// Topic builds /{registry}/{device}/{kind}[/{subfolder}]. The caller validates
// the IDs and subfolder first; Topic only assembles.
func Topic(registry, device string, kind Kind, subfolder string) string {
	t := "/" + registry + "/" + device + "/" + string(kind)
	if subfolder != "" {
		t += "/" + subfolder
	}
	return t
}

// ParsedTopic is a device topic split into its parts.
type ParsedTopic struct {
	Registry  string
	Device    string
	Kind      Kind
	Subfolder string
}

// ParseTopic splits /{registry}/{device}/{kind}[/{subfolder...}]. It checks the
// shape only; which kinds may carry a subfolder, and which direction a kind may
// travel, is for the caller.
func ParseTopic(topic string) (ParsedTopic, error) {
	if !strings.HasPrefix(topic, "/") {
		return ParsedTopic{}, fmt.Errorf("topic %q does not start with /", topic)
	}
	parts := strings.SplitN(topic[1:], "/", 4)
	if len(parts) < 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return ParsedTopic{}, fmt.Errorf("topic %q is not /{registry}/{device}/{kind}", topic)
	}
	p := ParsedTopic{Registry: parts[0], Device: parts[1], Kind: Kind(parts[2])}
	if len(parts) == 4 {
		if parts[3] == "" { // "/reg/dev/events/" is not "/reg/dev/events"
			return ParsedTopic{}, fmt.Errorf("topic %q ends with an empty level", topic)
		}
		p.Subfolder = parts[3]
	}
	return p, nil
}
