package emulator_test

import (
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func TestAttach(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	srv := f.srv
	sub := srv.Subscription()
	dir := t.TempDir()
	now := time.Now()

	// One gateway per auth method ("gw" is ASSOCIATION_ONLY).
	gwKeys := map[string]string{gw: f.gwKey}
	for id, method := range map[string]emulator.AuthMethod{"gw-token": emulator.DeviceAuthTokenOnly, "gw-both": emulator.AssociationAndDeviceAuthToken} {
		key, pub := emulator.NewDeviceKey(t, dir, id, omnicore.ES256)
		require.NoError(t, srv.AddDevice(reg, emulator.Device{ID: id, Gateway: true, AuthMethod: method, PublicKeys: []emulator.PublicKey{pub}}))
		gwKeys[id] = key
	}
	// Devices with keys, so that they can sign attach JWTs.
	devKeys := map[string]string{}
	for _, id := range []string{"keyed-bound", "keyed-unbound", "keyed-blocked"} {
		key, pub := emulator.NewDeviceKey(t, dir, id, omnicore.ES256)
		require.NoError(t, srv.AddDevice(reg, emulator.Device{ID: id, PublicKeys: []emulator.PublicKey{pub}, Blocked: id == "keyed-blocked"}))
		devKeys[id] = key
	}
	for _, g := range []string{gw, "gw-both"} {
		require.NoError(t, srv.Bind(reg, g, "keyed-bound"))
		require.NoError(t, srv.Bind(reg, g, "keyed-blocked"))
	}
	strangerKey, _ := emulator.NewDeviceKey(t, dir, "stranger", omnicore.ES256)
	jwtFor := func(dev string) string { return mint(t, devKeys[dev], omnicore.ES256, sub, now, time.Hour) }
	authz := func(tok string) string { return `{"authorization":"` + tok + `"}` }

	tests := []struct {
		name     string
		gateway  string
		device   string
		payload  string
		wantDesc string // "" = attached
	}{
		// ASSOCIATION_ONLY
		{name: "bound, empty payload", gateway: gw, device: "dev1", payload: ""},
		{name: "bound, {}", gateway: gw, device: "dev1", payload: "{}"},
		{name: "bound, empty authorization", gateway: gw, device: "dev1", payload: `{"authorization" : ""}`},
		{name: "bound, a JWT is ignored", gateway: gw, device: "keyed-bound", payload: authz("whatever")},
		{name: "not bound", gateway: gw, device: "keyed-unbound", payload: "{}", wantDesc: "is not bound to the gateway"},
		{name: "unknown device", gateway: gw, device: "invalid_device_id", payload: "{}", wantDesc: "does not exist"},
		{name: "blocked device", gateway: gw, device: "keyed-blocked", payload: "{}", wantDesc: "is blocked"},
		{name: "a gateway", gateway: gw, device: "gw-token", payload: "{}", wantDesc: "is a gateway"},
		{name: "itself", gateway: gw, device: gw, payload: "{}", wantDesc: "cannot attach itself"},
		{name: "malformed JSON", gateway: gw, device: "dev1", payload: "{", wantDesc: "not a JSON object"},
		{name: "the Go sample's single quotes", gateway: gw, device: "dev1", payload: "{ 'authorization' : x }", wantDesc: "not a JSON object"},
		{name: "authorization not a string", gateway: gw, device: "dev1", payload: `{"authorization":5}`, wantDesc: "is not a string"},
		{name: "a JSON array", gateway: gw, device: "dev1", payload: `[]`, wantDesc: "not a JSON object"},

		// DEVICE_AUTH_TOKEN_ONLY
		{name: "token: valid JWT, no binding needed", gateway: "gw-token", device: "keyed-unbound", payload: authz(jwtFor("keyed-unbound"))},
		{name: "token: missing", gateway: "gw-token", device: "keyed-unbound", payload: "{}", wantDesc: "needs the device's JWT"},
		{name: "token: empty", gateway: "gw-token", device: "keyed-unbound", payload: authz(""), wantDesc: "needs the device's JWT"},
		{name: "token: signed by another key", gateway: "gw-token", device: "keyed-unbound", payload: authz(mint(t, strangerKey, omnicore.ES256, sub, now, time.Hour)), wantDesc: "was rejected"},
		{name: "token: another device's JWT", gateway: "gw-token", device: "keyed-unbound", payload: authz(jwtFor("keyed-bound")), wantDesc: "was rejected"},
		{name: "token: wrong audience", gateway: "gw-token", device: "keyed-unbound", payload: authz(mint(t, devKeys["keyed-unbound"], omnicore.ES256, "nope", now, time.Hour)), wantDesc: "was rejected"},
		{name: "token: expired", gateway: "gw-token", device: "keyed-unbound", payload: authz(mint(t, devKeys["keyed-unbound"], omnicore.ES256, sub, now.Add(-3*time.Hour), time.Hour)), wantDesc: "was rejected"},
		{name: "token: padded", gateway: "gw-token", device: "keyed-unbound", payload: authz(paddedToken(t, devKeys["keyed-unbound"], sub)), wantDesc: "was rejected"},
		{name: "token: device without keys", gateway: "gw-token", device: "dev1", payload: authz(jwtFor("keyed-bound")), wantDesc: "was rejected"},

		// ASSOCIATION_AND_DEVICE_AUTH_TOKEN
		{name: "both: bound and valid JWT", gateway: "gw-both", device: "keyed-bound", payload: authz(jwtFor("keyed-bound"))},
		{name: "both: valid JWT, not bound", gateway: "gw-both", device: "keyed-unbound", payload: authz(jwtFor("keyed-unbound")), wantDesc: "is not bound"},
		{name: "both: bound, no JWT", gateway: "gw-both", device: "keyed-bound", payload: "{}", wantDesc: "needs the device's JWT"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fixture{t: t, srv: srv}
			c := f.connectAs(tc.gateway, gwKeys[tc.gateway])
			c.subscribe(topic(tc.gateway, omnicore.KindErrors, ""), 0)
			before := srv.Stats()
			tok := c.publish(topic(tc.device, omnicore.KindAttach, ""), 1, tc.payload)
			require.True(t, tok.WaitTimeout(wait), "PUBACK (AttachFailurePuback is on by default)")
			require.NoError(t, tok.Error())
			if tc.wantDesc == "" {
				require.Equal(t, []string{tc.device}, srv.Attachments(reg, tc.gateway))
				require.Equal(t, before.Attaches+1, srv.Stats().Attaches)
				c.mustPublish(topic(tc.device, omnicore.KindEvents, ""), 1, "from "+tc.device)
				c.noMessage()
				return
			}
			em := c.nextError() // it was written before the PUBACK
			require.Equal(t, omnicore.ErrorAttachment, em.ErrorType)
			require.Equal(t, tc.device, em.DeviceID)
			require.Contains(t, em.Description, tc.wantDesc)
			require.Equal(t, &omnicore.MessageInfo{MessageType: "PUBLISH", Topic: topic(tc.device, omnicore.KindAttach, ""), PacketID: tok.(*paho.PublishToken).MessageID()}, em.MessageInfo)
			require.Empty(t, srv.Attachments(reg, tc.gateway))
			require.Equal(t, before.AttachFailures+1, srv.Stats().AttachFailures)
			if len(tc.payload) > 20 {
				require.NotContains(t, em.Description, tc.payload[15:], "the error must not echo the token")
			}
			c.ackBarrier() // connection kept
		})
	}
}

