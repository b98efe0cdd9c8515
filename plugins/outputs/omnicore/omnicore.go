//go:generate go run github.com/influxdata/telegraf/tools/readme_config_includer@v1.37.2
package omnicore

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"text/template"
	"time"

	"github.com/Masterminds/sprig/v3"
	"golang.org/x/sync/errgroup"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/filter"
	"github.com/influxdata/telegraf/plugins/outputs"
	"github.com/influxdata/telegraf/plugins/serializers/influx"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gatewaystats"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/ratelog"
)

//go:embed sample.conf
var sampleConfig string

// Values of missing_device.
const (
	missingDrop    = "drop"
	missingGateway = "gateway"
)

// Values of layout.
const (
	layoutNonBatch = "non-batch"
	layoutBatch    = "batch"
	layoutAuto     = "auto"
)

// stateTagValue is the value of state_tag that routes a metric to state.
const stateTagValue = "state"

// Reasons a metric is given up on; they become the session's dropped_*
// counters.
const (
	dropMissingDevice    = "missing_device"
	dropInvalidDevice    = "invalid_device"
	dropInvalidSubfolder = "invalid_subfolder"
	dropSerialize        = "serialize_error"
	dropTooLarge         = "too_large"
	dropAttachRefused    = "attach_refused"
	// dropStateCoalesced is not a loss: the gateway counts it apart
	// (states_coalesced), not as dropped.
	dropStateCoalesced = gateway.StateCoalesced
)

// defaultWriteTimeout is how long a Write waits for acknowledgements. It
// stays well under Telegraf's default flush_interval (10s) and leaves room
// in the 5 s Telegraf takes to stop (the last flush waits for one Write):
// what is not acknowledged by then stays in Telegraf's buffer and goes again
// at the next flush.
const defaultWriteTimeout = 2 * time.Second

// disconnectedWriteTimeout bounds a Write that starts while the gateway is
// not connected: it fails soon with everything kept, rather than holding
// Telegraf's flush (and its stop, which waits for the last flush) for the
// whole write_timeout while the bridge is down.
const disconnectedWriteTimeout = time.Second

// timeoutName names the timeout a Write ran with, for its error.
func timeoutName(timeout, writeTimeout time.Duration) string {
	if timeout < writeTimeout {
		return fmt.Sprintf("%s (the gateway was not connected when the write started)", timeout)
	}
	return fmt.Sprintf("write_timeout (%s)", writeTimeout)
}

// warnInterval is how often one kind of drop warning is logged; the ones in
// between are logged at debug level and summed up in the next warning.
const warnInterval = 10 * time.Second

// OmniCore publishes metrics as the telemetry and state of devices attached to
// one OmniCore gateway.
type OmniCore struct {
	gateway.Options
	DeviceIDTag   string          `toml:"device_id_tag"`
	MissingDevice string          `toml:"missing_device"`
	Devices       []string        `toml:"devices"`
	QoS           int             `toml:"qos"`
	Layout        string          `toml:"layout"`
	Subfolder     string          `toml:"subfolder"`
	SubfolderTag  string          `toml:"subfolder_tag"`
	StateMetrics  []string        `toml:"state_metrics"`
	StateTag      string          `toml:"state_tag"`
	WriteTimeout  config.Duration `toml:"write_timeout"`
	// HealthStateInterval publishes the gateway's health as its state
	// (gateway.StartHealth); 0 is off.
	HealthStateInterval config.Duration `toml:"health_state_interval"`

	// Host is set by a program that runs the plugin outside Telegraf (the
	// execd binary: how gateway connections are shared across its
	// processes, and the route the health state names). Telegraf leaves it
	// zero: connections are shared within the process.
	Host gateway.Host `toml:"-"`

	// Gateways are more gateway identities: with them the plugin spreads
	// its devices over a pool of gateways, the top-level one first.
	Gateways []pool.GatewayOptions `toml:"gateways"`

	Log telegraf.Logger `toml:"-"`

	serializer  telegraf.Serializer
	cfg         *gateway.Config   // the top-level gateway's
	cfgs        []*gateway.Config // every gateway of the pool, cfg first
	subfolder   *template.Template
	stateFilter filter.Filter
	routingTags []string
	parallel    int
	warnings    *ratelog.Limiter
	// acquire is Host.Acquire (nil); unit tests replace it with a fake.
	acquire func(*gateway.Config) (gateway.Conn, func(), error)

	conn        gateway.Conn
	release     func()
	stopStats   func()
	stopHealth  func()
	stopAttach  context.CancelFunc
	attachingWG sync.WaitGroup

	// serializing is held while the serializer (not safe for concurrent
	// use) runs: by prepare, and by a publish worker serializing a message
	// of layout auto. Writes may overlap (the execd binary's).
	serializing sync.Mutex
}

