package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/inputs"
	"github.com/influxdata/telegraf/plugins/outputs"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
)

// testPlugins are the tables the tests' plugin files may hold.
var testPlugins = []string{"outputs.omnicore_test", "inputs.omnicore_test"}

func writeFile(t *testing.T, dir, name, content string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

// A secret referencing an unknown store is tested through a separate process
// (TestMainExitStatus): Telegraf keeps unlinked secrets in a process-wide
// list, so a failed link would make every later load in this process fail.
func TestLoadPluginFileErrors(t *testing.T) {
	tests := []struct {
		name    string
		config  string
		allowed []string
		errs    []string // substrings of the error
	}{
		{
			name:   "unknown option",
			config: "[[outputs.omnicore_test]]\n  topic = \"t\"\n  tpoic = \"typo\"\n",
			errs:   []string{`"tpoic"`, "not used"},
		},
		{
			name:   "two plugin tables",
			config: "[[outputs.omnicore_test]]\n  topic = \"a\"\n[[outputs.omnicore_test]]\n  topic = \"b\"\n",
			errs:   []string{"holds 2 plugin tables", "must hold exactly one [[outputs.omnicore_test]] or [[inputs.omnicore_test]] table"},
		},
		{
			name:   "an input and an output",
			config: "[[inputs.omnicore_test]]\n[[outputs.omnicore_test]]\n",
			errs:   []string{"holds 2 plugin tables", "[[inputs.omnicore_test]]", "[[outputs.omnicore_test]]"},
		},
		{
			name:   "no plugin table",
			config: "# nothing here\n",
			errs:   []string{"holds no plugin table"},
		},
		{
			name:   "plugin this program does not run",
			config: "[[outputs.file]]\n  files = [\"stdout\"]\n",
			errs:   []string{"undefined but requested output: file", "other plugins belong in telegraf.conf"},
		},
		{
			name:    "registered plugin that is not allowed",
			config:  "[[outputs.omnicore_test]]\n",
			allowed: defaultPlugins,
			errs:    []string{"holds [[outputs.omnicore_test]]; it must hold exactly one [[outputs.omnicore]] or [[inputs.omnicore]] table"},
		},
		{
			name:   "processor",
			config: "[[outputs.omnicore_test]]\n[[processors.noop]]\n",
			errs:   []string{"undefined but requested processor"},
		},
		{
			name:   "agent table",
			config: "[agent]\n  debug = true\n[[outputs.omnicore_test]]\n",
			errs:   []string{"line 1: [agent] has no effect in a plugin file"},
		},
		{
			name:   "global tags",
			config: "[global_tags]\n  site = \"x\"\n[[outputs.omnicore_test]]\n",
			errs:   []string{"[global_tags] has no effect in a plugin file"},
		},
		{
			name:   "output filter",
			config: "[[outputs.omnicore_test]]\n  namepass = [\"cpu\"]\n",
			errs:   []string{"outputs.omnicore_test: metric filters (namepass, tagpass, fieldinclude, ...) only work in telegraf.conf", "[[outputs.execd]]"},
		},
		{
			name:   "output batch size",
			config: "[[outputs.omnicore_test]]\n  metric_batch_size = 10\n",
			errs:   []string{"metric_batch_size (use the -batch_size flag)"},
		},
		{
			name:   "input interval",
			config: "[[inputs.omnicore_test]]\n  interval = \"5s\"\n",
			errs:   []string{"inputs.omnicore_test: interval has no effect in a plugin file", `set signal = "STDIN" on the [[inputs.execd]] block`, "-poll_interval"},
		},
		{
			name:   "input tags and name_override",
			config: "[[inputs.omnicore_test]]\n  name_override = \"x\"\n  [inputs.omnicore_test.tags]\n    site = \"x\"\n",
			errs:   []string{"inputs.omnicore_test: name_override, tags only work in telegraf.conf", "[[inputs.execd]]"},
		},
		{
			name:   "invalid log level",
			config: "[[outputs.omnicore_test]]\n  log_level = \"loud\"\n",
			errs:   []string{"log_level", `"loud"`},
		},
		{
			name:   "unknown serializer",
			config: "[[outputs.omnicore_test]]\n  data_format = \"nope\"\n",
			errs:   []string{`data_format "nope" is not built in; the serializers built in are: binary, carbon2, csv, graphite, influx, json, msgpack, nowmetric, splunkmetric, template, wavefront`},
		},
		{
			name:   "unknown parser",
			config: "[[inputs.omnicore_test]]\n  data_format = \"nope\"\n",
			errs:   []string{`data_format "nope" is not built in; the parsers built in are: binary, csv, influx, json, json_v2, value, xml, xpath_cbor, xpath_json, xpath_msgpack, xpath_protobuf`},
		},
		{
			name:   "TOML syntax",
			config: "[[outputs.omnicore_test]\n",
			errs:   []string{"error parsing data"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			allowed := tt.allowed
			if allowed == nil {
				allowed = testPlugins
			}
			path := writeFile(t, t.TempDir(), "plugin.conf", tt.config)
			_, err := loadPluginFile(path, allowed)
			require.Error(t, err)
			for _, e := range tt.errs {
				require.ErrorContains(t, err, e)
			}
		})
	}
}

func TestLoadPluginFileMissing(t *testing.T) {
	_, err := loadPluginFile(filepath.Join(t.TempDir(), "missing.conf"), testPlugins)
	require.ErrorContains(t, err, "reading the plugin file")
}

// The plugin file is loaded the way telegraf.conf is: a "$" that does not
// start an environment variable reference stays literal (MQTT topics such
// as $aws/... survive, unlike with the shim's os.Expand), ${VAR} and
// ${VAR:-default} are expanded, and secret-store references are linked.
func TestLoadPluginFileValues(t *testing.T) {
	t.Setenv("OMNICORE_TEST_TOPIC", "from-env")
	secrets := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(secrets, "bridge_password"), []byte("pa$$word"), 0o600))

	tests := []struct {
		name     string
		table    string
		topic    string
		password string
	}{
		{name: "dollar kept literal", table: `topic = "$aws/things/gw/shadow"`, topic: "$aws/things/gw/shadow"},
		{name: "dollar in the middle", table: `topic = "a/$SYS/b"`, topic: "a/$SYS/b"},
		{name: "environment variable", table: `topic = "t/${OMNICORE_TEST_TOPIC}/x"`, topic: "t/from-env/x"},
		{name: "default of an unset variable", table: `topic = "${OMNICORE_TEST_UNSET:-fallback}"`, topic: "fallback"},
		{name: "escaped reference", table: `topic = "$${OMNICORE_TEST_TOPIC}"`, topic: "${OMNICORE_TEST_TOPIC}"},
		{name: "password with a dollar", table: `password = "pa$word"`, password: "pa$word"},
		{name: "doubled dollar is an escaped one, as in telegraf.conf", table: `password = "pa$$word"`, password: "pa$word"},
		{
			name:     "password from a secret store",
			table:    `password = "@{files:bridge_password}"`,
			password: "pa$$word",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			conf := "[[secretstores.docker]]\n  id = \"files\"\n  path = \"" + secrets + "\"\n\n" +
				"[[outputs.omnicore_test]]\n  " + tt.table + "\n"
			path := writeFile(t, t.TempDir(), "plugin.conf", conf)
			p, err := loadPluginFile(path, testPlugins)
			require.NoError(t, err)
			require.Equal(t, "outputs", p.kind)
			require.Equal(t, "omnicore_test", p.name)
			out, ok := p.output.(*testOutput)
			require.True(t, ok)
			require.Equal(t, tt.topic, out.Topic)
			if tt.password != "" {
				buf, err := out.Password.Get()
				require.NoError(t, err)
				defer buf.Destroy()
				require.Equal(t, tt.password, buf.String())
			}
		})
	}
}

