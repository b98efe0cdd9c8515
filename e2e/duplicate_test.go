package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// Issue 23 item 3: two built-in Telegraf processes of one gateway on one
// host (a `telegraf --test` beside the service, or two Telegraf builds)
// never kick each other: the second waits for the first's host claim, says
// so once at E!, and connects once the first has stopped. (Two hosts of one
// gateway, which no host claim can see, are reported by the bridge-side
// detection: TestDuplicateClientIDReported in plugins/common/gateway.)
func TestBuiltinSecondProcessOfOneGatewayWaits(t *testing.T) {
	s := newSetup(t)
	devices := []string{"dev-0"}
	gw := s.gatewayFor("plant", "edge-gw", devices...)
	r := route{name: "builtin", builtin: true}
	src := s.write("telemetry.lp", "telemetry,device_id=dev-0 value=1i\n")
	config := Agent(500*time.Millisecond, 200*time.Millisecond) + fileInput(src) + s.output(r, gw)
	first := s.startBin(r.bin(), config)
	s.waitEmulator(30*time.Second, "the first process delivered", func() bool { return len(s.srv.Received()) > 0 })
	second := s.startBin(r.bin(), config)

	const waiting = "on this host connects as gateway"
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(second.Log(), waiting) {
		require.True(t, time.Now().Before(deadline), "the second process said nothing of the first in 30 s:\n%s", second.Log())
		time.Sleep(50 * time.Millisecond) // polls the log: it has no event to wait on
	}
	delivered := len(s.srv.Received())
	s.waitEmulator(30*time.Second, "the first process keeps delivering", func() bool { return len(s.srv.Received()) > delivered+2 })
	require.Zero(t, kicks(s.srv), "no connection was kicked")
	require.Equal(t, 1, countLines(second.Log(), waiting, " E! "), "said once, at E!")
	require.Contains(t, second.Log(), `"edge-gw"`)

	_, err := first.Stop(10 * time.Second)
	require.NoError(t, err)
	gatewayConnections := func() int {
		n := 0
		for _, c := range s.srv.Connections() {
			if c.Device == "edge-gw" && !c.Refused {
				n++
			}
		}
		return n
	}
	s.waitEmulator(30*time.Second, "the second process connects once the first stopped", func() bool { return gatewayConnections() >= 2 })
	require.Zero(t, kicks(s.srv), "no connection was kicked")
}

// kicks counts the connections the bridge closed for a newer one with the
// same client ID.
func kicks(srv *emulator.Server) int {
	n := 0
	for _, c := range srv.Connections() {
		if c.Reason == emulator.ReasonTakenOver {
			n++
		}
	}
	return n
}

// countLines counts the lines of log holding every one of parts.
func countLines(log string, parts ...string) int {
	n := 0
	for _, l := range strings.Split(log, "\n") {
		all := true
		for _, p := range parts {
			all = all && strings.Contains(l, p)
		}
		if all {
			n++
		}
	}
	return n
}
