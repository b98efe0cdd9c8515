package omnicore

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/inputs"
	_ "github.com/influxdata/telegraf/plugins/parsers/csv"
	influxparser "github.com/influxdata/telegraf/plugins/parsers/influx"
	_ "github.com/influxdata/telegraf/plugins/parsers/json"
	_ "github.com/influxdata/telegraf/plugins/parsers/value"
	influxserializer "github.com/influxdata/telegraf/plugins/serializers/influx"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

const (
	testRegistry = "reg"
	testGateway  = "gw"
)

// received is the arrival time the tests give inbound messages.
var received = time.Unix(1700000000, 0)

// writeKey writes a gateway key for Init to load.
func writeKey(t *testing.T) string {
	t.Helper()
	path, _, err := omnicore.WriteKeyPair(t.TempDir(), "gateway", omnicore.ES256)
	require.NoError(t, err)
	return path
}

// fakeAcquire makes the plugin use conn instead of a real session and counts
// the releases.
func fakeAcquire(conn gateway.Conn, releases *int) func(*gateway.Config) (gateway.Conn, func(), error) {
	var mu sync.Mutex
	return func(*gateway.Config) (gateway.Conn, func(), error) {
		return conn, func() {
			mu.Lock()
			defer mu.Unlock()
			if releases != nil {
				*releases++
			}
		}, nil
	}
}

// newPlugin builds the plugin from the factory, as Telegraf does, with a
// fake gateway connection.
func newPlugin(t *testing.T, mutate func(*OmniCore)) (*OmniCore, *gatewaytest.Conn) {
	t.Helper()
	p := inputs.Inputs["omnicore"]().(*OmniCore)
	p.Servers = []string{"tls://127.0.0.1:8883"}
	p.SubscriptionID = "sub"
	p.RegistryID = testRegistry
	p.GatewayID = testGateway
	p.PrivateKey = writeKey(t)
	p.Algorithm = omnicore.ES256
	p.Log = testutil.Logger{Name: "inputs.omnicore"}
	fake := gatewaytest.New(testGateway)
	p.acquire = fakeAcquire(fake, nil)
	if mutate != nil {
		mutate(p)
	}
	require.NoError(t, p.Init())
	return p, fake
}

// loadPlugin builds the plugin with Telegraf's config loader, which is what
// the execd binary does: it decodes the options and hands the plugin a
// parser factory for data_format.
func loadPlugin(t *testing.T, options string) (*OmniCore, *gatewaytest.Conn) {
	t.Helper()
	toml := fmt.Sprintf(`
[[inputs.omnicore]]
  servers = ["tls://127.0.0.1:8883"]
  subscription_id = "sub"
  registry_id = %q
  gateway_id = %q
  private_key = %q
  algorithm = "ES256"
%s
`, testRegistry, testGateway, writeKey(t), options)
	c := config.NewConfig()
	require.NoError(t, c.LoadConfigData([]byte(toml), ""))
	require.Len(t, c.Inputs, 1)
	p, ok := c.Inputs[0].Input.(*OmniCore)
	require.True(t, ok)
	p.Log = testutil.Logger{Name: "inputs.omnicore"}
	fake := gatewaytest.New(testGateway)
	p.acquire = fakeAcquire(fake, nil)
	require.NoError(t, p.Init())
	return p, fake
}

// start starts the plugin and waits until it has registered want handlers
// with the fake and the listed devices are attached.
func start(t *testing.T, p *OmniCore, fake *gatewaytest.Conn, acc telegraf.Accumulator, want int) {
	t.Helper()
	require.NoError(t, p.Start(acc))
	t.Cleanup(p.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, fake.WaitFor(ctx, func() bool {
		for _, d := range p.Devices {
			if !fake.Attached(d) && d != testGateway {
				return false
			}
		}
		return fake.Subscribers() == want
	}), "subscribers: got %d, want %d", fake.Subscribers(), want)
}

// waitMetrics waits, bounded, until acc holds n metrics.
func waitMetrics(t *testing.T, acc *testutil.Accumulator, n int) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		acc.Wait(n)
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("timed out waiting for %d metrics, have %d", n, acc.NMetrics())
	}
}

func tags(device, kind string, extra ...string) map[string]string {
	m := map[string]string{"gateway_id": testGateway, "registry_id": testRegistry, "device_id": device, "kind": kind}
	for i := 0; i+1 < len(extra); i += 2 {
		m[extra[i]] = extra[i+1]
	}
	return m
}

func configMsg(device, payload string) gateway.Inbound {
	return gateway.Inbound{Device: device, Kind: omnicore.KindConfig, Payload: []byte(payload), Received: received,
		Topic: omnicore.Topic(testRegistry, device, omnicore.KindConfig, "")}
}

func commandMsg(device, subfolder, payload string) gateway.Inbound {
	return gateway.Inbound{Device: device, Kind: omnicore.KindCommands, Subfolder: subfolder, Payload: []byte(payload),
		Received: received, Topic: omnicore.Topic(testRegistry, device, omnicore.KindCommands, subfolder)}
}

