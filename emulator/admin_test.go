package emulator_test

import (
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func httpDo(t *testing.T, method, url, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	require.NoError(t, err)
	if method != http.MethodGet {
		req.Header.Set("Content-Type", "application/json")
	}
	cl := &http.Client{Timeout: wait}
	resp, err := cl.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, b
}

func TestAdminAPI(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	api := httptest.NewServer(f.srv.AdminHandler())
	defer api.Close()
	c := f.gateway()
	c.subscribe("/reg/gw/errors", 0)
	c.attach("dev1")
	c.subscribe("/reg/dev1/config", 1)
	c.next()
	c.subscribe("/reg/dev1/commands/#", 1)
	c.mustPublish("/reg/dev1/events/a", 1, "first")
	c.mustPublish("/reg/dev1/state", 1, "\xff\x00binary")

	tests := []struct {
		name       string
		method     string
		path       string
		body       string
		wantStatus int
		check      func(t *testing.T, body []byte)
	}{
		{name: "set config", method: "PUT", path: "/v1/registries/reg/devices/dev1/config", body: `{"a":1}`, wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				require.JSONEq(t, `{"version":1}`, string(body))
				m := c.next()
				require.Equal(t, "/reg/dev1/config", m.Topic())
				require.Equal(t, `{"a":1}`, string(m.Payload()))
			}},
		{name: "set config with POST", method: "POST", path: "/v1/registries/reg/devices/dev1/config", body: "v2", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				require.JSONEq(t, `{"version":2}`, string(body))
				require.Equal(t, "v2", string(c.next().Payload()))
			}},
		{name: "config for an unknown device", method: "PUT", path: "/v1/registries/reg/devices/ghost/config", body: "x", wantStatus: 404},
		{name: "config over 64 KB", method: "PUT", path: "/v1/registries/reg/devices/dev1/config", body: strings.Repeat("x", omnicore.MaxConfigBytes+1), wantStatus: 413},
		{name: "command", method: "POST", path: "/v1/registries/reg/devices/dev1/commands?subfolder=a/b", body: "go", wantStatus: 200,
			check: func(t *testing.T, _ []byte) {
				m := c.next()
				require.Equal(t, "/reg/dev1/commands/a/b", m.Topic())
				require.Equal(t, "go", string(m.Payload()))
			}},
		{name: "command to a device not subscribed", method: "POST", path: "/v1/registries/reg/devices/dev2/commands", body: "x", wantStatus: 409},
		{name: "command with a bad subfolder", method: "POST", path: "/v1/registries/reg/devices/dev1/commands?subfolder=a/%23", body: "x", wantStatus: 400},
		{name: "telemetry", method: "GET", path: "/v1/telemetry", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				var page emulator.TelemetryPage
				require.NoError(t, json.Unmarshal(body, &page))
				require.Equal(t, 2, page.Next)
				require.Len(t, page.Messages, 2)
				m := page.Messages[0]
				require.Equal(t, 0, m.Index)
				require.Equal(t, "dev1", m.Device)
				require.Equal(t, omnicore.KindEvents, m.Kind)
				require.Equal(t, "a", m.Subfolder)
				require.Equal(t, "first", m.Payload)
				require.Equal(t, 5, m.Size)
				raw, err := base64.StdEncoding.DecodeString(page.Messages[1].PayloadBase64)
				require.NoError(t, err)
				require.Equal(t, "\xff\x00binary", string(raw))
			}},
		{name: "telemetry since", method: "GET", path: "/v1/telemetry?since=1", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				var page emulator.TelemetryPage
				require.NoError(t, json.Unmarshal(body, &page))
				require.Len(t, page.Messages, 1)
				require.Equal(t, 1, page.Messages[0].Index)
			}},
		{name: "telemetry since the end", method: "GET", path: "/v1/telemetry?since=2", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				require.JSONEq(t, `{"next":2,"more":false,"dropped":0,"messages":[]}`, string(body))
			}},
		{name: "telemetry one at a time", method: "GET", path: "/v1/telemetry?limit=1", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				var page emulator.TelemetryPage
				require.NoError(t, json.Unmarshal(body, &page))
				require.Len(t, page.Messages, 1)
				require.Equal(t, 0, page.Messages[0].Index)
				require.Equal(t, 1, page.Next)
				require.True(t, page.More)
			}},
		{name: "telemetry with a zero limit", method: "GET", path: "/v1/telemetry?limit=0", wantStatus: 400},
		{name: "telemetry with a limit too large", method: "GET", path: "/v1/telemetry?limit=10001", wantStatus: 400},
		{name: "telemetry with a bad since", method: "GET", path: "/v1/telemetry?since=-1", wantStatus: 400},
		{name: "devices", method: "GET", path: "/v1/devices", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				var devs []emulator.DeviceStatus
				require.NoError(t, json.Unmarshal(body, &devs))
				byID := map[string]emulator.DeviceStatus{}
				for _, d := range devs {
					byID[d.ID] = d
				}
				require.True(t, byID[gw].Gateway)
				require.True(t, byID[gw].Connected)
				require.Equal(t, emulator.AssociationOnly, byID[gw].AuthMethod)
				require.Equal(t, []string{gw}, byID["dev1"].AttachedTo)
				require.Equal(t, []string{gw}, byID["dev2"].BoundTo)
				require.Equal(t, 2, byID["dev1"].ConfigVersion)
			}},
		{name: "attachments", method: "GET", path: "/v1/attachments", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				var sets []emulator.AttachmentSet
				require.NoError(t, json.Unmarshal(body, &sets))
				require.Equal(t, []emulator.AttachmentSet{{ClientID: f.srv.ClientID(reg, gw), Registry: reg, Gateway: gw, Devices: []string{"dev1"}}}, sets)
			}},
		{name: "connections", method: "GET", path: "/v1/connections", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				var recs []emulator.ConnectionRecord
				require.NoError(t, json.Unmarshal(body, &recs))
				require.Len(t, recs, 1)
				require.True(t, recs[0].Open())
			}},
		{name: "errors", method: "GET", path: "/v1/errors", wantStatus: 200,
			check: func(t *testing.T, body []byte) { require.JSONEq(t, `[]`, string(body)) }},
		{name: "stats", method: "GET", path: "/v1/stats", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				var st emulator.Stats
				require.NoError(t, json.Unmarshal(body, &st))
				require.Equal(t, 2, st.MessagesAccepted)
				require.Equal(t, 1, st.ConnectionsOpen)
				require.Equal(t, 1, st.CommandsDelivered)
			}},
		{name: "kick one unknown client", method: "POST", path: "/v1/kick?client_id=nobody", wantStatus: 404},
		{name: "kick all", method: "POST", path: "/v1/kick", wantStatus: 200,
			check: func(t *testing.T, body []byte) {
				require.JSONEq(t, `{"kicked":1}`, string(body))
				c.expectLost()
			}},
		{name: "wrong method", method: "DELETE", path: "/v1/devices", wantStatus: 405},
		{name: "unknown path", method: "GET", path: "/v1/nothing", wantStatus: 404},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c.t = t
			status, body := httpDo(t, tc.method, api.URL+tc.path, tc.body)
			require.Equal(t, tc.wantStatus, status, "body: %s", body)
			if tc.wantStatus >= 400 && tc.wantStatus != 405 && !strings.HasSuffix(tc.path, "nothing") {
				var e map[string]string
				require.NoError(t, json.Unmarshal(body, &e))
				require.NotEmpty(t, e["error"])
			}
			if tc.check != nil {
				tc.check(t, body)
			}
		})
	}
}

