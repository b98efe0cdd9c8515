package omnicore

import (
	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Serializing the metrics of a Write into messages, per layout.

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
	// One metric per message: their metrics slices share one array.
	origs := make([]telegraf.Metric, len(entries))
	for i, e := range entries {
		payload, ok := o.serializeOne(dst, e, st)
		if ok {
			origs[i] = e.orig
			msgs = append(msgs, o.message(dst, payload, origs[i:i+1:i+1]))
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
	metrics := make([]telegraf.Metric, len(entries))
	for i, e := range entries {
		metrics[i] = e.orig
	}
	return o.message(dst, payload, metrics)
}

// message is the message of payload to dst, settling metrics.
func (o *OmniCore) message(dst destination, payload []byte, metrics []telegraf.Metric) message {
	return message{
		Message: gateway.Message{
			Device:    dst.device,
			Kind:      dst.kind,
			Subfolder: dst.subfolder,
			Payload:   payload,
			QoS:       byte(o.QoS),
		},
		metrics: metrics,
	}
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