func TestAttachFailureWithoutPuback(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.AttachFailurePuback = false }))
	c := f.gateway()
	c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
	bad := c.publish("/reg/ghost/attach", 1, "{}")
	require.Equal(t, omnicore.ErrorAttachment, c.nextError().ErrorType)
	c.notAcked(bad)
	c.attach("dev1") // a successful attach is still acknowledged
	require.Equal(t, []string{"dev1"}, f.srv.Attachments(reg, gw))
}

func TestMaxAttached(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.MaxAttached = 2 }))
	c := f.gateway()
	c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
	c.attach("dev1")
	c.attach("dev2")
	c.attach("dev1") // re-attaching an attached device does not count
	c.attach("dev3")
	em := c.nextError()
	require.Equal(t, omnicore.ErrorAttachment, em.ErrorType)
	require.Equal(t, "dev3", em.DeviceID)
	require.Contains(t, em.Description, "already has 2 devices attached")
	require.Equal(t, []string{"dev1", "dev2"}, f.srv.Attachments(reg, gw))
	c.mustPublish("/reg/dev2/detach", 1, "{}")
	c.attach("dev3")
	require.Equal(t, []string{"dev1", "dev3"}, f.srv.Attachments(reg, gw))
}

func TestDetach(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()
	c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
	c.attach("dev1")
	c.subscribe(topic("dev1", omnicore.KindConfig, ""), 1)
	require.Empty(t, c.next().Payload()) // the empty config after SUBACK
	c.subscribe(topic("dev1", omnicore.KindCommands, "#"), 1)
	require.True(t, f.srv.Subscribed(reg, "dev1", omnicore.KindCommands))

	tests := []struct {
		name    string
		device  string
		payload string
	}{
		{"attached device", "dev1", "{}"},
		{"device not attached: ignored", "dev2", ""},
		{"unknown device: ignored", "ghost", "{}"},
		{"the gateway itself: ignored", gw, "{}"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c.t = t
			c.mustPublish(topic(tc.device, omnicore.KindDetach, ""), 1, tc.payload)
			require.NotContains(t, f.srv.Attachments(reg, gw), tc.device)
			c.noMessage()
		})
	}
	c.t = t
	// Detaching dropped the device's subscriptions on this connection.
	require.False(t, f.srv.Subscribed(reg, "dev1", omnicore.KindConfig))
	require.False(t, f.srv.Subscribed(reg, "dev1", omnicore.KindCommands))
	require.ErrorIs(t, f.srv.SendCommand(reg, "dev1", "", []byte("x")), emulator.ErrNotSubscribed)
	_, err := f.srv.SetConfig(reg, "dev1", []byte("v1"))
	require.NoError(t, err)
	// And publishing for it now draws GATEWAY_DEVICE_NOT_FOUND.
	tok := c.publish("/reg/dev1/events", 1, "x")
	require.Equal(t, omnicore.ErrorDeviceNotFound, c.nextError().ErrorType)
	c.notAcked(tok)
	c.noMessage() // the config was not delivered either
	require.Equal(t, 1, f.srv.Stats().Detaches)
}

