package emulator_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

type outcome int

const (
	accepted outcome = iota
	notFound         // GATEWAY_DEVICE_NOT_FOUND, message dropped, connection kept
	closed           // connection closed by the bridge
)

func TestPublishTopics(t *testing.T) {
	t.Parallel()
	// State every case; the 1/s rule has its own test.
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.StateInterval = 0 }))
	big := func(n int) string { return strings.Repeat("x", n) }

	tests := []struct {
		name          string
		topic         string
		qos           byte
		payload       string
		want          outcome
		wantReason    string
		wantDevice    string
		wantKind      omnicore.Kind
		wantSubfolder string
	}{
		{name: "own events QoS 0", topic: "/reg/gw/events", wantDevice: gw, wantKind: omnicore.KindEvents},
		{name: "own events QoS 1", topic: "/reg/gw/events", qos: 1, wantDevice: gw, wantKind: omnicore.KindEvents},
		{name: "events with a subfolder", topic: "/reg/gw/events/a/b-c/d", qos: 1, wantDevice: gw, wantKind: omnicore.KindEvents, wantSubfolder: "a/b-c/d"},
		{name: "own state", topic: "/reg/gw/state", qos: 1, wantDevice: gw, wantKind: omnicore.KindState},
		{name: "attached device events", topic: "/reg/dev1/events", qos: 1, wantDevice: "dev1", wantKind: omnicore.KindEvents},
		{name: "attached device state QoS 0", topic: "/reg/dev1/state", wantDevice: "dev1", wantKind: omnicore.KindState},
		{name: "events of exactly 256 KB", topic: "/reg/gw/events", qos: 1, payload: big(omnicore.MaxTelemetryBytes), wantDevice: gw, wantKind: omnicore.KindEvents},
		{name: "state of exactly 64 KB", topic: "/reg/gw/state", qos: 1, payload: big(omnicore.MaxStateBytes), wantDevice: gw, wantKind: omnicore.KindState},
		{name: "empty payload", topic: "/reg/gw/events", qos: 1, payload: "", wantDevice: gw, wantKind: omnicore.KindEvents},

		{name: "bound but not attached device", topic: "/reg/dev2/events", qos: 1, want: notFound, wantDevice: "dev2"},
		{name: "unknown device", topic: "/reg/ghost/state", qos: 1, want: notFound, wantDevice: "ghost"},
		{name: "not attached at QoS 0", topic: "/reg/dev3/events", want: notFound, wantDevice: "dev3"},

		{name: "QoS 2", topic: "/reg/gw/events", qos: 2, want: closed, wantReason: emulator.ReasonQoS2},
		{name: "events over 256 KB", topic: "/reg/gw/events", qos: 1, payload: big(omnicore.MaxTelemetryBytes + 1), want: closed, wantReason: emulator.ReasonPayloadTooLarge},
		{name: "state over 64 KB", topic: "/reg/dev1/state", qos: 1, payload: big(omnicore.MaxStateBytes + 1), want: closed, wantReason: emulator.ReasonPayloadTooLarge},
		{name: "other registry", topic: "/other/gw/events", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "no leading slash", topic: "reg/gw/events", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "config is subscribe-only", topic: "/reg/gw/config", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "commands are subscribe-only", topic: "/reg/gw/commands", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "errors are subscribe-only", topic: "/reg/gw/errors", want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "unknown kind", topic: "/reg/gw/telemetry", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "state has no subfolders", topic: "/reg/gw/state/x", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "attach has no subfolders", topic: "/reg/dev1/attach/x", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "empty subfolder level", topic: "/reg/gw/events/a//b", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "dot-dot subfolder", topic: "/reg/gw/events/..", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "invalid device ID", topic: "/reg/-gw/events", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "device ID with dot-dot", topic: "/reg/a..b/events", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "$SYS", topic: "$SYS/broker/x", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "just the device", topic: "/reg/gw", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
		{name: "trailing slash", topic: "/reg/gw/events/", qos: 1, want: closed, wantReason: emulator.ReasonBadTopic},
	}
	id := f.srv.ClientID(reg, gw)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fixture{t: t, srv: f.srv, gwKey: f.gwKey}
			c := f.gateway()
			c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
			c.attach("dev1")
			before := f.srv.Stats().MessagesAccepted
			tok := c.publish(tc.topic, tc.qos, tc.payload)

			switch tc.want {
			case accepted:
				if tc.qos == 1 {
					require.True(t, tok.WaitTimeout(wait))
					require.NoError(t, tok.Error())
				}
				msgs, err := f.srv.WaitReceived(f.ctx(), before+1)
				require.NoError(t, err)
				m := msgs[len(msgs)-1]
				require.Equal(t, id, m.ClientID)
				require.Equal(t, reg, m.Registry)
				require.Equal(t, tc.wantDevice, m.Device)
				require.Equal(t, tc.wantKind, m.Kind)
				require.Equal(t, tc.wantSubfolder, m.Subfolder)
				require.Equal(t, tc.topic, m.Topic)
				require.Equal(t, tc.qos, m.QoS)
				require.Equal(t, tc.payload, string(m.Payload))
				if tc.qos == 1 {
					require.Equal(t, tok.(*paho.PublishToken).MessageID(), m.PacketID)
				}
			case notFound:
				em := c.nextError()
				want := omnicore.ErrorMessage{
					ErrorType:   omnicore.ErrorDeviceNotFound,
					Description: "The specified device with ID '" + tc.wantDevice + "' is not attached to the gateway.",
					DeviceID:    tc.wantDevice,
					MessageInfo: &omnicore.MessageInfo{MessageType: "PUBLISH", Topic: tc.topic, PacketID: tok.(*paho.PublishToken).MessageID()},
				}
				require.Equal(t, want, em)
				if tc.qos == 1 {
					c.notAcked(tok)
				} else {
					c.ackBarrier()
				}
				require.Equal(t, before+1, f.srv.Stats().MessagesAccepted, "only the barrier was accepted")
			case closed:
				c.expectLost()
				rec := f.waitClosed(id)
				require.Equal(t, tc.wantReason, rec.Reason)
				require.Equal(t, before, f.srv.Stats().MessagesAccepted)
			}
		})
	}
}