func TestLoadPluginFileKindAliasLogLevel(t *testing.T) {
	tests := []struct {
		name            string
		config          string
		kind            string
		alias, logLevel string
	}{
		{name: "output", config: "[[outputs.omnicore_test]]\n", kind: "outputs"},
		{name: "legacy single table", config: "[outputs.omnicore_test]\n", kind: "outputs"},
		{name: "input", config: "[[inputs.omnicore_test]]\n", kind: "inputs"},
		{
			name:     "alias and log level",
			config:   "[[outputs.omnicore_test]]\n  alias = \"site-a\"\n  log_level = \"debug\"\n",
			kind:     "outputs",
			alias:    "site-a",
			logLevel: "debug",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "plugin.conf", tt.config)
			p, err := loadPluginFile(path, testPlugins)
			require.NoError(t, err)
			require.Equal(t, tt.kind, p.kind)
			require.Equal(t, tt.alias, p.alias)
			require.Equal(t, tt.logLevel, p.logLevel)
			if tt.kind == "inputs" {
				require.IsType(t, &testInput{}, p.input)
				require.Nil(t, p.output)
			} else {
				require.IsType(t, &testOutput{}, p.output)
				require.Nil(t, p.input)
			}
		})
	}
}

// data_format and the format's own options reach the plugin: the output's
// SetSerializer and the input's SetParserFunc are called by the loader.
func TestLoadPluginFileDataFormat(t *testing.T) {
	m := metric.New("temperature", map[string]string{"device_id": "sensor-01"},
		map[string]any{"value": 21.5}, time.Unix(1700000000, 0))
	tests := []struct {
		name     string
		table    string
		expected string
	}{
		{name: "influx by default", expected: "temperature,device_id=sensor-01 value=21.5 1700000000000000000\n"},
		{
			name:     "influx with options",
			table:    "data_format = \"influx\"\n  influx_sort_fields = true\n  influx_uint_support = true",
			expected: "temperature,device_id=sensor-01 value=21.5 1700000000000000000\n",
		},
		{
			name:     "csv with its separator option",
			table:    "data_format = \"csv\"\n  csv_separator = \";\"",
			expected: "1700000000;temperature;sensor-01;21.5\n",
		},
		{
			name:     "carbon2",
			table:    "data_format = \"carbon2\"",
			expected: "metric=temperature field=value device_id=sensor-01  21.5 1700000000\n",
		},
		{
			name:     "json",
			table:    "data_format = \"json\"",
			expected: "{\"fields\":{\"value\":21.5},\"name\":\"temperature\",\"tags\":{\"device_id\":\"sensor-01\"},\"timestamp\":1700000000}\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "plugin.conf", "[[outputs.omnicore_test]]\n  "+tt.table+"\n")
			p, err := loadPluginFile(path, testPlugins)
			require.NoError(t, err)
			out := p.output.(*testOutput)
			require.NotNil(t, out.serializer, "SetSerializer was not called")
			b, err := out.serializer.Serialize(m)
			require.NoError(t, err)
			require.Equal(t, tt.expected, string(b))
		})
	}

	t.Run("input parser", func(t *testing.T) {
		conf := "[[inputs.omnicore_test]]\n" +
			"  data_format = \"json\"\n" +
			"  json_name_key = \"name\"\n" +
			"  tag_keys = [\"device\"]\n"
		path := writeFile(t, t.TempDir(), "plugin.conf", conf)
		p, err := loadPluginFile(path, testPlugins)
		require.NoError(t, err)
		in := p.input.(*testInput)
		require.NotNil(t, in.parserFunc, "SetParserFunc was not called")
		parser, err := in.parserFunc()
		require.NoError(t, err)
		metrics, err := parser.Parse([]byte(`{"name":"config","device":"sensor-01","temp":21.5}`))
		require.NoError(t, err)
		testutil.RequireMetricsEqual(t,
			[]telegraf.Metric{metric.New("config", map[string]string{"device": "sensor-01"}, map[string]any{"temp": 21.5}, time.Unix(0, 0))},
			metrics, testutil.IgnoreTime())
	})
}