func TestAttachmentsVanishWithConnection(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()
	c.attach("dev1")
	c.attach("dev2")
	c.subscribe(topic("dev1", omnicore.KindCommands, "#"), 1)
	require.Equal(t, []string{"dev1", "dev2"}, f.srv.Attachments(reg, gw))
	require.Len(t, f.srv.AllAttachments(), 1)

	c.c.Disconnect(100)
	require.Equal(t, emulator.ReasonClientDisconnect, f.waitClosed(f.srv.ClientID(reg, gw)).Reason)
	require.Empty(t, f.srv.Attachments(reg, gw))
	require.Empty(t, f.srv.AllAttachments())
	require.ErrorIs(t, f.srv.SendCommand(reg, "dev1", "", []byte("x")), emulator.ErrNotSubscribed)

	c = f.gateway()
	c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
	require.Empty(t, f.srv.Attachments(reg, gw))
	tok := c.publish("/reg/dev1/events", 1, "x")
	require.Equal(t, omnicore.ErrorDeviceNotFound, c.nextError().ErrorType)
	c.notAcked(tok)
}

func TestDuplicateClientIDKicksOlder(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	id := f.srv.ClientID(reg, gw)
	a := f.gateway()
	a.attach("dev1")
	a.subscribe(topic("dev1", omnicore.KindConfig, ""), 1)
	a.next()
	first := lastRecord(t, f.srv, id)

	// The newcomer asks for a persistent session: it must still start clean.
	b := f.gateway(func(o *paho.ClientOptions) { o.SetCleanSession(false) })
	a.expectLost()
	var old emulator.ConnectionRecord
	require.NoError(t, f.srv.WaitFor(f.ctx(), func() bool {
		for _, r := range f.srv.Connections() {
			if r.ID == first.ID && !r.Open() {
				old = r
				return true
			}
		}
		return false
	}))
	require.Equal(t, emulator.ReasonTakenOver, old.Reason)
	require.True(t, lastRecord(t, f.srv, id).Open())

	require.Empty(t, f.srv.Attachments(reg, gw))
	require.False(t, f.srv.Subscribed(reg, "dev1", omnicore.KindConfig))
	_, err := f.srv.SetConfig(reg, "dev1", []byte("v1"))
	require.NoError(t, err)
	b.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
	tok := b.publish("/reg/dev1/events", 1, "x")
	require.Equal(t, omnicore.ErrorDeviceNotFound, b.nextError().ErrorType)
	b.notAcked(tok)
	b.noMessage()
}

