package emulator_test

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

const adminToken = "0123456789abcdef-test-token"

// TestAdminRefusesWebPages sends the requests a web page (or a DNS-rebinding
// page) can make to the admin API, and some a user makes, over a real
// listener: the refused ones get 401/403/415 and change nothing, which the
// last step proves: the config a client receives next is the one set after
// the table, and the gateway was never kicked.
func TestAdminRefusesWebPages(t *testing.T) {
	t.Parallel()
	f := newFixture(t)
	c := f.gateway()
	c.attach("dev1")
	c.subscribe("/reg/dev1/config", 1)
	require.Empty(t, c.next().Payload(), "the empty config after the SUBACK")
	c.subscribe("/reg/dev1/commands/#", 1)

	handlers := map[string]*httptest.Server{
		"plain": httptest.NewServer(f.srv.AdminHandler()),
		"host":  httptest.NewServer(f.srv.AdminHandler(emulator.AdminHost("Emu.LAN"))),
		"token": httptest.NewServer(f.srv.AdminHandler(emulator.AdminToken(adminToken))),
	}
	for _, h := range handlers {
		defer h.Close()
	}
	const (
		config  = "/v1/registries/reg/devices/dev1/config"
		command = "/v1/registries/reg/devices/dev1/commands"
		appJSON = "application/json"
	)
	tests := []struct {
		name        string
		handler     string // default "plain"
		method      string
		path        string
		host        string // Host header; default: the listener's 127.0.0.1:port
		origin      string
		contentType string
		auth        string
		body        string
		wantStatus  int
	}{
		// curl -X POST -H 'Host: attacker.example' -H 'Origin: http://attacker.example' -H 'Content-Type: text/plain'
		//   --data-binary '{"evil":1}' http://127.0.0.1:8080/v1/registries/demo-registry/devices/demo-gateway/config
		{name: "the cross-site request of issue 14", method: "POST", path: config, host: "attacker.example",
			origin: "http://attacker.example", contentType: "text/plain", body: `{"evil":1}`, wantStatus: 403},
		{name: "cross-site POST with a loopback Host", method: "POST", path: config, origin: "http://attacker.example",
			contentType: "text/plain", body: `{"evil":1}`, wantStatus: 403},
		{name: "cross-site POST as JSON", method: "POST", path: config, origin: "http://attacker.example",
			contentType: appJSON, body: `{"evil":1}`, wantStatus: 403},
		{name: "text/plain POST without Origin", method: "POST", path: config, contentType: "text/plain", body: `{"evil":1}`, wantStatus: 415},
		{name: "POST without Content-Type", method: "POST", path: config, body: `{"evil":1}`, wantStatus: 415},
		{name: "form POST (curl's default)", method: "PUT", path: config, contentType: "application/x-www-form-urlencoded", body: "x", wantStatus: 415},
		{name: "multipart command", method: "POST", path: command, contentType: "multipart/form-data; boundary=x", body: "--x--", wantStatus: 415},
		{name: "text/plain kick", method: "POST", path: "/v1/kick", contentType: "text/plain", wantStatus: 415},
		{name: "kick without Content-Type", method: "POST", path: "/v1/kick", wantStatus: 415},
		{name: "DNS-rebinding read", method: "GET", path: "/v1/telemetry", host: "attacker.example", wantStatus: 403},
		{name: "DNS-rebinding read with a port", method: "GET", path: "/v1/devices", host: "attacker.example:8080", wantStatus: 403},
		{name: "rebinding name that starts with localhost", method: "GET", path: "/v1/devices", host: "localhost.attacker.example", wantStatus: 403},
		{name: "private address Host", method: "GET", path: "/v1/devices", host: "10.0.0.1:8080", wantStatus: 403},
		{name: "Origin null", method: "GET", path: "/v1/devices", origin: "null", wantStatus: 403},
		{name: "file Origin", method: "GET", path: "/v1/devices", origin: "file://", wantStatus: 403},
		{name: "preflight", method: "OPTIONS", path: config, origin: "http://attacker.example", wantStatus: 403},
		{name: "Host localhost", method: "GET", path: "/v1/devices", host: "localhost:8080", wantStatus: 200},
		{name: "Host [::1]", method: "GET", path: "/v1/devices", host: "[::1]:8080", wantStatus: 200},
		{name: "Host anywhere in 127/8", method: "GET", path: "/v1/devices", host: "127.9.9.9", wantStatus: 200},
		{name: "loopback Origin", method: "GET", path: "/v1/devices", origin: "http://localhost:3000", wantStatus: 200},
		{name: "JSON with a charset passes the guard", method: "POST", path: "/v1/kick?client_id=nobody", contentType: appJSON + "; charset=utf-8", wantStatus: 404},
		{name: "JSON command", method: "POST", path: command, contentType: appJSON, body: "ping", wantStatus: 200},

		{name: "admin host", handler: "host", method: "GET", path: "/v1/devices", host: "emu.lan:8080", wantStatus: 200},
		{name: "admin host Origin", handler: "host", method: "GET", path: "/v1/devices", host: "emu.lan:8080", origin: "http://emu.lan:8080", wantStatus: 200},
		{name: "another host", handler: "host", method: "GET", path: "/v1/devices", host: "other.lan:8080", wantStatus: 403},

		{name: "no token", handler: "token", method: "GET", path: "/v1/devices", wantStatus: 401},
		{name: "wrong token", handler: "token", method: "GET", path: "/v1/devices", auth: "Bearer " + adminToken + "x", wantStatus: 401},
		{name: "basic auth", handler: "token", method: "GET", path: "/v1/devices", auth: "Basic " + adminToken, wantStatus: 401},
		{name: "token", handler: "token", method: "GET", path: "/v1/devices", auth: "Bearer " + adminToken, wantStatus: 200},
		{name: "token, scheme in lower case", handler: "token", method: "GET", path: "/v1/devices", auth: "bearer " + adminToken, wantStatus: 200},
		{name: "token but text/plain", handler: "token", method: "POST", path: "/v1/kick", auth: "Bearer " + adminToken, contentType: "text/plain", wantStatus: 415},
		{name: "wrong token for a kick", handler: "token", method: "POST", path: "/v1/kick", auth: "Bearer nope", contentType: appJSON, wantStatus: 401},
		{name: "token from a rebinding page", handler: "token", method: "GET", path: "/v1/devices", host: "attacker.example", auth: "Bearer " + adminToken, wantStatus: 403},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := handlers[cmp.Or(tc.handler, "plain")]
			req, err := http.NewRequest(tc.method, srv.URL+tc.path, strings.NewReader(tc.body))
			require.NoError(t, err)
			if tc.host != "" {
				req.Host = tc.host
			}
			for k, v := range map[string]string{"Origin": tc.origin, "Content-Type": tc.contentType, "Authorization": tc.auth} {
				if v != "" {
					req.Header.Set(k, v)
				}
			}
			resp, err := (&http.Client{Timeout: wait}).Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			require.Equal(t, tc.wantStatus, resp.StatusCode, "body: %s", body)
			require.Empty(t, resp.Header.Get("Access-Control-Allow-Origin"), "CORS is never granted")
			if tc.wantStatus >= 400 {
				var e map[string]string
				require.NoError(t, json.Unmarshal(body, &e))
				require.NotEmpty(t, e["error"])
			}
			if tc.wantStatus == 401 {
				require.Contains(t, resp.Header.Get("WWW-Authenticate"), "Bearer")
			}
		})
	}
	c.t = t

	// The one accepted command arrived; no refused config did: the next
	// message is the config set now, version 1.
	require.Equal(t, "ping", string(c.next().Payload()))
	status, body := httpDo(t, "PUT", handlers["plain"].URL+config, "after")
	require.Equal(t, 200, status, string(body))
	require.JSONEq(t, `{"version":1}`, string(body))
	m := c.next()
	require.Equal(t, "/reg/dev1/config", m.Topic())
	require.Equal(t, "after", string(m.Payload()))
	require.Len(t, f.srv.Connections(), 1, "never kicked")
	require.True(t, f.srv.Connections()[0].Open())
}

