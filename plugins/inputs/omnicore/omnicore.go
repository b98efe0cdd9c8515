//go:generate go run github.com/influxdata/telegraf/tools/readme_config_includer@v1.37.2
package omnicore

import (
	"context"
	_ "embed"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/inputs"
	influxparser "github.com/influxdata/telegraf/plugins/parsers/influx"
	influxserializer "github.com/influxdata/telegraf/plugins/serializers/influx"

	"github.com/telegraf-omnicore/telegraf-omnicore/internal/redact"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gatewaystats"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/pool"
)

//go:embed sample.conf
var sampleConfig string

// Values of the listen option.
const (
	listenAttached   = "attached"   // every device the gateway attaches, and the gateway
	listenConfigured = "configured" // the devices option and the gateway only
)

// Metric names and the values of the kind tag.
const (
	measurementConfig  = "omnicore_config"
	measurementCommand = "omnicore_command"
	measurementError   = "omnicore_error"

	kindConfig  = "config"
	kindCommand = "command"
	kindError   = "error"

	// errorUnparseable is the error_type of an errors-topic message that is
	// not the bridge's JSON; the session counts it under the same name.
	errorUnparseable = "UNPARSEABLE"

	// dropStopped is the drop reason of a message that arrived while the
	// plugin was stopping.
	dropStopped = "input_stopped"
)

// Retry of device subscriptions the bridge refused (device not bound,
// unknown, blocked): the device is tried again after this back-off, so that
// fixing the registry needs no Telegraf restart.
const (
	minSubscribeRetry = 2 * time.Second
	maxSubscribeRetry = 5 * time.Minute
	// subscribeWorkers bounds the concurrent Subscribe calls; the session
	// pipelines the attaches behind them.
	subscribeWorkers = 64
)

// reservedTags are the tags the plugin sets itself; topic_tag must not
// overwrite one of them.
var reservedTags = []string{"device_id", "gateway_id", "registry_id", "kind", "subfolder", "error_type"}

// OmniCore turns the config, command and error messages the OmniCore bridge
// sends to a gateway into metrics.
type OmniCore struct {
	gateway.Options
	Devices                []string `toml:"devices"`
	Listen                 string   `toml:"listen"`
	TopicTag               string   `toml:"topic_tag"`
	MaxUndeliveredMessages int      `toml:"max_undelivered_messages"`
	DataFormat             string   `toml:"data_format"`
	// Gateways are more gateway identities: with them the plugin listens
	// through a pool of gateways, the top-level one first.
	Gateways []pool.GatewayOptions `toml:"gateways"`
	Log      telegraf.Logger       `toml:"-"`

	// HealthStateInterval publishes the gateway's health as its state
	// (gateway.StartHealth); 0 is off.
	HealthStateInterval config.Duration `toml:"health_state_interval"`

	// Host is set by a program that runs the plugin outside Telegraf (the
	// execd binary: how gateway connections are shared across its
	// processes, and the route the health state names). Telegraf leaves it
	// zero: connections are shared within the process.
	Host       gateway.Host `toml:"-"`
	stopHealth func()

	// acquire returns a gateway's connection: Host.Acquire (nil) outside tests.
	acquire    func(*gateway.Config) (gateway.Conn, func(), error)
	retryMin   time.Duration // first back-off of a refused device
	parserFunc telegraf.ParserFunc
	cfg        *gateway.Config   // the top-level gateway's
	cfgs       []*gateway.Config // every gateway of the pool, cfg first

	mu        sync.Mutex
	conn      gateway.Conn
	release   func()
	stopStats func()
	acc       telegraf.TrackingAccumulator
	sem       chan struct{} // one slot per message whose metrics are undelivered
	ctx       context.Context
	cancel    context.CancelFunc
	subs      []gateway.Subscription
	stopped   bool
	handlers  sync.WaitGroup // handler calls in progress
	wg        sync.WaitGroup // the plugin's goroutines

	received    atomic.Uint64
	parseErrors atomic.Uint64
	parseWarned atomic.Bool
}

func (*OmniCore) SampleConfig() string {
	return sampleConfig
}

// SetParserFunc implements telegraf.ParserFuncPlugin: every message gets a
// fresh parser, so parsers with per-input state (CSV headers, for one) see
// each payload on its own. Telegraf's config loader always calls it, with
// the influx parser when the table has no data_format; the plugin parses
// only when data_format is set explicitly.
func (p *OmniCore) SetParserFunc(fn telegraf.ParserFunc) {
	p.parserFunc = fn
}

