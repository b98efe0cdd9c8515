package omnicore

import (
	"context"
	"errors"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/models"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

const (
	events = omnicore.KindEvents
	state  = omnicore.KindState
)

func TestInitErrors(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*OmniCore)
		want   string
	}{
		{"qos 2", func(o *OmniCore) { o.QoS = 2 }, "qos 2 must be 0 or 1"},
		{"negative qos", func(o *OmniCore) { o.QoS = -1 }, "must be 0 or 1"},
		{"unknown layout", func(o *OmniCore) { o.Layout = "field" }, `layout "field"`},
		{"unknown missing_device", func(o *OmniCore) { o.MissingDevice = "keep" }, `missing_device "keep"`},
		{"empty device_id_tag", func(o *OmniCore) { o.DeviceIDTag = "" }, "device_id_tag"},
		{"zero write_timeout", func(o *OmniCore) { o.WriteTimeout = 0 }, "write_timeout"},
		{"unparseable subfolder template", func(o *OmniCore) { o.Subfolder = "{{ .Name" }, "subfolder template"},
		{"constant subfolder with wildcard", func(o *OmniCore) { o.Subfolder = "a/+/b" }, "subfolder"},
		{"constant subfolder with empty level", func(o *OmniCore) { o.Subfolder = "a//b" }, "subfolder"},
		{"bad state_metrics glob", func(o *OmniCore) { o.StateMetrics = []string{"a[", "b*"} }, "state_metrics"},
		{"state_tag same as device_id_tag", func(o *OmniCore) { o.StateTag = "device_id" }, "state_tag"},
		{"subfolder_tag same as state_tag", func(o *OmniCore) { o.StateTag = "kind"; o.SubfolderTag = "kind" }, `"kind" is already used`},
		{"invalid configured device", func(o *OmniCore) { o.Devices = []string{"ok", "bad/id"} }, "devices"},
		{"missing servers", func(o *OmniCore) { o.Servers = nil }, "servers is required"},
		{"missing registry_id", func(o *OmniCore) { o.RegistryID = "" }, "registry_id is required"},
		{"missing gateway_id", func(o *OmniCore) { o.GatewayID = "" }, "gateway_id is required"},
		{"missing subscription_id", func(o *OmniCore) { o.SubscriptionID = "" }, "subscription_id is required"},
		{"missing private_key", func(o *OmniCore) { o.PrivateKey = "" }, "private_key is required"},
		{"unreadable private_key", func(o *OmniCore) { o.PrivateKey = "/nonexistent/key.pem" }, "private_key"},
		{"wrong key algorithm", func(o *OmniCore) { o.Algorithm = omnicore.RS256 }, "private_key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o := factoryPlugin(t)
			tt.mutate(o)
			err := o.Init()
			require.ErrorContains(t, err, tt.want)
		})
	}
}

func TestInitDefaultsSerializer(t *testing.T) {
	o := factoryPlugin(t)
	require.NoError(t, o.Init())
	require.NotNil(t, o.serializer)
	buf, err := o.serializer.Serialize(m("cpu", map[string]string{"host": "a"}, 1))
	require.NoError(t, err)
	require.Equal(t, "cpu,host=a value=1i 1700000001000000000\n", string(buf))
}

// TestSampleConfig loads sample.conf with Telegraf's own config loader, which
// rejects unknown keys, calls SetSerializer for data_format and TLSConfig.
func TestSampleConfig(t *testing.T) {
	c := config.NewConfig()
	require.NoError(t, c.LoadConfigData([]byte((&OmniCore{}).SampleConfig()), config.EmptySourcePath))
	require.Len(t, c.Outputs, 1)
	o, ok := c.Outputs[0].Output.(*OmniCore)
	require.True(t, ok)

	rs, ok := o.serializer.(*models.RunningSerializer)
	require.True(t, ok, "SetSerializer was not called by the loader")
	require.Equal(t, "influx", rs.Config.DataFormat)

	require.Equal(t, []string{"tls://<hostprefix>.mqtt.korewireless.com:8883"}, o.Servers)
	require.Equal(t, "my-subscription", o.SubscriptionID)
	require.Equal(t, "my-registry", o.RegistryID)
	require.Equal(t, "my-gateway", o.GatewayID)
	require.Equal(t, "/etc/telegraf/omnicore/gateway.key", o.PrivateKey)
}

