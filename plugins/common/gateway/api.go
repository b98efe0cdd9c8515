package gateway

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Conn is what the plugins need from a gateway connection. *Session implements
// it in process; the cross-process sharing layer implements it over a Unix
// socket, so the plugins do not know which they hold.
type Conn interface {
	// GatewayID is the gateway's own device ID.
	GatewayID() string
	// Attach makes device part of the gateway's attached set and waits until
	// the bridge acknowledged the attach on the current connection. The device
	// stays wanted (re-attached after every reconnect) until Detach. It returns
	// ErrAttachRefused (wrapped, with the bridge's description) when the bridge
	// refused it; the device is then retried with back-off on later calls.
	// Attaching the gateway itself is a no-op.
	Attach(ctx context.Context, device string) error
	// Detach publishes a detach and forgets the device.
	Detach(ctx context.Context, device string) error
	// Publish sends one message for the gateway or a device (attaching the
	// device first when needed). At QoS 1 it returns nil only once the bridge
	// acknowledged the message; across reconnects and timeouts it retries
	// until ctx is done. At QoS 0 it returns once the message is written.
	// A state message less than omnicore.StateInterval after the device's
	// previous state is kept by the gateway, the latest per device, and
	// sent when its turn comes; Publish then returns at once.
	Publish(ctx context.Context, msg Message) error
	// Subscribe delivers device's config and commands to h (attaching the
	// device first when it is not the gateway). Subscriptions are restored
	// after every reconnect; the bridge then re-sends the latest config.
	Subscribe(ctx context.Context, device string, h Handler) (Subscription, error)
	// SubscribeAll delivers config and commands of every device attached
	// through this gateway, now and later, including the gateway's own.
	SubscribeAll(h Handler) Subscription
	// SubscribeErrors delivers every message of the gateway's errors topic.
	SubscribeErrors(h Handler) Subscription
	// CountDrop records a message a plugin gave up on, by reason, so that the
	// counters of the whole gateway are in one place. The reason
	// StateCoalesced is not a loss and is counted apart.
	CountDrop(reason string, n uint64)
	// ReportGauges publishes a plugin's own gauges (the execd output's spool:
	// bytes, records, age of the oldest record...) with the gateway's
	// counters, so that omnicore_gateway shows them wherever it is gathered.
	// source names the reporter (one per output); a report replaces that
	// source's previous one, and a source not heard from for GaugeTTL is
	// dropped, so a plugin that exited leaves no stale figures. Stats sums
	// each gauge over the live sources.
	ReportGauges(source string, gauges map[string]int64)
	// Stats returns a snapshot of the counters.
	Stats() Stats
}

// Subscription ends a Subscribe or SubscribeErrors.
type Subscription interface {
	Unsubscribe()
}

// Message is one outbound publish.
type Message struct {
	Device    string        // device ID; the gateway's own ID for its own telemetry
	Kind      omnicore.Kind // KindEvents or KindState
	Subfolder string        // events only; "" for the plain events topic
	Payload   []byte
	QoS       byte // 0 or 1
}

// Inbound is one message from the bridge.
type Inbound struct {
	Device    string        // the device the topic names (the gateway for errors)
	Kind      omnicore.Kind // KindConfig, KindCommands or KindErrors
	Subfolder string        // commands subfolder, "" when none
	Topic     string
	Payload   []byte
	Received  time.Time
	// Gateway is the gateway whose connection delivered the message, set
	// by a pool of gateways (plugins/common/pool); "" from a single one.
	Gateway string
}

// Handler receives inbound messages. Each subscription's handler runs on its
// own goroutine, in order, fed by a bounded queue: a handler that blocks
// delays only its own messages, and those its full queue cannot take are
// dropped (counted as dropped_inbound_queue_full) rather than holding the
// connection.
type Handler func(Inbound)

// Errors a caller can act on.
var (
	// ErrAttachRefused means the bridge refused to attach the device (not
	// bound, unknown, blocked, bad device token, attach limit).
	ErrAttachRefused = errors.New("attach refused by the bridge")
	// ErrInvalidDevice means the device ID can never be a topic level.
	ErrInvalidDevice = errors.New("invalid device ID")
	// ErrTooLarge means the payload is over the bridge's limit for its kind.
	ErrTooLarge = errors.New("payload over the bridge's size limit")
	// ErrClosed means the session was closed.
	ErrClosed = errors.New("gateway session closed")
	// ErrConflict means another plugin (of this process or another one)
	// connects as the same gateway with other connection options: they
	// cannot share one connection, and two connections would kick each
	// other off. The error names the differing options.
	ErrConflict = errors.New("another plugin connects as the same gateway with other connection options")
	// ErrTooManyDevices means the device would take the session over
	// max_devices; it is refused until other devices are forgotten.
	ErrTooManyDevices = errors.New("over max_devices")
)