func (p *OmniCore) Init() error {
	cfgs, err := pool.Configs(p.Options, p.Gateways, p.Log)
	if err != nil {
		return err
	}
	cfg := cfgs[0]
	switch p.Listen {
	case listenAttached, listenConfigured:
	default:
		return fmt.Errorf("listen %q must be %q or %q", p.Listen, listenAttached, listenConfigured)
	}
	if limit := omnicore.MaxAttachedDevices * len(cfgs); len(p.Devices) > limit {
		return fmt.Errorf("devices lists %d devices; a gateway attaches at most %d (add gateways to the pool for more)", len(p.Devices), omnicore.MaxAttachedDevices)
	}
	seen := make(map[string]bool, len(p.Devices))
	for _, d := range p.Devices {
		if err := omnicore.ValidateID(d); err != nil {
			return fmt.Errorf("devices: %w", err)
		}
		if seen[d] {
			return fmt.Errorf("devices: %q is listed twice", d)
		}
		seen[d] = true
	}
	if slices.Contains(reservedTags, p.TopicTag) {
		return fmt.Errorf("topic_tag %q would overwrite a tag the plugin sets; choose another name", p.TopicTag)
	}
	if err := gateway.ValidateHealthInterval(time.Duration(p.HealthStateInterval)); err != nil {
		return err
	}
	if p.MaxUndeliveredMessages < 1 {
		return fmt.Errorf("max_undelivered_messages %d must be at least 1", p.MaxUndeliveredMessages)
	}
	if p.DataFormat != "" {
		if p.parserFunc == nil {
			return fmt.Errorf("data_format %q is set but no parser was provided; the plugin must be loaded with Telegraf's config loader", p.DataFormat)
		}
		if _, err := p.parserFunc(); err != nil {
			return fmt.Errorf("creating the %q parser: %w", p.DataFormat, err)
		}
	}
	p.cfg, p.cfgs = cfg, cfgs
	return nil
}

// Start joins (or starts) the gateway session and subscribes in the
// background: it neither blocks nor fails while the bridge is unreachable.
func (p *OmniCore) Start(acc telegraf.Accumulator) error {
	acquire := p.acquire
	if acquire == nil {
		acquire = p.Host.Acquire
	}
	conn, release, err := pool.Connect(p.cfgs, acquire, p.Log)
	if err != nil {
		return fmt.Errorf("starting the gateway session: %w", err)
	}
	ctx, cancel := context.WithCancel(context.Background())

	p.mu.Lock()
	p.conn, p.release = conn, release
	p.acc = acc.WithTracking(p.MaxUndeliveredMessages)
	p.sem = make(chan struct{}, p.MaxUndeliveredMessages)
	p.stopStats = nil
	// The same series as Gather's, for users of inputs.internal.
	sem := p.sem
	p.stopStats = gatewaystats.ExportEach(conn, p.RegistryID, func() map[string]int64 {
		return p.ownCounters(sem)
	})
	p.stopHealth = nil
	if p.HealthStateInterval > 0 {
		p.stopHealth = pool.StartHealth(conn, gateway.HealthSettings{Interval: time.Duration(p.HealthStateInterval), Route: p.Host.RouteName(), Log: p.Log})
	}
	p.ctx, p.cancel = ctx, cancel
	p.subs = nil
	p.stopped = false
	p.mu.Unlock()

	p.wg.Add(1)
	go p.releaseDelivered(ctx, p.acc, p.sem)

	p.addSub(conn.SubscribeErrors(p.onError))

	gateways := pool.IDs(conn)
	devices := make([]string, 0, len(p.Devices)+len(gateways))
	var listen func(context.Context, string) (gateway.Subscription, error)
	if p.Listen == listenAttached {
		// One handler for the config and commands of every attached device,
		// the gateway's own included: the listed devices only need to be
		// attached (and stay attached across reconnects).
		p.addSub(conn.SubscribeAll(p.onMessage))
		listen = func(ctx context.Context, device string) (gateway.Subscription, error) {
			return nil, conn.Attach(ctx, device)
		}
	} else {
		// Each gateway of the pool has its own config and commands.
		devices = append(devices, gateways...)
		listen = func(ctx context.Context, device string) (gateway.Subscription, error) {
			return conn.Subscribe(ctx, device, p.onMessage)
		}
	}
	for _, d := range p.Devices {
		if !slices.Contains(gateways, d) {
			devices = append(devices, d)
		}
	}
	p.listenAll(ctx, devices, listen)
	p.Log.Debugf("Listening for config and commands of %d devices (listen = %q) through gateways %q", len(devices), p.Listen, gateways)
	return nil
}

