package gateway

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// duplicateErrors counts the E! lines reporting a probable duplicate client ID.
func duplicateErrors(log *testutil.CaptureLogger) int {
	n := 0
	for _, e := range log.Errors() {
		if strings.Contains(e, "probably a second connection with the same gateway ID") {
			n++
		}
	}
	return n
}

// Issue 21 item 5, issue 23: two processes of one gateway (a cloned image)
// kick each other off the bridge, which keeps one connection per client ID.
// Each session reports it as one E! naming the probable cause, not only as
// lost connections, and at most once a minute while the kicks go on.
func TestDuplicateClientIDReported(t *testing.T) {
	b := newTestBridge(t, 0)
	logA := &testutil.CaptureLogger{Name: "host-a"}
	logB := &testutil.CaptureLogger{Name: "host-b"}
	cfgA, cfgB := *b.cfg, *b.cfg
	cfgA.Log, cfgB.Log = logA, logB
	a := startSession(t, &cfgA)
	other, err := New(&cfgB)
	require.NoError(t, err)
	other.hostClaim += "/another-host" // two hosts: the host claim does not apply
	other.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		other.Close(ctx)
	})

	waitUntil(t, 30*time.Second, func() bool { return duplicateErrors(logA) > 0 && duplicateErrors(logB) > 0 }, "both hosts report the duplicate")
	kicks := 0
	for _, c := range b.srv.Connections() {
		if c.Reason == emulator.ReasonTakenOver {
			kicks++
		}
	}
	// The kicks go on; the report does not repeat within the minute.
	waitUntil(t, 30*time.Second, func() bool { return a.Stats().DuplicateSuspected >= 10 }, "more kicks")
	t.Logf("kicks recorded by the bridge when both had reported: %d; lost connections: host a %d, host b %d; E! lines: host a %d, host b %d; W! lines: host a %d, host b %d",
		kicks, a.Stats().ConnectionLost, other.Stats().ConnectionLost, len(logA.Errors()), len(logB.Errors()), len(logA.Warnings()), len(logB.Warnings()))
	require.GreaterOrEqual(t, kicks, duplicateAfter)
	require.Equal(t, 1, duplicateErrors(logA))
	require.Equal(t, 1, duplicateErrors(logB))
	require.Contains(t, logA.Errors()[0], `same gateway ID "gw"`)
}

// A couple of kicks (a bridge restart, a network flap) are not reported as
// a duplicate client ID.
func TestTwoKicksAreNotADuplicate(t *testing.T) {
	b := newTestBridge(t, 0)
	log := &testutil.CaptureLogger{Name: "gateway"}
	b.cfg.Log = log
	s := startSession(t, b.cfg)
	for i := range duplicateAfter - 1 {
		b.srv.KickAll()
		waitUntil(t, 10*time.Second, func() bool { return s.Stats().Connects == uint64(i+2) && s.Stats().Connected }, "reconnected")
	}
	require.Zero(t, duplicateErrors(log))
	require.Zero(t, s.Stats().DuplicateSuspected)
}

// Issue 23 item 3: a second session of one gateway on the same host (a
// telegraf --test beside the service, built in) waits for the first, says
// so once at E!, and never kicks it; it connects once the first is gone.
func TestSecondSessionOnOneHostWaits(t *testing.T) {
	b := newTestBridge(t, 0)
	logA := &testutil.CaptureLogger{Name: "service"}
	logB := &testutil.CaptureLogger{Name: "test-run"}
	cfgA, cfgB := *b.cfg, *b.cfg
	cfgA.Log, cfgB.Log = logA, logB
	a, err := New(&cfgA)
	require.NoError(t, err)
	a.Start()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, a.WaitReady(ctx))

	second := startWaiting(t, &cfgB)
	waitUntil(t, 10*time.Second, func() bool { return len(logB.Errors()) > 0 }, "the second session says why it does not connect")
	require.Contains(t, logB.Errors()[0], "on this host connects as gateway")
	connected, lastErr := second.Health()
	require.False(t, connected)
	require.ErrorContains(t, lastErr, "connects as gateway")
	require.NoError(t, a.Publish(ctx, Message{Device: testGateway, Kind: omnicore.KindEvents, QoS: 1, Payload: []byte("still connected")}))
	require.Equal(t, uint64(1), a.Stats().Connects)
	require.Zero(t, a.Stats().ConnectionLost, "the first session was never kicked")

	closeCtx, closeCancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer closeCancel()
	require.NoError(t, a.Close(closeCtx))
	require.NoError(t, second.WaitReady(ctx), "the second session connects once the first is gone")
	require.Len(t, logB.Errors(), 1, "said once")
	for _, c := range b.srv.Connections() {
		require.NotEqual(t, emulator.ReasonTakenOver, c.Reason, "no connection was kicked")
	}
}

// startWaiting starts a session without waiting for its connection.
func startWaiting(t *testing.T, cfg *Config) *Session {
	s, err := New(cfg)
	require.NoError(t, err)
	s.Start()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Close(ctx)
	})
	return s
}