func errorMsg(payload string) gateway.Inbound {
	return gateway.Inbound{Device: testGateway, Kind: omnicore.KindErrors, Payload: []byte(payload), Received: received,
		Topic: omnicore.Topic(testRegistry, testGateway, omnicore.KindErrors, "")}
}

// ---------------------------------------------------------------------------
// Configuration

func TestSampleConfigLoadsAndDefaultsMatchFactory(t *testing.T) {
	// The sample as shipped loads with Telegraf's config loader.
	c := config.NewConfig()
	require.NoError(t, c.LoadConfigData([]byte(sampleConfig), ""))
	require.Len(t, c.Inputs, 1)

	// Uncommenting every "# key = value" line (except the TLS examples)
	// gives exactly the factory defaults.
	commented := regexp.MustCompile(`^  # ([a-z_]+) = `)
	var lines []string
	uncommented := 0
	for _, line := range strings.Split(sampleConfig, "\n") {
		if m := commented.FindStringSubmatch(line); m != nil && !strings.HasPrefix(m[1], "tls_") {
			line = "  " + strings.TrimPrefix(line, "  # ")
			uncommented++
		}
		lines = append(lines, line)
	}
	require.GreaterOrEqual(t, uncommented, 18)
	c = config.NewConfig()
	require.NoError(t, c.LoadConfigData([]byte(strings.Join(lines, "\n")), ""))
	require.Len(t, c.Inputs, 1)
	loaded := c.Inputs[0].Input.(*OmniCore)
	factory := inputs.Inputs["omnicore"]().(*OmniCore)

	type settings struct {
		Options                gateway.Options
		Devices                []string
		Listen                 string
		TopicTag               string
		MaxUndeliveredMessages int
		DataFormat             string
	}
	project := func(p *OmniCore, o gateway.Options) settings {
		return settings{o, append([]string{}, p.Devices...), p.Listen, p.TopicTag, p.MaxUndeliveredMessages, p.DataFormat}
	}
	// The required settings are uncommented examples, not defaults.
	want := factory.Options
	want.Servers = loaded.Servers
	want.SubscriptionID, want.RegistryID, want.GatewayID = loaded.SubscriptionID, loaded.RegistryID, loaded.GatewayID
	want.PrivateKey = loaded.PrivateKey
	require.Equal(t, project(factory, want), project(loaded, loaded.Options))
}

func TestSampleConfigStyle(t *testing.T) {
	shared, err := os.ReadFile("../../common/gateway/options.conf")
	require.NoError(t, err)
	require.Contains(t, sampleConfig, string(shared), "sample.conf must start with the shared gateway options verbatim")

	lines := strings.Split(strings.TrimSuffix(sampleConfig, "\n"), "\n")
	require.Equal(t, "[[inputs.omnicore]]", lines[1])
	require.True(t, strings.HasPrefix(lines[0], "# "))
	for i, line := range lines[2:] {
		if line == "" {
			continue
		}
		// Options, their docs, and the commented gateways sub-table.
		require.Regexp(t, `^  (## |##$|# [a-z_]+ = |[a-z_]+ = |# \[\[inputs\.omnicore\.gateways\]\]$|#   [a-z_]+ = |#   ## |#   # [a-z_]+ = )`, line, "line %d", i+3)
		require.Equal(t, strings.TrimRight(line, " \t"), line, "trailing space on line %d", i+3)
	}
}

// The README carries sample.conf verbatim and the structure Telegraf's
// readme linter (tools/readme_linter) checks for an input plugin.
func TestReadme(t *testing.T) {
	buf, err := os.ReadFile("README.md")
	require.NoError(t, err)
	readme := string(buf)

	block := regexp.MustCompile("(?s)\n## Configuration\n\n```toml @sample.conf\n(.*?)```\n").FindStringSubmatch(readme)
	require.NotNil(t, block, `"## Configuration" must be followed directly by the toml block`)
	require.Equal(t, sampleConfig, block[1])

	paragraphs := strings.Split(readme, "\n\n")
	require.Equal(t, "# OmniCore Input Plugin", paragraphs[0])
	require.GreaterOrEqual(t, len(paragraphs[1]), 30, "a description follows the title")
	// The version badge's comment says what it means for an external plugin
	// (the form Telegraf's readme linter accepts after a version).
	require.Equal(t, "⭐ Telegraf v1.37.2 <!-- external plugin: built and tested against this version, not shipped with Telegraf -->\n🏷️ iot, messaging\n💻 all", paragraphs[2])
	lines := strings.Split(readme, "\n")
	for _, h := range []string{"Global configuration options", "Configuration", "Metrics", "Example Output"} {
		require.Contains(t, lines, "## "+h)
	}
	require.NotContains(t, readme, "](https://github.com/influxdata/telegraf/blob", "in-repo links must be relative")
	require.Contains(t, readme, `command = ["/usr/bin/telegraf-omnicore", "-config", "/etc/telegraf/omnicore/input.conf"]`)
}