// Gather emits the gateway statistics as omnicore_gateway, built into
// Telegraf and under execd alike: one series per gateway of the pool, the
// plugin's own counters with the top-level gateway's (gatewaystats, the
// schema of the README's "Metrics").
func (p *OmniCore) Gather(acc telegraf.Accumulator) error {
	p.mu.Lock()
	conn, sem, stopped := p.conn, p.sem, p.stopped
	p.mu.Unlock()
	if conn == nil || stopped {
		return nil
	}
	gatewaystats.Gather(acc, conn, p.RegistryID, func() map[string]int64 { return p.ownCounters(sem) })
	return nil
}

// ownCounters are the plugin's own fields of the statistics, on the
// top-level gateway's series.
func (p *OmniCore) ownCounters(sem chan struct{}) map[string]int64 {
	return map[string]int64{
		"messages_received": int64(p.received.Load()),
		"parse_errors":      int64(p.parseErrors.Load()),
		"undelivered":       int64(len(sem)),
	}
}

// Stop ends the subscriptions and waits for the handler calls in progress,
// so that no metric is added after it returns, then leaves the session.
func (p *OmniCore) Stop() {
	p.mu.Lock()
	if p.stopped || p.conn == nil {
		p.mu.Unlock()
		return
	}
	p.stopped = true
	subs := p.subs
	p.subs = nil
	release, stopStats, stopHealth := p.release, p.stopStats, p.stopHealth
	p.mu.Unlock()

	for _, s := range subs {
		s.Unsubscribe()
	}
	p.cancel() // unblocks handlers waiting for a free slot and the workers
	p.handlers.Wait()
	p.wg.Wait()
	if stopStats != nil {
		stopStats()
	}
	if stopHealth != nil {
		stopHealth()
	}
	release()
}

// addSub keeps s for Stop, or ends it at once when the plugin is stopping.
func (p *OmniCore) addSub(s gateway.Subscription) {
	if s == nil {
		return
	}
	p.mu.Lock()
	if p.stopped {
		p.mu.Unlock()
		s.Unsubscribe()
		return
	}
	p.subs = append(p.subs, s)
	p.mu.Unlock()
}

// releaseDelivered frees a slot for every message whose metrics Telegraf
// has delivered (or dropped).
func (p *OmniCore) releaseDelivered(ctx context.Context, acc telegraf.TrackingAccumulator, sem chan struct{}) {
	defer p.wg.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case <-acc.Delivered():
			select {
			case <-sem:
			default:
			}
		}
	}
}

// listenAll attaches or subscribes the devices with a bounded number of
// workers. A device the bridge refuses is logged and tried again with
// back-off, so that fixing the registry needs no restart.
func (p *OmniCore) listenAll(ctx context.Context, devices []string, listen func(context.Context, string) (gateway.Subscription, error)) {
	if len(devices) == 0 {
		return
	}
	// Every device is either in the queue, in a worker or waiting for its
	// retry timer, so the queue never holds more than len(devices).
	queue := make(chan string, len(devices))
	for _, d := range devices {
		queue <- d
	}
	var mu sync.Mutex
	failures := make(map[string]int)
	retry := func(d string, err error) {
		mu.Lock()
		failures[d]++
		n := failures[d]
		mu.Unlock()
		wait := subscribeBackoff(p.retryMin, n)
		if n == 1 {
			p.Log.Warnf("Cannot listen to device %q yet, retrying in %s (further attempts are logged at debug level): %v", d, wait.Round(time.Second), err)
		} else {
			p.Log.Debugf("Attempt %d to listen to device %q failed, retrying in %s: %v", n, d, wait.Round(time.Second), err)
		}
		time.AfterFunc(wait, func() {
			if ctx.Err() == nil {
				queue <- d
			}
		})
	}
	for range min(len(devices), subscribeWorkers) {
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			for {
				var d string
				select {
				case <-ctx.Done():
					return
				case d = <-queue:
				}
				sub, err := listen(ctx, d)
				if err == nil {
					p.addSub(sub)
					mu.Lock()
					n := failures[d]
					mu.Unlock()
					if n > 0 {
						p.Log.Infof("Listening to device %q after %d failed attempts", d, n)
					}
					continue
				}
				// On failure the session may keep the handler for later
				// reconnects; drop it so that a retry does not add a second
				// one (which would emit every message twice).
				if sub != nil {
					sub.Unsubscribe()
				}
				if ctx.Err() != nil {
					return
				}
				retry(d, err)
			}
		}()
	}
}