func TestStateRate(t *testing.T) {
	t.Parallel()
	// An hour makes "too fast" certain; 0 switches the rule off.
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.StateInterval = time.Hour }))
	id := f.srv.ClientID(reg, gw)

	t.Run("proxied device is detached", func(t *testing.T) {
		f := &fixture{t: t, srv: f.srv, gwKey: f.gwKey}
		c := f.gateway()
		c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
		c.attach("dev1")
		c.subscribe(topic("dev1", omnicore.KindConfig, ""), 1)
		c.next()
		c.mustPublish("/reg/dev1/state", 1, "s1")
		tok := c.publish("/reg/dev1/state", 1, "s2")
		em := c.nextError()
		require.Equal(t, omnicore.ErrorMessage{
			ErrorType: omnicore.ErrorDetachedByError, Description: "Device detached because of a device error.", DeviceID: "dev1",
			MessageInfo: &omnicore.MessageInfo{MessageType: "PUBLISH", Topic: "/reg/dev1/state", PacketID: tok.(*paho.PublishToken).MessageID()},
		}, em)
		c.notAcked(tok)
		require.Empty(t, f.srv.Attachments(reg, gw))
		require.False(t, f.srv.Subscribed(reg, "dev1", omnicore.KindConfig))
		st := f.srv.Stats()
		require.Equal(t, 1, st.StateAccepted)
		require.Equal(t, 1, st.BridgeDetaches)
		require.Equal(t, 1, st.DroppedStateRate)
		// Events are not limited by the state rule.
		c.attach("dev1")
		c.mustPublish("/reg/dev1/events", 1, "e1")
		c.mustPublish("/reg/dev1/events", 1, "e2")
	})
	t.Run("PUBACK switched on", func(t *testing.T) {
		f.srv.SetRules(func(r *emulator.Rules) { r.DetachedStatePuback = true })
		defer f.srv.SetRules(func(r *emulator.Rules) { r.DetachedStatePuback = false })
		f := &fixture{t: t, srv: f.srv, gwKey: f.gwKey}
		c := f.gateway()
		c.attach("dev2")
		c.mustPublish("/reg/dev2/state", 1, "s1")
		c.mustPublish("/reg/dev2/state", 1, "s2")
		require.Empty(t, f.srv.Attachments(reg, gw))
	})
	t.Run("own state too fast closes the connection", func(t *testing.T) {
		f := &fixture{t: t, srv: f.srv, gwKey: f.gwKey}
		c := f.gateway()
		c.mustPublish("/reg/gw/state", 1, "s1")
		c.publish("/reg/gw/state", 1, "s2")
		c.expectLost()
		require.Equal(t, emulator.ReasonStateRate, f.waitClosed(id).Reason)
	})
	t.Run("switched off", func(t *testing.T) {
		f.srv.SetRules(func(r *emulator.Rules) { r.StateInterval = 0 })
		f := &fixture{t: t, srv: f.srv, gwKey: f.gwKey}
		c := f.gateway()
		c.attach("dev3")
		for i := range 3 {
			c.mustPublish("/reg/dev3/state", 1, strings.Repeat("s", i+1))
		}
		require.Equal(t, []string{"dev3"}, f.srv.Attachments(reg, gw))
	})
}