func (*OmniCore) SampleConfig() string {
	return sampleConfig
}

// SetSerializer is called by Telegraf's config loader with the serializer of
// data_format.
func (o *OmniCore) SetSerializer(s telegraf.Serializer) {
	o.serializer = s
}

func (o *OmniCore) Init() error {
	if o.DeviceIDTag == "" {
		return errors.New("device_id_tag must not be empty")
	}
	switch o.MissingDevice {
	case missingDrop, missingGateway:
	default:
		return fmt.Errorf("missing_device %q must be %q or %q", o.MissingDevice, missingDrop, missingGateway)
	}
	if o.QoS != 0 && o.QoS != 1 {
		return fmt.Errorf("qos %d must be 0 or 1 (the bridge does not support QoS 2)", o.QoS)
	}
	switch o.Layout {
	case layoutNonBatch, layoutBatch, layoutAuto:
	default:
		return fmt.Errorf("layout %q must be %q, %q or %q", o.Layout, layoutNonBatch, layoutBatch, layoutAuto)
	}
	if o.WriteTimeout <= 0 {
		return fmt.Errorf("write_timeout %s must be positive", time.Duration(o.WriteTimeout))
	}
	if err := gateway.ValidateHealthInterval(time.Duration(o.HealthStateInterval)); err != nil {
		return err
	}
	for _, d := range o.Devices {
		if err := omnicore.ValidateID(d); err != nil {
			return fmt.Errorf("devices: %w", err)
		}
	}
	o.routingTags = []string{o.DeviceIDTag}
	for name, tag := range map[string]string{"subfolder_tag": o.SubfolderTag, "state_tag": o.StateTag} {
		if tag == "" {
			continue
		}
		if slices.Contains(o.routingTags, tag) {
			return fmt.Errorf("%s %q is already used by another routing option", name, tag)
		}
		o.routingTags = append(o.routingTags, tag)
	}
	if o.Subfolder != "" {
		tmpl, err := template.New("subfolder").Funcs(sprig.TxtFuncMap()).Parse(o.Subfolder)
		if err != nil {
			return fmt.Errorf("subfolder template: %w", err)
		}
		if !strings.Contains(o.Subfolder, "{{") {
			if err := omnicore.ValidateSubfolder(o.Subfolder); err != nil {
				return fmt.Errorf("subfolder: %w", err)
			}
		}
		o.subfolder = tmpl
	}
	f, err := filter.Compile(o.StateMetrics)
	if err != nil {
		return fmt.Errorf("state_metrics: %w", err)
	}
	o.stateFilter = f

	cfgs, err := pool.Configs(o.Options, o.Gateways, o.Log)
	if err != nil {
		return err
	}
	cfg := cfgs[0]
	o.cfg, o.cfgs = cfg, cfgs
	// Twice the sessions' in-flight windows keeps them full while finished
	// publishes hand over to the next ones.
	o.parallel = 2 * cfg.MaxInflight * len(cfgs)

	if o.serializer == nil {
		// Telegraf's config loader sets the serializer of data_format; built
		// any other way the plugin writes line protocol.
		s := &influx.Serializer{}
		if err := s.Init(); err != nil {
			return err
		}
		o.serializer = s
	}
	o.warnings = ratelog.New(o.Log, warnInterval)
	return nil
}