// subscribeBackoff doubles from base to maxSubscribeRetry, with jitter so
// that many refused devices do not retry in step.
func subscribeBackoff(base time.Duration, failures int) time.Duration {
	d := min(base<<min(failures-1, 10), maxSubscribeRetry)
	return d/2 + rand.N(d/2)
}

func (p *OmniCore) onMessage(in gateway.Inbound) { p.handle(in, p.messageMetrics) }

func (p *OmniCore) onError(in gateway.Inbound) { p.handle(in, p.errorMetrics) }

// handle runs on the session's dispatch goroutine. It blocks while
// max_undelivered_messages messages are undelivered: that is the
// back-pressure that bounds memory during a burst.
func (p *OmniCore) handle(in gateway.Inbound, convert func(gateway.Inbound) []telegraf.Metric) {
	p.mu.Lock()
	if p.stopped || p.conn == nil {
		conn := p.conn
		p.mu.Unlock()
		if conn != nil {
			conn.CountDrop(dropStopped, 1)
		}
		p.Log.Debugf("Dropping a message on %q: the plugin is stopping", in.Topic)
		return
	}
	p.handlers.Add(1)
	ctx, sem, acc, conn := p.ctx, p.sem, p.acc, p.conn
	p.mu.Unlock()
	defer p.handlers.Done()

	p.received.Add(1)
	select {
	case sem <- struct{}{}:
	case <-ctx.Done():
		conn.CountDrop(dropStopped, 1)
		p.Log.Debugf("Dropping a message on %q: the plugin is stopping", in.Topic)
		return
	}
	acc.AddTrackingMetricGroup(convert(in))
}

// messageMetrics turns a config or command message into metrics: the
// parser's, with the plugin's tags added, or one raw metric.
func (p *OmniCore) messageMetrics(in gateway.Inbound) []telegraf.Metric {
	kind, name := kindConfig, measurementConfig
	if in.Kind == omnicore.KindCommands {
		kind, name = kindCommand, measurementCommand
	}
	tags := map[string]string{
		"gateway_id":  p.gatewayOf(in),
		"registry_id": p.RegistryID,
		"device_id":   in.Device,
		"kind":        kind,
	}
	if in.Subfolder != "" {
		tags["subfolder"] = in.Subfolder
	}
	if p.TopicTag != "" {
		tags[p.TopicTag] = in.Topic
	}
	// An empty payload (a device without config) is never parsed: it is a
	// raw metric with an empty payload field.
	if p.DataFormat != "" && len(in.Payload) > 0 {
		metrics, err := p.parse(in.Payload)
		if err == nil && len(metrics) > 0 {
			for _, m := range metrics {
				for k, v := range tags {
					m.AddTag(k, v)
				}
			}
			// On both routes, so that one message gives the same metric
			// whichever way the plugin runs (see lineProtocolError).
			if err = lineProtocolError(metrics); err == nil {
				return metrics
			}
		}
		if err == nil {
			err = errors.New("the parser produced no metrics")
		}
		p.parseErrors.Add(1)
		// The size, never the bytes: a config or command can hold secrets,
		// and parsers quote what they choke on (see redact.Error).
		if p.parseWarned.CompareAndSwap(false, true) {
			p.Log.Warnf("Parsing a %s of device %q (%d bytes) as %q failed: %s; it is emitted raw as %s (further parse errors are logged at debug level)",
				kind, in.Device, len(in.Payload), p.DataFormat, redact.Error(err, in.Payload), name)
		} else if p.Log.Level().Includes(telegraf.Debug) {
			p.Log.Debugf("Parsing a %s of device %q (%d bytes) as %q failed: %s", kind, in.Device, len(in.Payload), p.DataFormat, redact.Error(err, in.Payload))
		}
	}
	return []telegraf.Metric{rawMetric(name, tags, in.Payload, in.Received)}
}

