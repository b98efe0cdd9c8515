package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// receiver counts, at the receiving end, every metric a broker delivered:
// the emulator's accepted events messages, or what a subscriber of
// mosquitto got. A client's PUBACKs say only that the broker took a
// message; the receiver says which metrics arrived, which never did and
// which arrived twice.
//
// Every workload of the benchmarks gives each metric its own timestamp
// (genMetrics), and every payload is line protocol, so a metric is known
// by the timestamp that ends its line, whatever the layout packed into one
// message.
type receiver struct {
	mu      sync.Mutex
	seen    map[int64]int32
	lines   int64
	bad     int64 // lines that end in no timestamp
	msgs    int64 // payloads delivered
	first   time.Time
	last    time.Time
	latency []time.Duration // receipt minus metric time, when recording
	record  bool
	notify  chan struct{}
}

func newReceiver() *receiver {
	return &receiver{seen: map[int64]int32{}, notify: make(chan struct{}, 1)}
}

// reset forgets everything received, before a client's run. With
// latencies, the receiver also records receipt time minus metric time.
func (r *receiver) reset(latencies bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	clear(r.seen)
	r.lines, r.bad, r.msgs = 0, 0, 0
	r.first, r.last = time.Time{}, time.Time{}
	r.latency = r.latency[:0]
	r.record = latencies
}

// observe counts the metrics of one delivered payload.
func (r *receiver) observe(payload []byte) {
	now := time.Now()
	keys, bad := metricKeys(payload)
	r.mu.Lock()
	if r.first.IsZero() {
		r.first = now
	}
	r.last = now
	r.msgs++
	r.lines += int64(len(keys) + bad)
	r.bad += int64(bad)
	for _, ts := range keys {
		r.seen[ts]++
		if r.record {
			r.latency = append(r.latency, now.Sub(time.Unix(0, ts)))
		}
	}
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

// metricKeys are the timestamps of the metrics in one payload, as the
// payload carries them, and the number of metrics that carry none. A
// payload is line protocol (a metric per line, its timestamp last, in ns),
// or Telegraf's JSON: one metric object, or {"metrics": [...]} of a batch,
// each with "timestamp" in the serializer's json_timestamp_units.
func metricKeys(payload []byte) (keys []int64, bad int) {
	if p := bytes.TrimSpace(payload); len(p) > 0 && p[0] == '{' {
		return jsonMetricKeys(p)
	}
	for len(payload) > 0 {
		line := payload
		if i := bytes.IndexByte(payload, '\n'); i >= 0 {
			line, payload = payload[:i], payload[i+1:]
		} else {
			payload = nil
		}
		if len(line) == 0 {
			continue
		}
		sp := bytes.LastIndexByte(line, ' ')
		ts, err := strconv.ParseInt(string(line[sp+1:]), 10, 64)
		if sp < 0 || err != nil {
			bad++
			continue
		}
		keys = append(keys, ts)
	}
	return keys, bad
}

// jsonMetric is what the receiver reads of a metric of Telegraf's JSON
// serializer.
type jsonMetric struct {
	Timestamp *int64 `json:"timestamp"`
}

func jsonMetricKeys(p []byte) (keys []int64, bad int) {
	var doc struct {
		jsonMetric
		Metrics []jsonMetric `json:"metrics"`
	}
	if err := json.Unmarshal(p, &doc); err != nil {
		return nil, 1
	}
	ms := doc.Metrics
	if ms == nil {
		ms = []jsonMetric{doc.jsonMetric}
	}
	for _, m := range ms {
		if m.Timestamp == nil {
			bad++
			continue
		}
		keys = append(keys, *m.Timestamp)
	}
	return keys, bad
}

// observeEmulator is the emulator's WithOnReceive hook: events only.
func (r *receiver) observeEmulator(m emulator.Message) {
	if m.Kind == omnicore.KindEvents {
		r.observe(m.Payload)
	}
}

// unique is the number of distinct metrics received so far.
func (r *receiver) unique() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.seen)
}

// messages is the number of payloads delivered since the last reset.
func (r *receiver) messages() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.msgs
}

func (r *receiver) span() (first, last time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.first, r.last
}

func (r *receiver) latencies() []time.Duration {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]time.Duration(nil), r.latency...)
}

// waitFor waits until want distinct metrics arrived, nothing arrived for
// quiet, or ctx ends. A client's last PUBACK can come back before a
// subscriber got the message it acknowledges.
func (r *receiver) waitFor(ctx context.Context, want int, quiet time.Duration) {
	t := time.NewTimer(quiet)
	defer t.Stop()
	for r.unique() < want {
		select {
		case <-r.notify:
			if !t.Stop() {
				select {
				case <-t.C:
				default:
				}
			}
			t.Reset(quiet)
		case <-t.C:
			return
		case <-ctx.Done():
			return
		}
	}
}

