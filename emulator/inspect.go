package emulator

import (
	"context"
	"slices"
	"sort"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Why a connection ended (ConnectionRecord.Reason). Refused connections carry
// one of the Refused* reasons.
const (
	ReasonClientDisconnect = "client disconnect"             // the client sent DISCONNECT
	ReasonConnectionLost   = "connection lost"               // the socket closed or failed without DISCONNECT
	ReasonKeepalive        = "keepalive timeout"             // no packet within 1.5 x keep-alive
	ReasonTakenOver        = "kicked by duplicate client ID" // a newer connection with the same client ID
	ReasonTokenExpired     = "token expired"                 // exp + ClockSkew passed
	ReasonIdle             = "idle timeout"                  // Rules.IdleTimeout without any packet
	ReasonQoS2             = "QoS 2 publish"                 // the bridge does not do QoS 2
	ReasonBadTopic         = "publish outside the bridge's topics"
	ReasonBadSubscribe     = "subscribe outside the bridge's topics"
	ReasonNotGateway       = "attach/detach from a non-gateway"
	ReasonPayloadTooLarge  = "payload over the limit"
	ReasonStateRate        = "own state faster than the state interval"
	ReasonMessageRate      = "message rate exceeded"
	ReasonProtocolError    = "protocol error"
	ReasonWriteFailed      = "write to client failed"
	ReasonKicked           = "admin kick"
	ReasonServerStop       = "server stop"
	ReasonBlocked          = "device blocked" // blocked through the REST API
	ReasonDeleted          = "device deleted" // deleted through the REST API

	RefusedProtocol    = "refused: protocol level is not MQTT 3.1.1"
	RefusedClientID    = "refused: unknown client ID"
	RefusedCredentials = "refused: bad credentials"
	RefusedBlocked     = "refused: device blocked"
	RefusedUnavailable = "refused: server unavailable"
)

// ConnectionRecord is one connection attempt: refused at CONNECT, open, or closed.
type ConnectionRecord struct {
	ID           int       `json:"id"`
	ClientID     string    `json:"client_id"`
	Remote       string    `json:"remote"`
	Listener     string    `json:"listener"` // "tcp" or "tls"
	Registry     string    `json:"registry,omitempty"`
	Device       string    `json:"device,omitempty"`
	Gateway      bool      `json:"gateway"`
	Connected    time.Time `json:"connected"`
	Disconnected time.Time `json:"disconnected,omitzero"` // zero while open
	TokenExpires time.Time `json:"token_expires,omitzero"`
	Reason       string    `json:"reason,omitempty"`
	Detail       string    `json:"detail,omitempty"`
	Refused      bool      `json:"refused"`
	ConnackCode  byte      `json:"connack_code"`
}

// Open reports whether the connection is established and not closed yet.
func (r ConnectionRecord) Open() bool { return !r.Refused && r.Disconnected.IsZero() }

// Message is an accepted events or state message.
type Message struct {
	Index     int           `json:"index"` // 0-based position among every message ever accepted
	Time      time.Time     `json:"time"`
	ClientID  string        `json:"client_id"`
	Registry  string        `json:"registry"`
	Device    string        `json:"device"`
	Kind      omnicore.Kind `json:"kind"`
	Subfolder string        `json:"subfolder,omitempty"`
	Topic     string        `json:"topic"`
	Payload   []byte        `json:"payload"`
	QoS       byte          `json:"qos"`
	PacketID  uint16        `json:"packet_id"`
	Dup       bool          `json:"dup"`
}

// SentError is an error the bridge raised for a gateway. Delivered is false
// when the gateway had not subscribed to its errors topic (the bridge then
// sends nothing).
type SentError struct {
	Time      time.Time             `json:"time"`
	ClientID  string                `json:"client_id"`
	Registry  string                `json:"registry"`
	Gateway   string                `json:"gateway"`
	Topic     string                `json:"topic"`
	Error     omnicore.ErrorMessage `json:"error"`
	Delivered bool                  `json:"delivered"`
}

// Stats are running counters.
type Stats struct {
	ConnectionsAccepted int   `json:"connections_accepted"`
	ConnectionsRefused  int   `json:"connections_refused"`
	ConnectionsOpen     int   `json:"connections_open"`
	SocketsOpen         int   `json:"sockets_open"`      // accepted TCP connections, CONNECT sent or not
	MessagesAccepted    int   `json:"messages_accepted"` // events + state
	EventsAccepted      int   `json:"events_accepted"`
	StateAccepted       int   `json:"state_accepted"`
	BytesAccepted       int64 `json:"bytes_accepted"`
	DroppedNotAttached  int   `json:"dropped_not_attached"`
	DroppedStateRate    int   `json:"dropped_state_rate"`
	Withheld            int   `json:"withheld"`
	Throttled           int   `json:"throttled"` // publishes delayed by MaxMessageRate
	Pubacks             int64 `json:"pubacks"`
	Attaches            int   `json:"attaches"`
	AttachFailures      int   `json:"attach_failures"`
	Detaches            int   `json:"detaches"`
	BridgeDetaches      int   `json:"bridge_detaches"` // GATEWAY_DETACHMENT_DEVICE_ERROR
	Subscribes          int   `json:"subscribes"`
	SubscribeFailures   int   `json:"subscribe_failures"`
	ErrorsRaised        int   `json:"errors_raised"`
	ErrorsDelivered     int   `json:"errors_delivered"`
	ConfigsDelivered    int   `json:"configs_delivered"`
	CommandsDelivered   int   `json:"commands_delivered"`
}

// Stats returns the counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	st := s.stats
	st.ConnectionsOpen = len(s.conns)
	s.mu.Unlock()
	st.Pubacks = s.pubacks.Load()
	for _, l := range s.listeners {
		st.SocketsOpen += l.count()
	}
	return st
}

