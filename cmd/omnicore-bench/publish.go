package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/plugins/outputs"
	mqttout "github.com/influxdata/telegraf/plugins/outputs/mqtt"
	influxser "github.com/influxdata/telegraf/plugins/serializers/influx"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/latencyproxy"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

func newSerializer() (telegraf.Serializer, error) {
	s := &influxser.Serializer{}
	return s, s.Init()
}

// newOurOutput builds outputs.omnicore as Telegraf's config loader would
// from a minimal table with data_format = "influx", and runs Init.
func newOurOutput(server string, id identity, tune func(*outomni.OmniCore)) (*outomni.OmniCore, error) {
	o, ok := outputs.Outputs["omnicore"]().(*outomni.OmniCore)
	if !ok {
		return nil, errors.New("outputs.omnicore is not registered")
	}
	o.Servers = []string{server}
	o.SubscriptionID = id.subscription
	o.RegistryID = registryID
	o.GatewayID = gatewayID
	o.PrivateKey = id.key
	o.Algorithm = keyAlg
	o.Log = newLogger("outputs.omnicore")
	ser, err := newSerializer()
	if err != nil {
		return nil, err
	}
	o.SetSerializer(ser)
	if tune != nil {
		tune(o)
	}
	if err := o.Init(); err != nil {
		return nil, fmt.Errorf("outputs.omnicore Init: %w", err)
	}
	return o, nil
}

// newMQTTOutput builds Telegraf's own outputs.mqtt as its config loader
// would, authenticated as the gateway (client ID and JWT password).
func newMQTTOutput(server string, id identity, topic string) (*mqttout.MQTT, error) {
	m, ok := outputs.Outputs["mqtt"]().(*mqttout.MQTT)
	if !ok {
		return nil, errors.New("outputs.mqtt is not registered")
	}
	tok, err := id.token()
	if err != nil {
		return nil, err
	}
	m.Servers = []string{server}
	m.Topic = topic
	m.QoS = 1
	m.ClientID = id.clientID()
	m.Username = config.NewSecret([]byte(omnicore.Username))
	m.Password = config.NewSecret([]byte(tok))
	m.Log = newLogger("outputs.mqtt")
	ser, err := newSerializer()
	if err != nil {
		return nil, err
	}
	m.SetSerializer(ser)
	if err := m.Init(); err != nil {
		return nil, fmt.Errorf("outputs.mqtt Init: %w", err)
	}
	return m, nil
}

// mqttTopic is outputs.mqtt's topic template: per-device topics on a plain
// broker; on the bridge, which lets it publish only as the gateway itself
// (it cannot attach), per-device subfolders of the gateway's events topic.
func mqttTopic(b broker) string {
	if b.emu != nil || b.isEmu {
		return "/" + registryID + "/" + gatewayID + `/events/{{ .Tag "device_id" }}`
	}
	return "/" + registryID + `/{{ .Tag "device_id" }}/events`
}

// writeAll calls Write with each batch, as Telegraf's output loop does.
func writeAll(ctx context.Context, out telegraf.Output, bs [][]telegraf.Metric) error {
	for _, b := range bs {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := out.Write(b); err != nil {
			return err
		}
	}
	return nil
}

// runOurs measures outputs.omnicore: Init and Connect, an untimed warm-up
// Write (which attaches the devices), then the timed Writes.
func runOurs(ctx context.Context, server string, id identity, warm []telegraf.Metric, timed [][]telegraf.Metric, tune func(*outomni.OmniCore)) (measurement, error) {
	o, err := newOurOutput(server, id, tune)
	if err != nil {
		return measurement{}, err
	}
	if err := o.Connect(); err != nil {
		return measurement{}, err
	}
	defer o.Close()
	if err := writeAll(ctx, o, batches(warm, 1000)); err != nil {
		return measurement{}, fmt.Errorf("warm-up: %w", err)
	}
	return measure(count(timed), func() error { return writeAll(ctx, o, timed) })
}

func count(bs [][]telegraf.Metric) int {
	n := 0
	for _, b := range bs {
		n += len(b)
	}
	return n
}

