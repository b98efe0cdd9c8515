package gateway

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// publishAllStream is publishStream through PublishAll, in batches of 500
// one after the other, as Telegraf calls Write.
func publishAllStream(ctx context.Context, s *Session, n, devices int, onAck func(i int)) []error {
	const size = 500
	errs := make([]error, n)
	for start := 0; start < n; start += size {
		msgs := make([]Message, min(size, n-start))
		for j := range msgs {
			i := start + j
			msgs[j] = Message{Device: deviceName(i % devices), Kind: omnicore.KindEvents, QoS: 1, Payload: []byte(fmt.Sprintf("m%06d", i))}
		}
		s.PublishAll(ctx, msgs, func(j int, err error) {
			errs[start+j] = err
			if err == nil && onAck != nil {
				onAck(start + j)
			}
		})
	}
	return errs
}

// TestPublishAllSettlesEveryMessage checks the outcome PublishAll reports
// for each kind of message, once each, against what the bridge received.
func TestPublishAllSettlesEveryMessage(t *testing.T) {
	b := newTestBridge(t, 3)
	s := startSession(t, b.cfg)
	ctx := testCtx(t, 20*time.Second)
	// dev-00000 is attached first: its messages take the batch path, the
	// others attach on the way.
	require.NoError(t, s.Attach(ctx, deviceName(0)))
	msgs := []Message{
		{Device: deviceName(0), Kind: omnicore.KindEvents, QoS: 1, Payload: []byte("a0")},
		{Device: deviceName(1), Kind: omnicore.KindEvents, QoS: 1, Payload: []byte("a1")},
		{Device: testGateway, Kind: omnicore.KindEvents, QoS: 1, Payload: []byte("g")},
		{Device: deviceName(2), Kind: omnicore.KindState, QoS: 1, Payload: []byte("s2")},
		{Device: deviceName(0), Kind: omnicore.KindEvents, Subfolder: "x", QoS: 0, Payload: []byte("q0")},
		{Device: "bad id!", Kind: omnicore.KindEvents, QoS: 1, Payload: []byte("bad")},
		{Device: deviceName(0), Kind: omnicore.KindEvents, QoS: 1, Payload: make([]byte, omnicore.MaxTelemetryBytes+1)},
	}
	calls := make([]int, len(msgs))
	errs := make([]error, len(msgs))
	s.PublishAll(ctx, msgs, func(i int, err error) {
		calls[i]++
		errs[i] = err
	})
	for i := range msgs {
		require.Equal(t, 1, calls[i], "message %d settled once", i)
	}
	for i := range 5 {
		require.NoError(t, errs[i], "message %d", i)
	}
	require.ErrorIs(t, errs[5], ErrInvalidDevice)
	require.ErrorIs(t, errs[6], ErrTooLarge)
	waitUntil(t, 5*time.Second, func() bool {
		got := receivedPayloads(b.srv)
		for _, m := range msgs[:5] {
			if got[m.Device+"|"+string(m.Payload)] == 0 {
				return false
			}
		}
		return true
	}, "every valid message received by the bridge")
	st := s.Stats()
	require.Equal(t, uint64(3), st.AttachesOK)
	require.GreaterOrEqual(t, st.Acked, uint64(4))
}

// TestPublishAllReturnsWhenCtxEnds: with the bridge withholding every
// PUBACK, PublishAll settles what is left with ctx's error as soon as ctx
// ends, and gives back the in-flight window.
func TestPublishAllReturnsWhenCtxEnds(t *testing.T) {
	b := newTestBridge(t, 1)
	b.cfg.MaxInflight = 8
	s := startSession(t, b.cfg)
	require.NoError(t, s.Attach(testCtx(t, 10*time.Second), deviceName(0)))
	b.srv.WithholdPubacks(1000)
	msgs := make([]Message, 50)
	for i := range msgs {
		msgs[i] = Message{Device: deviceName(0), Kind: omnicore.KindEvents, QoS: 1, Payload: []byte(fmt.Sprintf("m%d", i))}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	var settled int
	s.PublishAll(ctx, msgs, func(i int, err error) {
		settled++
		require.ErrorIs(t, err, context.DeadlineExceeded, "message %d", i)
	})
	require.Equal(t, len(msgs), settled)
	require.Less(t, time.Since(start), b.cfg.Timeout, "returned at ctx's end, not after the ack timeout")
	waitUntil(t, 5*time.Second, func() bool { return len(s.window) == 0 }, "window slots given back")
}

var _ BatchPublisher = (*Session)(nil)

// A connection that drops with messages in flight is an outage, not a wedged
// connection: paho fails their tokens ("connection lost before Publish
// completed") before the session hears the connection is lost, and each one
// was taken for a wedged connection, a W! per message in flight. Now no
// line per message, every message delivered after the reconnect, through
// both publish paths.
func TestConnectionLostWithMessagesInFlightIsQuiet(t *testing.T) {
	for _, batch := range []bool{false, true} {
		t.Run(fmt.Sprintf("PublishAll=%v", batch), func(t *testing.T) {
			b := newTestBridge(t, 1)
			log := &testutil.CaptureLogger{Name: "gateway"}
			b.cfg.Log = log
			b.cfg.MinReconnect = 5 * time.Millisecond
			b.cfg.MaxReconnect = 20 * time.Millisecond
			s := startSession(t, b.cfg)
			require.NoError(t, s.Attach(testCtx(t, 10*time.Second), deviceName(0)))
			b.srv.WithholdPubacks(1 << 20)
			const n = 80 // within the window of 100: all in flight at once
			msgs := make([]Message, n)
			for i := range msgs {
				msgs[i] = Message{Device: deviceName(0), Kind: omnicore.KindEvents, QoS: 1, Payload: []byte(fmt.Sprintf("m%d", i))}
			}
			ctx := testCtx(t, 30*time.Second)
			errs := make(chan error, n)
			if batch {
				go s.PublishAll(ctx, msgs, func(_ int, err error) { errs <- err })
			} else {
				for _, m := range msgs {
					go func() { errs <- s.Publish(ctx, m) }()
				}
			}
			waitUntil(t, 10*time.Second, func() bool { return b.srv.Stats().Withheld >= n }, "every message in flight")
			b.srv.WithholdPubacks(0)
			b.srv.KickAll()
			for range n {
				require.NoError(t, <-errs)
			}
			for _, e := range log.Messages() {
				require.NotContains(t, e.Text, "Publishing to", "a line per message in flight: %s", e.Text)
			}
		})
	}
}

// failedToken is a paho token that completed with err.
type failedToken struct{ err error }

func (failedToken) Wait() bool                     { return true }
func (failedToken) WaitTimeout(time.Duration) bool { return true }
func (failedToken) Done() <-chan struct{} {
	ch := make(chan struct{})
	close(ch)
	return ch
}
func (t failedToken) Error() error { return t.err }

// The order that test above meets only under load, made certain: the token
// fails with paho's text while the connection is not yet marked lost.
func TestTokenFailedByConnectionLossIsConnLost(t *testing.T) {
	s := &Session{}
	cs := &connection{lost: make(chan struct{})}
	tests := []struct {
		err  error
		want error
	}{
		{errors.New("connection lost before Publish completed"), errConnLost},
		{mqtt.ErrNotConnected, errConnLost},
		{errors.New("some other failure"), nil},
	}
	for _, tc := range tests {
		err := s.landed(cs, &flight{tok: failedToken{tc.err}}, nil)
		if tc.want != nil {
			require.ErrorIs(t, err, tc.want, "%v", tc.err)
		} else {
			require.Equal(t, tc.err, err, "other errors are passed on")
		}
	}
}
