package omnicore

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Routing a metric to its device, topic and payload.

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

	// Room for every message at once: growing the slice copied the
	// messages over and over (a tenth of prepare's time in the profile).
	size := len(order) + len(devs)
	if o.Layout == layoutNonBatch {
		size = len(metrics)
	}
	msgs := make([]message, 0, size)
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