// TestPublishWildcards uses a raw client: paho refuses to publish them.
func TestPublishWildcards(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for _, tp := range []string{"/reg/+/events", "/reg/gw/events/#", "/reg/gw/events/a+b", "#"} {
		t.Run(tp, func(t *testing.T) {
			r := dialRaw(t, f.srv)
			require.Equal(t, byte(0), r.connect(f.srv.ClientID(reg, gw), f.gwToken()))
			r.send(pub(tp, 1, 1, "x"))
			r.expectClosed()
			require.Equal(t, emulator.ReasonBadTopic, f.waitClosed(f.srv.ClientID(reg, gw)).Reason)
		})
	}
}

func TestSubscribeTopics(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	tests := []struct {
		name       string
		filter     string
		qos        byte
		want       outcome
		wantQoS    byte
		wantDevice string
		wantReason string
	}{
		{name: "own config QoS 0", filter: "/reg/gw/config", qos: 0, wantQoS: 0},
		{name: "own config QoS 1", filter: "/reg/gw/config", qos: 1, wantQoS: 1},
		{name: "QoS 2 granted as 1", filter: "/reg/gw/config", qos: 2, wantQoS: 1},
		{name: "own commands", filter: "/reg/gw/commands/#", qos: 1, wantQoS: 1},
		{name: "own errors", filter: "/reg/gw/errors", qos: 0, wantQoS: 0},
		{name: "attached device config", filter: "/reg/dev1/config", qos: 1, wantQoS: 1},
		{name: "attached device commands at QoS 2", filter: "/reg/dev1/commands/#", qos: 2, wantQoS: 1},

		{name: "bound but not attached", filter: "/reg/dev2/config", qos: 1, want: notFound, wantDevice: "dev2"},
		{name: "unknown device commands", filter: "/reg/ghost/commands/#", qos: 1, want: notFound, wantDevice: "ghost"},

		{name: "commands without #", filter: "/reg/gw/commands", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "commands subfolder", filter: "/reg/gw/commands/a", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "commands with +", filter: "/reg/gw/commands/+", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "everything of the device", filter: "/reg/gw/#", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "wildcard device", filter: "/reg/+/config", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "everything", filter: "#", qos: 0, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "other registry", filter: "/other/gw/config", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "another device's errors", filter: "/reg/dev1/errors", qos: 0, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "events", filter: "/reg/gw/events", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "state", filter: "/reg/gw/state", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "$SYS", filter: "$SYS/#", qos: 0, want: closed, wantReason: emulator.ReasonBadSubscribe},
		{name: "trailing slash", filter: "/reg/gw/config/", qos: 1, want: closed, wantReason: emulator.ReasonBadSubscribe},
	}
	id := f.srv.ClientID(reg, gw)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fixture{t: t, srv: f.srv, gwKey: f.gwKey}
			c := f.gateway()
			if tc.filter != "/reg/gw/errors" {
				c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
			}
			c.attach("dev1")
			tok := c.c.Subscribe(tc.filter, tc.qos, nil)
			switch tc.want {
			case accepted:
				require.True(t, tok.WaitTimeout(wait))
				require.NoError(t, tok.Error())
				require.Equal(t, tc.wantQoS, tok.(*paho.SubscribeToken).Result()[tc.filter])
				c.ackBarrier() // connection still fine
			case notFound:
				em := c.nextError()
				require.Equal(t, omnicore.ErrorDeviceNotFound, em.ErrorType)
				require.Equal(t, tc.wantDevice, em.DeviceID)
				require.NotNil(t, em.MessageInfo)
				require.Equal(t, "SUBSCRIBE", em.MessageInfo.MessageType)
				require.Equal(t, tc.filter, em.MessageInfo.Topic)
				require.True(t, tok.WaitTimeout(wait))
				require.Equal(t, byte(0x80), tok.(*paho.SubscribeToken).Result()[tc.filter])
				c.ackBarrier()
				require.False(t, f.srv.Subscribed(reg, tc.wantDevice, omnicore.KindConfig))
				require.False(t, f.srv.Subscribed(reg, tc.wantDevice, omnicore.KindCommands))
			case closed:
				c.expectLost()
				require.Equal(t, tc.wantReason, f.waitClosed(id).Reason)
			}
		})
	}
}

