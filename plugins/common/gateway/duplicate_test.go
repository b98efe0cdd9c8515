package gateway

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
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
