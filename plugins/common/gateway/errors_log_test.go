package gateway

import (
	"fmt"
	"testing"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// TestUnparseableBridgeErrorLogsNoPayload: a message on the errors topic that
// is not a bridge error is counted and logged by size, never by its bytes.
func TestUnparseableBridgeErrorLogsNoPayload(t *testing.T) {
	const secret = "S3cr3t-token-material"
	for _, payload := range []string{
		secret,
		`{"error_type":` + secret + `}`,
		`{"description":"` + secret + `"}`,
		`["` + secret + `"]`,
	} {
		log := &testutil.CaptureLogger{Name: "gateway"}
		s, err := New(&Config{Signer: &omnicore.Signer{}, Log: log})
		require.NoError(t, err)
		s.handleBridgeError(nil, []byte(payload))
		warnings := log.Warnings()
		require.Len(t, warnings, 1, payload)
		require.Contains(t, warnings[0], fmt.Sprintf("Unparseable message of %d bytes", len(payload)))
		for _, e := range log.Messages() {
			require.NotContains(t, e.Text, secret[:8], "payload bytes in a log line")
		}
		require.Equal(t, uint64(1), s.Stats().ErrorsByType["UNPARSEABLE"])
		s.cancel()
	}
}
