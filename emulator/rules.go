package emulator

import (
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// RateAction says what happens when a connection goes over Rules.MaxMessageRate.
type RateAction string

const (
	// RateThrottle stops reading from the connection until the rate allows the
	// next message, which delays its PUBACK (TCP back-pressure, nothing lost).
	RateThrottle RateAction = "throttle"
	// RateClose closes the connection.
	RateClose RateAction = "close"
)

// Rules are the bridge behaviours the emulator enforces. Every behaviour the
// bridge's documentation leaves unknown ([?] in docs/bridge.md) is a field here, so a
// test can run the client against each plausible bridge.
type Rules struct {
	// ClockSkew is how far a JWT's iat may lie in the future and how long after
	// exp the connection stays open.
	ClockSkew time.Duration
	// MaxTokenLifetime bounds exp - iat.
	MaxTokenLifetime time.Duration
	// BadCredentialsCode is the CONNACK return code for a JWT that does not
	// verify or a blocked device: 5 (not authorized, the default) or 4 (bad
	// user name or password). Any other value is treated as 5.
	BadCredentialsCode byte
	// CloseOnTokenExpiry closes a connection at exp + ClockSkew.
	CloseOnTokenExpiry bool

	// AttachFailurePuback sends the PUBACK of a failed attach after its
	// GATEWAY_ATTACHMENT_ERROR. When false the attach is never acknowledged and
	// the client has to time out.
	AttachFailurePuback bool
	// NotAttachedPuback acknowledges an events/state message for a device that
	// is neither the gateway nor attached (the message is dropped either way,
	// after a GATEWAY_DEVICE_NOT_FOUND error).
	NotAttachedPuback bool
	// NotAttachedErrorAfterPuback acknowledges such a message first and sends
	// its GATEWAY_DEVICE_NOT_FOUND after the PUBACK (the message is still
	// dropped): the other order a bridge may use. It implies the PUBACK.
	NotAttachedErrorAfterPuback bool
	// DetachedStatePuback acknowledges the state message that made the bridge
	// detach a device for going over StateInterval (the message is dropped
	// either way).
	DetachedStatePuback bool
	// MaxAttached is the number of devices one gateway connection may have
	// attached; one more draws GATEWAY_ATTACHMENT_ERROR.
	MaxAttached int

	// StateInterval is the least time between two accepted state messages of
	// one device (0 disables the check). A proxied device that goes faster is
	// detached with GATEWAY_DETACHMENT_DEVICE_ERROR; a connection whose own
	// device goes faster is closed.
	StateInterval time.Duration
	// MaxMessageRate is the number of inbound PUBLISH packets per second a
	// connection may send, with a burst of the same size (0 disables it).
	MaxMessageRate float64
	// RateAction is what happens above MaxMessageRate.
	RateAction RateAction
	// IdleTimeout closes a connection that sent no packet at all (PINGREQ
	// counts) for this long (0 disables it).
	IdleTimeout time.Duration

	// EmptyConfigOnSubscribe delivers a zero-length config message on a config
	// subscription when the device has no config yet.
	EmptyConfigOnSubscribe bool

	// MaxEventsBytes and MaxStateBytes are payload limits; a message over them
	// closes the connection.
	MaxEventsBytes int
	MaxStateBytes  int
}

// DefaultRules are the bridge as docs/bridge.md describes it, with the stated
// default for every unknown.
func DefaultRules() Rules {
	return Rules{
		ClockSkew:              omnicore.ClockSkew,
		MaxTokenLifetime:       omnicore.MaxTokenLifetime,
		BadCredentialsCode:     5,
		CloseOnTokenExpiry:     true,
		AttachFailurePuback:    true,
		NotAttachedPuback:      false,
		DetachedStatePuback:    false,
		MaxAttached:            omnicore.MaxAttachedDevices,
		StateInterval:          omnicore.StateInterval,
		MaxMessageRate:         0,
		RateAction:             RateThrottle,
		IdleTimeout:            omnicore.IdleTimeout,
		EmptyConfigOnSubscribe: true,
		MaxEventsBytes:         omnicore.MaxTelemetryBytes,
		MaxStateBytes:          omnicore.MaxStateBytes,
	}
}

// badCredentialsCode is the CONNACK code actually sent: only 4 and 5 make
// sense for a refused JWT, and a stray 0 would mean "accepted".
func (r *Rules) badCredentialsCode() byte {
	if r.BadCredentialsCode == 4 {
		return 4
	}
	return 5
}