func TestInitErrors(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(*OmniCore)
		want   string
	}{
		{"no servers", func(p *OmniCore) { p.Servers = nil }, "servers is required"},
		{"bad listen", func(p *OmniCore) { p.Listen = "all" }, `listen "all" must be "attached" or "configured"`},
		{"device with slash", func(p *OmniCore) { p.Devices = []string{"a/b"} }, "devices: ID"},
		{"device with wildcard", func(p *OmniCore) { p.Devices = []string{"dev+1"} }, "devices: ID"},
		{"empty device", func(p *OmniCore) { p.Devices = []string{""} }, "devices: empty ID"},
		{"duplicate device", func(p *OmniCore) { p.Devices = []string{"dev1", "dev1"} }, `"dev1" is listed twice`},
		{"too many devices", func(p *OmniCore) {
			p.Devices = make([]string, omnicore.MaxAttachedDevices+1)
			for i := range p.Devices {
				p.Devices[i] = fmt.Sprintf("d%d", i)
			}
		}, "at most 10000"},
		{"topic_tag overwrites device_id", func(p *OmniCore) { p.TopicTag = "device_id" }, `topic_tag "device_id"`},
		{"topic_tag overwrites kind", func(p *OmniCore) { p.TopicTag = "kind" }, `topic_tag "kind"`},
		{"no undelivered slots", func(p *OmniCore) { p.MaxUndeliveredMessages = 0 }, "max_undelivered_messages 0"},
		{"data_format without config loader", func(p *OmniCore) { p.DataFormat = "json" }, "no parser was provided"},
		{"parser factory fails", func(p *OmniCore) {
			p.DataFormat = "value"
			p.parserFunc = func() (telegraf.Parser, error) { return nil, fmt.Errorf("bad data_type") }
		}, `creating the "value" parser: bad data_type`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := inputs.Inputs["omnicore"]().(*OmniCore)
			p.Servers = []string{"tls://127.0.0.1:8883"}
			p.SubscriptionID, p.RegistryID, p.GatewayID = "sub", testRegistry, testGateway
			p.PrivateKey = writeKey(t)
			p.Algorithm = omnicore.ES256
			p.Log = testutil.Logger{}
			require.NoError(t, p.Init(), "the base configuration must be valid")
			tt.mutate(p)
			err := p.Init()
			require.ErrorContains(t, err, tt.want)
		})
	}
}

func TestConfigLoaderErrors(t *testing.T) {
	key := writeKey(t)
	tests := []struct {
		name    string
		options string
		want    string
	}{
		{"misspelled option", `listn = "configured"`, "listn"},
		{"unknown data format", `data_format = "nope"`, "parser not found"},
		{"bad parser option", "data_format = \"value\"\n  data_type = \"complex\"", "complex"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			toml := fmt.Sprintf("[[inputs.omnicore]]\n  servers = [\"tls://127.0.0.1:8883\"]\n  subscription_id = \"s\"\n"+
				"  registry_id = \"r\"\n  gateway_id = \"g\"\n  private_key = %q\n  algorithm = \"ES256\"\n  %s\n", key, tt.options)
			c := config.NewConfig()
			err := c.LoadConfigData([]byte(toml), "")
			if err == nil {
				// Parser options are checked when the parser is built,
				// which the plugin does in Init.
				require.Len(t, c.Inputs, 1)
				p := c.Inputs[0].Input.(*OmniCore)
				p.Log = testutil.Logger{}
				err = p.Init()
			}
			require.ErrorContains(t, err, tt.want)
		})
	}
}

// ---------------------------------------------------------------------------
// Messages to metrics

func TestRawMessages(t *testing.T) {
	garbage := []byte{0xff, 0xfe, 0x00, 'o', 'k', 0xc3}
	tests := []struct {
		name     string
		topicTag string
		in       gateway.Inbound
		want     telegraf.Metric
	}{
		{
			name: "config",
			in:   configMsg("dev1", `{"interval":10}`),
			want: metric.New("omnicore_config", tags("dev1", "config"), map[string]any{"payload": `{"interval":10}`}, received),
		},
		{
			name: "empty config",
			in:   configMsg("dev1", ""),
			want: metric.New("omnicore_config", tags("dev1", "config"), map[string]any{"payload": ""}, received),
		},
		{
			name: "command without subfolder",
			in:   commandMsg("dev1", "", "reboot"),
			want: metric.New("omnicore_command", tags("dev1", "command"), map[string]any{"payload": "reboot"}, received),
		},
		{
			name: "command with one subfolder level",
			in:   commandMsg("dev1", "valve", "open"),
			want: metric.New("omnicore_command", tags("dev1", "command", "subfolder", "valve"), map[string]any{"payload": "open"}, received),
		},
		{
			name: "command with several subfolder levels",
			in:   commandMsg("dev1", "pump/2/speed", "1500"),
			want: metric.New("omnicore_command", tags("dev1", "command", "subfolder", "pump/2/speed"), map[string]any{"payload": "1500"}, received),
		},
		{
			name: "command of the gateway itself",
			in:   commandMsg(testGateway, "", "ping"),
			want: metric.New("omnicore_command", tags(testGateway, "command"), map[string]any{"payload": "ping"}, received),
		},
		{
			name: "binary command",
			in:   commandMsg("dev1", "fw", string(garbage)),
			want: metric.New("omnicore_command", tags("dev1", "command", "subfolder", "fw"), map[string]any{
				"payload":        "\ufffd\x00ok\ufffd", // one U+FFFD per run of invalid bytes
				"payload_base64": base64.StdEncoding.EncodeToString(garbage),
			}, received),
		},
		{
			name:     "topic tag",
			topicTag: "topic",
			in:       commandMsg("dev1", "a/b", "x"),
			want: metric.New("omnicore_command", tags("dev1", "command", "subfolder", "a/b", "topic", "/reg/dev1/commands/a/b"),
				map[string]any{"payload": "x"}, received),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, fake := newPlugin(t, func(p *OmniCore) {
				p.TopicTag = tt.topicTag
				p.Devices = []string{"dev1"}
			})
			var acc testutil.Accumulator
			start(t, p, fake, &acc, 2)
			fake.Deliver(tt.in)
			testutil.RequireMetricsEqual(t, []telegraf.Metric{tt.want}, acc.GetTelegrafMetrics())
		})
	}
}

