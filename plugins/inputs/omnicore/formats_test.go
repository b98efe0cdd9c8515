package omnicore

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf/testutil"

	// The parsers the execd binary and make telegraf-builtin include,
	// beyond those of the other tests.
	_ "github.com/influxdata/telegraf/plugins/parsers/binary"
	_ "github.com/influxdata/telegraf/plugins/parsers/json_v2"
	_ "github.com/influxdata/telegraf/plugins/parsers/xpath"
)

// The data formats Telegraf users pair with MQTT parse config payloads,
// configured through Telegraf's config loader as in a plugin file or
// telegraf.conf.
func TestParserFormats(t *testing.T) {
	tests := []struct {
		name    string
		options string
		payload []byte
		fields  map[string]any
	}{
		{
			name: "json_v2",
			options: `data_format = "json_v2"
  [[inputs.omnicore.json_v2]]
    measurement_name = "cfg"
    [[inputs.omnicore.json_v2.field]]
      path = "sample_rate"
      type = "int"`,
			payload: []byte(`{"sample_rate":5,"ignored":true}`),
			fields:  map[string]any{"sample_rate": int64(5)},
		},
		{
			name: "xpath_json",
			options: `data_format = "xpath_json"
  [[inputs.omnicore.xpath]]
    metric_name = "'cfg'"
    [inputs.omnicore.xpath.fields_int]
      sample_rate = "/sample_rate"`,
			payload: []byte(`{"sample_rate":5}`),
			fields:  map[string]any{"sample_rate": int64(5)},
		},
		{
			name: "xml",
			options: `data_format = "xml"
  [[inputs.omnicore.xpath]]
    metric_name = "'cfg'"
    [inputs.omnicore.xpath.fields_int]
      sample_rate = "/config/sample_rate"`,
			payload: []byte(`<config><sample_rate>5</sample_rate></config>`),
			fields:  map[string]any{"sample_rate": int64(5)},
		},
		{
			name: "xpath_msgpack",
			options: `data_format = "xpath_msgpack"
  [[inputs.omnicore.xpath]]
    metric_name = "'cfg'"
    [inputs.omnicore.xpath.fields_int]
      sample_rate = "/sample_rate"`,
			// {"sample_rate": 5} in MessagePack.
			payload: append([]byte{0x81, 0xab}, append([]byte("sample_rate"), 0x05)...),
			fields:  map[string]any{"sample_rate": int64(5)},
		},
		{
			name:    "value",
			options: "data_format = \"value\"\n  data_type = \"integer\"\n  value_field_name = \"sample_rate\"",
			payload: []byte("5"),
			fields:  map[string]any{"sample_rate": int64(5)},
		},
		{
			name: "binary",
			options: `data_format = "binary"
  endianness = "be"
  [[inputs.omnicore.binary]]
    metric_name = "cfg"
    [[inputs.omnicore.binary.entries]]
      name = "sample_rate"
      type = "uint16"`,
			payload: []byte{0x00, 0x05},
			fields:  map[string]any{"sample_rate": uint64(5)},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, fake := loadPlugin(t, tt.options)
			var acc testutil.Accumulator
			start(t, p, fake, &acc, 2)
			in := configMsg(testGateway, "")
			in.Payload = tt.payload
			fake.Deliver(in)
			waitMetrics(t, &acc, 1)
			m := acc.GetTelegrafMetrics()[0]
			require.Equal(t, tt.fields, m.Fields(), "%s: %v", m.Name(), m)
			require.Equal(t, map[string]string{"gateway_id": testGateway, "registry_id": testRegistry, "device_id": testGateway, "kind": "config"}, m.Tags())
			require.Zero(t, p.parseErrors.Load())
		})
	}
}