// measurement is the rate of a timed part and the CPU this process spent
// on it per item.
type measurement struct {
	rate float64 // items per second
	cpu  float64 // microseconds of this process's CPU per item
}

// measure times f, which handles n items.
func measure(n int, f func() error) (measurement, error) {
	cpu0 := processCPU()
	start := time.Now()
	if err := f(); err != nil {
		return measurement{}, err
	}
	took := time.Since(start)
	return measurement{
		rate: float64(n) / took.Seconds(),
		cpu:  float64((processCPU() - cpu0).Microseconds()) / float64(n),
	}, nil
}

// processCPU is the user and system CPU time of this process so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runMQTT measures outputs.mqtt the same way.
func runMQTT(ctx context.Context, b broker, server string, id identity, warm []telegraf.Metric, timed [][]telegraf.Metric) (measurement, error) {
	m, err := newMQTTOutput(server, id, mqttTopic(b))
	if err != nil {
		return measurement{}, err
	}
	if err := m.Connect(); err != nil {
		return measurement{}, fmt.Errorf("outputs.mqtt Connect: %w", err)
	}
	defer m.Close()
	if err := writeAll(ctx, m, batches(warm, 1000)); err != nil {
		return measurement{}, fmt.Errorf("warm-up: %w", err)
	}
	return measure(count(timed), func() error { return writeAll(ctx, m, timed) })
}

// bareMsg is a prepared publish.
type bareMsg struct {
	topic   string
	payload []byte
}

// bareMessages prepares the messages our output sends for ms (the payload
// without the device_id tag, one per metric), outside any timing.
func bareMessages(ms []telegraf.Metric) ([]bareMsg, error) {
	ser, err := newSerializer()
	if err != nil {
		return nil, err
	}
	out := make([]bareMsg, len(ms))
	for i, m := range ms {
		dev, _ := m.GetTag("device_id")
		c := m.Copy()
		c.RemoveTag("device_id")
		p, err := ser.Serialize(c)
		if err != nil {
			return nil, err
		}
		out[i] = bareMsg{topic: omnicore.Topic(registryID, dev, omnicore.KindEvents, ""), payload: p}
	}
	return out, nil
}

func attachMessages(devices []string) []bareMsg {
	out := make([]bareMsg, len(devices))
	for i, d := range devices {
		out[i] = bareMsg{topic: omnicore.Topic(registryID, d, omnicore.KindAttach, ""), payload: []byte("{}")}
	}
	return out
}

// runBare is the practical limit: paho publishing prepared messages at QoS 1
// with window messages in flight, continuously (no batch boundaries). It
// attaches the devices first (untimed), as the bridge requires.
//
// With batch > 0 it waits for every PUBACK of each batch of that many
// messages before starting the next, as a Telegraf output's Write must: the
// limit of any output with Telegraf's Write semantics.
//
// tlsCfg, when not nil, is the TLS configuration of a tls:// server.
func runBare(ctx context.Context, server string, id identity, devices []string, warm, timed []bareMsg, window, batch int, tlsCfg *tls.Config) (measurement, error) {
	c, err := pahoConnectTLS(server, id, nil, tlsCfg)
	if err != nil {
		return measurement{}, fmt.Errorf("bare paho connect: %w", err)
	}
	defer c.Disconnect(250)
	publish := func(msgs []bareMsg) error {
		work := make(chan bareMsg)
		var (
			wg       sync.WaitGroup
			mu       sync.Mutex
			firstErr error
		)
		for range window {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for m := range work {
					t := c.Publish(m.topic, 1, false, m.payload)
					var err error
					switch {
					case !t.WaitTimeout(30 * time.Second):
						err = fmt.Errorf("no PUBACK within 30s on %s", m.topic)
					case t.Error() != nil:
						err = t.Error()
					}
					if err != nil {
						mu.Lock()
						if firstErr == nil {
							firstErr = err
						}
						mu.Unlock()
					}
				}
			}()
		}
	feed:
		for _, m := range msgs {
			select {
			case work <- m:
			case <-ctx.Done():
				break feed
			}
		}
		close(work)
		wg.Wait()
		if firstErr == nil {
			firstErr = ctx.Err()
		}
		return firstErr
	}
	if err := publish(attachMessages(devices)); err != nil {
		return measurement{}, fmt.Errorf("attach: %w", err)
	}
	if err := publish(warm); err != nil {
		return measurement{}, fmt.Errorf("warm-up: %w", err)
	}
	if batch <= 0 {
		batch = len(timed)
	}
	return measure(len(timed), func() error {
		for off := 0; off < len(timed); off += batch {
			if err := publish(timed[off:min(off+batch, len(timed))]); err != nil {
				return err
			}
		}
		return nil
	})
}