func TestParsedMessages(t *testing.T) {
	at := time.Unix(0, 1700000000000000000)
	tests := []struct {
		name        string
		options     string
		in          []gateway.Inbound
		want        []telegraf.Metric
		ignoreTime  bool
		parseErrors uint64
	}{
		{
			name:    "json config; the payload cannot spoof the plugin's tags",
			options: "data_format = \"json\"\n  tag_keys = [\"site\", \"device_id\"]",
			in:      []gateway.Inbound{configMsg("dev1", `{"site":"north","device_id":"spoofed","interval":10}`)},
			want: []telegraf.Metric{metric.New("omnicore", tags("dev1", "config", "site", "north"),
				map[string]any{"interval": 10.0}, received)},
			ignoreTime: true,
		},
		{
			name:    "value command with subfolder",
			options: "data_format = \"value\"\n  data_type = \"integer\"",
			in:      []gateway.Inbound{commandMsg("dev1", "pump/speed", "1500")},
			want: []telegraf.Metric{metric.New("omnicore", tags("dev1", "command", "subfolder", "pump/speed"),
				map[string]any{"value": int64(1500)}, received)},
			ignoreTime: true,
		},
		{
			name:    "influx command with two metrics",
			options: `data_format = "influx"`,
			in:      []gateway.Inbound{commandMsg("dev1", "", "setpoint,zone=a temp=21.5 1700000000000000000\nmode eco=true 1700000000000000000")},
			want: []telegraf.Metric{
				metric.New("setpoint", tags("dev1", "command", "zone", "a"), map[string]any{"temp": 21.5}, at),
				metric.New("mode", tags("dev1", "command"), map[string]any{"eco": true}, at),
			},
		},
		{
			name:    "csv gets a fresh parser per message",
			options: "data_format = \"csv\"\n  csv_header_row_count = 1",
			in:      []gateway.Inbound{configMsg("dev1", "a,b\n1,2\n"), configMsg("dev1", "c,d\n3,4\n")},
			want: []telegraf.Metric{
				metric.New("omnicore", tags("dev1", "config"), map[string]any{"a": int64(1), "b": int64(2)}, received),
				metric.New("omnicore", tags("dev1", "config"), map[string]any{"c": int64(3), "d": int64(4)}, received),
			},
			ignoreTime: true,
		},
		{
			name:    "parse failure falls back to raw",
			options: `data_format = "json"`,
			in:      []gateway.Inbound{commandMsg("dev1", "", "reboot")},
			want: []telegraf.Metric{metric.New("omnicore_command", tags("dev1", "command"),
				map[string]any{"payload": "reboot"}, received)},
			parseErrors: 1,
		},
		{
			name:    "no metrics parsed falls back to raw",
			options: `data_format = "json"`,
			in:      []gateway.Inbound{configMsg("dev1", "[]")},
			want: []telegraf.Metric{metric.New("omnicore_config", tags("dev1", "config"),
				map[string]any{"payload": "[]"}, received)},
			parseErrors: 1,
		},
		{
			name:    "binary payload that fails to parse",
			options: `data_format = "influx"`,
			in:      []gateway.Inbound{commandMsg("dev1", "", "\x00\xff\xfe")},
			want: []telegraf.Metric{metric.New("omnicore_command", tags("dev1", "command"),
				map[string]any{"payload": "\x00\ufffd", "payload_base64": "AP/+"}, received)},
			parseErrors: 1,
		},
		{
			name:    "empty config is not parsed",
			options: `data_format = "json"`,
			in:      []gateway.Inbound{configMsg("dev1", "")},
			want: []telegraf.Metric{metric.New("omnicore_config", tags("dev1", "config"),
				map[string]any{"payload": ""}, received)},
		},
		{
			name: "no data_format: the loader's default influx parser is not used",
			in:   []gateway.Inbound{configMsg("dev1", "cpu usage=1")},
			want: []telegraf.Metric{metric.New("omnicore_config", tags("dev1", "config"),
				map[string]any{"payload": "cpu usage=1"}, received)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, fake := loadPlugin(t, "  devices = [\"dev1\"]\n  "+tt.options)
			var acc testutil.Accumulator
			start(t, p, fake, &acc, 2)
			for _, in := range tt.in {
				fake.Deliver(in)
			}
			if tt.ignoreTime {
				testutil.RequireMetricsEqual(t, tt.want, acc.GetTelegrafMetrics(), testutil.IgnoreTime())
			} else {
				testutil.RequireMetricsEqual(t, tt.want, acc.GetTelegrafMetrics())
			}
			require.Equal(t, tt.parseErrors, p.parseErrors.Load())

			// All metrics of one message are one tracking group: one slot of
			// max_undelivered_messages, freed once all are delivered.
			require.Len(t, p.sem, len(tt.in))
			for _, m := range acc.GetTelegrafMetrics() {
				m.Accept()
			}
			require.Eventually(t, func() bool { return len(p.sem) == 0 }, 10*time.Second, time.Millisecond)
		})
	}
}

