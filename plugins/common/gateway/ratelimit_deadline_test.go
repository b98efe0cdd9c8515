package gateway

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// TestRateLimitDeadlineKeepsTheConnection: when max_message_rate would make
// a publish wait past its deadline, the publish fails with the deadline at
// once and the connection stays (it used to be taken for a wedged
// connection and replaced, so the next Write found the gateway
// disconnected: benchmark 5 under load).
func TestRateLimitDeadlineKeepsTheConnection(t *testing.T) {
	b := newTestBridge(t, 0)
	b.cfg.MaxMessageRate = 1 // burst 1: the second message waits a second
	s := startSession(t, b.cfg)
	msg := Message{Device: testGateway, Kind: omnicore.KindEvents, Payload: []byte("m"), QoS: 1}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	require.NoError(t, s.Publish(ctx, msg))

	short, cancelShort := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancelShort()
	err := s.Publish(short, msg)
	require.ErrorIs(t, err, context.DeadlineExceeded)

	require.NoError(t, s.Publish(ctx, msg), "the same connection goes on")
	st := s.Stats()
	require.Equal(t, uint64(1), st.Connects)
	require.Zero(t, st.ConnectionLost)
	require.Len(t, b.srv.Connections(), 1, "never reconnected")
}