// The sample.conf of each real plugin, as its README shows it, loads through
// this program's loader (the required keys are uncommented, the commented
// defaults are valid TOML once uncommented).
func TestRealPluginSampleConfigs(t *testing.T) {
	tests := []struct {
		name   string
		sample string
		kind   string
	}{
		{name: "outputs.omnicore", sample: outputs.Outputs["omnicore"]().SampleConfig(), kind: "outputs"},
		{name: "inputs.omnicore", sample: inputs.Inputs["omnicore"]().SampleConfig(), kind: "inputs"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, variant := range []struct{ name, text string }{
				{"as shipped", tt.sample},
				{"defaults uncommented", uncommentDefaults(tt.sample)},
			} {
				path := writeFile(t, t.TempDir(), "plugin.conf", variant.text)
				p, err := loadPluginFile(path, defaultPlugins)
				require.NoError(t, err, variant.name)
				require.Equal(t, tt.name, p.id(), variant.name)
				require.Equal(t, tt.kind, p.kind, variant.name)
			}
		})
	}
}

// uncommentDefaults turns the "  # key = value" lines of a sample.conf into
// settings, except tls_ca, whose example file the loader would read.
func uncommentDefaults(sample string) string {
	lines := strings.Split(sample, "\n")
	for i, l := range lines {
		// The commented gateways sub-table is uncommented whole, header
		// included.
		if strings.HasPrefix(l, "  # ") && (strings.Contains(l, " = ") || strings.HasPrefix(l, "  # [[")) && !strings.HasPrefix(l, "  # tls_ca ") {
			lines[i] = "  " + strings.TrimPrefix(l, "  # ")
		}
	}
	return strings.Join(lines, "\n")
}
