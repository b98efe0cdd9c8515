package main

import (
	"context"
	"fmt"
	"time"

	"github.com/influxdata/telegraf"
	mqttout "github.com/influxdata/telegraf/plugins/outputs/mqtt"
	jsonser "github.com/influxdata/telegraf/plugins/serializers/json"

	"github.com/telegraf-omnicore/telegraf-omnicore/internal/latencyproxy"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// Benchmark 10: bytes on the wire per metric (issue 24), the figure a site
// on a cellular contract pays. Each client runs in process through a
// counting TCP proxy (internal/latencyproxy with no delay) in front of
// mosquitto, so every byte of TCP payload both ways is counted: MQTT fixed
// headers, topics, packet IDs, PUBACKs, keep-alives and, over TLS, the TLS
// records. Counting starts after the connection, the attaches and a warm-up
// Write, and stops when the last timed Write returned (every PUBACK back);
// the bytes are divided by the metrics the subscriber received.

// wireCase is one transport and data format of benchmark 10.
type wireCase struct {
	format string // "influx" or "json"
	tls    bool
}

func (c wireCase) String() string {
	t := "plain TCP"
	if c.tls {
		t = "TLS"
	}
	return fmt.Sprintf("data_format %q, %s", c.format, t)
}

// wireLayouts are ours' layouts, each with the outputs.mqtt layout it is
// compared with: auto publishes a message per metric when no
// max_message_rate is set, as outputs.mqtt's default non-batch does.
var wireLayouts = []struct{ ours, peer string }{
	{"non-batch", "non-batch"},
	{"batch", "batch"},
	{"auto", "non-batch"},
}

// wireResult is what one client put on the wire.
type wireResult struct {
	setup    int64 // both ways, connect to the end of the warm-up
	up, down int64 // during the timed Writes: to the broker, from it
	msgs     int64 // messages the subscriber got of the timed Writes
	tally    tally
}

// perMetric is the timed bytes, both ways, per metric received.
func (r wireResult) perMetric() float64 {
	if r.tally.received == 0 {
		return 0
	}
	return float64(r.up+r.down) / float64(r.tally.received)
}

// wireMetrics are n metrics over devices as genMetrics makes them, a second
// apart from start: Telegraf's JSON serializer writes seconds by default
// (json_timestamp_units), and the receiver knows a metric by its timestamp.
func wireMetrics(n, devices int, start time.Time) []telegraf.Metric {
	ms := genMetrics(n, devices, start)
	for i, m := range ms {
		m.SetTime(start.Add(time.Duration(i) * time.Second))
	}
	return ms
}

// wireKeys are the timestamps of ms as a payload of format carries them:
// nanoseconds in line protocol, seconds in Telegraf's default JSON.
func wireKeys(ms []telegraf.Metric, format string) []int64 {
	unit := int64(1)
	if format == "json" {
		unit = int64(time.Second)
	}
	out := make([]int64, len(ms))
	for i, m := range ms {
		out[i] = m.Time().UnixNano() / unit
	}
	return out
}

// serializerFor is the serializer of data_format format, initialised as
// Telegraf's config loader does with its defaults.
func serializerFor(format string) (telegraf.Serializer, error) {
	switch format {
	case "influx":
		return newSerializer()
	case "json":
		s := &jsonser.Serializer{}
		return s, s.Init()
	}
	return nil, fmt.Errorf("no serializer %q", format)
}

// wireRun counts the bytes of one client: mk builds it for a server URL.
func wireRun(ctx context.Context, target, scheme string, rcv *receiver, mk func(server string) (telegraf.Output, error),
	warm []telegraf.Metric, timed [][]telegraf.Metric, warmWant, want []int64) (wireResult, error) {
	p, err := latencyproxy.New(target, 0)
	if err != nil {
		return wireResult{}, err
	}
	defer p.Close()
	out, err := mk(scheme + "://" + p.Addr())
	if err != nil {
		return wireResult{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	rcv.reset(false)
	if err := out.Connect(); err != nil {
		return wireResult{}, fmt.Errorf("connect: %w", err)
	}
	defer out.Close()
	if err := writeAll(ctx, out, batches(warm, 1000)); err != nil {
		return wireResult{}, fmt.Errorf("warm-up: %w", err)
	}
	// The warm-up's messages must be in before the receiver forgets them.
	rcv.waitFor(ctx, len(warmWant), receiverQuiet)
	if t := rcv.count(warmWant); !t.ok() {
		return wireResult{}, fmt.Errorf("warm-up at the subscriber: %s", t)
	}
	up0, down0 := p.Bytes()
	rcv.reset(false)
	if err := writeAll(ctx, out, timed); err != nil {
		return wireResult{}, err
	}
	// Every Write returned: every PUBACK crossed the proxy.
	up1, down1 := p.Bytes()
	rcv.waitFor(ctx, len(want), receiverQuiet)
	res := wireResult{setup: up0 + down0, up: up1 - up0, down: down1 - down0, msgs: rcv.messages(), tally: rcv.count(want)}
	if !res.tally.ok() {
		return res, fmt.Errorf("at the subscriber %s", res.tally)
	}
	return res, nil
}

// wireRows are the rows of one case, with the runs behind their notes.
type wireRows struct {
	rows    []*row // one per wireLayouts entry
	ours    map[string][]wireResult
	peer    map[string][]wireResult
	problem map[string]int
}

func (b *bench) benchWire(ctx context.Context) error {
	n, devices := b.sz.wireMetrics, b.sz.wireDevices
	cases := []wireCase{{format: "influx"}, {format: "json"}, {format: "influx", tls: true}}
	all := map[wireCase]*wireRows{}
	for _, c := range cases {
		wr := &wireRows{ours: map[string][]wireResult{}, peer: map[string][]wireResult{}, problem: map[string]int{}}
		for _, l := range wireLayouts {
			r := &row{id: "10", name: fmt.Sprintf("bytes on the wire per metric (TCP payload both ways), %s metrics over %s devices in Writes of 1,000, %s: layout %s vs outputs.mqtt layout %s",
				groupThousands(int64(n)), groupThousands(int64(devices)), c, l.ours, l.peer),
				unit: "B/metric", lowerIsBetter: true, oursLabel: "outputs.omnicore " + l.ours, peerLabel: "outputs.mqtt " + l.peer}
			wr.rows = append(wr.rows, r)
			b.rows = append(b.rows, r)
		}
		all[c] = wr
	}
	skip := ""
	switch {
	case b.mosq == nil:
		skip = b.hdr.mosquitto
	case b.tls == nil || b.mosq.tlsURL == "":
		skip = "mosquitto has no TLS listener"
	}
	if skip != "" {
		for _, wr := range all {
			for _, r := range wr.rows {
				r.skipped = skip
			}
		}
		return nil
	}
	rcv := newReceiver()
	sub, err := subscribe(b.mosq.url, rcv)
	if err != nil {
		return err
	}
	defer sub.Disconnect(250)
	br := broker{name: "mosquitto", url: b.mosq.url, tlsURL: b.mosq.tlsURL, caFile: b.tls.caFile}

	start := time.Unix(1_700_000_000, 0)
	warm := wireMetrics(devices, devices, start.Add(-24*time.Hour))
	ms := wireMetrics(n, devices, start)
	timed := batches(ms, 1000)
	for run := 0; run < b.opts.runs; run++ {
		for _, c := range cases {
			wr := all[c]
			target, scheme, caFile := br.hostPort(), "tcp", ""
			if c.tls {
				target, scheme, caFile = br.tlsHostPort(), "tls", br.caFile
			}
			type client struct {
				name, layout string
				ours         bool
				mk           func(server string) (telegraf.Output, error)
			}
			var clients []client
			for _, l := range []string{"non-batch", "batch", "auto"} {
				clients = append(clients, client{name: "outputs.omnicore " + l, layout: l, ours: true, mk: func(server string) (telegraf.Output, error) {
					return newOurOutput(server, b.id, func(o *outomni.OmniCore) {
						o.Layout = l
						o.TLSCA = caFile
						if ser, err := serializerFor(c.format); err == nil {
							o.SetSerializer(ser)
						}
					})
				}})
			}
			for _, l := range []string{"non-batch", "batch"} {
				clients = append(clients, client{name: "outputs.mqtt " + l, layout: l, mk: func(server string) (telegraf.Output, error) {
					return newMQTTOutputWith(server, b.id, mqttTopic(br), caFile, func(m *mqttout.MQTT) error {
						m.Layout = l
						ser, err := serializerFor(c.format)
						m.SetSerializer(ser)
						return err
					})
				}})
			}
			k := run % len(clients)
			for _, cl := range append(clients[k:], clients[:k]...) {
				progress("  run %d/%d: %s, %s", run+1, b.opts.runs, cl.name, c)
				res, err := wireRun(ctx, target, scheme, rcv, cl.mk, warm, timed, wireKeys(warm, c.format), wireKeys(ms, c.format))
				if err != nil {
					for i, l := range wireLayouts {
						if (cl.ours && l.ours == cl.layout) || (!cl.ours && l.peer == cl.layout) {
							wr.rows[i].addProblem("%s: %v", cl.name, err)
							wr.rows[i].leftOut++
						}
					}
					progress("    problem: %v", err)
					continue
				}
				progress("    %.1f B/metric (%.1f to the broker, %.1f back), %.3f messages/metric; %s before the count (connect, attaches, warm-up)",
					res.perMetric(), float64(res.up)/float64(res.tally.received), float64(res.down)/float64(res.tally.received),
					float64(res.msgs)/float64(res.tally.received), formatBytes(res.setup))
				if cl.ours {
					wr.ours[cl.layout] = append(wr.ours[cl.layout], res)
				} else {
					wr.peer[cl.layout] = append(wr.peer[cl.layout], res)
				}
			}
		}
	}
	for _, c := range cases {
		wr := all[c]
		for i, l := range wireLayouts {
			r := wr.rows[i]
			for _, res := range wr.ours[l.ours] {
				r.ours = append(r.ours, res.perMetric())
			}
			for _, res := range wr.peer[l.peer] {
				r.peer = append(r.peer, res.perMetric())
			}
			r.note = fmt.Sprintf("in process through a counting TCP proxy to mosquitto (set_tcp_nodelay true), QoS 1, per-device topics /{registry}/{device}/events, each plugin's defaults but layout and data_format; counted from after the connection, the attaches and a warm-up Write of one metric per device to the return of the last Write, divided by the metrics the subscriber received; %s; %s",
				wireSummary("ours", wr.ours[l.ours]), wireSummary("outputs.mqtt", wr.peer[l.peer]))
			r.slowerWhy = "ours' payload carries no device tag, so more bytes come from the protocol: see the split in the note"
		}
	}
	return nil
}

// wireSummary is the medians of a client's runs for a note.
func wireSummary(who string, rs []wireResult) string {
	if len(rs) == 0 {
		return who + ": no run"
	}
	var up, down, msgs, setup []float64
	var sum tally
	for _, r := range rs {
		m := float64(r.tally.received)
		up = append(up, float64(r.up)/m)
		down = append(down, float64(r.down)/m)
		msgs = append(msgs, float64(r.msgs)/m)
		setup = append(setup, float64(r.setup))
		sum.add(r.tally)
	}
	return fmt.Sprintf("%s %.1f B/metric to the broker and %.1f back, %.3f messages/metric, %s before the count; at the subscriber, all runs: %s",
		who, median(up), median(down), median(msgs), formatBytes(int64(median(setup))), sum)
}

// formatBytes is a byte count for people: 1,234 B, 12.3 KiB, 4.5 MiB.
func formatBytes(n int64) string {
	switch {
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 10<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return groupThousands(n) + " B"
}
