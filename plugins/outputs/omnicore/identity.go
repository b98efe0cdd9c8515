package omnicore

import (
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// GatewayIdentity is the gateway the output publishes as, after Init: its
// gateway_id and MQTT client ID. The execd program names the output's
// spool after it (and not after the connection options, so that editing
// servers keeps the spool).
func (o *OmniCore) GatewayIdentity() (gatewayID, clientID string) {
	return o.cfg.GatewayID, o.cfg.ClientID()
}

// GatewayConn is the gateway connection after Connect (nil before): the
// execd program reports its queue's gauges through it.
func (o *OmniCore) GatewayConn() gateway.Conn {
	return o.conn
}