// TestSampleConfigDefaults uncomments every "# key = value" line of
// sample.conf (except the TLS examples) and checks that the result is the
// factory's defaults: the commented values are the real defaults.
func TestSampleConfigDefaults(t *testing.T) {
	commented := regexp.MustCompile(`(?m)^  # ([a-z_]+) = `)
	sample := (&OmniCore{}).SampleConfig()
	var uncommented []string
	conf := commented.ReplaceAllStringFunc(sample, func(s string) string {
		key := commented.FindStringSubmatch(s)[1]
		if strings.HasPrefix(key, "tls_") || key == "insecure_skip_verify" {
			return s
		}
		uncommented = append(uncommented, key)
		return "  " + key + " = "
	})
	for _, key := range []string{"device_id_tag", "missing_device", "devices", "qos", "layout", "subfolder",
		"subfolder_tag", "state_metrics", "state_tag", "write_timeout", "algorithm", "max_inflight", "timeout"} {
		require.Contains(t, uncommented, key)
	}

	c := config.NewConfig()
	require.NoError(t, c.LoadConfigData([]byte(conf), config.EmptySourcePath))
	require.Len(t, c.Outputs, 1)
	loaded := c.Outputs[0].Output.(*OmniCore)
	loaded.serializer = nil
	loaded.Log = nil

	want := factoryPlugin(t)
	want.Log = nil
	want.Servers = []string{"tls://<hostprefix>.mqtt.korewireless.com:8883"}
	want.SubscriptionID = "my-subscription"
	want.RegistryID = "my-registry"
	want.GatewayID = "my-gateway"
	want.PrivateKey = "/etc/telegraf/omnicore/gateway.key"
	want.Algorithm = omnicore.RS256
	// Lists written as [] decode as empty, not nil.
	want.Devices = []string{}
	want.StateMetrics = []string{}
	require.Equal(t, want, loaded)
}

