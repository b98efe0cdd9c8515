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
	"github.com/influxdata/telegraf/selfstat"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/internal/latencyproxy"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gatewaystats"
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
//
// caFile, when not "", is its tls_ca (for a tls:// server).
func newMQTTOutput(server string, id identity, topic string, caFile ...string) (*mqttout.MQTT, error) {
	ca := ""
	if len(caFile) > 0 {
		ca = caFile[0]
	}
	return newMQTTOutputWith(server, id, topic, ca, nil)
}

// newMQTTOutputWith is newMQTTOutput with tune applied before Init (a
// layout, another serializer).
func newMQTTOutputWith(server string, id identity, topic, caFile string, tune func(*mqttout.MQTT) error) (*mqttout.MQTT, error) {
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
	if caFile != "" {
		m.TLSCA = caFile
	}
	ser, err := newSerializer()
	if err != nil {
		return nil, err
	}
	m.SetSerializer(ser)
	if tune != nil {
		if err := tune(m); err != nil {
			return nil, err
		}
	}
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
//
// Connect does not wait for the connection; a Write that starts before it
// is up waits at most a second. With waitConnected the warm-up starts only
// once the session says it is connected (over a long round trip, TLS and
// CONNECT take several).
func runOurs(ctx context.Context, server string, id identity, warm []telegraf.Metric, timed [][]telegraf.Metric, tune func(*outomni.OmniCore), waitConnected ...bool) (measurement, error) {
	o, err := newOurOutput(server, id, tune)
	if err != nil {
		return measurement{}, err
	}
	if err := o.Connect(); err != nil {
		return measurement{}, err
	}
	defer o.Close()
	if len(waitConnected) > 0 && waitConnected[0] {
		if err := waitOursConnected(ctx, 30*time.Second); err != nil {
			return measurement{}, err
		}
	}
	if err := writeAll(ctx, o, batches(warm, 1000)); err != nil {
		return measurement{}, fmt.Errorf("warm-up: %w", err)
	}
	return measure(count(timed), func() error { return writeAll(ctx, o, timed) })
}

// waitOursConnected waits until the gateway statistics that
// outputs.omnicore exports in process (internal_omnicore, refreshed every
// second) say the gateway is connected.
func waitOursConnected(ctx context.Context, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		for _, m := range selfstat.Metrics() {
			if m.Name() != gatewaystats.InternalMeasurement {
				continue
			}
			if gw, _ := m.GetTag("gateway_id"); gw != gatewayID {
				continue
			}
			if v, ok := m.GetField("connected"); ok && v == int64(1) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("outputs.omnicore not connected within %s: %w", timeout, ctx.Err())
		case <-time.After(50 * time.Millisecond): // polling the exported statistics
		}
	}
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
func runMQTT(ctx context.Context, b broker, server, caFile string, id identity, warm []telegraf.Metric, timed [][]telegraf.Metric) (measurement, error) {
	m, err := newMQTTOutput(server, id, mqttTopic(b), caFile)
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
	// tls runs every client over TLS to the broker's TLS listener
	// (b.tlsURL), verifying its certificate against b.caFile.
	tls bool
	// devices, when > 0, overrides the sizes' devices (metrics overrides
	// the metrics of ours, outputs.mqtt and bare alike).
	devices int
	// clients, when not nil, are the only clients of this case (ours,
	// mqtt, bare).
	clients map[string]bool
	// tune adjusts our output's options (e.g. max_devices).
	tune func(*outomni.OmniCore)
	// why is added to the notes of the rows: what is special in the setup.
	why      string
	problems []string
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
	server, target, scheme := pc.b.url, pc.b.hostPort(), "tcp"
	var (
		tlsCfg *tls.Config
		caFile string
	)
	if pc.tls {
		server, target, scheme, caFile = pc.b.tlsURL, pc.b.tlsHostPort(), "tls", pc.b.caFile
		var err error
		if tlsCfg, err = pc.b.tlsConfig(); err != nil {
			pc.problems = append(pc.problems, err.Error())
			return
		}
	}
	if pc.delay > 0 {
		// The proxy forwards bytes: TLS runs end to end through it, and
		// the client verifies the certificate for 127.0.0.1, the host it
		// dials, which the emulator's certificate names.
		p, err := latencyproxy.New(target, pc.delay)
		if err != nil {
			pc.problems = append(pc.problems, err.Error())
			return
		}
		defer p.Close()
		server = scheme + "://" + p.Addr()
	}
	oursTune := func(o *outomni.OmniCore) {
		if caFile != "" {
			o.TLSCA = caFile
		}
		if pc.tune != nil {
			pc.tune(o)
		}
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
			return runOurs(ctx, server, id, warm, timed, oursTune, pc.delay >= 50*time.Millisecond)
		}, &pc.ours, oursWant, &pc.oursCPU},
		{"mqtt", "outputs.mqtt", func(ctx context.Context) (measurement, error) {
			return runMQTT(ctx, pc.b, server, caFile, id, mqttWarm, mqttTimed)
		}, &pc.mqtt, timestampsOf(mqttSent), &pc.mqttCPU},
		{"bare", "bare paho", func(ctx context.Context) (measurement, error) {
			return runBare(ctx, server, id, devices, bareWarm, bareTimed, sz.window, 0, tlsCfg)
		}, &pc.bare, oursWant, &pc.bareCPU},
	}
	if pc.delay == 0 && !pc.tls && pc.devices == 0 {
		clients = append(clients, client{"bare", "bare paho, batches", func(ctx context.Context) (measurement, error) {
			return runBare(ctx, server, id, devices, bareWarm, bareTimed, sz.window, sz.batch, nil)
		}, &pc.bareBatched, oursWant, nil})
	}
	if only != nil {
		clients = slices.DeleteFunc(clients, func(c client) bool { return !only[c.key] })
	}
	if pc.clients != nil {
		clients = slices.DeleteFunc(clients, func(c client) bool { return !pc.clients[c.key] })
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
		if pc.metrics > 0 {
			s.metrics, s.mqttMetrics = pc.metrics, pc.metrics
		}
		if pc.devices > 0 {
			s.devices = pc.devices
		}
		if pc.tls {
			link += ", TLS"
		}
		what := fmt.Sprintf("publish QoS 1, %s devices, %s, %s", groupThousands(int64(s.devices)), link, pc.b.name)
		if pc.nagle {
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
		goal := "0.80x"
		if pc.tls && pc.delay > 0 {
			goal = "0.90x (over a real round trip with TLS)"
		}
		vsBare := &row{id: id, name: what + " — vs bare paho", unit: "metrics/s",
			oursLabel: "outputs.omnicore", peerLabel: "bare paho",
			ours: pc.ours, peer: pc.bare,
			note:      fmt.Sprintf("%s metrics in Writes of %d, layout non-batch, influx; bare paho: prepared payloads, %d publishes in flight (our max_inflight), no batch boundaries, devices attached beforehand: the practical limit; goal ours >= %s", groupThousands(int64(s.metrics)), s.batch, s.window, goal),
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
		if pc.tls {
			tlsNote := "every client over TLS to the " + pc.b.name + "'s TLS listener"
			if pc.delay > 0 {
				tlsNote += " through the proxy (which forwards the encrypted bytes)"
			}
			tlsNote += ", verifying its certificate (issued for 127.0.0.1, the host dialled) against the benchmark's CA: ours with tls_ca, "
			if pc.clients == nil || pc.clients["mqtt"] {
				tlsNote += "outputs.mqtt with tls_ca, "
			}
			tlsNote += "bare paho with that CA as its RootCAs; nobody skips verification; the handshakes happen before the clock starts"
			if pc.delay > 0 {
				tlsNote += fmt.Sprintf("; with %d in flight the ceiling is about %s messages/s", s.window, groupThousands(int64(float64(s.window)/(2*pc.delay).Seconds())))
			}
			vsMQTT.note += "; " + tlsNote
			vsBare.note += "; " + tlsNote
		}
		if pc.why != "" {
			vsMQTT.note += "; " + pc.why
			vsBare.note += "; " + pc.why
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
		if pc.clients == nil || pc.clients["mqtt"] {
			rows = append(rows, vsMQTT)
		}
		rows = append(rows, vsBare)
	}
	return rows
}

func caseLabel(pc *publishCase) string {
	l := pc.b.name + ", loopback"
	if pc.delay > 0 {
		l = fmt.Sprintf("%s, %s RTT", pc.b.name, 2*pc.delay)
	}
	if pc.tls {
		l += ", TLS"
	}
	if pc.devices > 0 {
		l += fmt.Sprintf(", %s devices", groupThousands(int64(pc.devices)))
	}
	return l
}

// benchPublish runs benchmarks 1 and 1b: every client against every broker,
// on loopback and through the 20 ms RTT proxy, opts.runs times.
func (b *bench) benchPublish(ctx context.Context) error {
	emuRcv := newReceiver()
	emuOpts := []emulator.Option{emulator.WithOnReceive(emuRcv.observeEmulator)}
	caFile := ""
	if b.tls != nil {
		// The TLS rows: the emulator's certificate comes from the same CA
		// as mosquitto's.
		emuOpts = append(emuOpts, emulator.WithTLSAddr("127.0.0.1:0"), emulator.WithCA(b.tls.caCertPEM, b.tls.caKeyPEM))
		caFile = b.tls.caFile
	}
	emu, err := startEmulator(b.pub, b.sz.pub.devices, emuOpts...)
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
		brokers = append(brokers, broker{name: "mosquitto", url: b.mosq.url, rcv: rcv, tlsURL: b.mosq.tlsURL, caFile: caFile})
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
		brokers = append(brokers, broker{name: "emulator", url: emu.URL, emu: emu, rcv: emuRcv, tlsURL: emu.TLSURL, caFile: caFile})
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
	if b.opts.wants("1") {
		for _, br := range brokers {
			if br.tlsURL == "" {
				continue
			}
			// Over TLS on loopback: ours, outputs.mqtt and bare paho.
			cases = append(cases, &publishCase{b: br, tls: true, metrics: b.sz.tlsMetrics,
				tallies: map[string]tally{}, leftOut: map[string]int{}})
		}
		if b.opts.brokers == nil || b.opts.brokers["emulator"] {
			// Many devices on one connection: an emulator of its own
			// with every device bound, and the bridge's limit of
			// 10,000 attached devices raised for it.
			n := b.sz.manyDevices
			rcv := newReceiver()
			progress("  starting an emulator with %s devices", groupThousands(int64(n)))
			many, err := startEmulator(b.pub, n, emulator.WithOnReceive(rcv.observeEmulator),
				emulator.WithRules(func(r *emulator.Rules) { r.MaxAttached = n }))
			if err != nil {
				return err
			}
			defer many.Close()
			cases = append(cases, &publishCase{b: broker{name: "emulator", url: many.URL, emu: many, rcv: rcv},
				devices: n, metrics: b.sz.manyMetrics, clients: map[string]bool{"ours": true, "bare": true},
				tune: func(o *outomni.OmniCore) { o.MaxDevices = n },
				why: fmt.Sprintf("%s metrics over %s devices, all on one connection: the bridge attaches at most %s devices per gateway connection, so here the emulator's limit is raised to %s and ours runs with max_devices = %d (past %s a deployment uses a pool of gateways, benchmark 8); the untimed warm-up attaches every device (ours and bare alike), so the timed part runs with %s devices attached and known",
					groupThousands(int64(b.sz.manyMetrics)), groupThousands(int64(n)), groupThousands(omnicore.MaxAttachedDevices), groupThousands(int64(n)), n, groupThousands(omnicore.MaxAttachedDevices), groupThousands(int64(n))),
				tallies: map[string]tally{}, leftOut: map[string]int{}})
		}
	}
	if b.opts.wants("1b") {
		// Over 20 ms and 100 ms round trips with TLS: ours against bare
		// paho (outputs.mqtt, one message per round trip, is compared
		// in the plain tcp rows above).
		for _, br := range brokers {
			if br.tlsURL == "" {
				continue
			}
			for _, rt := range []struct {
				delay   time.Duration
				metrics int
			}{{10 * time.Millisecond, 0}, {50 * time.Millisecond, b.sz.tlsRTT100Metrics}} {
				pc := &publishCase{b: br, delay: rt.delay, tls: true, metrics: rt.metrics,
					clients: map[string]bool{"ours": true, "bare": true}, tallies: map[string]tally{}, leftOut: map[string]int{}}
				if rt.delay >= 50*time.Millisecond {
					// The untimed warm-up Write attaches every device:
					// two messages per metric, about 2 s at 100 in
					// flight over 100 ms, the default write_timeout.
					pc.tune = func(o *outomni.OmniCore) { o.WriteTimeout = config.Duration(20 * time.Second) }
					pc.why = "ours with write_timeout = \"20s\" (its untimed warm-up Write of one metric per new device is 2,000 messages, attaches included, about 2 s at 100 in flight over 100 ms: the default 2 s; the timed Writes of 1,000 take about 1.1 s) and its warm-up starts once the gateway is connected (TLS and CONNECT take a few round trips)"
				}
				cases = append(cases, pc)
			}
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
			if pc.metrics > 0 {
				sz.metrics, sz.mqttMetrics = pc.metrics, pc.metrics
			}
			if pc.devices > 0 {
				sz.devices = pc.devices
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