func TestNonGatewayDevice(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	key, pub := emulator.NewDeviceKey(t, t.TempDir(), "direct", omnicore.ES256)
	require.NoError(t, f.srv.AddDevice(reg, emulator.Device{ID: "direct", PublicKeys: []emulator.PublicKey{pub}}))
	id := f.srv.ClientID(reg, "direct")

	tests := []struct {
		name       string
		do         func(c *client) paho.Token
		wantReason string // "" = connection kept
	}{
		{"own telemetry", func(c *client) paho.Token { return c.publish("/reg/direct/events", 1, "x") }, ""},
		{"own config", func(c *client) paho.Token { return c.c.Subscribe("/reg/direct/config", 1, nil) }, ""},
		{"attach", func(c *client) paho.Token { return c.publish("/reg/dev1/attach", 1, "{}") }, emulator.ReasonNotGateway},
		{"detach", func(c *client) paho.Token { return c.publish("/reg/dev1/detach", 1, "{}") }, emulator.ReasonNotGateway},
		{"errors topic", func(c *client) paho.Token { return c.c.Subscribe("/reg/direct/errors", 0, nil) }, emulator.ReasonBadSubscribe},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := &fixture{t: t, srv: f.srv}
			c := f.connectAs("direct", key)
			tok := tc.do(c)
			if tc.wantReason == "" {
				require.True(t, tok.WaitTimeout(wait))
				require.NoError(t, tok.Error())
				c.ackBarrier()
				return
			}
			c.expectLost()
			require.Equal(t, tc.wantReason, f.waitClosed(id).Reason)
		})
	}

	// A non-gateway publishing for another device draws the error nobody can
	// receive: it is recorded as not delivered, and no PUBACK comes.
	f2 := &fixture{t: t, srv: f.srv}
	c := f2.connectAs("direct", key)
	tok := c.publish("/reg/dev1/events", 1, "x")
	c.notAcked(tok)
	errs := f.srv.ErrorsSent()
	last := errs[len(errs)-1]
	require.Equal(t, omnicore.ErrorDeviceNotFound, last.Error.ErrorType)
	require.Equal(t, "direct", last.Gateway)
	require.False(t, last.Delivered)
}

// TestErrorsTopic checks the errors payload byte for byte and that nothing is
// sent to a gateway that did not subscribe.
func TestErrorsTopic(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()

	// Not subscribed: raised, recorded, not sent.
	tok := c.publish("/reg/dev2/events", 1, "x")
	c.notAcked(tok)
	c.noMessage()
	errs := f.srv.ErrorsSent()
	require.Len(t, errs, 1)
	require.False(t, errs[0].Delivered)

	c.subscribe(topic(gw, omnicore.KindErrors, ""), 0)
	tok = c.publish("/reg/dev2/events", 1, "x")
	m := c.next()
	require.Equal(t, "/reg/gw/errors", m.Topic())
	require.Equal(t, byte(0), m.Qos())
	require.False(t, m.Retained())
	id := tok.(*paho.PublishToken).MessageID()
	want, err := json.Marshal(omnicore.ErrorMessage{
		ErrorType:   omnicore.ErrorDeviceNotFound,
		Description: "The specified device with ID 'dev2' is not attached to the gateway.",
		DeviceID:    "dev2",
		MessageInfo: &omnicore.MessageInfo{MessageType: "PUBLISH", Topic: "/reg/dev2/events", PacketID: id},
	})
	require.NoError(t, err)
	require.Equal(t, string(want), string(m.Payload()))
	var keys map[string]any
	require.NoError(t, json.Unmarshal(m.Payload(), &keys))
	require.ElementsMatch(t, []string{"error_type", "description", "device_id", "mqtt_message_info"}, mapKeys(keys))
	c.notAcked(tok)

	errs = f.srv.ErrorsSent()
	require.Len(t, errs, 2)
	require.True(t, errs[1].Delivered)
	require.Equal(t, f.srv.ClientID(reg, gw), errs[1].ClientID)
	require.Equal(t, gw, errs[1].Gateway)
	require.Equal(t, "/reg/gw/errors", errs[1].Topic)
	st := f.srv.Stats()
	require.Equal(t, 2, st.ErrorsRaised)
	require.Equal(t, 1, st.ErrorsDelivered)
	require.Equal(t, 2, st.DroppedNotAttached)
}

