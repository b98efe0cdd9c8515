package emulator_test

import (
	"context"
	"testing"
	"time"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/metric"
	"github.com/influxdata/telegraf/plugins/outputs"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	outomnicore "github.com/telegraf-omnicore/telegraf-omnicore/plugins/outputs/omnicore"
)

// TestRESTLiveEffects: a change through the REST API acts on live MQTT
// connections at once.
func TestRESTLiveEffects(t *testing.T) {
	t.Parallel()
	devPath := func(d string) string { return koreBase + "/registries/" + reg + "/devices/" + d }
	tests := []struct {
		name string
		run  func(t *testing.T, f *fixture, api *restAPI)
	}{
		{"unbinding refuses the next attach", func(t *testing.T, f *fixture, api *restAPI) {
			c := f.gateway()
			c.subscribe("/reg/gw/errors", 0)
			c.attach("dev1")
			code, body := api.do("POST", koreBase+"/registries/reg/unbindDeviceFromGateway", `{"deviceId":"dev1","gatewayId":"gw"}`)
			require.Equal(t, 200, code, "%v", body)
			c.mustPublish("/reg/dev1/events", 1, "still attached") // attached before: stays
			c.mustPublish("/reg/dev1/detach", 1, "")
			c.mustPublish("/reg/dev1/attach", 1, "{}")
			e := c.nextError()
			require.Equal(t, omnicore.ErrorAttachment, e.ErrorType)
			require.Contains(t, e.Description, "not bound")
		}},
		{"blocking closes the device's connection and refuses the next", func(t *testing.T, f *fixture, api *restAPI) {
			key, pub := emulator.NewDeviceKey(t, t.TempDir(), "direct", omnicore.ES256)
			require.NoError(t, f.srv.AddDevice(reg, emulator.Device{ID: "direct", PublicKeys: []emulator.PublicKey{pub}}))
			c := f.connectAs("direct", key)
			code, _ := api.do("PUT", devPath("direct")+"/communication", `{"isblocked":true}`)
			require.Equal(t, 200, code)
			c.expectLost()
			require.Equal(t, emulator.ReasonBlocked, f.waitClosed(f.srv.ClientID(reg, "direct")).Reason)
			_, err := f.dial(f.srv.ClientID(reg, "direct"), f.srv.Token(t, key, omnicore.ES256, time.Hour))
			require.Error(t, err)
			require.Equal(t, emulator.RefusedBlocked, lastRecord(t, f.srv, f.srv.ClientID(reg, "direct")).Reason)
		}},
		{"blocking detaches an attached device", func(t *testing.T, f *fixture, api *restAPI) {
			c := f.gateway()
			c.subscribe("/reg/gw/errors", 0)
			c.attach("dev2")
			code, _ := api.do("PATCH", devPath("dev2")+"?updateMask=blocked", `{"blocked":true}`)
			require.Equal(t, 200, code)
			e := c.nextError()
			require.Equal(t, omnicore.ErrorDetachedByError, e.ErrorType)
			require.Equal(t, "dev2", e.DeviceID)
			require.Empty(t, f.srv.Attachments(reg, gw))
			c.mustPublish("/reg/dev2/attach", 1, "{}")
			require.Contains(t, c.nextError().Description, "is blocked")
		}},
		{"a rotated key is accepted at the next connect", func(t *testing.T, f *fixture, api *restAPI) {
			dir := t.TempDir()
			oldKey, oldPub := emulator.NewDeviceKey(t, dir, "old", omnicore.ES256)
			newKey, newPub := emulator.NewDeviceKey(t, dir, "new", omnicore.ES256)
			require.NoError(t, f.srv.AddDevice(reg, emulator.Device{ID: "rot", PublicKeys: []emulator.PublicKey{oldPub}}))
			c := f.connectAs("rot", oldKey)
			code, body := api.do("PATCH", devPath("rot")+"?updateMask=credentials", `{"credentials":[{"publicKey":{"format":"ES256_PEM","key":`+jsonQuote(string(newPub.PEM))+`}}]}`)
			require.Equal(t, 200, code, "%v", body)
			c.mustPublish("/reg/rot/events", 1, "the old connection stays")
			_, err := f.dial(f.srv.ClientID(reg, "rot")+"", f.srv.Token(t, oldKey, omnicore.ES256, time.Hour))
			require.Error(t, err, "the old key is gone")
			c2, err := f.dial(f.srv.ClientID(reg, "rot"), f.srv.Token(t, newKey, omnicore.ES256, time.Hour))
			require.NoError(t, err)
			c2.mustPublish("/reg/rot/events", 1, "new key")
		}},
		{"an expired credential is refused", func(t *testing.T, f *fixture, api *restAPI) {
			key, pub := emulator.NewDeviceKey(t, t.TempDir(), "exp", omnicore.ES256)
			past := time.Now().Add(-time.Minute).UTC().Format(time.RFC3339)
			code, body := api.do("POST", koreBase+"/registries/reg/devices", `{"id":"exp","credentials":[{"expirationTime":"`+past+`","publicKey":{"format":"ES256_PEM","key":`+jsonQuote(string(pub.PEM))+`}}]}`)
			require.Equal(t, 200, code, "%v", body)
			_, err := f.dial(f.srv.ClientID(reg, "exp"), f.srv.Token(t, key, omnicore.ES256, time.Hour))
			require.Error(t, err)
			require.Equal(t, emulator.RefusedCredentials, lastRecord(t, f.srv, f.srv.ClientID(reg, "exp")).Reason)
		}},
		{"a deleted device disappears", func(t *testing.T, f *fixture, api *restAPI) {
			c := f.gateway()
			c.subscribe("/reg/gw/errors", 0)
			c.attach("dev3")
			code, _ := api.do("DELETE", devPath("dev3"), "")
			require.Equal(t, 200, code)
			require.Equal(t, omnicore.ErrorDetachedByError, c.nextError().ErrorType)
			c.mustPublish("/reg/dev3/attach", 1, "{}")
			require.Contains(t, c.nextError().Description, "does not exist")
		}},
		{"a deleted gateway is disconnected and refused", func(t *testing.T, f *fixture, api *restAPI) {
			c := f.gateway()
			code, _ := api.do("DELETE", devPath(gw), "")
			require.Equal(t, 200, code)
			c.expectLost()
			require.Equal(t, emulator.ReasonDeleted, f.waitClosed(f.srv.ClientID(reg, gw)).Reason)
			_, err := f.dial(f.srv.ClientID(reg, gw), f.gwToken())
			require.Error(t, err)
			require.Equal(t, emulator.RefusedClientID, lastRecord(t, f.srv, f.srv.ClientID(reg, gw)).Reason)
		}},
		{"config, command and states reach the connection", func(t *testing.T, f *fixture, api *restAPI) {
			c := f.gateway()
			c.attach("dev1")
			c.subscribe("/reg/dev1/config", 1)
			require.Empty(t, c.next().Payload(), "no config yet: an empty one")
			c.subscribe("/reg/dev1/commands/#", 1)
			code, _ := api.do("POST", devPath("dev1")+"/updateConfigurationToDevice", `{"binaryData":"`+b64("cfg")+`"}`)
			require.Equal(t, 200, code)
			m := c.next()
			require.Equal(t, "/reg/dev1/config", m.Topic())
			require.Equal(t, "cfg", string(m.Payload()))
			code, body := api.do("POST", devPath("dev1")+"/sendCommandToDevice", `{"binaryData":"`+b64("go")+`","subfolder":"valve/1"}`)
			require.Equal(t, 200, code, "%v", body)
			m = c.next()
			require.Equal(t, "/reg/dev1/commands/valve/1", m.Topic())
			require.Equal(t, "go", string(m.Payload()))
			code, _ = api.do("POST", koreBase+"/registries/reg/sendBroadcastToDevice", `{"binaryData":"`+b64("all")+`"}`)
			require.Equal(t, 200, code)
			require.Equal(t, "all", string(c.next().Payload()))
			c.mustPublish("/reg/dev1/state", 1, "s1")
			_, states := api.do("GET", devPath("dev1")+"/states", "")
			require.Equal(t, []any{map[string]any{"binaryData": b64("s1"), "updateTime": states["deviceStates"].([]any)[0].(map[string]any)["updateTime"]}}, states["deviceStates"])
			_, d := api.do("GET", devPath("dev1"), "")
			require.Equal(t, true, d["clientOnline"], "attached")
			require.Equal(t, b64("s1"), d["state"].(map[string]any)["binaryData"])
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			f := newFixture(t)
			tc.run(t, f, newRESTAPI(t, f.srv))
		})
	}
}