func TestParseErrorsWarnOnce(t *testing.T) {
	p, fake := loadPlugin(t, `data_format = "json"`)
	logger := &testutil.CaptureLogger{Name: "inputs.omnicore"}
	p.Log = logger
	var acc testutil.Accumulator
	start(t, p, fake, &acc, 2)
	for range 3 {
		fake.Deliver(commandMsg(testGateway, "", "not json"))
	}
	require.Len(t, acc.GetTelegrafMetrics(), 3)
	require.Equal(t, uint64(3), p.parseErrors.Load())
	var warnings []string
	for _, w := range logger.Warnings() {
		if strings.Contains(w, "Parsing") {
			warnings = append(warnings, w)
		}
	}
	require.Len(t, warnings, 1, "parse errors after the first are logged at debug level")
}

// TestParseErrorsLogNoPayload delivers configs and commands that hold a
// secret and fail to parse, with the logger at debug level: the first parse
// error is a warning and the next ones are debug lines, all of which say the
// size, and none of which holds the secret (parsers quote the input they
// choke on: Telegraf's influx parser quotes the whole line).
func TestParseErrorsLogNoPayload(t *testing.T) {
	const secret = "S3cr3t-Wifi-Key-0042"
	tests := []struct {
		format  string
		payload string
	}{
		{"influx", "wifi,ssid=home psk=" + secret},
		{"influx", "wifi psk=\"" + secret + "\" bad"},
		{"json", `{"wifi_psk":` + secret + `}`},
		{"value\"\n  data_type = \"float", secret},
		{"csv\"\n  csv_header_row_count = 1\n  csv_column_types = [\"int\"]\n  csv_delimiter = \",", "psk\n" + secret + "\n"},
	}
	for _, tc := range tests {
		t.Run(strings.SplitN(tc.format, `"`, 2)[0], func(t *testing.T) {
			p, fake := loadPlugin(t, "  devices = [\"dev1\"]\n  data_format = \""+tc.format+"\"")
			logger := &testutil.CaptureLogger{Name: "inputs.omnicore"}
			p.Log = logger
			require.Equal(t, telegraf.Trace, logger.Level(), "every level is captured")
			var acc testutil.Accumulator
			start(t, p, fake, &acc, 2)
			fake.Deliver(configMsg("dev1", tc.payload))
			fake.Deliver(commandMsg("dev1", "wifi", tc.payload))
			fake.Deliver(commandMsg("dev1", "", tc.payload))
			require.Len(t, acc.GetTelegrafMetrics(), 3)
			require.Equal(t, uint64(3), p.parseErrors.Load(), "the payload must fail to parse, else this tests nothing")
			var parseLines int
			for _, e := range logger.Messages() {
				require.NotContains(t, e.Text, secret[:8], "payload bytes in a log line")
				if strings.Contains(e.Text, "Parsing a") {
					parseLines++
					require.Contains(t, e.Text, fmt.Sprintf("(%d bytes)", len(tc.payload)))
				}
			}
			require.Equal(t, 3, parseLines, "one warning and two debug lines")
		})
	}
}

func TestParserPanicIsAParseError(t *testing.T) {
	p, fake := newPlugin(t, func(p *OmniCore) {
		p.DataFormat = "custom"
		p.parserFunc = func() (telegraf.Parser, error) { return panickingParser{}, nil }
	})
	var acc testutil.Accumulator
	start(t, p, fake, &acc, 2)
	fake.Deliver(configMsg(testGateway, "boom"))
	testutil.RequireMetricsEqual(t, []telegraf.Metric{
		metric.New("omnicore_config", tags(testGateway, "config"), map[string]any{"payload": "boom"}, received),
	}, acc.GetTelegrafMetrics())
	require.Equal(t, uint64(1), p.parseErrors.Load())
}

type panickingParser struct{}

func (panickingParser) Parse([]byte) ([]telegraf.Metric, error)   { panic("hostile input") }
func (panickingParser) ParseLine(string) (telegraf.Metric, error) { panic("hostile input") }
func (panickingParser) SetDefaultTags(map[string]string)          {}

