package gateway

import (
	"context"
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
