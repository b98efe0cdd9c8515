package omnicore

import (
	"context"
	"encoding/base64"
	"fmt"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	influxparser "github.com/influxdata/telegraf/plugins/parsers/influx"
	influxserializer "github.com/influxdata/telegraf/plugins/serializers/influx"
	"github.com/influxdata/telegraf/testutil"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway/gatewaytest"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// fuzzFormats are the data_format settings the fuzzer feeds payloads to:
// every parser the execd binary ships (influx, json, value, csv), with the
// options users set most.
var fuzzFormats = []string{
	"", // no data_format: raw metrics
	`data_format = "influx"`,
	`data_format = "json"`,
	"data_format = \"json\"\n  tag_keys = [\"site\", \"device_id\", \"kind\"]\n  json_string_fields = [\"*\"]",
	"data_format = \"value\"\n  data_type = \"float\"",
	"data_format = \"value\"\n  data_type = \"integer\"",
	"data_format = \"value\"\n  data_type = \"string\"",
	"data_format = \"value\"\n  data_type = \"boolean\"",
	"data_format = \"csv\"\n  csv_header_row_count = 1",
	"data_format = \"csv\"\n  csv_column_names = [\"a\", \"b\"]\n  csv_tag_columns = [\"b\"]",
}

// FuzzInboundPayload delivers arbitrary config and command payloads to the
// plugin for every data format: it never panics, every message becomes at
// least one metric carrying the plugin's tags (which a payload cannot spoof),
// a raw metric keeps the exact payload, and every metric survives the trip
// to Telegraf: the shim serializes it as line protocol (a metric it cannot
// serialize stops the shim's writer, and with it the whole input) and
// inputs.execd parses it back.
func FuzzInboundPayload(f *testing.F) {
	seeds := []string{
		"", "{}", "[]", `{"a":1}`, `{"a":"x","site":"north","device_id":"spoof","kind":"spoof"}`, `[{"a":1},{"b":2}]`,
		`{"a":{"b":[1,2,{"c":null}]}}`, `{"a":1e400}`, `{"":1}`, `{"a":true}`, "null", `"str"`, "1", "-0", "NaN", "+Inf",
		"1.5e308", "99999999999999999999", "true", "nope", "cpu usage=1", "cpu,device_id=spoof usage=1 1",
		"cpu usage=1 1\nmem free=2i 2", "cpu", "m v=\"unterminated", "a,b\n1,2\n", "a,b\n1\n", ",\n,\n", "a,a\n1,2\n",
		"\"\"\n\"\"", "x\n", "\x00\xff\xfe", "caf\xc3", "\ufeff{\"a\":1}", "a=1", "m\\ v=1",
	}
	for i, s := range seeds {
		f.Add(uint8(i), uint8(i%2), []byte(s))
	}
	plugins := make([]*fuzzPlugin, len(fuzzFormats))
	for i, format := range fuzzFormats {
		plugins[i] = newFuzzPlugin(f, format)
	}
	serializer := &influxserializer.Serializer{}
	if err := serializer.Init(); err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, format, kind uint8, payload []byte) {
		fp := plugins[int(format)%len(plugins)]
		in := gateway.Inbound{Device: "dev1", Kind: omnicore.KindConfig, Payload: payload}
		wantTags := map[string]string{"gateway_id": testGateway, "registry_id": testRegistry, "device_id": "dev1", "kind": kindConfig}
		if kind%2 == 1 {
			in.Kind, in.Subfolder = omnicore.KindCommands, "a/b"
			wantTags["kind"], wantTags["subfolder"] = kindCommand, "a/b"
		}
		fp.acc.ClearMetrics()
		parseErrors := fp.plugin.parseErrors.Load()
		fp.fake.Deliver(in)
		metrics := fp.acc.GetTelegrafMetrics()
		if len(metrics) == 0 {
			t.Fatalf("%s: payload %q became no metric", fp.format, payload)
		}
		if fp.plugin.DataFormat == "" || len(payload) == 0 || fp.plugin.parseErrors.Load() != parseErrors {
			// Not parsed, or the parser failed: one raw metric.
			wantName := measurementConfig
			if kind%2 == 1 {
				wantName = measurementCommand
			}
			if len(metrics) != 1 || metrics[0].Name() != wantName {
				t.Fatalf("%s: payload %q: want one raw %s metric, got %v", fp.format, payload, wantName, metrics)
			}
			raw, _ := metrics[0].GetField("payload")
			checkRaw(t, payload, raw, metrics[0])
		}
		for _, m := range metrics {
			m.Accept() // frees the max_undelivered_messages slot
			for k, v := range wantTags {
				if got, _ := m.GetTag(k); got != v {
					t.Fatalf("%s: payload %q: tag %s = %q, want %q (metric %v)", fp.format, payload, k, got, v, m)
				}
			}
			line, err := serializer.Serialize(m)
			if err != nil {
				t.Fatalf("%s: payload %q: metric %v cannot be serialized for the shim's stdout: %v", fp.format, payload, m, err)
			}
			parser := &influxparser.Parser{}
			if err := parser.Init(); err != nil {
				t.Fatal(err)
			}
			back, err := parser.Parse(line)
			if err != nil || len(back) != 1 {
				t.Fatalf("%s: payload %q: line %q does not parse back as one metric: %v", fp.format, payload, line, err)
			}
		}
	})
}