// Raw metrics go through line protocol under execd: the shim serialises
// them and inputs.execd parses them back. Whatever the payload, the text
// must be valid UTF-8 and survive the round trip unchanged.
func TestRawPayloadSurvivesLineProtocol(t *testing.T) {
	random := make([]byte, 512)
	for i := range random {
		random[i] = byte(i * 7)
	}
	payloads := map[string][]byte{
		"invalid UTF-8":        {0xff, 0xfe, 0xfd},
		"NUL and controls":     {0x00, 0x01, '\t', 0x7f},
		"quotes and escapes":   []byte(`say "hi" \ \\ \"`),
		"newlines":             []byte("line1\nline2\r\n"),
		"line protocol":        []byte(`cpu,host=a usage=1 1700000000000000000`),
		"truncated multi-byte": []byte("caf\xc3"),
		"binary":               random,
		"empty":                {},
	}
	for name, payload := range payloads {
		t.Run(name, func(t *testing.T) {
			m := rawMetric("omnicore_command", tags("dev1", "command"), payload, received)
			text, ok := m.GetField("payload")
			require.True(t, ok)
			require.True(t, utf8.ValidString(text.(string)))
			if b64, ok := m.GetField("payload_base64"); ok {
				require.False(t, utf8.Valid(payload))
				exact, err := base64.StdEncoding.DecodeString(b64.(string))
				require.NoError(t, err)
				require.Equal(t, payload, exact)
			} else {
				require.Equal(t, string(payload), text)
			}

			serializer := &influxserializer.Serializer{}
			require.NoError(t, serializer.Init())
			line, err := serializer.Serialize(m)
			require.NoError(t, err)
			require.True(t, utf8.Valid(line))
			parser := &influxparser.Parser{}
			require.NoError(t, parser.Init())
			back, err := parser.Parse(line)
			require.NoError(t, err)
			testutil.RequireMetricsEqual(t, []telegraf.Metric{m}, back)
		})
	}
}

func TestErrorMessages(t *testing.T) {
	errTags := func(device, errorType string) map[string]string {
		return tags(device, "error", "error_type", errorType)
	}
	tests := []struct {
		name    string
		payload string
		want    telegraf.Metric
	}{
		{
			name: "all fields",
			payload: `{"error_type":"GATEWAY_DEVICE_NOT_FOUND","description":"device not attached","device_id":"dev1",` +
				`"mqtt_message_info":{"message_type":"PUBLISH","topic":"/reg/dev1/events","packet_id":7}}`,
			want: metric.New("omnicore_error", errTags("dev1", "GATEWAY_DEVICE_NOT_FOUND"), map[string]any{
				"description":  "device not attached",
				"message_type": "PUBLISH",
				"topic":        "/reg/dev1/events",
				"packet_id":    int64(7),
			}, received),
		},
		{
			name:    "without mqtt_message_info",
			payload: `{"error_type":"GATEWAY_ATTACHMENT_ERROR","description":"device is not bound","device_id":"dev2"}`,
			want: metric.New("omnicore_error", errTags("dev2", "GATEWAY_ATTACHMENT_ERROR"),
				map[string]any{"description": "device is not bound"}, received),
		},
		{
			name:    "QoS 0 packet without packet_id",
			payload: `{"error_type":"GATEWAY_DEVICE_NOT_FOUND","description":"x","device_id":"dev1","mqtt_message_info":{"message_type":"PUBLISH","topic":"/reg/dev1/state"}}`,
			want: metric.New("omnicore_error", errTags("dev1", "GATEWAY_DEVICE_NOT_FOUND"),
				map[string]any{"description": "x", "message_type": "PUBLISH", "topic": "/reg/dev1/state"}, received),
		},
		{
			name:    "unknown error type and extra keys",
			payload: `{"error_type":"SOMETHING_NEW","description":"new","device_id":"dev3","extra":{"a":1}}`,
			want: metric.New("omnicore_error", errTags("dev3", "SOMETHING_NEW"),
				map[string]any{"description": "new"}, received),
		},
		{
			name:    "no device: the gateway",
			payload: `{"error_type":"GATEWAY_DETACHMENT_DEVICE_ERROR","description":"rate"}`,
			want: metric.New("omnicore_error", errTags(testGateway, "GATEWAY_DETACHMENT_DEVICE_ERROR"),
				map[string]any{"description": "rate"}, received),
		},
		{
			name:    "garbage",
			payload: "oops \xff{",
			want: metric.New("omnicore_error", errTags(testGateway, "UNPARSEABLE"), map[string]any{
				"description":    "unparseable errors-topic message: " + jsonError("oops \xff{"),
				"payload":        "oops \ufffd{",
				"payload_base64": base64.StdEncoding.EncodeToString([]byte("oops \xff{")),
			}, received),
		},
		{
			name:    "JSON without error_type",
			payload: `{"description":"what"}`,
			want: metric.New("omnicore_error", errTags(testGateway, "UNPARSEABLE"), map[string]any{
				"description": "unparseable errors-topic message: no error_type",
				"payload":     `{"description":"what"}`,
			}, received),
		},
		{
			name:    "empty",
			payload: "",
			want: metric.New("omnicore_error", errTags(testGateway, "UNPARSEABLE"), map[string]any{
				"description": "unparseable errors-topic message: " + jsonError(""),
				"payload":     "",
			}, received),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Errors never go through data_format.
			p, fake := loadPlugin(t, `data_format = "json"`)
			var acc testutil.Accumulator
			start(t, p, fake, &acc, 2)
			fake.Deliver(errorMsg(tt.payload))
			testutil.RequireMetricsEqual(t, []telegraf.Metric{tt.want}, acc.GetTelegrafMetrics())
			require.Zero(t, p.parseErrors.Load())
		})
	}
}

