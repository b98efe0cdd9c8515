package gateway

import (
	"context"
	"regexp"
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
		case e.Level == 'I' && regexp.MustCompile(`^Connected to the bridge as "`+regexp.QuoteMeta(s.clientID)+`"; (1 device|\d+ devices) attached$`).MatchString(e.Text):
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
	b, log, s := fastReconnectSession(t, 0, 20*time.Millisecond)

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

// Issue 23: an outage that lasts is told again at most once per
// outageWarnInterval (a minute; shortened here), each W! with how long it
// has lasted and where the backlog waits; the attempts between at debug.
func TestLastingOutageWarnsOncePerInterval(t *testing.T) {
	defer func(d time.Duration) { outageWarnInterval = d }(outageWarnInterval)
	outageWarnInterval = 200 * time.Millisecond
	b, log, s := fastReconnectSession(t, 0, 10*time.Millisecond)

	b.srv.Stop()
	start := time.Now()
	warns := func() (n int) {
		for _, e := range log.Messages() {
			if e.Level == 'W' && strings.Contains(e.Text, "Still not connected") {
				require.Regexp(t, `after \d+s \(\d+ attempts\): .*; the metrics not acknowledged wait in Telegraf's buffer$`, e.Text)
				n++
			}
		}
		return n
	}
	waitUntil(t, 30*time.Second, func() bool { return warns() >= 3 }, "three W! of a lasting outage")
	require.NoError(t, b.srv.Restart())
	require.NoError(t, s.WaitReady(testCtx(t, 30*time.Second)))
	elapsed := time.Since(start)

	var errs, debug int
	for _, e := range log.Messages() {
		switch {
		case e.Level == 'E':
			errs++
		case e.Level == 'D' && strings.Contains(e.Text, "Connecting to the bridge as"):
			debug++
		}
	}
	require.Equal(t, 1, errs, "one E! when the outage began")
	require.LessOrEqual(t, warns(), int(elapsed/outageWarnInterval)+1, "at most one W! per interval in %s", elapsed)
	require.Greater(t, debug, warns(), "the attempts between the W! lines at debug")
}

// Issue 23: each outage line says where the metrics not acknowledged wait on
// its route, and only there: built in Telegraf's buffer; under execd what
// the output's runner reports (the spool, memory while the spool's disk
// fails, Telegraf's buffer with spool = false), or, before its first report,
// the output process's spool.
func TestOutageLinesSayWhereTheBacklogWaits(t *testing.T) {
	queue := func(spooled, inMemory, diskFailed int64) map[string]int64 {
		return map[string]int64{"spool_records": spooled, "memory_records": inMemory, "spool_disk_failed": diskFailed}
	}
	tests := []struct {
		name   string
		route  string
		source string // "" for no report
		gauges map[string]int64
		want   string
	}{
		{name: "built in", route: RouteBuiltIn, want: "the metrics not acknowledged wait in Telegraf's buffer"},
		{name: "execd, spool", route: RouteExecd, source: "spool /var/lib/x", gauges: queue(40, 2, 0), want: "42 metrics wait in the spool"},
		{name: "execd, spool empty so far", route: RouteExecd, source: "spool /var/lib/x", gauges: queue(0, 0, 0), want: "the metrics not acknowledged wait in the spool"},
		{name: "execd, spool disk failed", route: RouteExecd, source: "spool /var/lib/x", gauges: queue(0, 7, 1), want: "7 metrics wait in memory while the spool's disk fails"},
		{name: "execd, spool = false", route: RouteExecd, source: "memory queue", gauges: queue(0, 3, 0), want: "the metrics not acknowledged wait in Telegraf's buffer (spool = false)"},
		{name: "execd, no report yet", route: RouteExecd, want: "the metrics not acknowledged wait with the output process (in its spool, unless spool = false)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := *newTestBridge(t, 0).cfg
			cfg.Route = tt.route
			s, err := New(&cfg)
			require.NoError(t, err)
			if tt.source != "" {
				s.ReportGauges(tt.source, tt.gauges)
			}
			require.Equal(t, tt.want, s.backlog())
		})
	}
}