// checkRaw checks a raw metric: its payload field is valid UTF-8 and, with
// payload_base64 when the payload is not, gives back the exact bytes.
func checkRaw(t *testing.T, payload []byte, raw any, m telegraf.Metric) {
	t.Helper()
	text, ok := raw.(string)
	if !ok || !utf8.ValidString(text) {
		t.Fatalf("raw payload field %q is not valid UTF-8 text (metric %v)", raw, m)
	}
	b64, hasB64 := m.GetField("payload_base64")
	if !hasB64 {
		if text != string(payload) {
			t.Fatalf("raw payload %q, want %q", text, payload)
		}
		return
	}
	exact, err := base64.StdEncoding.DecodeString(b64.(string))
	if err != nil || string(exact) != string(payload) {
		t.Fatalf("payload_base64 %q does not give back %q: %v", b64, payload, err)
	}
}

type fuzzPlugin struct {
	format string
	plugin *OmniCore
	fake   *gatewaytest.Conn
	acc    *testutil.Accumulator
}

// newFuzzPlugin loads the plugin with Telegraf's config loader (which hands
// it the parser of data_format) and starts it on a fake gateway.
func newFuzzPlugin(f *testing.F, format string) *fuzzPlugin {
	f.Helper()
	key, _, err := omnicore.WriteKeyPair(f.TempDir(), "gateway", omnicore.ES256)
	if err != nil {
		f.Fatal(err)
	}
	toml := fmt.Sprintf(`
[[inputs.omnicore]]
  servers = ["tls://127.0.0.1:8883"]
  subscription_id = "sub"
  registry_id = %q
  gateway_id = %q
  private_key = %q
  algorithm = "ES256"
  devices = ["dev1"]
  %s
`, testRegistry, testGateway, key, format)
	c := config.NewConfig()
	if err := c.LoadConfigData([]byte(toml), ""); err != nil {
		f.Fatalf("%s: %v", format, err)
	}
	p := c.Inputs[0].Input.(*OmniCore)
	p.Log = testutil.Logger{Name: "inputs.omnicore", Quiet: true}
	fake := gatewaytest.New(testGateway)
	p.acquire = func(*gateway.Config) (gateway.Conn, func(), error) { return fake, func() {}, nil }
	if err := p.Init(); err != nil {
		f.Fatalf("%s: %v", format, err)
	}
	acc := &testutil.Accumulator{}
	if err := p.Start(acc); err != nil {
		f.Fatal(err)
	}
	f.Cleanup(p.Stop)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := fake.WaitFor(ctx, func() bool { return fake.Attached("dev1") }); err != nil {
		f.Fatalf("dev1 was not attached: %v", err)
	}
	return &fuzzPlugin{format: format, plugin: p, fake: fake, acc: acc}
}
