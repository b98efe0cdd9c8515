package gateway

import (
	"errors"
	"fmt"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// A connection that drops with messages in flight is an outage, not a wedged
// connection: paho fails their tokens ("connection lost before Publish
// completed") before the session hears the connection is lost, and each one
// was taken for a wedged connection, a W! per message in flight. Now no
// line per message, every message delivered after the reconnect, through
// Publish's path.
func TestConnectionLostWithMessagesInFlightIsQuiet(t *testing.T) {
	b, log, s := fastReconnectSession(t, 1, 20*time.Millisecond)
	require.NoError(t, s.Attach(testCtx(t, 10*time.Second), deviceName(0)))
	b.srv.WithholdPubacks(1 << 20)
	const n = 80 // within the window of 100: all in flight at once
	msgs := make([]Message, n)
	for i := range msgs {
		msgs[i] = Message{Device: deviceName(0), Kind: omnicore.KindEvents, QoS: 1, Payload: []byte(fmt.Sprintf("m%d", i))}
	}
	ctx := testCtx(t, 30*time.Second)
	errs := make(chan error, n)
	for _, m := range msgs {
		go func() { errs <- s.Publish(ctx, m) }()
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

// fastReconnectSession starts a session on a test bridge with devices,
// its log captured, reconnecting every few milliseconds (at most
// maxReconnect apart): for the tests of what an outage logs.
func fastReconnectSession(t *testing.T, devices int, maxReconnect time.Duration) (*testBridge, *testutil.CaptureLogger, *Session) {
	t.Helper()
	b := newTestBridge(t, devices)
	log := &testutil.CaptureLogger{Name: "gateway"}
	b.cfg.Log = log
	b.cfg.MinReconnect = 5 * time.Millisecond
	b.cfg.MaxReconnect = maxReconnect
	return b, log, startSession(t, b.cfg)
}