// publishCase is one broker and link of benchmarks 1 and 1b.
type publishCase struct {
	b     broker
	delay time.Duration // one-way; 0 for plain loopback
	// nagle marks the extra case on mosquitto with Nagle's algorithm on:
	// ours and bare only, with its own size.
	nagle   bool
	metrics int
	// figures per run
	ours, mqtt, bare []float64
	// CPU of this process per metric, µs (client, plus the emulator when
	// it is the broker)
	oursCPU, mqttCPU, bareCPU []float64
	// bareBatched is bare paho waiting for each Write-sized batch (loopback
	// cases only), to tell the cost of Write boundaries from ours.
	bareBatched []float64
	problems    []string
	// per client name: what the receiver counted over all runs, and the
	// runs left out of the median for a problem
	tallies map[string]tally
	leftOut map[string]int
}

// receiverQuiet bounds the wait for the receiver after a client's last
// PUBACK: counting stops when nothing arrived for this long.
const receiverQuiet = 10 * time.Second

// receiverNote is what the receiver counted for each client of a case.
func (pc *publishCase) receiverNote() string {
	where := "the emulator's accepted events"
	if pc.b.emu == nil {
		where = "a subscriber of mosquitto"
	}
	var parts []string
	for _, name := range []string{"outputs.omnicore", "outputs.mqtt", "bare paho", "bare paho, batches"} {
		if t, ok := pc.tallies[name]; ok {
			parts = append(parts, name+" "+t.String())
		}
	}
	return fmt.Sprintf("counted at the receiver (%s), all runs: %s", where, strings.Join(parts, "; "))
}

type publishSizes struct {
	devices     int
	metrics     int // ours and bare
	mqttMetrics int // outputs.mqtt
	warmMQTT    int // outputs.mqtt warm-up metrics
	batch       int
	window      int
}

