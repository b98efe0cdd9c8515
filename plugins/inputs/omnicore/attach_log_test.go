package omnicore

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/plugins/outputs"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	outomni "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// Issue 23 item 7: built in, the output and the input of a gateway share
// one session, whose logger is that of the plugin that started it (here the
// output). A device listed only in the input that the bridge refuses is
// reported by the input, once at W! ("further attempts are logged at debug
// level"), and its further attempts are at debug: nothing about it from the
// output, at any level above debug, however often it is tried again.
func TestRefusedDeviceReportedByTheInputOnly(t *testing.T) {
	const stranger = "stranger"
	b := newBridge(t, "sensor-01")
	// Registered, not bound to the gateway: the bridge refuses its attach.
	require.NoError(t, b.srv.AddDevice(testRegistry, emulator.Device{ID: stranger}))

	outLog := &testutil.CaptureLogger{Name: "outputs.omnicore"}
	out := outputs.Outputs["omnicore"]().(*outomni.OmniCore)
	b.connectTo(&out.Options)
	out.Log = outLog
	require.NoError(t, out.Init())
	require.NoError(t, out.Connect()) // starts the session: its logger is the output's
	t.Cleanup(func() { require.NoError(t, out.Close()) })

	inLog := &testutil.CaptureLogger{Name: "inputs.omnicore"}
	in := b.plugin(t, func(p *OmniCore) {
		p.Devices = []string{"sensor-01", stranger}
		p.Log = inLog
	})
	in.retryMin = 50 * time.Millisecond
	in.Host.Route = "" // built in: one process, one session
	var acc testutil.Accumulator
	require.NoError(t, in.Start(&acc))
	t.Cleanup(in.Stop)

	// Several refusals: the first attempt and retries after it.
	ctx, cancel := context.WithTimeout(context.Background(), 2*eventTimeout)
	defer cancel()
	require.NoError(t, b.srv.WaitFor(ctx, func() bool { return in.conn.Stats().AttachesFailed >= 4 }),
		"the bridge refused %q fewer than 4 times", stranger)
	b.waitSubscribed(t, "sensor-01")

	var warned, debugRetries int
	for _, e := range inLog.Messages() {
		if !strings.Contains(e.Text, stranger) {
			continue
		}
		switch e.Level {
		case 'W':
			require.Contains(t, e.Text, "further attempts are logged at debug level")
			warned++
		case 'D':
			debugRetries++
		default:
			require.Failf(t, "an attach failure above debug", "%c! %s", e.Level, e.Text)
		}
	}
	require.Equal(t, 1, warned, "one W! from the input: %v", inLog.Messages())
	require.Positive(t, debugRetries, "the further attempts at debug")
	for _, e := range outLog.Messages() {
		if e.Level != 'D' {
			require.NotContains(t, e.Text, stranger, "the output did not ask for the device: %c! %s", e.Level, e.Text)
		}
	}
	t.Logf("%d refusals: 1 W! and %d debug lines from the input, none from the output above debug", in.conn.Stats().AttachesFailed, debugRetries)
}