// waitWhileRunning waits until want distinct metrics arrived, nothing
// arrived for quiet, or ctx ends; once exited is closed (the sending process
// ended), it waits at most receiverQuiet more for the rest.
func (r *receiver) waitWhileRunning(ctx context.Context, want int, quiet time.Duration, exited <-chan struct{}) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-exited:
			r.waitFor(ctx, want, receiverQuiet)
			cancel()
		case <-ctx.Done():
		}
	}()
	r.waitFor(ctx, want, quiet)
}

// tally is what the receiver got of the metrics a client sent.
type tally struct {
	sent, received, missing, duplicates, unexpected int
}

// count compares what arrived with want, the timestamps of the metrics
// the client sent.
func (r *receiver) count(want []int64) tally {
	r.mu.Lock()
	defer r.mu.Unlock()
	t := tally{sent: len(want), unexpected: int(r.bad)}
	expected := make(map[int64]bool, len(want))
	for _, ts := range want {
		expected[ts] = true
		n := r.seen[ts]
		switch {
		case n == 0:
			t.missing++
		case n > 1:
			t.duplicates += int(n) - 1
		}
		if n > 0 {
			t.received++
		}
	}
	for ts, n := range r.seen {
		if !expected[ts] {
			t.unexpected += int(n)
		}
	}
	return t
}

func (t tally) ok() bool { return t.missing == 0 && t.duplicates == 0 && t.unexpected == 0 }

func (t tally) String() string {
	s := fmt.Sprintf("%s of %s received, %d missing, %d duplicates",
		groupThousands(int64(t.received)), groupThousands(int64(t.sent)), t.missing, t.duplicates)
	if t.unexpected > 0 {
		s += fmt.Sprintf(", %d unexpected", t.unexpected)
	}
	return s
}

// add sums tallies over runs.
func (t *tally) add(o tally) {
	t.sent += o.sent
	t.received += o.received
	t.missing += o.missing
	t.duplicates += o.duplicates
	t.unexpected += o.unexpected
}

// subscribe connects a counting subscriber to a plain broker (mosquitto)
// for every events topic the clients publish to: the per-device topics
// and the gateway's own events subfolders.
//
// It shares the benchmark's process (and CPU) with the clients, so it is
// made cheap: QoS 0 (no PUBACK to write per message; mosquitto runs with
// max_queued_messages 0, so it queues for an online subscriber without
// limit and drops nothing), and reads through a buffer (paho reads each
// packet in three or more small reads, a system call each).
func subscribe(server string, r *receiver) (mqtt.Client, error) {
	return subscribeQoS(server, r, 0)
}

// subscribeQoS is subscribe at QoS qos: at 1, as a user's subscriber that
// wants every message, the broker sends each message as a QoS 1 publish
// and waits for this subscriber's PUBACK (paho sends it once the handler,
// which counts the message, returned).
func subscribeQoS(server string, r *receiver, qos byte) (mqtt.Client, error) {
	opts := mqtt.NewClientOptions()
	opts.AddBroker(server)
	opts.SetCustomOpenConnectionFn(func(uri *url.URL, _ mqtt.ClientOptions) (net.Conn, error) {
		c, err := net.DialTimeout("tcp", uri.Host, 10*time.Second)
		if err != nil {
			return nil, err
		}
		return &bufferedConn{Conn: c, r: bufio.NewReaderSize(c, 64<<10)}, nil
	})
	opts.SetClientID(fmt.Sprintf("omnicore-bench-receiver-%d", time.Now().UnixNano()))
	opts.SetProtocolVersion(4)
	opts.SetCleanSession(true)
	opts.SetAutoReconnect(false)
	opts.SetKeepAlive(60 * time.Second)
	opts.SetConnectTimeout(10 * time.Second)
	c := mqtt.NewClient(opts)
	if t := c.Connect(); !t.WaitTimeout(15*time.Second) || t.Error() != nil {
		c.Disconnect(0)
		return nil, errors.Join(errors.New("the counting subscriber could not connect"), t.Error())
	}
	filters := map[string]byte{
		"/" + registryID + "/+/events":                   qos,
		"/" + registryID + "/" + gatewayID + "/events/+": qos,
	}
	t := c.SubscribeMultiple(filters, func(_ mqtt.Client, m mqtt.Message) { r.observe(m.Payload()) })
	if !t.WaitTimeout(15*time.Second) || t.Error() != nil {
		c.Disconnect(0)
		return nil, errors.Join(errors.New("the counting subscriber could not subscribe"), t.Error())
	}
	return c, nil
}

// timestamps are the metric times a client sends, as the receiver keys them.
func timestampsOf[M interface{ Time() time.Time }](ms []M) []int64 {
	out := make([]int64, len(ms))
	for i, m := range ms {
		out[i] = m.Time().UnixNano()
	}
	return out
}

// bufferedConn reads through a buffer (only paho's reader reads).
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.r.Read(p) }