// runPublishCase runs the three clients once against c's broker, in an
// order that rotates with the run number.
func runPublishCase(ctx context.Context, pc *publishCase, id identity, sz publishSizes, run int, only map[string]bool) {
	server := pc.b.url
	if pc.delay > 0 {
		p, err := latencyproxy.New(pc.b.hostPort(), pc.delay)
		if err != nil {
			pc.problems = append(pc.problems, err.Error())
			return
		}
		defer p.Close()
		server = "tcp://" + p.Addr()
	}
	start := time.Unix(1_700_000_000, 0)
	devices := deviceIDs(sz.devices)
	warm := genMetrics(sz.devices, sz.devices, start)
	ms := genMetrics(sz.metrics, sz.devices, start.Add(time.Hour))
	timed := batches(ms, sz.batch)
	mqttTimed := batches(ms[:min(sz.mqttMetrics, len(ms))], sz.batch)
	if sz.mqttMetrics > len(ms) {
		mqttTimed = batches(genMetrics(sz.mqttMetrics, sz.devices, start.Add(time.Hour)), sz.batch)
	}
	bareWarm, err1 := bareMessages(warm)
	bareTimed, err2 := bareMessages(ms)
	if err := errors.Join(err1, err2); err != nil {
		pc.problems = append(pc.problems, err.Error())
		return
	}

	mqttWarm := warm[:min(len(warm), sz.warmMQTT)]
	var mqttSent []telegraf.Metric
	mqttSent = append(mqttSent, mqttWarm...)
	for _, b := range mqttTimed {
		mqttSent = append(mqttSent, b...)
	}
	oursWant := append(timestampsOf(warm), timestampsOf(ms)...)
	type client struct {
		key  string
		name string
		run  func(ctx context.Context) (measurement, error)
		dst  *[]float64
		want []int64 // the metrics it sends, as the receiver counts them
		cpu  *[]float64
	}
	clients := []client{
		{"ours", "outputs.omnicore", func(ctx context.Context) (measurement, error) {
			return runOurs(ctx, server, id, warm, timed, nil)
		}, &pc.ours, oursWant, &pc.oursCPU},
		{"mqtt", "outputs.mqtt", func(ctx context.Context) (measurement, error) {
			return runMQTT(ctx, pc.b, server, id, mqttWarm, mqttTimed)
		}, &pc.mqtt, timestampsOf(mqttSent), &pc.mqttCPU},
		{"bare", "bare paho", func(ctx context.Context) (measurement, error) {
			return runBare(ctx, server, id, devices, bareWarm, bareTimed, sz.window, 0, nil)
		}, &pc.bare, oursWant, &pc.bareCPU},
	}
	if pc.delay == 0 {
		clients = append(clients, client{"bare", "bare paho, batches", func(ctx context.Context) (measurement, error) {
			return runBare(ctx, server, id, devices, bareWarm, bareTimed, sz.window, sz.batch, nil)
		}, &pc.bareBatched, oursWant, nil})
	}
	if only != nil {
		clients = slices.DeleteFunc(clients, func(c client) bool { return !only[c.key] })
	}
	for i := range clients {
		c := clients[(i+run)%len(clients)]
		pc.b.rcv.reset(false)
		cctx, cancel := context.WithTimeout(ctx, clientTimeout)
		v, err := c.run(cctx)
		cancel()
		if err != nil {
			pc.problems = append(pc.problems, fmt.Sprintf("%s: %v", c.name, err))
			pc.leftOut[c.name]++
			continue
		}
		// Count at the receiver: a run that lost or duplicated a metric
		// is reported and left out of the median.
		pc.b.rcv.waitFor(ctx, len(c.want), receiverQuiet)
		t := pc.b.rcv.count(c.want)
		sum := pc.tallies[c.name]
		sum.add(t)
		pc.tallies[c.name] = sum
		if !t.ok() {
			pc.problems = append(pc.problems, fmt.Sprintf("%s: at the receiver %s", c.name, t))
			pc.leftOut[c.name]++
			continue
		}
		*c.dst = append(*c.dst, v.rate)
		if c.cpu != nil {
			*c.cpu = append(*c.cpu, v.cpu)
		}
		progress("    %-19s %s, %.1f µs CPU/metric", c.name, formatValue(v.rate, "metrics/s"), v.cpu)
	}
}

// clientTimeout bounds one client's part of one run.
const clientTimeout = 10 * time.Minute