func TestWriteRouting(t *testing.T) {
	tests := []struct {
		name     string
		mutate   func(*OmniCore)
		metrics  []telegraf.Metric
		expected []published
		drops    map[string]uint64
	}{
		{
			name:    "device tag routes to the device's events without the tag",
			metrics: []telegraf.Metric{m("cpu", map[string]string{"device_id": "dev1", "host": "h"}, 1)},
			expected: []published{
				expect(t, "dev1", events, "", m("cpu", map[string]string{"host": "h"}, 1)),
			},
		},
		{
			name:    "custom device tag",
			mutate:  func(o *OmniCore) { o.DeviceIDTag = "source" },
			metrics: []telegraf.Metric{m("cpu", map[string]string{"source": "dev1", "device_id": "x"}, 1)},
			expected: []published{
				expect(t, "dev1", events, "", m("cpu", map[string]string{"device_id": "x"}, 1)),
			},
		},
		{
			name:    "missing device tag is dropped",
			metrics: []telegraf.Metric{m("cpu", map[string]string{"host": "h"}, 1), m("cpu", map[string]string{"device_id": "dev1"}, 2)},
			expected: []published{
				expect(t, "dev1", events, "", m("cpu", nil, 2)),
			},
			drops: map[string]uint64{dropMissingDevice: 1},
		},
		{
			name:    "missing device tag goes to the gateway",
			mutate:  func(o *OmniCore) { o.MissingDevice = missingGateway },
			metrics: []telegraf.Metric{m("cpu", map[string]string{"host": "h"}, 1)},
			expected: []published{
				expect(t, "gw", events, "", m("cpu", map[string]string{"host": "h"}, 1)),
			},
		},
		{
			name:    "subfolder template on the metric name",
			mutate:  func(o *OmniCore) { o.Subfolder = "{{ .Name }}" },
			metrics: []telegraf.Metric{m("cpu", map[string]string{"device_id": "dev1"}, 1)},
			expected: []published{
				expect(t, "dev1", events, "cpu", m("cpu", nil, 1)),
			},
		},
		{
			name:   "subfolder template with tag and field accessors",
			mutate: func(o *OmniCore) { o.Subfolder = `{{ .Tag "sensor" }}/v{{ .Field "value" }}` },
			metrics: []telegraf.Metric{
				m("temp", map[string]string{"device_id": "dev1", "sensor": "t1"}, 7),
			},
			expected: []published{
				expect(t, "dev1", events, "t1/v7", m("temp", map[string]string{"sensor": "t1"}, 7)),
			},
		},
		{
			name:    "subfolder template with Sprig functions",
			mutate:  func(o *OmniCore) { o.Subfolder = `{{ .Name | upper }}/{{ .Tag "sensor" | default "all" }}` },
			metrics: []telegraf.Metric{m("temp", map[string]string{"device_id": "dev1"}, 1)},
			expected: []published{
				expect(t, "dev1", events, "TEMP/all", m("temp", nil, 1)),
			},
		},
		{
			name:    "subfolder template rendering empty uses the plain events topic",
			mutate:  func(o *OmniCore) { o.Subfolder = `{{ .Tag "sensor" }}` },
			metrics: []telegraf.Metric{m("temp", map[string]string{"device_id": "dev1"}, 1)},
			expected: []published{
				expect(t, "dev1", events, "", m("temp", nil, 1)),
			},
		},
		{
			name:   "subfolder template rendering an empty level is refused",
			mutate: func(o *OmniCore) { o.Subfolder = `{{ .Tag "a" }}/{{ .Tag "b" }}` },
			metrics: []telegraf.Metric{
				m("temp", map[string]string{"device_id": "dev1", "a": "x"}, 1),
				m("temp", map[string]string{"device_id": "dev1", "a": "x", "b": "y"}, 2),
			},
			expected: []published{
				expect(t, "dev1", events, "x/y", m("temp", map[string]string{"a": "x", "b": "y"}, 2)),
			},
			drops: map[string]uint64{dropInvalidSubfolder: 1},
		},
		{
			name:   "subfolder template rendering wildcards or dot levels is refused",
			mutate: func(o *OmniCore) { o.Subfolder = `{{ .Tag "a" }}` },
			metrics: []telegraf.Metric{
				m("temp", map[string]string{"device_id": "dev1", "a": "+"}, 1),
				m("temp", map[string]string{"device_id": "dev1", "a": "x/#"}, 2),
				m("temp", map[string]string{"device_id": "dev1", "a": "../x"}, 3),
				m("temp", map[string]string{"device_id": "dev1", "a": "ok"}, 4),
			},
			expected: []published{
				expect(t, "dev1", events, "ok", m("temp", map[string]string{"a": "ok"}, 4)),
			},
			drops: map[string]uint64{dropInvalidSubfolder: 3},
		},
		{
			name:    "subfolder template failing at execution is refused",
			mutate:  func(o *OmniCore) { o.Subfolder = `{{ .Name.Foo }}` },
			metrics: []telegraf.Metric{m("temp", map[string]string{"device_id": "dev1"}, 1)},
			drops:   map[string]uint64{dropInvalidSubfolder: 1},
		},
		{
			name: "subfolder tag overrides the template and is not in the payload",
			mutate: func(o *OmniCore) {
				o.Subfolder = "{{ .Name }}"
				o.SubfolderTag = "folder"
			},
			metrics: []telegraf.Metric{
				m("temp", map[string]string{"device_id": "dev1", "folder": "a/b"}, 1),
				m("temp", map[string]string{"device_id": "dev1"}, 2),
			},
			expected: []published{
				expect(t, "dev1", events, "a/b", m("temp", nil, 1)),
				expect(t, "dev1", events, "temp", m("temp", nil, 2)),
			},
		},
		{
			name:   "invalid subfolder tag values are refused",
			mutate: func(o *OmniCore) { o.SubfolderTag = "folder" },
			metrics: []telegraf.Metric{
				m("temp", map[string]string{"device_id": "dev1", "folder": "a/#"}, 1),
				m("temp", map[string]string{"device_id": "dev1", "folder": ""}, 2),
				m("temp", map[string]string{"device_id": "dev1", "folder": "a/"}, 3),
			},
			drops: map[string]uint64{dropInvalidSubfolder: 3},
		},
		{
			name:   "state by metric name glob",
			mutate: func(o *OmniCore) { o.StateMetrics = []string{"status*"}; o.Subfolder = "{{ .Name }}" },
			metrics: []telegraf.Metric{
				m("status_fw", map[string]string{"device_id": "dev1"}, 1),
				m("temp", map[string]string{"device_id": "dev1"}, 1),
			},
			expected: []published{
				expect(t, "dev1", state, "", m("status_fw", nil, 1)),
				expect(t, "dev1", events, "temp", m("temp", nil, 1)),
			},
		},
		{
			name:   "state by tag; the tag is not in the payload",
			mutate: func(o *OmniCore) { o.StateTag = "kind" },
			metrics: []telegraf.Metric{
				m("fw", map[string]string{"device_id": "dev1", "kind": "state"}, 1),
				m("temp", map[string]string{"device_id": "dev1", "kind": "telemetry"}, 1),
				m("temp", map[string]string{"device_id": "dev2"}, 1),
			},
			expected: []published{
				expect(t, "dev1", state, "", m("fw", nil, 1)),
				expect(t, "dev1", events, "", m("temp", nil, 1)),
				expect(t, "dev2", events, "", m("temp", nil, 1)),
			},
		},
		{
			name:   "only the latest state of a device per write",
			mutate: func(o *OmniCore) { o.StateMetrics = []string{"status"} },
			metrics: []telegraf.Metric{
				m("status", map[string]string{"device_id": "dev1"}, 1),
				m("status", map[string]string{"device_id": "dev1"}, 3),
				m("status", map[string]string{"device_id": "dev2"}, 1),
				m("status", map[string]string{"device_id": "dev1"}, 2),
			},
			expected: []published{
				expect(t, "dev1", state, "", m("status", nil, 3)),
				expect(t, "dev2", state, "", m("status", nil, 1)),
			},
			drops: map[string]uint64{dropStateCoalesced: 2},
		},
		{
			name:    "state of the gateway itself",
			mutate:  func(o *OmniCore) { o.StateMetrics = []string{"status"}; o.MissingDevice = missingGateway },
			metrics: []telegraf.Metric{m("status", nil, 1)},
			expected: []published{
				expect(t, "gw", state, "", m("status", nil, 1)),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn := gatewaytest.New("gw")
			mutate := []func(*OmniCore){}
			if tt.mutate != nil {
				mutate = append(mutate, tt.mutate)
			}
			o := newPlugin(t, conn, mutate...)
			require.NoError(t, o.Write(tt.metrics))
			require.Equal(t, strs(tt.expected...), decode(t, conn.Published()))
			drops := tt.drops
			if drops == nil {
				drops = map[string]uint64{}
			}
			require.Equal(t, drops, conn.Drops())
		})
	}
}