// TestAdminNoHost covers what an HTTP client cannot send: no Host at all
// (HTTP/1.0).
func TestAdminNoHost(t *testing.T) {
	t.Parallel()
	srv := emulator.NewServer(emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
	defer srv.Close()
	req := httptest.NewRequest("GET", "/v1/devices", nil)
	req.Host = ""
	req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/1.0", 1, 0
	rec := httptest.NewRecorder()
	srv.AdminHandler().ServeHTTP(rec, req)
	require.Equal(t, 403, rec.Code)
}

func TestIsLoopbackHost(t *testing.T) {
	t.Parallel()
	for host, want := range map[string]bool{
		"localhost": true, "LOCALHOST": true, "127.0.0.1": true, "127.255.0.9": true, "::1": true, "[::1]": true,
		"::ffff:127.0.0.1": true, "0.0.0.0": false, "::": false, "10.1.2.3": false, "localhost.example": false,
		"example.com": false, "": false, "128.0.0.1": false,
	} {
		require.Equal(t, want, emulator.IsLoopbackHost(host), host)
	}
}

// TestTelemetryPages walks GET /v1/telemetry page by page while the older
// messages have been dropped by WithMaxReceived: every kept message comes
// exactly once, in order, and the page says how many were dropped.
func TestTelemetryPages(t *testing.T) {
	t.Parallel()
	f := newFixture(t, emulator.WithMaxReceived(8))
	api := httptest.NewServer(f.srv.AdminHandler())
	defer api.Close()
	c := f.gateway()
	const total = 21
	for i := range total {
		c.mustPublish("/reg/gw/events", 1, fmt.Sprintf("m%02d", i))
	}
	kept := f.srv.Received()
	require.NotEmpty(t, kept)
	require.LessOrEqual(t, len(kept), 8)
	first := kept[0].Index
	require.Equal(t, total-len(kept), first)

	since, pages := 0, 0
	var got []string
	for {
		status, body := httpDo(t, "GET", api.URL+"/v1/telemetry?limit=3&since="+url.QueryEscape(fmt.Sprint(since)), "")
		require.Equal(t, 200, status, string(body))
		var page emulator.TelemetryPage
		require.NoError(t, json.Unmarshal(body, &page))
		if pages == 0 {
			require.Equal(t, first, page.Dropped, "dropped before the first kept message")
		} else {
			require.Zero(t, page.Dropped)
		}
		require.LessOrEqual(t, len(page.Messages), 3)
		for i, m := range page.Messages {
			require.Equal(t, max(since, first)+i, m.Index)
			got = append(got, m.Payload)
		}
		since = page.Next
		pages++
		if !page.More {
			break
		}
	}
	require.Equal(t, total, since)
	want := make([]string, 0, len(kept))
	for _, m := range kept {
		want = append(want, string(m.Payload))
	}
	require.Equal(t, want, got)
	require.Equal(t, (len(kept)+2)/3, pages)
}