// Connect joins (or starts) the gateway's session, or the sessions of its
// pool, and attaches the devices of the devices option in the background: a
// bridge that is down does not fail Connect, the session keeps reconnecting
// and Write waits for it.
func (o *OmniCore) Connect() error {
	acquire := o.acquire
	if acquire == nil {
		acquire = o.Host.Acquire
	}
	conn, release, err := pool.Connect(o.cfgs, acquire, o.Log)
	if err != nil {
		return fmt.Errorf("starting the gateway session: %w", err)
	}
	o.conn, o.release = conn, release
	o.stopStats = gatewaystats.ExportEach(conn, o.RegistryID, nil)
	if o.HealthStateInterval > 0 {
		o.stopHealth = pool.StartHealth(conn, gateway.HealthSettings{Interval: time.Duration(o.HealthStateInterval), Route: o.Host.RouteName(), Log: o.Log})
	}
	if len(o.Devices) > 0 {
		ctx, cancel := context.WithCancel(context.Background())
		o.stopAttach = cancel
		o.attachingWG.Add(1)
		go func() {
			defer o.attachingWG.Done()
			o.attachDevices(ctx)
		}()
	}
	return nil
}

// attachDevices attaches the configured devices concurrently; the session
// pipelines the attaches within its in-flight window.
func (o *OmniCore) attachDevices(ctx context.Context) {
	start := time.Now()
	var g errgroup.Group
	g.SetLimit(o.parallel)
	var mu sync.Mutex
	failed := 0
	for _, d := range o.Devices {
		g.Go(func() error {
			err := o.conn.Attach(ctx, d)
			if err == nil {
				return nil
			}
			mu.Lock()
			failed++
			mu.Unlock()
			if ctx.Err() == nil {
				o.Log.Warnf("Attaching device %q failed: %v", d, err)
			}
			return nil
		})
	}
	_ = g.Wait()
	if ctx.Err() != nil {
		return
	}
	o.Log.Infof("Attached %d of %d configured devices in %s", len(o.Devices)-failed, len(o.Devices), time.Since(start).Round(time.Millisecond))
}

// Close stops attaching and releases the session; the last user of the
// session waits a bounded time for messages in flight.
func (o *OmniCore) Close() error {
	if o.stopAttach != nil {
		o.stopAttach()
		o.attachingWG.Wait()
		o.stopAttach = nil
	}
	if o.stopStats != nil {
		o.stopStats()
		o.stopStats = nil
	}
	if o.stopHealth != nil {
		o.stopHealth()
		o.stopHealth = nil
	}
	if o.release != nil {
		o.release()
		o.release = nil
		o.conn = nil
	}
	return nil
}

// destination is where a metric goes.
type destination struct {
	device    string
	kind      omnicore.Kind
	subfolder string
}

// entry is a metric on its way: the original (the identity Telegraf retries
// with) and the copy to serialize, without the routing tags.
type entry struct {
	orig, out telegraf.Metric
}

// message is one publish and the metrics it settles once acknowledged.
type message struct {
	gateway.Message
	metrics []telegraf.Metric
	// pending are the metrics of a message of layout auto, serialized by
	// the worker that sends it (see packAuto); Payload is empty until then.
	pending []entry
	dst     destination
}

// writeStats are the counts of one Write, for its debug line.
type writeStats struct {
	in             int
	messages, sent int
	metricsSent    int
	dropped        map[string]int
	// coalesced counts the states replaced by a newer one of the same
	// device in this Write: settled, but not a loss.
	coalesced int
	// settled holds the metrics this Write acknowledged (true) or gave up
	// on (false).
	settled map[telegraf.Metric]bool
}