// publishRows turns the cases into table rows, two per case (ours against
// outputs.mqtt, ours against bare paho).
func publishRows(cases []*publishCase, sz, rttSz publishSizes) []*row {
	var rows []*row
	for _, pc := range cases {
		id, link, s := "1", "loopback", sz
		if pc.delay > 0 {
			id, link, s = "1b", fmt.Sprintf("%d ms RTT", 2*pc.delay.Milliseconds()), rttSz
		}
		what := fmt.Sprintf("publish QoS 1, %s devices, %s, %s", groupThousands(int64(s.devices)), link, pc.b.name)
		if pc.nagle {
			s.metrics, s.mqttMetrics = pc.metrics, pc.metrics
			what = fmt.Sprintf("publish QoS 1, %s devices, loopback, mosquitto with its defaults (set_tcp_nodelay false: Nagle on)", groupThousands(int64(s.devices)))
		}
		ourNote := fmt.Sprintf("%s metrics in Writes of %d, layout non-batch, influx", groupThousands(int64(s.metrics)), s.batch)
		mqttNote := "outputs.mqtt waits for each PUBACK before the next publish"
		if s.mqttMetrics != s.metrics {
			mqttNote += fmt.Sprintf(" (so it published only %s metrics to stay bounded in time; metrics/s compared)", groupThousands(int64(s.mqttMetrics)))
		}
		if pc.b.emu != nil {
			mqttNote += "; on the bridge it cannot attach, so it publishes to the gateway's own events/{device} subfolders"
		} else {
			mqttNote += "; same per-device topics as ours"
		}
		vsMQTT := &row{id: id, name: what + " — vs outputs.mqtt", unit: "metrics/s",
			oursLabel: "outputs.omnicore", peerLabel: "outputs.mqtt",
			ours: pc.ours, peer: pc.mqtt, note: ourNote + "; " + mqttNote,
			slowerWhy: "on loopback a PUBACK comes back within tens of microseconds, so waiting for each one costs outputs.mqtt little and the rate is bound by CPU, which client, broker and the machine's other work share (see CPU per metric); over a real link (1b) the waiting dominates"}
		vsBare := &row{id: id, name: what + " — vs bare paho", unit: "metrics/s",
			oursLabel: "outputs.omnicore", peerLabel: "bare paho",
			ours: pc.ours, peer: pc.bare,
			note:      fmt.Sprintf("bare paho: prepared payloads, %d publishes in flight (our max_inflight), no batch boundaries, devices attached beforehand: the practical limit; goal ours >= 0.80x", s.window),
			slowerWhy: "ours routes, strips the device tag, serializes and tracks each metric, and every Write of a batch ends by waiting for its last PUBACKs, which the bare publisher never does"}
		if pc.delay > 0 {
			vsBare.slowerWhy = "each Write ends by waiting for the last PUBACKs of its batch (about one RTT in which the window is not full), which the continuous bare publisher never does"
		}
		cpuWho := "this process"
		if pc.b.emu != nil {
			cpuWho = "this process, client and emulator"
		}
		cpuNote := fmt.Sprintf("CPU per metric (%s): ours %.0f µs, outputs.mqtt %.0f µs, bare paho %.0f µs",
			cpuWho, median(pc.oursCPU), median(pc.mqttCPU), median(pc.bareCPU))
		if pc.delay == 0 {
			vsMQTT.note += "; " + cpuNote
		}
		if len(pc.bareBatched) > 0 {
			vsBare.note += fmt.Sprintf("; bare paho waiting for each batch of %d like a Write: %s", s.batch, formatValue(median(pc.bareBatched), "metrics/s"))
			vsBare.slowerWhy = fmt.Sprintf("bare paho with the same Write boundaries does %s, so the boundaries explain little of the gap; the rest is CPU, which bounds every rate on loopback: ours spends %.0f µs per metric (%s) against bare paho's %.0f µs, for routing, copying each metric to drop the device tag, serializing, and a goroutine and acknowledgement tracking per message",
				formatValue(median(pc.bareBatched), "metrics/s"), median(pc.oursCPU), cpuWho, median(pc.bareCPU))
			if median(pc.bareBatched) < 0.9*median(pc.bare) {
				vsBare.slowerWhy = fmt.Sprintf("bare paho with the same Write boundaries drops to %s: most of the gap is the wait for the last PUBACKs at the end of every Write; the rest is CPU: ours spends %.0f µs per metric (%s) against bare paho's %.0f µs",
					formatValue(median(pc.bareBatched), "metrics/s"), median(pc.oursCPU), cpuWho, median(pc.bareCPU))
			}
		}
		if pc.nagle {
			vsMQTT.note += "; a broker with Nagle's algorithm on, as shipped"
			vsBare.note += "; with Nagle on at the broker, the last PUBACKs of each Write wait for the client's delayed TCP ACK (up to 40 ms on Linux)"
			vsMQTT.slowerWhy = "with Nagle on at the broker, the last PUBACKs of each Write wait for the client's delayed TCP ACK (up to 40 ms on Linux) before they are sent, while outputs.mqtt, one message at a time, never has two PUBACKs outstanding"
			vsBare.slowerWhy = "with Nagle on at the broker, the last PUBACKs of each Write wait for the client's delayed TCP ACK (up to 40 ms on Linux) before they are sent; a continuous publisher never has a last message, and outputs.mqtt (one message at a time) never has two PUBACKs outstanding"
		}
		rn := pc.receiverNote()
		vsMQTT.note += "; " + rn
		vsBare.note += "; " + rn
		vsMQTT.leftOut = pc.leftOut["outputs.omnicore"] + pc.leftOut["outputs.mqtt"]
		vsBare.leftOut = pc.leftOut["outputs.omnicore"] + pc.leftOut["bare paho"]
		for _, p := range pc.problems {
			vsMQTT.addProblem("%s", p)
			vsBare.addProblem("%s", p)
		}
		rows = append(rows, vsMQTT, vsBare)
	}
	return rows
}

