package omnicore

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/testutil"

	// The serializers the execd binary and make telegraf-builtin include,
	// beyond those of the other tests.
	_ "github.com/influxdata/telegraf/plugins/serializers/binary"
	_ "github.com/influxdata/telegraf/plugins/serializers/msgpack"
	_ "github.com/influxdata/telegraf/plugins/serializers/template"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
)

// The serializers Telegraf users pair with MQTT write the payloads,
// configured through Telegraf's config loader.
func TestSerializerFormats(t *testing.T) {
	tests := []struct {
		name    string
		options string
		payload []byte
	}{
		{
			name:    "template",
			options: "data_format = \"template\"\n  template = '{{ .Name }} temp={{ .Field \"temp\" }}'",
			payload: []byte("climate temp=21"),
		},
		{
			name:    "binary",
			options: "data_format = \"binary\"\n  endianness = \"be\"\n  entries = [{ read_from = \"field\", name = \"temp\", data_format = \"uint16\" }]",
			payload: []byte{0x00, 21},
		},
		{
			name:    "msgpack",
			options: `data_format = "msgpack"`,
			// Telegraf's msgpack metric: a map of name, time, tags and
			// fields (checked by its own tests); here its first bytes.
			payload: nil,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := config.NewConfig()
			require.NoError(t, c.LoadConfigData([]byte(fmt.Sprintf(`
[[outputs.omnicore]]
  servers = ["tls://127.0.0.1:8883"]
  subscription_id = "sub"
  registry_id = "reg"
  gateway_id = "gw"
  private_key = %q
  algorithm = "ES256"
  %s
`, keyFile(t), tt.options)), ""))
			require.Len(t, c.Outputs, 1)
			o := c.Outputs[0].Output.(*OmniCore)
			o.Log = &testutil.CaptureLogger{Name: "outputs.omnicore"}
			conn := gatewaytest.New("gw")
			o.acquire = func(*gateway.Config) (gateway.Conn, func(), error) { return conn, func() {}, nil }
			require.NoError(t, o.Init())
			require.NoError(t, o.Connect())
			defer o.Close()

			in := metric.New("climate", map[string]string{"device_id": "dev1"}, map[string]any{"temp": int64(21)}, t0)
			require.NoError(t, o.Write([]telegraf.Metric{in}))
			pub := conn.Published()
			require.Len(t, pub, 1)
			require.Equal(t, "dev1", pub[0].Device)
			if tt.payload != nil {
				require.Equal(t, tt.payload, pub[0].Payload)
				return
			}
			// fixmap of 4 entries, then "name" as a fixstr.
			require.Equal(t, append([]byte{0x84, 0xa4}, "name"...), pub[0].Payload[:6])
			require.Contains(t, string(pub[0].Payload), "climate")
			require.NotContains(t, string(pub[0].Payload), "device_id", "the routing tag is not part of the payload")
		})
	}
}