func jsonError(payload string) string {
	var e omnicore.ErrorMessage
	return json.Unmarshal([]byte(payload), &e).Error()
}

// ---------------------------------------------------------------------------
// Subscriptions

func TestListen(t *testing.T) {
	tests := []struct {
		name       string
		listen     string
		handlers   int      // errors + (all | gateway) + listed devices
		wantFrom   []string // devices whose config becomes a metric
		ignoreFrom []string
	}{
		{"attached", "attached", 2, []string{testGateway, "dev1", "other"}, nil},
		{"configured", "configured", 3, []string{testGateway, "dev1"}, []string{"other"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, fake := newPlugin(t, func(p *OmniCore) {
				p.Listen = tt.listen
				p.Devices = []string{"dev1", testGateway} // the gateway is listened to anyway
			})
			var acc testutil.Accumulator
			start(t, p, fake, &acc, tt.handlers)
			require.True(t, fake.Attached("dev1"))

			// outputs.omnicore, sharing the session, attaches another device.
			require.NoError(t, fake.Attach(context.Background(), "other"))
			for _, d := range append(append([]string{}, tt.wantFrom...), tt.ignoreFrom...) {
				fake.Deliver(configMsg(d, "cfg-"+d))
			}
			var want []telegraf.Metric
			for _, d := range tt.wantFrom {
				want = append(want, metric.New("omnicore_config", tags(d, "config"), map[string]any{"payload": "cfg-" + d}, received))
			}
			// Exactly one metric per message: no handler is registered twice.
			testutil.RequireMetricsEqual(t, want, acc.GetTelegrafMetrics(), testutil.SortMetrics())

			fake.Deliver(errorMsg(`{"error_type":"X","device_id":"dev9"}`))
			require.Len(t, acc.GetTelegrafMetrics(), len(want)+1)
		})
	}
}

// refusingConn refuses the first Attach or Subscribe calls of one device the
// way the session does: with ErrAttachRefused, and for Subscribe with the
// handler kept.
type refusingConn struct {
	*gatewaytest.Conn
	device string

	mu      sync.Mutex
	refuse  int
	attempt int
}

func (c *refusingConn) Subscribe(ctx context.Context, device string, h gateway.Handler) (gateway.Subscription, error) {
	sub, err := c.Conn.Subscribe(ctx, device, h)
	if err != nil || device != c.device {
		return sub, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.attempt++
	if c.attempt <= c.refuse {
		return sub, fmt.Errorf("%w: device %q: not bound to the gateway", gateway.ErrAttachRefused, device)
	}
	return sub, nil
}

func (c *refusingConn) Attach(ctx context.Context, device string) error {
	if device == c.device {
		c.mu.Lock()
		c.attempt++
		refused := c.attempt <= c.refuse
		c.mu.Unlock()
		if refused {
			return fmt.Errorf("%w: device %q: not bound to the gateway", gateway.ErrAttachRefused, device)
		}
	}
	return c.Conn.Attach(ctx, device)
}

func (c *refusingConn) attempts() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.attempt
}

func TestRefusedDeviceIsRetried(t *testing.T) {
	for _, listen := range []string{listenAttached, listenConfigured} {
		t.Run(listen, func(t *testing.T) {
			fake := gatewaytest.New(testGateway)
			conn := &refusingConn{Conn: fake, device: "dev2", refuse: 2}
			logger := &testutil.CaptureLogger{Name: "inputs.omnicore"}
			p, _ := newPlugin(t, func(p *OmniCore) {
				p.Listen = listen
				p.Devices = []string{"dev1", "dev2"}
				p.acquire = fakeAcquire(conn, nil)
				p.retryMin = time.Millisecond
			})
			p.Log = logger
			handlers := 2 // errors and all
			if listen == listenConfigured {
				handlers = 4 // errors, the gateway, dev1 and dev2
			}
			var acc testutil.Accumulator
			start(t, p, fake, &acc, handlers)
			// The attempt counter is not a change of the fake, so poll it.
			require.Eventually(t, func() bool { return conn.attempts() == 3 }, 10*time.Second, time.Millisecond)
			require.Equal(t, handlers, fake.Subscribers(), "a refused subscription leaves no handler behind")

			fake.Deliver(commandMsg("dev2", "", "go"))
			testutil.RequireMetricsEqual(t, []telegraf.Metric{
				metric.New("omnicore_command", tags("dev2", "command"), map[string]any{"payload": "go"}, received),
			}, acc.GetTelegrafMetrics())

			var warned []string
			for _, w := range logger.Warnings() {
				if strings.Contains(w, `"dev2"`) {
					warned = append(warned, w)
				}
			}
			require.Len(t, warned, 1, "the first refusal is a warning, retries are debug")
			require.Contains(t, warned[0], "not bound to the gateway")
		})
	}
}

// ---------------------------------------------------------------------------
// Tracking and lifecycle