func TestHostileDeviceTags(t *testing.T) {
	tests := []struct {
		name   string
		device string
	}{
		{"slash", "a/b"},
		{"leading slash", "/reg/other"},
		{"plus", "a+b"},
		{"hash", "a#"},
		{"dot dot", "a..b"},
		{"only dot dot", ".."},
		{"empty", ""},
		{"over 256 bytes", "d" + strings.Repeat("x", 256)},
		{"invalid UTF-8", "d\xff\xfe"},
		{"space", "a b"},
		{"NUL", "a\x00b"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn := gatewaytest.New("gw")
			o := newPlugin(t, conn, func(o *OmniCore) { o.StateMetrics = []string{"status"} })
			err := o.Write([]telegraf.Metric{
				m("cpu", map[string]string{"device_id": tt.device}, 1),
				m("status", map[string]string{"device_id": tt.device}, 1),
				m("cpu", map[string]string{"device_id": "good"}, 2),
			})
			require.NoError(t, err)
			require.Equal(t, strs(expect(t, "good", events, "", m("cpu", nil, 2))), decode(t, conn.Published()))
			require.Equal(t, map[string]uint64{dropInvalidDevice: 2}, conn.Drops())
			require.Equal(t, 1, logOf(o).count("W", "not a valid device ID"), logOf(o).String())
		})
	}
}

func TestDropWarningsAreRateLimited(t *testing.T) {
	conn := gatewaytest.New("gw")
	o := newPlugin(t, conn)
	var batch []telegraf.Metric
	for i := range 100 {
		batch = append(batch, m("cpu", map[string]string{"device_id": "bad/" + string(rune('a'+i%26))}, i))
		batch = append(batch, m("cpu", map[string]string{"host": "no-device"}, i))
	}
	require.NoError(t, o.Write(batch))
	require.NoError(t, o.Write([]telegraf.Metric{m("cpu", map[string]string{"device_id": "a+b"}, 1)}))
	require.Equal(t, map[string]uint64{dropInvalidDevice: 101, dropMissingDevice: 100}, conn.Drops())
	require.Equal(t, 1, logOf(o).count("W", "not a valid device ID"), logOf(o).String())
	require.Equal(t, 1, logOf(o).count("W", "without the device tag"), logOf(o).String())
	require.Equal(t, 1, logOf(o).count("D", "Write of 200 metrics: 0 messages, 0 published (0 metrics), dropped invalid_device=100 missing_device=100"), logOf(o).String())
}