func caseLabel(pc *publishCase) string {
	if pc.delay > 0 {
		return fmt.Sprintf("%s, %s RTT", pc.b.name, 2*pc.delay)
	}
	return pc.b.name + ", loopback"
}

// benchPublish runs benchmarks 1 and 1b: every client against every broker,
// on loopback and through the 20 ms RTT proxy, opts.runs times.
func (b *bench) benchPublish(ctx context.Context) error {
	emuRcv := newReceiver()
	emu, err := startEmulator(b.pub, b.sz.pub.devices, emulator.WithOnReceive(emuRcv.observeEmulator))
	if err != nil {
		return err
	}
	defer emu.Close()
	brokers := []broker{}
	var nagleBroker broker
	if b.mosq != nil && (b.opts.brokers == nil || b.opts.brokers["mosquitto"]) {
		rcv := newReceiver()
		sub, err := subscribe(b.mosq.url, rcv)
		if err != nil {
			return err
		}
		defer sub.Disconnect(250)
		brokers = append(brokers, broker{name: "mosquitto", url: b.mosq.url, rcv: rcv})
		if b.mosqNagle != nil {
			rcv := newReceiver()
			sub, err := subscribe(b.mosqNagle.url, rcv)
			if err != nil {
				return err
			}
			defer sub.Disconnect(250)
			nagleBroker = broker{name: "mosquitto (defaults, Nagle on)", url: b.mosqNagle.url, rcv: rcv}
		}
	}
	if b.opts.brokers == nil || b.opts.brokers["emulator"] {
		brokers = append(brokers, broker{name: "emulator", url: emu.URL, emu: emu, rcv: emuRcv})
	}

	var cases []*publishCase
	for _, delay := range []time.Duration{0, 10 * time.Millisecond} {
		if (delay == 0 && !b.opts.wants("1")) || (delay > 0 && !b.opts.wants("1b")) {
			continue
		}
		for _, br := range brokers {
			cases = append(cases, &publishCase{b: br, delay: delay, tallies: map[string]tally{}, leftOut: map[string]int{}})
		}
		if delay == 0 && nagleBroker.rcv != nil {
			cases = append(cases, &publishCase{b: nagleBroker, nagle: true, metrics: b.sz.nagleMetrics, tallies: map[string]tally{}, leftOut: map[string]int{}})
		}
	}
	for run := 0; run < b.opts.runs; run++ {
		for _, pc := range cases {
			if err := ctx.Err(); err != nil {
				return err
			}
			sz := b.sz.pub
			if pc.delay > 0 {
				sz = b.sz.pubRTT
			}
			if pc.nagle {
				sz.metrics, sz.mqttMetrics = pc.metrics, pc.metrics
			}
			progress("  run %d/%d: %s", run+1, b.opts.runs, caseLabel(pc))
			runPublishCase(ctx, pc, b.id, sz, run, b.opts.clients)
		}
	}
	b.rows = append(b.rows, publishRows(cases, b.sz.pub, b.sz.pubRTT)...)
	if b.mosq == nil {
		for _, id := range []string{"1", "1b"} {
			if b.opts.wants(id) {
				b.rows = append(b.rows, &row{id: id, name: "publish QoS 1 on mosquitto", skipped: b.hdr.mosquitto})
			}
		}
	}
	return nil
}
