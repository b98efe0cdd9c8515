package omnicore

import (
	"fmt"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/outputs"
	influxparser "github.com/influxdata/telegraf/plugins/parsers/influx"
	"github.com/influxdata/telegraf/plugins/serializers/influx"
	"github.com/influxdata/telegraf/testutil"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// newPlugin builds the plugin from its factory with valid connection options,
// runs mutate, Init and Connect on conn, and closes it when the test ends.
func newPlugin(t *testing.T, conn gateway.Conn, mutate ...func(*OmniCore)) *OmniCore {
	t.Helper()
	o := factoryPlugin(t)
	o.acquire = func(*gateway.Config) (gateway.Conn, func(), error) { return conn, func() {}, nil }
	for _, f := range mutate {
		f(o)
	}
	require.NoError(t, o.Init())
	require.NoError(t, o.Connect())
	t.Cleanup(func() { require.NoError(t, o.Close()) })
	return o
}

// factoryPlugin is the registered factory's plugin with the required
// options set and a capturing logger.
func factoryPlugin(t *testing.T) *OmniCore {
	t.Helper()
	creator, ok := outputs.Outputs["omnicore"]
	require.True(t, ok, "outputs.omnicore is not registered")
	o := creator().(*OmniCore)
	o.Servers = []string{"tcp://127.0.0.1:1883"}
	o.SubscriptionID = "test-sub"
	o.RegistryID = "reg"
	o.GatewayID = "gw"
	o.PrivateKey = keyFile(t)
	o.Algorithm = omnicore.ES256
	o.Log = &testutil.CaptureLogger{Name: "outputs.omnicore"}
	return o
}

// keyFile writes a fresh ES256 gateway key.
func keyFile(t *testing.T) string {
	t.Helper()
	path, _, err := omnicore.WriteKeyPair(t.TempDir(), "gw", omnicore.ES256)
	require.NoError(t, err)
	return path
}

// published is a message in a comparable form: the topic parts, the QoS and
// the metrics of the payload as sorted line protocol.
type published struct {
	Device    string
	Kind      omnicore.Kind
	Subfolder string
	QoS       byte
	Metrics   string
}

func (p published) String() string {
	return fmt.Sprintf("%s %s %q qos=%d\n%s", p.Device, p.Kind, p.Subfolder, p.QoS, p.Metrics)
}

// canonical renders metrics as line protocol with sorted fields.
func canonical(t *testing.T, ms ...telegraf.Metric) string {
	t.Helper()
	s := &influx.Serializer{SortFields: true}
	require.NoError(t, s.Init())
	var b strings.Builder
	for _, m := range ms {
		buf, err := s.Serialize(m)
		require.NoError(t, err)
		b.Write(buf)
	}
	return b.String()
}

// decode turns the fake's messages into their comparable form.
func decode(t *testing.T, msgs []gateway.Message) []string {
	t.Helper()
	out := make([]string, 0, len(msgs))
	for _, msg := range msgs {
		out = append(out, published{
			Device:    msg.Device,
			Kind:      msg.Kind,
			Subfolder: msg.Subfolder,
			QoS:       msg.QoS,
			Metrics:   canonical(t, parse(t, msg.Payload)...),
		}.String())
	}
	sort.Strings(out)
	return out
}

func parse(t *testing.T, payload []byte) []telegraf.Metric {
	t.Helper()
	p := &influxparser.Parser{}
	require.NoError(t, p.Init())
	ms, err := p.Parse(payload)
	require.NoError(t, err)
	return ms
}

// expect builds the comparable form of an expected message.
func expect(t *testing.T, device string, kind omnicore.Kind, subfolder string, ms ...telegraf.Metric) published {
	return published{Device: device, Kind: kind, Subfolder: subfolder, QoS: 1, Metrics: canonical(t, ms...)}
}

func strs(ps ...published) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.String())
	}
	sort.Strings(out)
	return out
}

var t0 = time.Unix(1700000000, 0)

// m is shorthand for metric.New with one int field and a time offset in
// seconds.
func m(name string, tags map[string]string, sec int) telegraf.Metric {
	return metric.New(name, tags, map[string]any{"value": int64(sec)}, t0.Add(time.Duration(sec)*time.Second))
}

// sized returns a metric whose line protocol, once the routing tags are
// removed, is exactly size bytes.
func sized(t *testing.T, name string, tags map[string]string, size, sec int) telegraf.Metric {
	t.Helper()
	s := &influx.Serializer{}
	require.NoError(t, s.Init())
	bare := metric.New(name, nil, map[string]any{"pad": ""}, t0.Add(time.Duration(sec)*time.Second))
	buf, err := s.Serialize(bare)
	require.NoError(t, err)
	pad := size - len(buf)
	require.GreaterOrEqual(t, pad, 0)
	out := metric.New(name, tags, map[string]any{"pad": strings.Repeat("x", pad)}, bare.Time())
	return out
}

// logView reads the plugin's testutil.CaptureLogger.
type logView struct{ *testutil.CaptureLogger }

func logOf(o *OmniCore) logView { return logView{o.Log.(*testutil.CaptureLogger)} }

// count returns how many lines of level ("E", "W", "I" or "D") contain substr.
func (l logView) count(level, substr string) int {
	n := 0
	for _, e := range l.Messages() {
		if e.Level == level[0] && strings.Contains(e.Text, substr) {
			n++
		}
	}
	return n
}

func (l logView) String() string {
	var b strings.Builder
	for _, e := range l.Messages() {
		b.WriteString(e.String())
		b.WriteByte('\n')
	}
	return b.String()
}