func (o *OmniCore) Write(metrics []telegraf.Metric) error {
	if len(metrics) == 0 {
		return nil
	}
	if o.conn == nil {
		return errors.New("not connected")
	}
	start := time.Now()
	st := &writeStats{in: len(metrics), dropped: make(map[string]int), settled: make(map[telegraf.Metric]bool)}
	o.serializing.Lock()
	msgs := o.prepare(metrics, st)
	o.serializing.Unlock()
	st.messages = len(msgs)

	timeout := time.Duration(o.WriteTimeout)
	if len(msgs) > 0 && !o.conn.Stats().Connected {
		timeout = min(timeout, disconnectedWriteTimeout)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	failed, firstErr := o.publish(ctx, msgs, st)

	if st.coalesced > 0 {
		o.conn.CountDrop(dropStateCoalesced, uint64(st.coalesced))
	}
	for reason, n := range st.dropped {
		o.conn.CountDrop(reason, uint64(n))
	}
	coalesced := ""
	if st.coalesced > 0 {
		coalesced = fmt.Sprintf("%d states coalesced, ", st.coalesced)
	}
	o.Log.Debugf("Write of %d metrics: %d messages, %d published (%d metrics), %sdropped %s, in %s",
		st.in, st.messages, st.sent, st.metricsSent, coalesced, formatCounts(st.dropped), time.Since(start).Round(time.Microsecond))

	if failed == 0 {
		// Metrics given up on (invalid device, too large...) are counted
		// and logged above; reporting them as rejected would also make
		// Telegraf log every such write as failed.
		return nil
	}
	werr := &writeError{err: fmt.Errorf("%d of %d messages not acknowledged within %s: %w; "+
		"the metrics not acknowledged stay in the buffer and are written again",
		failed, len(msgs), timeoutName(timeout, time.Duration(o.WriteTimeout)), firstErr)}
	for i, m := range metrics {
		acked, settled := st.settled[m]
		switch {
		case settled && acked:
			werr.accept = append(werr.accept, i)
		case settled:
			werr.reject = append(werr.reject, i)
		}
	}
	return werr
}

// prepare routes, coalesces, serializes and splits the metrics into
// messages. Metrics it gives up on are counted in st and settled.
func (o *OmniCore) prepare(metrics []telegraf.Metric, st *writeStats) []message {
	var (
		order  []destination // events destinations in order of first appearance
		events = make(map[destination][]entry)
		states = make(map[string]entry) // device -> latest state
		devs   []string                 // devices with a state, in order
	)
	for _, m := range metrics {
		dst, ok := o.route(m, st)
		if !ok {
			continue
		}
		e := entry{orig: m, out: o.strip(m)}
		if dst.kind == omnicore.KindState {
			prev, seen := states[dst.device]
			switch {
			case !seen:
				devs = append(devs, dst.device)
				states[dst.device] = e
			case m.Time().Before(prev.orig.Time()):
				o.coalesce(st, e.orig)
			default:
				o.coalesce(st, prev.orig)
				states[dst.device] = e
			}
			continue
		}
		if _, seen := events[dst]; !seen {
			order = append(order, dst)
		}
		events[dst] = append(events[dst], e)
	}

	var msgs []message
	if o.Layout == layoutAuto {
		msgs = o.packAuto(order, events)
	} else {
		for _, dst := range order {
			msgs = o.serialize(msgs, dst, events[dst], st)
		}
	}
	// One state per device (the latest), after the telemetry. The gateway
	// paces them: a state before its device's turn is kept there and sent
	// when due, without holding this Write.
	for _, dev := range devs {
		msgs = o.serialize(msgs, destination{device: dev, kind: omnicore.KindState}, []entry{states[dev]}, st)
	}
	return msgs
}

// route finds a metric's destination; it counts and settles the metric and
// returns false when the metric cannot go anywhere.
func (o *OmniCore) route(m telegraf.Metric, st *writeStats) (destination, bool) {
	device, ok := m.GetTag(o.DeviceIDTag)
	if !ok {
		if o.MissingDevice == missingDrop {
			o.drop(st, dropMissingDevice, m)
			o.warnings.Warnf(dropMissingDevice, "Dropping metric %q without the device tag %q (missing_device = %q)",
				m.Name(), o.DeviceIDTag, o.MissingDevice)
			return destination{}, false
		}
		device = o.conn.GatewayID()
	}
	if err := omnicore.ValidateID(device); err != nil {
		o.drop(st, dropInvalidDevice, m)
		o.warnings.Warnf(dropInvalidDevice, "Dropping metric %q: tag %q is not a valid device ID: %v", m.Name(), o.DeviceIDTag, err)
		return destination{}, false
	}
	dst := destination{device: device, kind: omnicore.KindEvents}
	if o.isState(m) {
		dst.kind = omnicore.KindState
		return dst, true
	}
	sub, err := o.renderSubfolder(m)
	if err == nil && sub != "" {
		err = omnicore.ValidateSubfolder(sub)
	}
	if err != nil {
		o.drop(st, dropInvalidSubfolder, m)
		o.warnings.Warnf(dropInvalidSubfolder, "Dropping metric %q of device %q: %v", m.Name(), device, err)
		return destination{}, false
	}
	dst.subfolder = sub
	return dst, true
}

// Overlappable says whether a Write of metrics may run while other Writes
// are in flight (the execd binary overlaps Writes): yes unless one of them
// is a state message. A device's state must reach the bridge in order, and
// the last one written must stay the last (Write keeps the latest of a
// batch and paces them); two Writes in flight, one of them retried, could
// reverse two states. Telemetry events carry their own timestamps, so their
// order across Writes does not matter (QoS 1 resends reorder them anyway).
// Write is safe for concurrent use.
func (o *OmniCore) Overlappable(metrics []telegraf.Metric) bool {
	for _, m := range metrics {
		if o.isState(m) {
			return false
		}
	}
	return true
}

func (o *OmniCore) isState(m telegraf.Metric) bool {
	if o.StateTag != "" {
		if v, ok := m.GetTag(o.StateTag); ok && v == stateTagValue {
			return true
		}
	}
	return o.stateFilter != nil && o.stateFilter.Match(m.Name())
}

// renderSubfolder returns the events subfolder: the subfolder_tag's value when
// the metric has it, else the subfolder template's output ("" for none).
func (o *OmniCore) renderSubfolder(m telegraf.Metric) (string, error) {
	if o.SubfolderTag != "" {
		if v, ok := m.GetTag(o.SubfolderTag); ok {
			if v == "" {
				return "", fmt.Errorf("tag %q is empty", o.SubfolderTag)
			}
			return v, nil
		}
	}
	if o.subfolder == nil {
		return "", nil
	}
	var b strings.Builder
	if err := o.subfolder.Execute(&b, templateMetric{m}); err != nil {
		return "", fmt.Errorf("subfolder template: %w", err)
	}
	return b.String(), nil
}

// templateMetric is what the subfolder template sees: the metric, plus the
// .Tag and .Field accessors outputs.mqtt's topic template offers.
type templateMetric struct {
	telegraf.Metric
}

// Tag returns the value of tag key, "" when the metric does not have it.
func (m templateMetric) Tag(key string) string {
	v, _ := m.GetTag(key)
	return v
}

// Field returns the value of field key, nil when the metric does not have it.
func (m templateMetric) Field(key string) any {
	v, _ := m.GetField(key)
	return v
}

// strip returns the metric without its routing tags, copying it only when it
// has one. A tracking metric is unwrapped first, so that the copy does not
// hold a delivery reference.
func (o *OmniCore) strip(m telegraf.Metric) telegraf.Metric {
	if !slices.ContainsFunc(o.routingTags, m.HasTag) {
		return m
	}
	if u, ok := m.(telegraf.UnwrappableMetric); ok {
		m = u.Unwrap()
	}
	c := m.Copy()
	for _, t := range o.routingTags {
		c.RemoveTag(t)
	}
	return c
}

// autoHorizon is the share of max_message_rate that layout auto spends on
// one Write without waiting: the session's limiter lets a tenth of a
// second's worth go at once (its burst). A Write whose telemetry fits in
// it goes out one metric per message; a larger one is packed just enough
// to fit, and no further than one message per destination (as batch,
// split at the bridge's size limit): under a cap, fewer messages finish
// the Write sooner.
const autoHorizon = 100 * time.Millisecond

// packAuto groups the telemetry of a Write for layout auto: as many metrics
// per message as the rate budget requires. Without max_message_rate there
// is no budget to fit, and every metric is its own message. The groups are
// serialized by the workers that send them (serializePending), so that the
// first messages go out while the rest are still being packed.
func (o *OmniCore) packAuto(order []destination, events map[destination][]entry) []message {
	total := 0
	for _, dst := range order {
		total += len(events[dst])
	}
	budget := max(1, o.MaxMessageRate*autoHorizon.Seconds())
	onePerMetric := o.MaxMessageRate <= 0 || float64(total) <= budget
	var msgs []message
	for _, dst := range order {
		es := events[dst]
		parts := len(es)
		if !onePerMetric {
			// This destination's share of the budget, at least one.
			parts = max(1, int(float64(len(es))*budget/float64(total)))
		}
		size := (len(es) + parts - 1) / parts
		for len(es) > 0 {
			n := min(size, len(es))
			msg := message{
				Message: gateway.Message{Device: dst.device, Kind: dst.kind, Subfolder: dst.subfolder, QoS: byte(o.QoS)},
				dst:     dst,
				pending: es[:n:n],
				metrics: make([]telegraf.Metric, n),
			}
			for i, e := range es[:n] {
				msg.metrics[i] = e.orig
			}
			msgs = append(msgs, msg)
			es = es[n:]
		}
	}
	return msgs
}

// serializePending serializes a message of layout auto into the messages
// that go out (more than one when the bridge's size limit splits it). The
// serializer is not safe for concurrent use: the workers take turns.
func (o *OmniCore) serializePending(msg *message, st *writeStats) []message {
	o.serializing.Lock()
	defer o.serializing.Unlock()
	if len(msg.pending) == 1 {
		payload, ok := o.serializeOne(msg.dst, msg.pending[0], st)
		if !ok {
			return nil
		}
		return []message{o.newMessage(msg.dst, payload, msg.pending[0])}
	}
	return o.serializeBatch(nil, msg.dst, msg.pending, st)
}

// limit is the bridge's payload limit for kind.
func limit(kind omnicore.Kind) int {
	if kind == omnicore.KindState {
		return omnicore.MaxStateBytes
	}
	return omnicore.MaxTelemetryBytes
}

// serialize appends the messages for entries of one destination.
func (o *OmniCore) serialize(msgs []message, dst destination, entries []entry, st *writeStats) []message {
	if o.Layout == layoutBatch {
		return o.serializeBatch(msgs, dst, entries, st)
	}
	for _, e := range entries {
		payload, ok := o.serializeOne(dst, e, st)
		if ok {
			msgs = append(msgs, o.newMessage(dst, payload, e))
		}
	}
	return msgs
}

// serializeOne serializes one metric and checks it against the limit.
func (o *OmniCore) serializeOne(dst destination, e entry, st *writeStats) ([]byte, bool) {
	payload, err := o.serializer.Serialize(e.out)
	if err != nil {
		o.drop(st, dropSerialize, e.orig)
		o.warnings.Warnf(dropSerialize, "Dropping metric %q of device %q: serializing failed: %v", e.orig.Name(), dst.device, err)
		return nil, false
	}
	if len(payload) > limit(dst.kind) {
		o.dropTooLarge(st, dst, e.orig, len(payload))
		return nil, false
	}
	return payload, true
}

func (o *OmniCore) dropTooLarge(st *writeStats, dst destination, m telegraf.Metric, size int) {
	o.drop(st, dropTooLarge, m)
	o.warnings.Warnf(dropTooLarge, "Dropping metric %q of device %q: its %s payload is %d bytes, over the bridge's limit of %d",
		m.Name(), dst.device, dst.kind, size, limit(dst.kind))
}

// serializeBatch appends the entries as batches of at most the bridge's
// limit, splitting by metric count and never inside a metric.
func (o *OmniCore) serializeBatch(msgs []message, dst destination, entries []entry, st *writeStats) []message {
	outs := make([]telegraf.Metric, len(entries))
	for i, e := range entries {
		outs[i] = e.out
	}
	payload, err := o.serializer.SerializeBatch(outs)
	lim := limit(dst.kind)
	switch {
	case err == nil && len(payload) <= lim:
		return append(msgs, o.newMessage(dst, payload, entries...))
	case len(entries) == 1 && err != nil:
		o.drop(st, dropSerialize, entries[0].orig)
		o.warnings.Warnf(dropSerialize, "Dropping metric %q of device %q: serializing failed: %v", entries[0].orig.Name(), dst.device, err)
		return msgs
	case len(entries) == 1:
		o.dropTooLarge(st, dst, entries[0].orig, len(payload))
		return msgs
	}
	// Too large (or a metric failed): pack by the sizes of the metrics on
	// their own, refusing those that cannot fit at all, and check each part.
	var parts [][]entry
	var part []entry
	size := 0
	for _, e := range entries {
		b, ok := o.serializeOne(dst, e, st)
		if !ok {
			continue
		}
		if size+len(b) > lim && len(part) > 0 {
			parts = append(parts, part)
			part, size = nil, 0
		}
		part = append(part, e)
		size += len(b)
	}
	if len(part) > 0 {
		parts = append(parts, part)
	}
	if len(parts) == 1 && len(parts[0]) == len(entries) {
		// The sizes on their own fit but the batch does not (format
		// overhead): halve.
		half := len(entries) / 2
		parts = [][]entry{entries[:half], entries[half:]}
	}
	for _, p := range parts {
		msgs = o.serializeBatch(msgs, dst, p, st)
	}
	return msgs
}

func (o *OmniCore) newMessage(dst destination, payload []byte, entries ...entry) message {
	msg := message{
		Message: gateway.Message{
			Device:    dst.device,
			Kind:      dst.kind,
			Subfolder: dst.subfolder,
			Payload:   payload,
			QoS:       byte(o.QoS),
		},
		metrics: make([]telegraf.Metric, len(entries)),
	}
	for i, e := range entries {
		msg.metrics[i] = e.orig
	}
	return msg
}

// coalesce counts a state replaced by a newer one of its device and
// settles it: the gateway counts it as coalesced, not as dropped.
func (o *OmniCore) coalesce(st *writeStats, m telegraf.Metric) {
	st.coalesced++
	st.settled[m] = false
}

// drop counts a metric given up on and settles it.
func (o *OmniCore) drop(st *writeStats, reason string, m telegraf.Metric) {
	st.dropped[reason]++
	st.settled[m] = false
}

// publish sends the messages concurrently and waits for all of them. It
// returns how many were not acknowledged for a reason that may pass
// (bridge unreachable until write_timeout) and the first such error.
//
// At most parallel long-lived workers take the messages in order, rather
// than a goroutine per message.
func (o *OmniCore) publish(ctx context.Context, msgs []message, st *writeStats) (int, error) {
	var (
		wg       sync.WaitGroup
		next     atomic.Int64
		mu       sync.Mutex
		failed   int
		firstErr error
	)
	settle := func(msg *message, err error) {
		mu.Lock()
		defer mu.Unlock()
		reason := permanentReason(err)
		switch {
		case err == nil:
			st.sent++
			st.metricsSent += len(msg.metrics)
		case reason == "":
			failed++
			if firstErr == nil {
				firstErr = err
			}
			return
		default:
			st.dropped[reason] += len(msg.metrics)
			o.warnings.Warnf(reason, "Dropping %d metrics of device %q: %v", len(msg.metrics), msg.Device, err)
		}
		for _, m := range msg.metrics {
			st.settled[m] = err == nil
		}
	}
	for range min(o.parallel, len(msgs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(msgs) {
					return
				}
				msg := &msgs[i]
				if msg.pending == nil {
					settle(msg, o.publishOne(ctx, msg))
					continue
				}
				// Layout auto: serialize now, counting drops apart
				// from the other workers.
				local := &writeStats{dropped: make(map[string]int), settled: make(map[telegraf.Metric]bool)}
				parts := o.serializePending(msg, local)
				mu.Lock()
				st.messages += len(parts) - 1
				for r, n := range local.dropped {
					st.dropped[r] += n
				}
				for m, ok := range local.settled {
					st.settled[m] = ok
				}
				mu.Unlock()
				for j := range parts {
					settle(&parts[j], o.publishOne(ctx, &parts[j]))
				}
			}
		}()
	}
	wg.Wait()
	return failed, firstErr
}

// publishOne publishes one message. State pacing is the gateway's (see
// gateway.Conn's Publish).
func (o *OmniCore) publishOne(ctx context.Context, msg *message) error {
	return o.conn.Publish(ctx, msg.Message)
}

// permanentReason is the drop reason of an error that retrying does not
// cure, "" for nil and for errors worth retrying.
func permanentReason(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, gateway.ErrAttachRefused):
		return dropAttachRefused
	case errors.Is(err, gateway.ErrInvalidDevice):
		return dropInvalidDevice
	case errors.Is(err, gateway.ErrTooLarge):
		return dropTooLarge
	}
	return ""
}

func formatCounts(counts map[string]int) string {
	if len(counts) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(counts))
	for k := range counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%d", k, counts[k])
	}
	return strings.Join(parts, " ")
}

func init() {
	outputs.Add("omnicore", func() telegraf.Output {
		return &OmniCore{
			Options:       gateway.DefaultOptions(),
			DeviceIDTag:   "device_id",
			MissingDevice: missingDrop,
			QoS:           1,
			Layout:        layoutNonBatch,
			WriteTimeout:  config.Duration(defaultWriteTimeout),
		}
	})
}