// parse runs a fresh parser; a parser that panics on hostile input is a
// parse error, not a crash.
func (p *OmniCore) parse(payload []byte) (metrics []telegraf.Metric, err error) {
	defer func() {
		if r := recover(); r != nil {
			metrics, err = nil, fmt.Errorf("parser panicked: %v", r)
		}
	}()
	parser, err := p.parserFunc()
	if err != nil {
		return nil, fmt.Errorf("creating the parser: %w", err)
	}
	return parser.Parse(payload)
}

// lineProtocolError reports a metric that would not reach Telegraf: the
// shim writes metrics to stdout as line protocol and stops for good on one it
// cannot serialize (a JSON {"":1}, or the value parser's "NaN", leaves no
// field line protocol can carry), and inputs.execd drops a line it cannot
// parse back (a tag value with a vertical tab, from a CSV tag column). Such
// a message is emitted raw instead.
func lineProtocolError(metrics []telegraf.Metric) error {
	serializer := &influxserializer.Serializer{}
	if err := serializer.Init(); err != nil {
		return err
	}
	for _, m := range metrics {
		line, err := serializer.Serialize(m)
		if err != nil {
			return fmt.Errorf("a parsed metric cannot be written as line protocol: %w", err)
		}
		parser := &influxparser.Parser{}
		if err := parser.Init(); err != nil {
			return err
		}
		if back, err := parser.Parse(line); err != nil || len(back) != 1 {
			return fmt.Errorf("a parsed metric does not survive line protocol: %q", line)
		}
	}
	return nil
}

// gatewayOf is the gateway that delivered in: in a pool, the member that
// carries the device (or whose errors topic it is).
func (p *OmniCore) gatewayOf(in gateway.Inbound) string {
	if in.Gateway != "" {
		return in.Gateway
	}
	return p.GatewayID
}

// errorMetrics turns a message of the gateway's errors topic into one
// omnicore_error metric.
func (p *OmniCore) errorMetrics(in gateway.Inbound) []telegraf.Metric {
	tags := map[string]string{
		"gateway_id":  p.gatewayOf(in),
		"registry_id": p.RegistryID,
		"kind":        kindError,
	}
	var e omnicore.ErrorMessage
	err := json.Unmarshal(in.Payload, &e)
	if err == nil && e.ErrorType == "" {
		err = errors.New("no error_type")
	}
	if err != nil {
		// Keep the text so that nothing the bridge said is lost.
		tags["error_type"] = errorUnparseable
		tags["device_id"] = in.Device
		m := rawMetric(measurementError, tags, in.Payload, in.Received)
		m.AddField("description", "unparseable errors-topic message: "+err.Error())
		return []telegraf.Metric{m}
	}
	tags["error_type"] = e.ErrorType
	tags["device_id"] = e.DeviceID
	if e.DeviceID == "" {
		// Not about a device: the error concerns the gateway whose errors
		// topic carried it.
		tags["device_id"] = in.Device
	}
	fields := map[string]any{"description": e.Description}
	if mi := e.MessageInfo; mi != nil {
		fields["message_type"] = mi.MessageType
		fields["topic"] = mi.Topic
		if mi.PacketID != 0 {
			fields["packet_id"] = int64(mi.PacketID)
		}
	}
	return []telegraf.Metric{metric.New(measurementError, tags, fields, in.Received)}
}

// rawMetric carries a payload as text. Line protocol and JSON need valid
// UTF-8, so a payload that is not valid UTF-8 gets its invalid bytes
// replaced by U+FFFD in payload and its exact bytes in payload_base64.
func rawMetric(name string, tags map[string]string, payload []byte, t time.Time) telegraf.Metric {
	fields := make(map[string]any, 2)
	if utf8.Valid(payload) {
		fields["payload"] = string(payload)
	} else {
		fields["payload"] = strings.ToValidUTF8(string(payload), "\uFFFD")
		fields["payload_base64"] = base64.StdEncoding.EncodeToString(payload)
	}
	return metric.New(name, tags, fields, t)
}

func init() {
	inputs.Add("omnicore", func() telegraf.Input {
		return &OmniCore{
			Options:                gateway.DefaultOptions(),
			Listen:                 listenAttached,
			MaxUndeliveredMessages: 1000,
			retryMin:               minSubscribeRetry,
		}
	})
}