// Stats are the session's counters. Maps are copies.
type Stats struct {
	Connected       bool
	Connects        uint64 // successful CONNECTs
	ConnectFailures uint64
	ConnectionLost  uint64
	TokenRenewals   uint64 // planned reconnects to renew the JWT
	AttachesOK      uint64
	AttachesFailed  uint64
	Detaches        uint64
	Attached        int    // devices attached on the current connection
	Published       uint64 // publish attempts written
	Acked           uint64 // messages acknowledged (QoS 1) or written (QoS 0)
	Retries         uint64 // publish attempts repeated after a timeout or reconnect
	Received        uint64 // inbound messages routed
	Known           int    // devices the session keeps state for (at most max_devices)
	DevicesRefused  uint64 // new devices refused because max_devices were known
	// ResentAfterError counts messages sent again because the bridge named
	// them in an error after acknowledging them.
	ResentAfterError uint64
	ErrorsByType     map[string]uint64
	DroppedByReason  map[string]uint64
	Gauges           map[string]int64 `json:",omitempty"` // ReportGauges, summed over live sources

	// DuplicateSuspected counts connections the bridge closed soon after
	// connecting, from the 3rd in a row: a probable second connection with
	// the same client ID.
	DuplicateSuspected uint64

	// StatesCoalesced counts states replaced by a newer state of the same
	// device before they were sent: not a loss, and not counted as dropped.
	StatesCoalesced uint64
}

// GaugeTTL is how long a source's ReportGauges figures stay in Stats without
// a new report. Reporters send at least every GaugeTTL/4.
const GaugeTTL = time.Minute

// gaugeBook keeps the latest gauges of each source; the zero value is ready.
type gaugeBook struct {
	mu      sync.Mutex
	sources map[string]gaugeReport
}

type gaugeReport struct {
	at     time.Time
	gauges map[string]int64
}

func (b *gaugeBook) report(source string, gauges map[string]int64, now time.Time) {
	cp := make(map[string]int64, len(gauges))
	for k, v := range gauges {
		cp[k] = v
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.sources == nil {
		b.sources = make(map[string]gaugeReport)
	}
	b.sources[source] = gaugeReport{at: now, gauges: cp}
}

// sum returns the gauges summed over the sources heard from within GaugeTTL
// of now, forgetting the others; nil when there are none.
func (b *gaugeBook) sum(now time.Time) map[string]int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out map[string]int64
	for src, r := range b.sources {
		if now.Sub(r.at) > GaugeTTL {
			delete(b.sources, src)
			continue
		}
		if out == nil {
			out = make(map[string]int64)
		}
		for k, v := range r.gauges {
			out[k] += v
		}
	}
	return out
}

// Fields are the statistics fields of s, the one source of both exports of
// a gateway's statistics: the omnicore_gateway metric of inputs.omnicore and
// internal_omnicore through selfstat. Every value is an int64, because
// selfstat carries nothing else and both exports must match: connected is 0
// or 1. Each bridge error type is a field errors_<type> and each drop reason
// a field dropped_<reason> (snake_case), so that every series of a gateway
// is one metric; the gauges other processes report (ReportGauges: spool_*)
// keep their names. The schema is documented in the input plugin's README,
// "Metrics".
func (s Stats) Fields() map[string]int64 {
	connected := int64(0)
	if s.Connected {
		connected = 1
	}
	f := make(map[string]int64, 17+len(s.ErrorsByType)+len(s.DroppedByReason)+len(s.Gauges))
	f["connected"] = connected
	f["connects"] = int64(s.Connects)
	f["connect_failures"] = int64(s.ConnectFailures)
	f["connection_lost"] = int64(s.ConnectionLost)
	f["token_renewals"] = int64(s.TokenRenewals)
	f["attaches_ok"] = int64(s.AttachesOK)
	f["attaches_failed"] = int64(s.AttachesFailed)
	f["detaches"] = int64(s.Detaches)
	f["attached"] = int64(s.Attached)
	f["published"] = int64(s.Published)
	f["acked"] = int64(s.Acked)
	f["retries"] = int64(s.Retries)
	f["received"] = int64(s.Received)
	f["devices_known"] = int64(s.Known)
	f["devices_refused"] = int64(s.DevicesRefused)
	f["resent_after_error"] = int64(s.ResentAfterError)
	f["duplicate_suspected"] = int64(s.DuplicateSuspected)
	f["states_coalesced"] = int64(s.StatesCoalesced)
	for k, v := range s.ErrorsByType {
		f["errors_"+snake(k)] += int64(v)
	}
	for k, v := range s.DroppedByReason {
		f["dropped_"+snake(k)] += int64(v)
	}
	for k, v := range s.Gauges {
		f[snake(k)] += v
	}
	return f
}

// Add adds o's counters, devices, errors, drops and gauges to s (a pool's
// members summed); s stays Connected only while o is too.
func (s *Stats) Add(o Stats) {
	s.Connected = s.Connected && o.Connected
	s.Connects += o.Connects
	s.ConnectFailures += o.ConnectFailures
	s.ConnectionLost += o.ConnectionLost
	s.TokenRenewals += o.TokenRenewals
	s.AttachesOK += o.AttachesOK
	s.AttachesFailed += o.AttachesFailed
	s.Detaches += o.Detaches
	s.Attached += o.Attached
	s.Published += o.Published
	s.Acked += o.Acked
	s.Retries += o.Retries
	s.Received += o.Received
	s.Known += o.Known
	s.DevicesRefused += o.DevicesRefused
	s.ResentAfterError += o.ResentAfterError
	s.DuplicateSuspected += o.DuplicateSuspected
	s.StatesCoalesced += o.StatesCoalesced
	s.ErrorsByType = addCounts(s.ErrorsByType, o.ErrorsByType)
	s.DroppedByReason = addCounts(s.DroppedByReason, o.DroppedByReason)
	s.Gauges = addCounts(s.Gauges, o.Gauges)
}

// addCounts adds src to dst, allocating dst when src has entries.
func addCounts[V uint64 | int64](dst, src map[string]V) map[string]V {
	for k, v := range src {
		if dst == nil {
			dst = make(map[string]V, len(src))
		}
		dst[k] += v
	}
	return dst
}