func TestLayouts(t *testing.T) {
	batch := []telegraf.Metric{
		m("cpu", map[string]string{"device_id": "dev1", "sensor": "a"}, 1),
		m("cpu", map[string]string{"device_id": "dev1"}, 2),
		m("mem", map[string]string{"device_id": "dev1"}, 3),
		m("cpu", map[string]string{"device_id": "dev2"}, 1),
		m("status", map[string]string{"device_id": "dev1"}, 1),
	}
	tests := []struct {
		layout   string
		expected []published
	}{
		{
			layout: layoutNonBatch,
			expected: []published{
				expect(t, "dev1", events, "cpu", m("cpu", map[string]string{"sensor": "a"}, 1)),
				expect(t, "dev1", events, "cpu", m("cpu", nil, 2)),
				expect(t, "dev1", events, "mem", m("mem", nil, 3)),
				expect(t, "dev2", events, "cpu", m("cpu", nil, 1)),
				expect(t, "dev1", state, "", m("status", nil, 1)),
			},
		},
		{
			layout: layoutBatch,
			expected: []published{
				expect(t, "dev1", events, "cpu", m("cpu", map[string]string{"sensor": "a"}, 1), m("cpu", nil, 2)),
				expect(t, "dev1", events, "mem", m("mem", nil, 3)),
				expect(t, "dev2", events, "cpu", m("cpu", nil, 1)),
				expect(t, "dev1", state, "", m("status", nil, 1)),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.layout, func(t *testing.T) {
			conn := gatewaytest.New("gw")
			o := newPlugin(t, conn, func(o *OmniCore) {
				o.Layout = tt.layout
				o.Subfolder = "{{ .Name }}"
				o.StateMetrics = []string{"status"}
			})
			require.NoError(t, o.Write(batch))
			require.Equal(t, strs(tt.expected...), decode(t, conn.Published()))
		})
	}
}

// TestSizeLimits checks the bridge's payload limits at their edges, in both
// layouts: a payload of exactly the limit goes, one byte more is refused (a
// single metric) or split (a batch), and the other metrics always go.
func TestSizeLimits(t *testing.T) {
	const tele, st = omnicore.MaxTelemetryBytes, omnicore.MaxStateBytes
	dev1 := map[string]string{"device_id": "dev1"}
	dev2 := map[string]string{"device_id": "dev2"}
	small := func() telegraf.Metric { return m("small", dev2, 1) }
	tests := []struct {
		name     string
		layout   string
		metrics  []telegraf.Metric
		messages map[string][]int // device/kind -> metrics per message
		refused  []int            // indexes of the metrics refused as too large
	}{
		{
			name:     "non-batch telemetry at the limit",
			layout:   layoutNonBatch,
			metrics:  []telegraf.Metric{sized(t, "big", dev1, tele, 1), small()},
			messages: map[string][]int{"dev1/events": {1}, "dev2/events": {1}},
		},
		{
			name:     "non-batch telemetry one byte over is refused",
			layout:   layoutNonBatch,
			metrics:  []telegraf.Metric{sized(t, "big", dev1, tele+1, 1), small()},
			messages: map[string][]int{"dev2/events": {1}},
			refused:  []int{0},
		},
		{
			name:     "non-batch state at the limit",
			layout:   layoutNonBatch,
			metrics:  []telegraf.Metric{sized(t, "status", dev1, st, 1), small()},
			messages: map[string][]int{"dev1/state": {1}, "dev2/events": {1}},
		},
		{
			name:     "non-batch state one byte over is refused",
			layout:   layoutNonBatch,
			metrics:  []telegraf.Metric{sized(t, "status", dev1, st+1, 1), small()},
			messages: map[string][]int{"dev2/events": {1}},
			refused:  []int{0},
		},
		{
			name:   "batch exactly at the limit is one message",
			layout: layoutBatch,
			metrics: []telegraf.Metric{
				sized(t, "a", dev1, tele/4, 1), sized(t, "a", dev1, tele/4, 2),
				sized(t, "a", dev1, tele/4, 3), sized(t, "a", dev1, tele/4, 4), small(),
			},
			messages: map[string][]int{"dev1/events": {4}, "dev2/events": {1}},
		},
		{
			name:   "batch one byte over the limit is split",
			layout: layoutBatch,
			metrics: []telegraf.Metric{
				sized(t, "a", dev1, tele/4, 1), sized(t, "a", dev1, tele/4, 2),
				sized(t, "a", dev1, tele/4, 3), sized(t, "a", dev1, tele/4+1, 4), small(),
			},
			messages: map[string][]int{"dev1/events": {3, 1}, "dev2/events": {1}},
		},
		{
			name:     "batch of many small metrics is split into full messages",
			layout:   layoutBatch,
			metrics:  append(repeatSized(t, "a", dev1, 1000, 1000), small()),
			messages: map[string][]int{"dev1/events": {262, 262, 262, 214}, "dev2/events": {1}},
		},
		{
			name:   "batch with one oversize metric refuses only that one",
			layout: layoutBatch,
			metrics: []telegraf.Metric{
				sized(t, "a", dev1, 100, 1), sized(t, "a", dev1, tele+1, 2), sized(t, "a", dev1, 100, 3), small(),
			},
			messages: map[string][]int{"dev1/events": {2}, "dev2/events": {1}},
			refused:  []int{1},
		},
		{
			name:     "batch state at the limit",
			layout:   layoutBatch,
			metrics:  []telegraf.Metric{sized(t, "status", dev1, st, 1), small()},
			messages: map[string][]int{"dev1/state": {1}, "dev2/events": {1}},
		},
		{
			name:     "batch state one byte over is refused",
			layout:   layoutBatch,
			metrics:  []telegraf.Metric{sized(t, "status", dev1, st+1, 1), small()},
			messages: map[string][]int{"dev2/events": {1}},
			refused:  []int{0},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn := gatewaytest.New("gw")
			o := newPlugin(t, conn, func(o *OmniCore) {
				o.Layout = tt.layout
				o.StateMetrics = []string{"status"}
			})
			require.NoError(t, o.Write(tt.metrics))

			got := make(map[string][]int)
			var sent []string
			for _, msg := range conn.Published() {
				require.LessOrEqual(t, len(msg.Payload), limit(msg.Kind))
				ms := parse(t, msg.Payload)
				key := msg.Device + "/" + string(msg.Kind)
				got[key] = append(got[key], len(ms))
				sent = append(sent, lines(t, ms...)...)
			}
			// Concurrent publishing may reorder a device's messages.
			for _, counts := range got {
				slices.Sort(counts)
			}
			for _, counts := range tt.messages {
				slices.Sort(counts)
			}
			require.Equal(t, tt.messages, got)

			// Every metric that was not refused arrives exactly once.
			var want []string
			for i, m := range tt.metrics {
				if !slices.Contains(tt.refused, i) {
					want = append(want, lines(t, stripped(m))...)
				}
			}
			require.ElementsMatch(t, want, sent)

			if len(tt.refused) == 0 {
				require.Empty(t, conn.Drops())
				return
			}
			require.Equal(t, map[string]uint64{dropTooLarge: uint64(len(tt.refused))}, conn.Drops())
			require.Equal(t, 1, logOf(o).count("W", `of device "dev1": its`), logOf(o).String())
			require.Equal(t, 1, logOf(o).count("W", "over the bridge's limit"), logOf(o).String())
		})
	}
}

func repeatSized(t *testing.T, name string, tags map[string]string, size, n int) []telegraf.Metric {
	out := make([]telegraf.Metric, n)
	for i := range out {
		out[i] = sized(t, name, tags, size, i)
	}
	return out
}

func stripped(m telegraf.Metric) telegraf.Metric {
	c := m.Copy()
	c.RemoveTag("device_id")
	return c
}

func lines(t *testing.T, ms ...telegraf.Metric) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = canonical(t, m)
	}
	return out
}

