package gateway

import (
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/eclipse/paho.mqtt.golang/packets"
	"github.com/stretchr/testify/require"
)

// The bridge's refusals and paho's network errors are explained in the
// words of the options to fix; the cause stays matchable with errors.Is.
func TestExplainConnectError(t *testing.T) {
	dial := fmt.Errorf("dial tcp 127.0.0.1:8883: %w", syscall.ECONNREFUSED)
	tests := []struct {
		name  string
		err   error
		want  string
		cause error
	}{
		{"paho's network error", fmt.Errorf("%w : %w", packets.ErrorNetworkError, dial),
			"network error: dial tcp 127.0.0.1:8883: connection refused", syscall.ECONNREFUSED},
		{"refused token", packets.ErrorRefusedNotAuthorised, "check private_key, algorithm", ErrNotAuthorized},
		{"unknown gateway", packets.ErrorRefusedIDRejected, "check subscription_id, registry_id and gateway_id", packets.ErrorRefusedIDRejected},
		{"untrusted certificate", errors.New("tls: failed to verify certificate: x509: certificate signed by unknown authority"), "set tls_ca", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := explainConnectError(tt.err)
			require.Contains(t, got.Error(), tt.want)
			require.NotContains(t, got.Error(), " : ")
			if tt.cause != nil {
				require.ErrorIs(t, got, tt.cause)
			}
		})
	}
}