func TestRegistryFile(t *testing.T) {
	t.Parallel()
	rf, err := emulator.ReadRegistryFile(filepath.Join("..", "testdata", "registry.json"))
	require.NoError(t, err)
	keyDir := t.TempDir()
	srv := emulator.NewServer(emulator.WithSubscription(rf.Subscription))
	defer srv.Close()
	gen, err := srv.ApplyRegistryFile(rf, filepath.Join("..", "testdata"), keyDir)
	require.NoError(t, err)
	require.Len(t, gen, 3)

	byID := map[string]emulator.DeviceStatus{}
	for _, d := range srv.Devices() {
		byID[d.ID] = d
	}
	require.True(t, byID["demo-gateway"].Gateway)
	for _, s := range []string{"sensor-01", "sensor-02", "sensor-03", "sensor-04", "sensor-05", "sensor-blocked"} {
		require.Equal(t, []string{"demo-gateway"}, byID[s].BoundTo, s)
	}
	require.Empty(t, byID["sensor-unbound"].BoundTo)
	require.True(t, byID["sensor-blocked"].Blocked)
	require.Equal(t, emulator.DeviceAuthTokenOnly, byID["token-gateway"].AuthMethod)
	require.Equal(t, 1, byID["sensor-01"].ConfigVersion)

	// The generated gateway key works, and a second start reuses it.
	var gwKey string
	for _, g := range gen {
		if g.Device == "demo-gateway" {
			gwKey = g.PrivatePath
			require.Equal(t, omnicore.RS256, g.Algorithm)
		}
	}
	require.FileExists(t, gwKey)
	f := &fixture{t: t, srv: srv}
	c, err := f.dial(srv.ClientID("demo-registry", "demo-gateway"), mint(t, gwKey, omnicore.RS256, "demo-sub", time.Now(), time.Hour))
	require.NoError(t, err)
	c.c.Disconnect(0)

	before, err := os.ReadFile(gwKey)
	require.NoError(t, err)
	srv2 := emulator.NewServer(emulator.WithSubscription(rf.Subscription), emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
	defer srv2.Close()
	_, err = srv2.ApplyRegistryFile(rf, filepath.Join("..", "testdata"), keyDir)
	require.NoError(t, err)
	after, err := os.ReadFile(gwKey)
	require.NoError(t, err)
	require.Equal(t, before, after)
}

func TestRegistryFileErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, pub := emulator.NewDeviceKey(t, dir, "k", omnicore.ES256)
	tests := []struct {
		name    string
		json    string
		wantErr string
	}{
		{"unknown field", `{"subscription":"s","registries":[],"extra":1}`, "unknown field"},
		{"no subscription", `{"registries":[]}`, "subscription"},
		{"bad registry ID", `{"subscription":"s","registries":[{"id":"a/b","devices":[]}]}`, "registry"},
		{"bad device ID", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"-x"}]}]}`, "device"},
		{"bound to a non-gateway", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a"},{"id":"b","bound_to":["a"]}]}]}`, "not a gateway"},
		{"bound to a missing gateway", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"b","bound_to":["g"]}]}]}`, "not found"},
		{"two key sources", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a","public_keys":[{"algorithm":"ES256","generate":true,"pem_file":"k.pub"}]}]}]}`, "exactly one"},
		{"key of the wrong algorithm", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a","public_keys":[{"algorithm":"RS256","pem_file":"k.pub"}]}]}]}`, "key 1"},
		{"unknown auth method", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"g","gateway":true,"auth_method":"MAGIC"}]}]}`, "auth method"},
		{"pem file key", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a","public_keys":[{"algorithm":"ES256","pem_file":"k.pub"}]}]}]}`, ""},
		{"inline pem key", `{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a","public_keys":[{"algorithm":"ES256","pem":` + jsonString(string(pub.PEM)) + `}]}]}]}`, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, "r.json")
			require.NoError(t, os.WriteFile(path, []byte(tc.json), 0o600))
			rf, err := emulator.ReadRegistryFile(path)
			if err == nil {
				srv := emulator.NewServer(emulator.WithSubscription(rf.Subscription), emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
				defer srv.Close()
				_, err = srv.ApplyRegistryFile(rf, dir, t.TempDir())
			}
			if tc.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, tc.wantErr)
		})
	}
}

func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
