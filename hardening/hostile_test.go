package hardening

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/serializers/influx"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// hostileLine is one metric the generator writes and where it must end.
type hostileLine struct {
	name    string
	device  *string // nil: no device_id tag
	sub     string  // subfolder_tag value, "" for none
	state   bool
	pad     int    // bytes of a string field
	outcome string // "" for accepted, else the drop reason the output counts
	// topicSub is the subfolder the topic gets when it differs from sub.
	topicSub string
}

// TestHostileInputEndToEnd sends metrics with hostile device tags and
// subfolders, and payloads over the bridge's limits, through a real
// Telegraf into the output: none reaches a topic outside
// /{registry}/{valid device}/, each one is counted under its drop reason,
// the good metrics around them all arrive, and the output neither crashes
// nor gets its connection closed by the bridge.
func TestHostileInputEndToEnd(t *testing.T) {
	w := newWorld(t)
	gw := w.gateway("dev-01", "dev-02", "dev-03")
	output := w.write("omnicore-output.conf", gw.OutputFile(`subfolder_tag = "sub"`, `state_metrics = ["bigstate"]`))

	dev := func(s string) *string { return &s }
	lines := []hostileLine{
		{name: "valid", device: dev("dev-01")},
		{name: "valid state", device: dev("dev-02"), state: true},
		{name: "valid subfolder", device: dev("dev-01"), sub: "x/y"},
		{name: "slash", device: dev("/"), outcome: "invalid_device"},
		{name: "path", device: dev("dev-01/events"), outcome: "invalid_device"},
		{name: "traversal", device: dev("dev-01/../dev-02"), outcome: "invalid_device"},
		{name: "plus", device: dev("+"), outcome: "invalid_device"},
		{name: "plus inside", device: dev("dev+01"), outcome: "invalid_device"},
		{name: "hash", device: dev("#"), outcome: "invalid_device"},
		{name: "hash inside", device: dev("dev#"), outcome: "invalid_device"},
		{name: "dot dot", device: dev(".."), outcome: "invalid_device"},
		{name: "dot dot inside", device: dev("dev..01"), outcome: "invalid_device"},
		{name: "300 bytes", device: dev("d" + strings.Repeat("x", 299)), outcome: "invalid_device"},
		{name: "invalid UTF-8", device: dev("dev-\xff\xfe"), outcome: "invalid_device"},
		{name: "non-ASCII", device: dev("dév"), outcome: "invalid_device"},
		{name: "space", device: dev("dev 01"), outcome: "invalid_device"},
		{name: "comma and equals", device: dev("dev,a=b"), outcome: "invalid_device"},
		{name: "dollar", device: dev("$SYS"), outcome: "invalid_device"},
		{name: "starts with a digit", device: dev("01dev"), outcome: "invalid_device"},
		{name: "no device tag", outcome: "missing_device"},
		{name: "valid but unknown", device: dev("dev%2Fx"), outcome: "attach_refused"},
		{name: "valid but unbound", device: dev("Dev.x_~"), outcome: "attach_refused"},
		{name: "subfolder plus", device: dev("dev-01"), sub: "a/+/b", outcome: "invalid_subfolder"},
		{name: "subfolder hash", device: dev("dev-01"), sub: "#", outcome: "invalid_subfolder"},
		{name: "subfolder traversal", device: dev("dev-01"), sub: "../x", outcome: "invalid_subfolder"},
		{name: "subfolder empty level", device: dev("dev-01"), sub: "a//b", outcome: "invalid_subfolder"},
		{name: "subfolder leading slash", device: dev("dev-01"), sub: "/a", outcome: "invalid_subfolder"},
		{name: "subfolder 300 bytes", device: dev("dev-01"), sub: strings.Repeat("s", 300), outcome: "invalid_subfolder"},
		// Telegraf's line protocol parser replaces invalid UTF-8 with
		// U+FFFD before the output sees it: a valid subfolder then. (The
		// output's own rules refuse invalid UTF-8: FuzzTopic.)
		{name: "subfolder invalid UTF-8", device: dev("dev-01"), sub: "x\xff", topicSub: "x\uFFFD"},
		{name: "event of 200 KB (a line over 64 KiB)", device: dev("dev-03"), pad: 200 << 10},
		{name: "event over 256 KB", device: dev("dev-03"), pad: 300 << 10, outcome: "too_large"},
		{name: "state of 10 KB", device: dev("dev-03"), state: true, pad: 10 << 10},
		{name: "state over 64 KB", device: dev("dev-01"), state: true, pad: 70 << 10, outcome: "too_large"},
		{name: "valid after all that", device: dev("dev-02")},
	}
	serializer := &influx.Serializer{}
	require.NoError(t, serializer.Init())
	spec := GenSpec{}
	valid := map[int64]hostileLine{}
	wantDropped := map[string]int{}
	for i, l := range lines {
		tags := map[string]string{}
		if l.device != nil {
			tags["device_id"] = *l.device
		}
		if l.sub != "" {
			tags["sub"] = l.sub
		}
		fields := map[string]any{"n": int64(i)}
		if l.pad > 0 {
			fields["pad"] = strings.Repeat("p", l.pad)
		}
		name := MeasurementEvent
		if l.state {
			name = "bigstate"
		}
		b, err := serializer.Serialize(metric.New(name, tags, fields, time.Unix(0, int64(i+1))))
		require.NoError(t, err)
		spec.Lines = append(spec.Lines, strings.TrimSuffix(string(b), "\n"))
		if l.outcome == "" {
			valid[int64(i)] = l
		} else {
			wantDropped[l.outcome]++
		}
	}
	start := time.Now()
	w.start(agent + w.generatorInput(spec) + outputBlock(output))

	// The tally only knows the generator's measurements; count bigstate too.
	received := func() map[int64]string {
		out := map[int64]string{}
		for _, m := range w.srv.Received() {
			for i, l := range lines {
				if strings.Contains(string(m.Payload), fmt.Sprintf("n=%di", i)) && l.outcome == "" {
					out[int64(i)] = m.Topic
				}
			}
		}
		return out
	}
	w.waitFor(90*time.Second, "the valid metrics accepted and the others counted", func() bool {
		return len(received()) == len(valid) && ParseLog(w.tg.Log()).DroppedTotal() >= len(lines)-len(valid)
	})
	elapsed := time.Since(start)
	w.stop()
	logf := ParseLog(w.tg.Log())

	// Where everything went.
	got := received()
	want := map[int64]string{}
	for n, l := range valid {
		topic := "/plant/" + *l.device + "/events"
		if l.state {
			topic = "/plant/" + *l.device + "/state"
		}
		switch {
		case l.topicSub != "":
			topic += "/" + l.topicSub
		case l.sub != "":
			topic += "/" + l.sub
		}
		want[n] = topic
	}
	require.Equal(t, want, got)
	allowed := regexp.MustCompile(`^/plant/dev-0[123]/(events|events/x/y|events/x\x{FFFD}|state)$`)
	for _, m := range w.srv.Received() {
		require.Regexp(t, allowed, m.Topic)
	}
	require.Equal(t, wantDropped, logf.Dropped, "drops by reason")
	require.Equal(t, len(lines), logf.Acked, "Telegraf handed every line to the output")
	require.Zero(t, logf.Restarts, "the output process restarted")

	// The bridge never had to close the connection (a bad topic, an oversize
	// payload) and refused only the two valid IDs it does not know.
	for _, c := range w.srv.Connections() {
		require.NotContains(t, []string{emulator.ReasonBadTopic, emulator.ReasonPayloadTooLarge, emulator.ReasonProtocolError, emulator.ReasonQoS2}, c.Reason)
	}
	var refused []string
	for _, e := range w.srv.ErrorsSent() {
		refused = append(refused, e.Error.ErrorType+" "+e.Error.DeviceID)
	}
	sort.Strings(refused)
	require.Equal(t, []string{"GATEWAY_ATTACHMENT_ERROR Dev.x_~", "GATEWAY_ATTACHMENT_ERROR dev%2Fx"}, refused)

	// Each kind of drop is logged at warning level.
	for reason := range wantDropped {
		require.Contains(t, w.tg.Log(), warningFor[reason], "no warning for %s", reason)
	}
	t.Logf("%d metrics in %s: %d accepted on their device's topic, dropped and counted: %v", len(lines), elapsed.Round(time.Millisecond), len(got), logf.Dropped)
}

// warningFor is the start of the output's warning for each drop reason.
var warningFor = map[string]string{
	"invalid_device":    "W! [outputs.omnicore] Dropping metric \"seq\": tag \"device_id\" is not a valid device ID",
	"missing_device":    "W! [outputs.omnicore] Dropping metric \"seq\" without the device tag",
	"attach_refused":    "W! [outputs.omnicore] Dropping 1 metrics of device",
	"invalid_subfolder": "W! [outputs.omnicore] Dropping metric \"seq\" of device \"dev-01\"",
	"too_large":         "payload is",
}