// startOutput runs the real outputs.omnicore against srv as the gateway.
func startOutput(t *testing.T, srv *emulator.Server, registryID, gatewayID, key string) *outomnicore.OmniCore {
	t.Helper()
	o := outputs.Outputs["omnicore"]().(*outomnicore.OmniCore)
	o.Servers = []string{srv.URL}
	o.SubscriptionID = srv.Subscription()
	o.RegistryID = registryID
	o.GatewayID = gatewayID
	o.PrivateKey = key
	o.Algorithm = omnicore.ES256
	o.MaxReconnectInterval = config.Duration(time.Second)
	o.WriteTimeout = config.Duration(time.Minute)
	o.Log = testutil.Logger{Name: "outputs.omnicore"}
	require.NoError(t, o.Init())
	require.NoError(t, o.Connect())
	t.Cleanup(func() { require.NoError(t, o.Close()) })
	return o
}

// TestRESTProvisioningFlow provisions with KORE's API only, then runs the
// real plugin through the gateway it made.
func TestRESTProvisioningFlow(t *testing.T) {
	t.Parallel()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	api := newRESTAPI(t, srv)
	key, pub := emulator.NewDeviceKey(t, t.TempDir(), "plant-gw", omnicore.ES256)
	for _, st := range []struct{ path, body string }{
		{koreBase + "/registries", `{"id":"plant"}`},
		{koreBase + "/registries/plant/devices", `{"id":"plant-gw","gatewayConfig":{"gatewayType":"GATEWAY","gatewayAuthMethod":"ASSOCIATION_ONLY"},"credentials":[{"publicKey":{"format":"ES256_PEM","key":` + jsonQuote(string(pub.PEM)) + `}}]}`},
		{koreBase + "/registries/plant/devices", `{"id":"boiler-1"}`},
		{koreBase + "/registries/plant/bindDeviceToGateway", `{"deviceId":"boiler-1","gatewayId":"plant-gw"}`},
	} {
		code, body := api.do("POST", st.path, st.body)
		require.Equal(t, 200, code, "%s: %v", st.path, body)
	}

	o := startOutput(t, srv, "plant", "plant-gw", key)
	ms := []telegraf.Metric{
		metric.New("boiler", map[string]string{"device_id": "boiler-1"}, map[string]any{"temp": 71.5}, time.Unix(1700000000, 0)),
		metric.New("boiler", map[string]string{"device_id": "boiler-1"}, map[string]any{"temp": 72.0}, time.Unix(1700000001, 0)),
	}
	require.NoError(t, o.Write(ms))
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	got, err := srv.WaitReceived(ctx, len(ms)) // one message per metric, in any order
	require.NoError(t, err)
	var payloads []string
	for _, m := range got {
		require.Equal(t, "boiler-1", m.Device)
		payloads = append(payloads, string(m.Payload))
	}
	require.ElementsMatch(t, []string{"boiler temp=71.5 1700000000000000000\n", "boiler temp=72 1700000001000000000\n"}, payloads)

	_, d := api.do("GET", koreBase+"/registries/plant/devices/boiler-1", "")
	require.Equal(t, true, d["clientOnline"])
	require.NotEmpty(t, d["lastEventTime"])
	_, gws := api.do("GET", koreBase+"/registries/plant/devices?gatewayListOptions.associationsDeviceId=boiler-1", "")
	require.Equal(t, []string{"plant-gw"}, ids(gws["devices"]))
	_, g := api.do("GET", koreBase+"/registries/plant/devices/plant-gw", "")
	require.Equal(t, true, g["clientOnline"])
	require.Equal(t, []any{"boiler-1"}, g["gateway"])
}
