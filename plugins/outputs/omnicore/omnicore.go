//go:generate go run github.com/influxdata/telegraf/tools/readme_config_includer@v1.37.2
package omnicore

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
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
	// Debug: the session's connect line tells the devices attached.
	o.Log.Debugf("Attached %d of %d configured devices in %s", len(o.Devices)-failed, len(o.Devices), time.Since(start).Round(time.Millisecond))
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