func TestRefusedDeviceDoesNotBlockOthers(t *testing.T) {
	conn := gatewaytest.New("gw")
	conn.Refuse("unbound", "device is not bound to the gateway")
	o := newPlugin(t, conn, func(o *OmniCore) { o.StateMetrics = []string{"status"} })
	batch := []telegraf.Metric{
		m("cpu", map[string]string{"device_id": "unbound"}, 1),
		m("cpu", map[string]string{"device_id": "dev1"}, 1),
		m("cpu", map[string]string{"device_id": "unbound"}, 2),
		m("status", map[string]string{"device_id": "unbound"}, 2),
		m("cpu", map[string]string{"device_id": "dev2"}, 1),
	}
	require.NoError(t, o.Write(batch))
	require.Equal(t, strs(
		expect(t, "dev1", events, "", m("cpu", nil, 1)),
		expect(t, "dev2", events, "", m("cpu", nil, 1)),
	), decode(t, conn.Published()))
	require.Equal(t, map[string]uint64{dropAttachRefused: 3}, conn.Drops())
	require.Equal(t, 1, logOf(o).count("W", `device "unbound"`), logOf(o).String())
	require.Equal(t, 1, logOf(o).count("W", "not bound to the gateway"), logOf(o).String())
}

// TestTransientFailureRetriesOnlyUnacknowledged: a message that cannot be
// delivered within write_timeout fails the Write, whose error says which
// metrics are settled (acknowledged or given up on); the execd binary
// writes the rest again, which sends only what was not acknowledged.
func TestTransientFailureRetriesOnlyUnacknowledged(t *testing.T) {
	conn := &blockingConn{Conn: gatewaytest.New("gw"), blocked: map[string]bool{"slow": true}}
	o := newPlugin(t, conn, func(o *OmniCore) {
		o.WriteTimeout = config.Duration(100 * time.Millisecond)
		o.StateMetrics = []string{"status"}
	})
	batch := []telegraf.Metric{
		m("cpu", map[string]string{"device_id": "fast"}, 1),
		m("cpu", map[string]string{"device_id": "slow"}, 1),
		m("status", map[string]string{"device_id": "fast"}, 1),
		m("status", map[string]string{"device_id": "fast"}, 2),
		m("cpu", map[string]string{"device_id": "bad/id"}, 1),
	}
	err := o.Write(batch)
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.ErrorContains(t, err, "1 of 3 messages not acknowledged within write_timeout")
	require.Equal(t, strs(
		expect(t, "fast", events, "", m("cpu", nil, 1)),
		expect(t, "fast", state, "", m("status", nil, 2)),
	), decode(t, conn.Published()))
	require.Equal(t, map[string]uint64{dropInvalidDevice: 1, dropStateCoalesced: 1}, conn.Drops())
	for _, m := range batch {
		_, ok := m.GetTag("device_id")
		require.True(t, ok, "Write modified a metric Telegraf will retry")
	}
	var se interface{ Settled() (accept, reject []int) }
	require.ErrorAs(t, err, &se)
	accept, reject := se.Settled()
	require.Equal(t, []int{0, 3}, accept)
	require.Equal(t, []int{2, 4}, reject)

	conn.unblock("slow")
	require.NoError(t, o.Write([]telegraf.Metric{batch[1]}))
	require.Equal(t, strs(
		expect(t, "fast", events, "", m("cpu", nil, 1)),
		expect(t, "fast", state, "", m("status", nil, 2)),
		expect(t, "slow", events, "", m("cpu", nil, 1)),
	), decode(t, conn.Published()))
	require.Equal(t, map[string]uint64{dropInvalidDevice: 1, dropStateCoalesced: 1}, conn.Drops())
}

// Writes may run concurrently (the execd binary overlaps them): every
// message is published once, and the batches with a state message are the
// ones Overlappable refuses.
func TestConcurrentWrites(t *testing.T) {
	conn := gatewaytest.New("gw")
	o := newPlugin(t, conn, func(o *OmniCore) { o.StateMetrics = []string{"status"} })
	const writers, perWrite = 8, 50
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	var want []string
	for w := range writers {
		var batch []telegraf.Metric
		for i := range perWrite {
			dev := "dev-" + strconv.Itoa(i%7)
			batch = append(batch, m("cpu", map[string]string{"device_id": dev}, w*perWrite+i))
			want = append(want, expect(t, dev, events, "", m("cpu", nil, w*perWrite+i)).String())
		}
		require.True(t, o.Overlappable(batch))
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- o.Write(batch)
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	require.ElementsMatch(t, want, decode(t, conn.Published()))

	require.False(t, o.Overlappable([]telegraf.Metric{
		m("cpu", map[string]string{"device_id": "a"}, 1),
		m("status", map[string]string{"device_id": "a"}, 1),
	}))
	o.StateTag = "omnicore_kind"
	require.False(t, o.Overlappable([]telegraf.Metric{m("cpu", map[string]string{"device_id": "a", "omnicore_kind": "state"}, 1)}))
}

// blockingConn never acknowledges publishes for blocked devices: Publish
// waits until the context ends, as the session does while the bridge is down.
type blockingConn struct {
	*gatewaytest.Conn
	mu      sync.Mutex
	blocked map[string]bool
}

func (c *blockingConn) Publish(ctx context.Context, msg gateway.Message) error {
	c.mu.Lock()
	blocked := c.blocked[msg.Device]
	c.mu.Unlock()
	if blocked {
		<-ctx.Done()
		return ctx.Err()
	}
	return c.Conn.Publish(ctx, msg)
}

func (c *blockingConn) unblock(device string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.blocked, device)
}