func mapKeys(m map[string]any) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestErrorBeforeAck reads the wire: an error caused by a packet comes before
// that packet's PUBACK or SUBACK.
func TestErrorBeforeAck(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.NotAttachedPuback = true }))
	tests := []struct {
		name    string
		pk      packets.Packet
		ack     byte
		errType string
	}{
		{"failed attach", pub("/reg/ghost/attach", 1, 7, "{}"), packets.Puback, omnicore.ErrorAttachment},
		{"publish for a device not attached", pub("/reg/dev2/events", 1, 8, "x"), packets.Puback, omnicore.ErrorDeviceNotFound},
		{"subscribe for a device not attached", sub(9, "/reg/dev2/config", 1), packets.Suback, omnicore.ErrorDeviceNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, f.srv)
			require.Equal(t, byte(0), r.connect(f.srv.ClientID(reg, gw), f.gwToken()))
			r.send(sub(1, "/reg/gw/errors", 0))
			pk, err := r.read()
			require.NoError(t, err)
			require.Equal(t, packets.Suback, pk.FixedHeader.Type)

			r.send(tc.pk)
			first, err := r.read()
			require.NoError(t, err)
			require.Equal(t, packets.Publish, first.FixedHeader.Type, "the error comes first")
			require.Equal(t, "/reg/gw/errors", first.TopicName)
			require.Equal(t, byte(0), first.FixedHeader.Qos)
			var em omnicore.ErrorMessage
			require.NoError(t, json.Unmarshal(first.Payload, &em))
			require.Equal(t, tc.errType, em.ErrorType)
			require.Equal(t, tc.pk.PacketID, em.MessageInfo.PacketID)

			second, err := r.read()
			require.NoError(t, err)
			require.Equal(t, tc.ack, second.FixedHeader.Type)
			require.Equal(t, tc.pk.PacketID, second.PacketID)
			if tc.ack == packets.Suback {
				require.Equal(t, []byte{0x80}, second.ReasonCodes)
			}
		})
	}
}

// TestPubackOrder: PUBACKs follow the order of the PUBLISHes, with and
// without a delay.
func TestPubackOrder(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	for _, delay := range []time.Duration{0, 20 * time.Millisecond} {
		t.Run(delay.String(), func(t *testing.T) {
			f.srv.SetPubackDelay(delay)
			r := dialRaw(t, f.srv)
			require.Equal(t, byte(0), r.connect(f.srv.ClientID(reg, gw), f.gwToken()))
			for i := uint16(1); i <= 20; i++ {
				r.send(pub("/reg/gw/events", 1, i, "x"))
			}
			for i := uint16(1); i <= 20; i++ {
				pk, err := r.read()
				require.NoError(t, err)
				require.Equal(t, packets.Puback, pk.FixedHeader.Type)
				require.Equal(t, i, pk.PacketID)
			}
		})
	}
}

// TestErrorAfterAck reads the wire with NotAttachedErrorAfterPuback: the
// message for a device that is not attached is acknowledged first, then its
// GATEWAY_DEVICE_NOT_FOUND names the packet, and the message is dropped.
func TestErrorAfterAck(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.NotAttachedErrorAfterPuback = true }))
	r := dialRaw(t, f.srv)
	require.Equal(t, byte(0), r.connect(f.srv.ClientID(reg, gw), f.gwToken()))
	r.send(sub(1, "/reg/gw/errors", 0))
	pk, err := r.read()
	require.NoError(t, err)
	require.Equal(t, packets.Suback, pk.FixedHeader.Type)

	r.send(pub("/reg/dev2/events", 1, 8, "x"))
	first, err := r.read()
	require.NoError(t, err)
	require.Equal(t, packets.Puback, first.FixedHeader.Type, "the PUBACK comes first")
	require.Equal(t, uint16(8), first.PacketID)
	second, err := r.read()
	require.NoError(t, err)
	require.Equal(t, packets.Publish, second.FixedHeader.Type)
	var em omnicore.ErrorMessage
	require.NoError(t, json.Unmarshal(second.Payload, &em))
	require.Equal(t, omnicore.ErrorDeviceNotFound, em.ErrorType)
	require.Equal(t, uint16(8), em.MessageInfo.PacketID)
	require.Equal(t, 1, f.srv.Stats().DroppedNotAttached)
}
