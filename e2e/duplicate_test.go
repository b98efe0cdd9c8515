package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// Issue 21 item 5, issue 23 item 3: two built-in Telegraf processes of one
// gateway (two hosts from one cloned image) kick each other off the
// bridge. Each says so in one E! naming a probable second connection with
// the same gateway ID, not only "Connection to the bridge lost".
func TestBuiltinDuplicateGatewayIsReported(t *testing.T) {
	s := newSetup(t)
	devices := []string{"dev-0"}
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	r := route{name: "builtin", builtin: true}
	src := s.write("telemetry.lp", "telemetry,device_id=dev-0 value=1i\n")
	config := Agent(500*time.Millisecond, 200*time.Millisecond) + fileInput(src) + s.output(r, gw)
	first := s.startBin(r.bin(), config)
	s.waitEmulator(30*time.Second, "the first host connected", func() bool { return len(s.srv.Received()) > 0 })
	second := s.startBin(r.bin(), config)

	const reported = "probably a second connection with the same gateway ID"
	deadline := time.Now().Add(60 * time.Second)
	for !(strings.Contains(first.Log(), reported) && strings.Contains(second.Log(), reported)) {
		require.True(t, time.Now().Before(deadline), "no E! about the duplicate gateway in 60 s (%d and %d W! lines 'Connection to the bridge lost')",
			warnLost(first.Log()), warnLost(second.Log()))
		time.Sleep(50 * time.Millisecond) // polls the logs: they have no event to wait on
	}
	kicks := 0
	for _, c := range s.srv.Connections() {
		if c.Reason == emulator.ReasonTakenOver {
			kicks++
		}
	}
	for name, tg := range map[string]*Telegraf{"first": first, "second": second} {
		log := tg.Log()
		lines := 0
		for _, l := range strings.Split(log, "\n") {
			if strings.Contains(l, reported) {
				require.Contains(t, l, " E! ")
				require.Contains(t, l, `"edge-gw"`)
				lines++
			}
		}
		t.Logf("%s host: %d E! line about the duplicate, %d W! 'Connection to the bridge lost' (kicks recorded by the bridge so far: %d)",
			name, lines, warnLost(log), kicks)
		require.Equal(t, 1, lines, "once a minute at most")
	}
}

// warnLost counts the W! lines of a lost connection.
func warnLost(log string) int {
	n := 0
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, " W! ") && strings.Contains(l, "Connection to the bridge lost") {
			n++
		}
	}
	return n
}