// Received returns the accepted events/state messages in arrival order (the
// latest WithMaxReceived of them, if set).
func (s *Server) Received() []Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.received)
}

// ReceivedSince returns the kept messages with Index >= since and the index
// the next call should pass.
func (s *Server) ReceivedSince(since int) (msgs []Message, next int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	first := s.recvTotal - len(s.received)
	start := max(since-first, 0)
	if start < len(s.received) {
		msgs = slices.Clone(s.received[start:])
	}
	return msgs, s.recvTotal
}

// WaitReceived waits until at least n messages have been accepted in total,
// then returns Received().
func (s *Server) WaitReceived(ctx context.Context, n int) ([]Message, error) {
	err := s.WaitFor(ctx, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.recvTotal >= n
	})
	return s.Received(), err
}

// WaitFor waits until cond returns true. cond is re-evaluated after every
// change of the emulator's state (connection opened/refused/closed, attach,
// detach, subscription, message accepted or dropped, error raised, config or
// command delivered), so it should depend on that state only. It must not
// block; it may call any Server method.
func (s *Server) WaitFor(ctx context.Context, cond func() bool) error {
	for {
		s.mu.Lock()
		if s.changed == nil {
			s.changed = make(chan struct{})
		}
		ch := s.changed
		s.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// WaitAttached waits until devices are all attached on the gateway's live connection.
func (s *Server) WaitAttached(ctx context.Context, registryID, gatewayID string, devices ...string) error {
	return s.WaitFor(ctx, func() bool {
		att := s.Attachments(registryID, gatewayID)
		for _, d := range devices {
			if !slices.Contains(att, d) {
				return false
			}
		}
		return true
	})
}

// WaitConnected waits until clientID has a live connection and returns its record.
func (s *Server) WaitConnected(ctx context.Context, clientID string) (ConnectionRecord, error) {
	var rec ConnectionRecord
	err := s.WaitFor(ctx, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		if c := s.byClientID[clientID]; c != nil {
			rec = *c.record
			return true
		}
		return false
	})
	return rec, err
}

// WaitClosed waits until a connection of clientID that was open has closed
// (or a CONNECT of it was refused) and returns that record: the first such
// record with ID > afterID, so pass the ID of the last record you saw.
func (s *Server) WaitClosed(ctx context.Context, clientID string, afterID int) (ConnectionRecord, error) {
	var rec ConnectionRecord
	err := s.WaitFor(ctx, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, r := range s.history {
			if r.ID > afterID && r.ClientID == clientID && !r.Disconnected.IsZero() {
				rec = *r
				return true
			}
		}
		return false
	})
	return rec, err
}

// Connections returns the connection history (the last 10,000 records), oldest first.
func (s *Server) Connections() []ConnectionRecord {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]ConnectionRecord, len(s.history))
	for i, r := range s.history {
		out[i] = *r
	}
	return out
}

// ErrorsSent returns the errors raised for gateways, oldest first (the last 10,000).
func (s *Server) ErrorsSent() []SentError {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.errorsSent)
}

// Attachments returns the devices attached on the gateway's live connection, sorted.
func (s *Server) Attachments(registryID, gatewayID string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := s.byClientID[s.ClientID(registryID, gatewayID)]
	if c == nil {
		return nil
	}
	return c.attachedLocked()
}

// AttachmentSet is one live gateway connection and its attached devices.
type AttachmentSet struct {
	ClientID string   `json:"client_id"`
	Registry string   `json:"registry"`
	Gateway  string   `json:"gateway"`
	Devices  []string `json:"devices"`
}

// AllAttachments lists every live gateway connection with its attached devices.
func (s *Server) AllAttachments() []AttachmentSet {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []AttachmentSet
	for _, c := range s.conns {
		if !c.gateway {
			continue
		}
		out = append(out, AttachmentSet{ClientID: c.clientID, Registry: c.registry, Gateway: c.device, Devices: c.attachedLocked()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ClientID < out[j].ClientID })
	return out
}

// Subscribed reports whether a live connection holds a subscription of kind
// (config, commands or errors) for the device.
func (s *Server) Subscribed(registryID, deviceID string, kind omnicore.Kind) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.conns {
		if c.registry == registryID && c.subscribedLocked(deviceID, kind) >= 0 {
			return true
		}
	}
	return false
}

// recordLocked appends a connection record, keeping the history bounded.
func (s *Server) recordLocked(r *ConnectionRecord) {
	s.nextConnID++
	r.ID = s.nextConnID
	if len(s.history) >= maxHistory {
		s.history = slices.Delete(s.history, 0, len(s.history)-maxHistory+1)
	}
	s.history = append(s.history, r)
}
