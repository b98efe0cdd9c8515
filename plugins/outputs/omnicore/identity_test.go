package omnicore

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// The identity the execd program names the spool after is the gateway's,
// whatever the connection options.
func TestGatewayIdentity(t *testing.T) {
	o := factoryPlugin(t)
	require.NoError(t, o.Init())
	id, client := o.GatewayIdentity()
	require.Equal(t, o.GatewayID, id)
	require.Contains(t, client, o.GatewayID)

	other := factoryPlugin(t)
	other.Servers = []string{"tcp://localhost:1883"}
	require.NoError(t, other.Init())
	_, client2 := other.GatewayIdentity()
	require.Equal(t, client, client2, "servers are not part of the identity")
}