func TestUndeliveredLimitBlocksUntilDelivered(t *testing.T) {
	const limit, total = 5, 20
	p, fake := newPlugin(t, func(p *OmniCore) { p.MaxUndeliveredMessages = limit })
	var acc testutil.Accumulator
	start(t, p, fake, &acc, 2)

	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range total {
			fake.Deliver(commandMsg(testGateway, "", fmt.Sprint(i)))
		}
	}()
	// The message after the limit has been received but waits for a slot.
	require.Eventually(t, func() bool { return p.received.Load() == limit+1 }, 10*time.Second, time.Millisecond)
	require.Equal(t, uint64(limit), acc.NMetrics())
	var stats testutil.Accumulator
	require.NoError(t, p.Gather(&stats))
	undelivered, ok := stats.Int64Field("omnicore_gateway", "undelivered")
	require.True(t, ok)
	require.Equal(t, int64(limit), undelivered)

	// Each delivery lets exactly one more message in.
	acc.GetTelegrafMetrics()[0].Accept()
	waitMetrics(t, &acc, limit+1)
	require.Eventually(t, func() bool { return p.received.Load() == limit+2 }, 10*time.Second, time.Millisecond)
	require.Equal(t, uint64(limit+1), acc.NMetrics())

	for i := 1; i < total; i++ {
		waitMetrics(t, &acc, min(i+limit, total))
		acc.GetTelegrafMetrics()[i].Accept()
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the burst did not drain")
	}
	require.Equal(t, uint64(total), acc.NMetrics())
	for i, m := range acc.GetTelegrafMetrics() {
		v, _ := m.GetField("payload")
		require.Equal(t, fmt.Sprint(i), v, "order is kept")
	}
}

func TestStopUnblocksAndReleases(t *testing.T) {
	releases := 0
	p, fake := newPlugin(t, func(p *OmniCore) { p.MaxUndeliveredMessages = 1 })
	p.acquire = fakeAcquire(fake, &releases)
	var acc testutil.Accumulator
	start(t, p, fake, &acc, 2)

	fake.Deliver(commandMsg(testGateway, "", "1"))
	blocked := make(chan struct{})
	go func() {
		defer close(blocked)
		fake.Deliver(commandMsg(testGateway, "", "2"))
	}()
	require.Eventually(t, func() bool { return p.received.Load() == 2 }, 10*time.Second, time.Millisecond)

	stopped := make(chan struct{})
	go func() {
		p.Stop()
		close(stopped)
	}()
	for _, ch := range []chan struct{}{stopped, blocked} {
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			t.Fatal("Stop did not return or did not unblock the handler")
		}
	}
	require.Equal(t, 1, releases)
	require.Zero(t, fake.Subscribers())
	require.Equal(t, uint64(1), fake.Drops()[dropStopped], "the message cut off by Stop is counted")
	require.Equal(t, uint64(1), acc.NMetrics())

	p.Stop() // idempotent
	require.Equal(t, 1, releases)
}

func TestGather(t *testing.T) {
	p, fake := newPlugin(t, nil)

	var before testutil.Accumulator
	require.NoError(t, p.Gather(&before))
	require.Zero(t, before.NMetrics(), "nothing to report before Start")

	var acc testutil.Accumulator
	start(t, p, fake, &acc, 2)
	fake.Deliver(configMsg(testGateway, "x"))
	fake.CountDrop("too_large", 2)

	var stats testutil.Accumulator
	require.NoError(t, p.Gather(&stats))
	fields := map[string]any{"messages_received": int64(1), "parse_errors": int64(0), "undelivered": int64(1)}
	for k, v := range fake.Stats().Fields() {
		fields[k] = v
	}
	require.Equal(t, int64(2), fields["dropped_too_large"])
	testutil.RequireMetricsEqual(t, []telegraf.Metric{
		metric.New("omnicore_gateway", map[string]string{"gateway_id": testGateway, "registry_id": testRegistry}, fields, time.Time{}),
	}, stats.GetTelegrafMetrics(), testutil.IgnoreTime())
}

// Start joins the real session and returns at once even though nothing
// listens on the bridge's port; Stop returns promptly too.
func TestStartAndStopWithBridgeDown(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())

	p := inputs.Inputs["omnicore"]().(*OmniCore)
	p.Servers = []string{"tcp://" + addr}
	p.SubscriptionID, p.RegistryID, p.GatewayID = "sub", testRegistry, "gw-down"
	p.PrivateKey = writeKey(t)
	p.Algorithm = omnicore.ES256
	p.Devices = []string{"dev1", "dev2"}
	p.Log = testutil.Logger{Name: "inputs.omnicore"}
	require.NoError(t, p.Init())

	var acc testutil.Accumulator
	started := make(chan error, 1)
	go func() { started <- p.Start(&acc) }()
	select {
	case err := <-started:
		require.NoError(t, err)
	case <-time.After(5 * time.Second):
		t.Fatal("Start blocked while the bridge is down")
	}

	var stats testutil.Accumulator
	require.NoError(t, p.Gather(&stats))
	connected, ok := stats.Int64Field("omnicore_gateway", "connected")
	require.True(t, ok)
	require.Zero(t, connected)

	stopped := make(chan struct{})
	go func() {
		p.Stop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		t.Fatal("Stop blocked while the bridge is down")
	}
}