// barrierConn makes Attach and Publish wait until n calls are in progress at
// once: it proves that the plugin issues them concurrently (one by one they
// would never get there, and fail when the barrier's 10 s are up).
type barrierConn struct {
	*gatewaytest.Conn
	n       int32
	waiting atomic.Int32
	entered chan struct{} // one value per call that reached the barrier
	full    chan struct{}
	once    sync.Once
	expired chan struct{} // closed 10 s after the barrier was made
}

func newBarrierConn(n int) *barrierConn {
	c := &barrierConn{
		Conn:    gatewaytest.New("gw"),
		n:       int32(n),
		entered: make(chan struct{}, 2*n),
		full:    make(chan struct{}),
		expired: make(chan struct{}),
	}
	time.AfterFunc(10*time.Second, func() { close(c.expired) })
	return c
}

func (c *barrierConn) wait(ctx context.Context) error {
	c.entered <- struct{}{}
	if c.waiting.Add(1) >= c.n {
		c.once.Do(func() { close(c.full) })
	}
	select {
	case <-c.full:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.expired:
		return errors.New("calls were not concurrent")
	}
}

func (c *barrierConn) Attach(ctx context.Context, device string) error {
	if err := c.wait(ctx); err != nil {
		return err
	}
	return c.Conn.Attach(ctx, device)
}

func (c *barrierConn) Publish(ctx context.Context, msg gateway.Message) error {
	if err := c.wait(ctx); err != nil {
		return err
	}
	return c.Conn.Publish(ctx, msg)
}

func TestConnectAttachesDevicesConcurrently(t *testing.T) {
	devices := make([]string, 50)
	for i := range devices {
		devices[i] = "dev" + string(rune('A'+i%26)) + string(rune('a'+i/26))
	}
	conn := newBarrierConn(len(devices))
	conn.Refuse(devices[7], "not bound")
	o := newPlugin(t, conn, func(o *OmniCore) { o.Devices = devices })

	attached := make(chan struct{})
	go func() {
		o.attachingWG.Wait()
		close(attached)
	}()
	select {
	case <-attached:
	case <-time.After(15 * time.Second):
		t.Fatal("the configured devices were not attached")
	}
	require.Equal(t, 1, logOf(o).count("D", "Attached 49 of 50 configured devices"), logOf(o).String())
	for i, d := range devices {
		require.Equal(t, i != 7, conn.Attached(d), d)
	}
	require.Equal(t, 1, logOf(o).count("W", `Attaching device "`+devices[7]+`" failed`), logOf(o).String())
}

func TestWritePublishesConcurrently(t *testing.T) {
	const n = 40
	conn := newBarrierConn(n)
	o := newPlugin(t, conn)
	batch := make([]telegraf.Metric, n)
	for i := range batch {
		batch[i] = m("cpu", map[string]string{"device_id": "dev1"}, i)
	}
	require.NoError(t, o.Write(batch))
	require.Len(t, conn.Published(), n)
}

func TestCloseStopsEagerAttach(t *testing.T) {
	conn := newBarrierConn(1000) // never full: every Attach waits
	o := factoryPlugin(t)
	o.acquire = func(*gateway.Config) (gateway.Conn, func(), error) { return conn, func() {}, nil }
	o.Devices = []string{"dev1", "dev2"}
	require.NoError(t, o.Init())
	require.NoError(t, o.Connect())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// Wait until both attaches are under way, then Close must end them.
	for range 2 {
		select {
		case <-conn.entered:
		case <-ctx.Done():
			t.Fatal("attaches did not start")
		}
	}
	closed := make(chan error)
	go func() { closed <- o.Close() }()
	select {
	case err := <-closed:
		require.NoError(t, err)
	case <-ctx.Done():
		t.Fatal("Close waited for the attaches")
	}
	require.Zero(t, logOf(o).count("W", "Attaching device"), logOf(o).String())
}

func TestQoS(t *testing.T) {
	for _, qos := range []int{0, 1} {
		conn := gatewaytest.New("gw")
		o := newPlugin(t, conn, func(o *OmniCore) { o.QoS = qos })
		require.NoError(t, o.Write([]telegraf.Metric{m("cpu", map[string]string{"device_id": "dev1"}, 1)}))
		msgs := conn.Published()
		require.Len(t, msgs, 1)
		require.Equal(t, byte(qos), msgs[0].QoS)
	}
}

