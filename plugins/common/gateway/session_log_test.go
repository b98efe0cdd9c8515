package gateway

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/influxdata/telegraf/testutil"
)

// Routine events are logged at debug level: a Telegraf user at the default
// info level sees the first connect, not one line per token renewal; and a
// session that closes does not report a lost connection or reconnect.
func TestLogLevelsOfRoutineEvents(t *testing.T) {
	b := newTestBridge(t, 2)
	log := &testutil.CaptureLogger{Name: "gateway"}
	b.cfg.Log = log
	b.cfg.TokenLifetime = 2 * time.Second
	b.cfg.RenewBefore = 1500 * time.Millisecond
	s, err := New(b.cfg)
	require.NoError(t, err)
	s.Start()
	ctx := testCtx(t, 30*time.Second)
	require.NoError(t, s.WaitReady(ctx))
	require.NoError(t, s.Attach(ctx, deviceName(0)))
	waitUntil(t, 30*time.Second, func() bool { return s.Stats().TokenRenewals >= 2 && s.Stats().Connected }, "two token renewals")

	closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	require.NoError(t, s.Close(closeCtx))

	var connectedInfo, renewedDebug int
	for _, e := range log.Messages() {
		switch {
		case e.Level == 'I' && e.Text == `Connected to the bridge as "`+s.clientID+`"`:
			connectedInfo++
		case e.Level == 'D' && e.Text == `Connected to the bridge as "`+s.clientID+`" with the renewed token`:
			renewedDebug++
		}
		if e.Level != 'D' {
			require.NotContains(t, e.Text, "Re-attached", "a re-attach after a renewal is routine")
			require.NotContains(t, e.Text, "lost", "closing is not losing the connection")
			require.NotContains(t, e.Text, "reconnecting")
		}
	}
	require.Equal(t, 1, connectedInfo)
	require.GreaterOrEqual(t, renewedDebug, 2)
	require.Zero(t, s.Stats().ConnectionLost)
}

// Issue 23: an outage of the bridge is one line per change of state, not a
// line per attempt: one E! when connecting first fails (with the reason),
// the attempts after it at debug (a W! once a minute while it lasts), one
// I! with its length when a connect succeeds again.
func TestConnectOutageLoggedOnce(t *testing.T) {
	b := newTestBridge(t, 0)
	log := &testutil.CaptureLogger{Name: "gateway"}
	b.cfg.Log = log
	b.cfg.MinReconnect = 5 * time.Millisecond
	b.cfg.MaxReconnect = 20 * time.Millisecond
	s := startSession(t, b.cfg)

	b.srv.Stop()
	waitUntil(t, 30*time.Second, func() bool { return s.Stats().ConnectFailures >= 20 }, "20 failed connects")
	require.NoError(t, b.srv.Restart())
	require.NoError(t, s.WaitReady(testCtx(t, 30*time.Second)))

	var errs, warns, back int
	for _, e := range log.Messages() {
		switch {
		case e.Level == 'E' && strings.Contains(e.Text, "Connecting to the bridge as"):
			errs++
		case e.Level == 'W' && strings.Contains(e.Text, "Still not connected"):
			warns++
		case e.Level == 'I' && strings.Contains(e.Text, "failed attempts"):
			back++
		}
	}
	require.Equal(t, 1, errs, "one E! for %d failed connects", s.Stats().ConnectFailures)
	require.Zero(t, warns, "no W! within the first minute")
	require.Equal(t, 1, back, "one I! when connected again")
}
