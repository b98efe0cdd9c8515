package emulator_test

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func TestConfigOnSubscribe(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		device      string // gw, or dev1 (attached)
		preset      []string
		emptyRule   bool
		subQoS      byte
		wantPayload *string // nil: nothing delivered
		wantQoS     byte
	}{
		{name: "no config: empty payload", device: gw, emptyRule: true, subQoS: 1, wantPayload: ptr(""), wantQoS: 1},
		{name: "no config, switched off: nothing", device: gw, emptyRule: false, subQoS: 1},
		{name: "latest of several", device: gw, preset: []string{"v1", "v2", "v3"}, emptyRule: true, subQoS: 1, wantPayload: ptr("v3"), wantQoS: 1},
		{name: "QoS 0 subscription", device: gw, preset: []string{"v1"}, emptyRule: true, subQoS: 0, wantPayload: ptr("v1"), wantQoS: 0},
		{name: "QoS 2 subscription gets QoS 1", device: gw, preset: []string{"v1"}, emptyRule: true, subQoS: 2, wantPayload: ptr("v1"), wantQoS: 1},
		{name: "attached device", device: "dev1", preset: []string{"dev1 config"}, emptyRule: true, subQoS: 1, wantPayload: ptr("dev1 config"), wantQoS: 1},
		{name: "64 KB config", device: "dev1", preset: []string{strings.Repeat("c", omnicore.MaxConfigBytes)}, emptyRule: false, subQoS: 1, wantPayload: ptr(strings.Repeat("c", omnicore.MaxConfigBytes)), wantQoS: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			f := newFixture(t, emulator.WithRules(func(r *emulator.Rules) { r.EmptyConfigOnSubscribe = tc.emptyRule }))
			for i, p := range tc.preset {
				v, err := f.srv.SetConfig(reg, tc.device, []byte(p))
				require.NoError(t, err)
				require.Equal(t, i+1, v)
			}
			c := f.gateway()
			c.attach("dev1")
			c.subscribe(topic(tc.device, omnicore.KindCommands, "#"), 1)
			c.subscribe(topic(tc.device, omnicore.KindConfig, ""), tc.subQoS)
			// A command after the SUBACK: anything the bridge sent on
			// subscribe arrives before it.
			require.NoError(t, f.srv.SendCommand(reg, tc.device, "", []byte("marker")))
			m := c.next()
			if tc.wantPayload == nil {
				require.Equal(t, topic(tc.device, omnicore.KindCommands, ""), m.Topic())
				return
			}
			require.Equal(t, topic(tc.device, omnicore.KindConfig, ""), m.Topic())
			require.Equal(t, *tc.wantPayload, string(m.Payload()))
			require.Equal(t, tc.wantQoS, m.Qos())
			require.False(t, m.Retained())
			require.Equal(t, "marker", string(c.next().Payload()))
		})
	}
}

func ptr[T any](v T) *T { return &v }

func TestConfigUpdates(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()
	c.attach("dev1")
	c.subscribe(topic("dev1", omnicore.KindConfig, ""), 1)
	require.Empty(t, c.next().Payload())

	for i, p := range []string{"a", "b", ""} {
		v, err := f.srv.SetConfig(reg, "dev1", []byte(p))
		require.NoError(t, err)
		require.Equal(t, i+1, v)
		m := c.next()
		require.Equal(t, "/reg/dev1/config", m.Topic())
		require.Equal(t, p, string(m.Payload()))
	}
	// Subscribing again re-delivers the latest.
	_, err := f.srv.SetConfig(reg, "dev1", []byte("latest"))
	require.NoError(t, err)
	require.Equal(t, "latest", string(c.next().Payload()))
	c.subscribe(topic("dev1", omnicore.KindConfig, ""), 1)
	require.Equal(t, "latest", string(c.next().Payload()))

	// Configs of other devices are not sent here.
	_, err = f.srv.SetConfig(reg, "dev2", []byte("not for you"))
	require.NoError(t, err)
	got, version, err := f.srv.Config(reg, "dev2")
	require.NoError(t, err)
	require.Equal(t, "not for you", string(got))
	require.Equal(t, 1, version)
	c.ackBarrier()
	c.noMessage()

	tests := []struct {
		name    string
		device  string
		payload []byte
		wantErr error
	}{
		{"over 64 KB", "dev1", make([]byte, omnicore.MaxConfigBytes+1), emulator.ErrConfigTooLarge},
		{"unknown device", "ghost", []byte("x"), emulator.ErrNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := f.srv.SetConfig(reg, tc.device, tc.payload)
			require.ErrorIs(t, err, tc.wantErr)
		})
	}
}

func TestCommands(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()
	c.attach("dev1")
	c.subscribe(topic("dev1", omnicore.KindCommands, "#"), 1)
	c.subscribe(topic(gw, omnicore.KindCommands, "#"), 0)

	tests := []struct {
		name      string
		device    string
		subfolder string
		wantTopic string
		wantQoS   byte
		wantErr   error
	}{
		{name: "no subfolder", device: "dev1", wantTopic: "/reg/dev1/commands", wantQoS: 1},
		{name: "subfolder", device: "dev1", subfolder: "a/b", wantTopic: "/reg/dev1/commands/a/b", wantQoS: 1},
		{name: "gateway's own at QoS 0", device: gw, subfolder: "x", wantTopic: "/reg/gw/commands/x", wantQoS: 0},
		{name: "not subscribed", device: "dev2", wantErr: emulator.ErrNotSubscribed},
		{name: "unknown device", device: "ghost", wantErr: emulator.ErrNotFound},
		{name: "wildcard subfolder", device: "dev1", subfolder: "a/+", wantErr: errAny},
		{name: "empty level", device: "dev1", subfolder: "a//b", wantErr: errAny},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c.t = t
			err := f.srv.SendCommand(reg, tc.device, tc.subfolder, []byte("cmd "+tc.name))
			switch {
			case tc.wantErr == errAny:
				require.Error(t, err)
			case tc.wantErr != nil:
				require.ErrorIs(t, err, tc.wantErr)
			default:
				require.NoError(t, err)
				m := c.next()
				require.Equal(t, tc.wantTopic, m.Topic())
				require.Equal(t, "cmd "+tc.name, string(m.Payload()))
				require.Equal(t, tc.wantQoS, m.Qos())
			}
			c.ackBarrier()
			c.noMessage()
		})
	}
	c.t = t
	require.Equal(t, 3, f.srv.Stats().CommandsDelivered)
}

// errAny marks "some error" in a table.
var errAny = &struct{ error }{}
