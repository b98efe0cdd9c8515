package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Issue 23 item 6: built in, states faster than the bridge's one per device
// per second made every Write wait for its device's turn, and Telegraf
// logged "did not complete within its flush interval" (9 times in this
// test before the fix, 17 in 16 s). The gateway keeps such a state for its turn
// without holding the Write: no such line, one state per device per second
// at the bridge, no bridge error.
func TestBuiltinFastStatesDoNotHoldTheFlush(t *testing.T) {
	const perDevice = 8 // states of each device at the bridge: about 8 s at 1/s
	s := newSetup(t)
	devices := []string{"dev-0", "dev-1", "dev-2", "dev-3"}
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	r := route{name: "builtin", builtin: true}
	var lines strings.Builder
	for _, d := range devices {
		lines.WriteString("devstate,device_id=" + d + " v=1i\n")
	}
	src := s.write("states.lp", lines.String())
	// A state of every device every 200 ms, flushed every 500 ms.
	tg := s.startBin(r.bin(), Agent(200*time.Millisecond, 500*time.Millisecond)+fileInput(src)+
		s.output(r, gw, `state_metrics = ["devstate"]`))
	s.waitEmulator(60*time.Second, "8 states per device", func() bool { return len(s.srv.Received()) >= perDevice*len(devices) })
	_, err := tg.Stop(10 * time.Second)
	require.NoError(t, err)

	log := tg.Log()
	prev := map[string]time.Time{}
	states := 0
	for _, m := range s.srv.Received() {
		require.Equal(t, omnicore.KindState, m.Kind)
		if p, ok := prev[m.Device]; ok {
			require.GreaterOrEqual(t, m.Time.Sub(p), omnicore.StateInterval, "state of %s", m.Device)
		}
		prev[m.Device] = m.Time
		states++
	}
	warned := strings.Count(log, "did not complete within its flush interval")
	t.Logf("a state per device every 200 ms, 4 devices, flush_interval 500ms, until %d states per device reached the bridge: %d lines 'did not complete within its flush interval', %d states at the bridge",
		perDevice, warned, states)
	require.Zero(t, warned, log)
	require.Empty(t, s.srv.ErrorsSent())
	require.NotContains(t, log, " E! ")
}