// TestTrackingMetricsAreNotHeld: removing the routing tags must not copy a
// tracking metric's delivery reference, or Telegraf would wait forever for
// its delivery (inputs with tracking would stall).
func TestTrackingMetricsAreNotHeld(t *testing.T) {
	conn := gatewaytest.New("gw")
	o := newPlugin(t, conn)
	delivered := make(chan telegraf.DeliveryInfo, 1)
	tm, _ := metric.WithTracking(m("cpu", map[string]string{"device_id": "dev1"}, 1), func(di telegraf.DeliveryInfo) { delivered <- di })
	require.NoError(t, o.Write([]telegraf.Metric{tm}))
	require.Len(t, conn.Published(), 1)
	tm.Accept()
	select {
	case di := <-delivered:
		require.True(t, di.Delivered())
	default:
		t.Fatal("the tracking metric was not delivered after Accept: Write kept a reference")
	}
}

func TestWriteBeforeConnect(t *testing.T) {
	o := factoryPlugin(t)
	require.NoError(t, o.Init())
	require.ErrorContains(t, o.Write([]telegraf.Metric{m("cpu", nil, 1)}), "not connected")
	require.NoError(t, o.Write(nil))
}

// TestLayoutAuto checks how layout auto packs: one metric per message while
// the Write fits in what max_message_rate lets go at once (a tenth of a
// second's worth; always without a rate), packed just enough to fit when it
// does not, never across destinations.
func TestLayoutAuto(t *testing.T) {
	dev := func(d string, sec int) telegraf.Metric { return m("cpu", map[string]string{"device_id": d}, sec) }
	tests := []struct {
		name     string
		rate     float64
		batch    []telegraf.Metric
		expected []published
	}{
		{
			name:  "no rate: one metric per message",
			batch: []telegraf.Metric{dev("dev1", 1), dev("dev1", 2), dev("dev2", 1)},
			expected: []published{
				expect(t, "dev1", events, "", m("cpu", nil, 1)),
				expect(t, "dev1", events, "", m("cpu", nil, 2)),
				expect(t, "dev2", events, "", m("cpu", nil, 1)),
			},
		},
		{
			name:  "within the budget: one metric per message",
			rate:  30,
			batch: []telegraf.Metric{dev("dev1", 1), dev("dev1", 2), dev("dev2", 1)},
			expected: []published{
				expect(t, "dev1", events, "", m("cpu", nil, 1)),
				expect(t, "dev1", events, "", m("cpu", nil, 2)),
				expect(t, "dev2", events, "", m("cpu", nil, 1)),
			},
		},
		{
			name: "over the budget: each destination packed to its share",
			rate: 20,
			batch: []telegraf.Metric{dev("dev1", 1), dev("dev1", 2), dev("dev1", 3), dev("dev1", 4),
				dev("dev1", 5), dev("dev1", 6), dev("dev2", 1), dev("dev2", 2)},
			expected: []published{
				expect(t, "dev1", events, "", m("cpu", nil, 1), m("cpu", nil, 2), m("cpu", nil, 3), m("cpu", nil, 4), m("cpu", nil, 5), m("cpu", nil, 6)),
				expect(t, "dev2", events, "", m("cpu", nil, 1), m("cpu", nil, 2)),
			},
		},
		{
			name: "a large share is split into parts: 4 messages for a budget of 4",
			rate: 40,
			batch: []telegraf.Metric{dev("dev1", 1), dev("dev1", 2), dev("dev1", 3), dev("dev1", 4),
				dev("dev1", 5), dev("dev1", 6), dev("dev2", 1), dev("dev2", 2)},
			expected: []published{
				expect(t, "dev1", events, "", m("cpu", nil, 1), m("cpu", nil, 2)),
				expect(t, "dev1", events, "", m("cpu", nil, 3), m("cpu", nil, 4)),
				expect(t, "dev1", events, "", m("cpu", nil, 5), m("cpu", nil, 6)),
				expect(t, "dev2", events, "", m("cpu", nil, 1), m("cpu", nil, 2)),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conn := gatewaytest.New("gw")
			o := newPlugin(t, conn, func(o *OmniCore) {
				o.Layout = layoutAuto
				o.MaxMessageRate = tt.rate
			})
			require.NoError(t, o.Write(tt.batch))
			// The workers send concurrently: compare as sets.
			require.ElementsMatch(t, strs(tt.expected...), decode(t, conn.Published()))
		})
	}
}

// TestLayoutAutoSplitsAtTheLimit: a packed group larger than the bridge's
// telemetry limit goes out in several messages, and every metric arrives.
func TestLayoutAutoSplitsAtTheLimit(t *testing.T) {
	conn := gatewaytest.New("gw")
	o := newPlugin(t, conn, func(o *OmniCore) {
		o.Layout = layoutAuto
		o.MaxMessageRate = 1
	})
	tags := map[string]string{"device_id": "dev1"}
	var batch []telegraf.Metric
	for i := range 6 {
		batch = append(batch, sized(t, "big", tags, 100_000, i))
	}
	require.NoError(t, o.Write(batch))
	pub := conn.Published()
	require.Len(t, pub, 3, "600 KB of one device in messages of at most 256 KB")
	n := 0
	for _, p := range pub {
		require.LessOrEqual(t, len(p.Payload), omnicore.MaxTelemetryBytes)
		n += len(parse(t, p.Payload))
	}
	require.Equal(t, len(batch), n)
}