// TestGatewayFlow follows the origin document (and Google's gateway demo)
// over TLS: errors first, attach, wait for the PUBACK, subscribe config and
// commands, publish telemetry and state for the device and the gateway,
// receive a config and a command, detach, unsubscribe, disconnect.
func TestGatewayFlow(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	_, err := f.srv.SetConfig(reg, "dev1", []byte(`{"interval":"10s"}`))
	require.NoError(t, err)
	c := f.gateway(withTLS(f.srv))
	require.Equal(t, byte(0), c.subscribe("/reg/gw/errors", 0))
	c.mustPublish("/reg/dev1/attach", 1, `{"authorization" : ""}`)
	require.Equal(t, byte(1), c.subscribe("/reg/gw/config", 1))
	m := c.next()
	require.Equal(t, "/reg/gw/config", m.Topic())
	require.Empty(t, m.Payload())
	require.Equal(t, byte(1), c.subscribe("/reg/dev1/config", 1))
	m = c.next()
	require.Equal(t, "/reg/dev1/config", m.Topic())
	require.Equal(t, `{"interval":"10s"}`, string(m.Payload()))
	require.Equal(t, byte(1), c.subscribe("/reg/dev1/commands/#", 1))

	c.mustPublish("/reg/gw/state", 1, "gateway up")
	c.mustPublish("/reg/dev1/state", 0, "dev1 state")
	c.mustPublish("/reg/dev1/events", 1, "t=21.5")
	c.mustPublish("/reg/dev1/events/alerts", 1, "hot")
	msgs, err := f.srv.WaitReceived(f.ctx(), 4)
	require.NoError(t, err)
	require.Len(t, msgs, 4)

	v, err := f.srv.SetConfig(reg, "dev1", []byte(`{"interval":"5s"}`))
	require.NoError(t, err)
	require.Equal(t, 2, v)
	m = c.next()
	require.Equal(t, "/reg/dev1/config", m.Topic())
	require.Equal(t, `{"interval":"5s"}`, string(m.Payload()))
	require.Equal(t, byte(1), m.Qos())
	// paho PUBACKs after the handler returns: wait for it while connected.
	require.NoError(t, f.srv.WaitFor(f.ctx(), func() bool {
		for _, d := range f.srv.Devices() {
			if d.ID == "dev1" {
				return d.ConfigAckedVersion == 2
			}
		}
		return false
	}), "the QoS 1 config PUBACK is recorded as the device's ack")

	require.NoError(t, f.srv.SendCommand(reg, "dev1", "reboot/now", []byte("please")))
	m = c.next()
	require.Equal(t, "/reg/dev1/commands/reboot/now", m.Topic())
	require.Equal(t, "please", string(m.Payload()))

	c.mustPublish("/reg/dev1/detach", 1, "{}")
	require.Empty(t, f.srv.Attachments(reg, gw))
	tok := c.c.Unsubscribe("/reg/gw/config")
	require.True(t, tok.WaitTimeout(wait))
	require.False(t, f.srv.Subscribed(reg, gw, omnicore.KindConfig))
	c.c.Disconnect(250)
	require.Equal(t, emulator.ReasonClientDisconnect, f.waitClosed(f.srv.ClientID(reg, gw)).Reason)
	require.Empty(t, f.srv.ErrorsSent())

}
