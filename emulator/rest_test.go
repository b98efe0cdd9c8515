package emulator_test

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"io"
	"math/big"
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

const koreBase = "/omnicore/subscriptions/" + emulator.DefaultSubscription

// restAPI is the command's HTTP handler on a test server.
type restAPI struct {
	t   *testing.T
	url string
	hdr http.Header
}

func newRESTAPI(t *testing.T, srv *emulator.Server, opts ...emulator.AdminOption) *restAPI {
	api := httptest.NewServer(srv.HTTPHandler(opts...))
	t.Cleanup(api.Close)
	return &restAPI{t: t, url: api.URL, hdr: http.Header{}}
}

// do sends a request (JSON body unless empty) and decodes the JSON answer.
func (a *restAPI) do(method, path, body string) (int, map[string]any) {
	a.t.Helper()
	var rd io.Reader = http.NoBody
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, a.url+path, rd)
	require.NoError(a.t, err)
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	for k, v := range a.hdr {
		req.Header[k] = v
	}
	resp, err := (&http.Client{Timeout: wait}).Do(req)
	require.NoError(a.t, err)
	defer resp.Body.Close()
	require.Equal(a.t, "application/json", resp.Header.Get("Content-Type"), "%s %s", method, path)
	var out map[string]any
	require.NoError(a.t, json.NewDecoder(resp.Body).Decode(&out), "%s %s", method, path)
	return resp.StatusCode, out
}

// requireShape checks that obj has the fields with the JSON types of want
// ("string", "number", "bool", "array", "object").
func requireShape(t *testing.T, obj map[string]any, want map[string]string) {
	t.Helper()
	for field, typ := range want {
		v, ok := obj[field]
		require.True(t, ok, "field %q missing in %v", field, obj)
		var got string
		switch v.(type) {
		case string:
			got = "string"
		case float64:
			got = "number"
		case bool:
			got = "bool"
		case []any:
			got = "array"
		case map[string]any:
			got = "object"
		}
		require.Equal(t, typ, got, "type of %q in %v", field, obj)
	}
}

// requireKoreError checks KORE's GenericErrorResponse.
func requireKoreError(t *testing.T, body map[string]any, code int, status string) {
	t.Helper()
	requireShape(t, body, map[string]string{"error": "object"})
	frame := body["error"].(map[string]any)
	requireShape(t, frame, map[string]string{"code": "number", "details": "string", "message": "string", "status": "string"})
	require.Equal(t, float64(code), frame["code"], "%v", frame)
	require.Equal(t, status, frame["status"], "%v", frame)
}

var (
	deviceShape = map[string]string{
		"id": "string", "name": "string", "numId": "string", "parent": "string", "registry": "string",
		"subscription": "string", "blocked": "bool", "createdOn": "string", "updatedOn": "string",
		"credentials": "array", "gateway": "array", "gatewayConfig": "object", "isGateway": "bool",
		"clientOnline": "bool",
	}
	registryShape = map[string]string{
		"id": "string", "name": "string", "parent": "string", "createdOn": "string", "updatedOn": "string",
		"numberOfDevices": "number", "numberOfGateways": "number",
	}
	listShape = map[string]string{"pageNumber": "number", "pageSize": "number", "totalCount": "number"}
)

func pemFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	return string(b)
}

// selfSignedRSA returns an RSA certificate (PEM) for an RSA_X509_PEM credential.
func selfSignedRSA(t *testing.T) string {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	require.NoError(t, err)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "dev"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	require.NoError(t, err)
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
}

func jsonQuote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// TestRESTShapes walks KORE's operations in order on one emulator and checks
// status codes, field names and JSON types as the OpenAPI description has
// them.
func TestRESTShapes(t *testing.T) {
	t.Parallel()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	api := newRESTAPI(t, srv)
	dir := t.TempDir()
	_, gwPub := emulator.NewDeviceKey(t, dir, "gw", omnicore.ES256)
	rsaPath, _, err := omnicore.WriteKeyPair(dir, "rsa", omnicore.RS256)
	require.NoError(t, err)
	rsaPub := pemFile(t, strings.TrimSuffix(rsaPath, ".key")+".pub")
	cert := selfSignedRSA(t)

	reg := koreBase + "/registries/r1"
	dev := reg + "/devices/"
	steps := []struct {
		name, method, path, body string
		status                   int
		koreStatus               string // for errors
		check                    func(t *testing.T, body map[string]any)
	}{
		{"create registry", "POST", koreBase + "/registries", `{"id":"r1","logLevel":"INFO","mqttConfig":{"mqttEnabledState":"MQTT_ENABLED"}}`, 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, registryShape)
			require.Equal(t, "r1", b["id"])
			require.Equal(t, "subscriptions/test-sub/registries/r1", b["name"])
			require.Equal(t, "INFO", b["logLevel"])
			require.Equal(t, map[string]any{"mqttEnabledState": "MQTT_ENABLED"}, b["mqttConfig"])
		}},
		{"registry exists", "POST", koreBase + "/registries", `{"id":"r1"}`, 409, "ALREADY_EXISTS", nil},
		{"bad registry id", "POST", koreBase + "/registries", `{"id":"1bad"}`, 400, "INVALID_ARGUMENT", nil},
		{"MQTT_DISABLED not emulated", "POST", koreBase + "/registries", `{"id":"r2","mqttConfig":{"mqttEnabledState":"MQTT_DISABLED"}}`, 400, "INVALID_ARGUMENT", nil},
		{"not JSON", "POST", koreBase + "/registries", `{"id":`, 400, "INVALID_ARGUMENT", nil},
		{"list registries", "GET", koreBase + "/registries?pageNumber=1&pageSize=10", "", 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, listShape)
			require.Len(t, b["deviceRegistries"], 1)
			requireShape(t, b["deviceRegistries"].([]any)[0].(map[string]any), registryShape)
			require.Equal(t, float64(10), b["pageSize"])
			require.Equal(t, float64(1), b["totalCount"])
		}},
		{"list registries by id", "GET", koreBase + "/registries?registryIds=r9,r8", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Empty(t, b["deviceRegistries"])
		}},
		{"page size over the bound", "GET", koreBase + "/registries?pageSize=1001", "", 400, "INVALID_ARGUMENT", nil},
		{"update registry", "PATCH", reg + "?updateMask=logLevel", `{"logLevel":"ERROR"}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, "ERROR", b["logLevel"])
		}},
		{"update registry, bad mask", "PATCH", reg + "?updateMask=id", `{"id":"x"}`, 400, "INVALID_ARGUMENT", nil},
		{"create gateway ES256_PEM", "POST", reg + "/devices", `{"id":"gw","gatewayConfig":{"gatewayType":"GATEWAY","gatewayAuthMethod":"ASSOCIATION_ONLY"},"credentials":[{"publicKey":{"format":"ES256_PEM","key":` + jsonQuote(string(gwPub.PEM)) + `}}],"metadata":{"site":"north"}}`, 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, deviceShape)
			require.Equal(t, true, b["isGateway"])
			require.Equal(t, map[string]any{"gatewayType": "GATEWAY", "gatewayAuthMethod": "ASSOCIATION_ONLY"}, b["gatewayConfig"])
			cred := b["credentials"].([]any)[0].(map[string]any)
			requireShape(t, cred, map[string]string{"id": "string", "publicKey": "object"})
			require.Equal(t, "ES256_PEM", cred["publicKey"].(map[string]any)["format"])
			require.Equal(t, map[string]any{"site": "north"}, b["metadata"])
		}},
		{"create device RSA_PEM", "POST", reg + "/devices", `{"id":"dev1","credentials":[{"publicKey":{"format":"RSA_PEM","key":` + jsonQuote(rsaPub) + `},"expirationTime":"2099-01-01T00:00:00Z"}]}`, 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, deviceShape)
			require.Equal(t, false, b["isGateway"])
			require.Equal(t, map[string]any{"gatewayType": "NON_GATEWAY", "gatewayAuthMethod": "GATEWAY_AUTH_METHOD_UNSPECIFIED"}, b["gatewayConfig"])
			require.Equal(t, "2099-01-01T00:00:00Z", b["credentials"].([]any)[0].(map[string]any)["expirationTime"])
		}},
		{"create device RSA_X509_PEM", "POST", reg + "/devices", `{"id":"dev2","blocked":true,"credentials":[{"publicKey":{"format":"RSA_X509_PEM","key":` + jsonQuote(cert) + `}}]}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, true, b["blocked"])
		}},
		{"format does not fit the key", "POST", reg + "/devices", `{"id":"dev3","credentials":[{"publicKey":{"format":"ES256_PEM","key":` + jsonQuote(rsaPub) + `}}]}`, 400, "INVALID_ARGUMENT", nil},
		{"certificate under a key format", "POST", reg + "/devices", `{"id":"dev3","credentials":[{"publicKey":{"format":"RSA_PEM","key":` + jsonQuote(cert) + `}}]}`, 400, "INVALID_ARGUMENT", nil},
		{"unknown format", "POST", reg + "/devices", `{"id":"dev3","credentials":[{"publicKey":{"format":"DSA","key":` + jsonQuote(rsaPub) + `}}]}`, 400, "INVALID_ARGUMENT", nil},
		{"auth method on a non-gateway", "POST", reg + "/devices", `{"id":"dev3","gatewayConfig":{"gatewayType":"NON_GATEWAY","gatewayAuthMethod":"ASSOCIATION_ONLY"}}`, 400, "INVALID_ARGUMENT", nil},
		{"device in unknown registry", "POST", koreBase + "/registries/nope/devices", `{"id":"dev3"}`, 404, "NOT_FOUND", nil},
		{"create device bound at birth", "POST", reg + "/devices", `{"id":"dev3","gateway":["gw"]}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []any{"gw"}, b["gateway"])
		}},
		{"bind", "POST", reg + "/bindDeviceToGateway", `{"deviceId":"dev1","gatewayId":"gw"}`, 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, map[string]string{"info": "string"})
		}},
		{"bind to a non-gateway", "POST", reg + "/bindDeviceToGateway", `{"deviceId":"dev1","gatewayId":"dev2"}`, 400, "INVALID_ARGUMENT", nil},
		{"bind unknown device", "POST", reg + "/bindDeviceToGateway", `{"deviceId":"ghost","gatewayId":"gw"}`, 404, "NOT_FOUND", nil},
		{"bind without gatewayId", "POST", reg + "/bindDeviceToGateway", `{"deviceId":"dev1"}`, 400, "INVALID_ARGUMENT", nil},
		{"bind many", "POST", reg + "/bindDevicesToGateway", `{"deviceIds":["dev2","dev3"],"gatewayId":"gw"}`, 200, "", nil},
		{"unbind many", "POST", reg + "/unbindDevicesFromGateway", `{"deviceIds":["dev2"],"gatewayId":"gw"}`, 200, "", nil},
		{"devices of a gateway", "GET", reg + "/devices?gatewayListOptions.associationsGatewayId=gw", "", 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, listShape)
			require.Equal(t, []string{"dev1", "dev3"}, ids(b["devices"]))
		}},
		{"devices of a gateway by numId", "GET", reg + "/devices?gatewayListOptions.associationsGatewayId=1", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []string{"dev1", "dev3"}, ids(b["devices"]))
		}},
		{"gateways of a device", "GET", reg + "/devices?gatewayListOptions.associationsDeviceId=dev1", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []string{"gw"}, ids(b["devices"]))
		}},
		{"gateways only", "GET", reg + "/devices?gatewayListOptions.gatewayType=GATEWAY", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []string{"gw"}, ids(b["devices"]))
		}},
		{"non-gateways by ids", "GET", reg + "/devices?gatewayListOptions.gatewayType=NON_GATEWAY&deviceIds=dev2,dev3,gw", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []string{"dev2", "dev3"}, ids(b["devices"]))
		}},
		{"paging", "GET", reg + "/devices?pageSize=2&pageNumber=2", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []string{"dev3", "gw"}, ids(b["devices"]))
			require.Equal(t, float64(4), b["totalCount"])
			require.Equal(t, float64(2), b["pageNumber"])
		}},
		{"fieldMask", "GET", reg + "/devices?deviceIds=dev2&fieldMask=blocked", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, map[string]any{"id": "dev2", "numId": "3", "blocked": true}, b["devices"].([]any)[0])
		}},
		{"unknown gateway in a filter", "GET", reg + "/devices?gatewayListOptions.associationsGatewayId=ghost", "", 404, "NOT_FOUND", nil},
		{"bad gatewayType", "GET", reg + "/devices?gatewayListOptions.gatewayType=SOME", "", 400, "INVALID_ARGUMENT", nil},
		{"get device", "GET", dev + "dev1", "", 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, deviceShape)
			require.Equal(t, []any{"gw"}, b["gateway"])
		}},
		{"update metadata", "PATCH", dev + "dev1?updateMask=metadata", `{"metadata":{"floor":"2"}}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, map[string]any{"floor": "2"}, b["metadata"])
		}},
		{"update with two fields", "PATCH", dev + "dev1?updateMask=logLevel,blocked", `{"logLevel":"ERROR","blocked":false}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, "ERROR", b["logLevel"])
		}},
		{"update auth method", "PATCH", dev + "gw?updateMask=gatewayConfig.gatewayAuthMethod", `{"gatewayConfig":{"gatewayAuthMethod":"ASSOCIATION_AND_DEVICE_AUTH_TOKEN"}}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, "ASSOCIATION_AND_DEVICE_AUTH_TOKEN", b["gatewayConfig"].(map[string]any)["gatewayAuthMethod"])
		}},
		{"update without mask", "PATCH", dev + "dev1", `{"blocked":true}`, 400, "INVALID_ARGUMENT", nil},
		{"update an immutable field", "PATCH", dev + "dev1?updateMask=id", `{"id":"x"}`, 400, "INVALID_ARGUMENT", nil},
		{"block", "PUT", dev + "dev1/communication", `{"isblocked":true}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Empty(t, b)
		}},
		{"blocked shows", "GET", dev + "dev1", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, true, b["blocked"])
		}},
		{"unblock", "PUT", dev + "dev1/communication", `{"isblocked":false}`, 200, "", nil},
		{"communication without isblocked", "PUT", dev + "dev1/communication", `{}`, 400, "INVALID_ARGUMENT", nil},
		{"config", "POST", dev + "dev1/updateConfigurationToDevice", `{"binaryData":"` + b64(`{"rate":1}`) + `"}`, 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, map[string]string{"version": "number", "cloudUpdateTime": "string", "binaryData": "string", "acknowledged": "bool"})
			require.Equal(t, float64(1), b["version"])
			require.Equal(t, b64(`{"rate":1}`), b["binaryData"])
		}},
		{"config with versionToUpdate", "POST", dev + "dev1/updateConfigurationToDevice", `{"binaryData":"` + b64(`{"rate":2}`) + `","versionToUpdate":"1"}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, float64(2), b["version"])
		}},
		{"config with a stale version", "POST", dev + "dev1/updateConfigurationToDevice", `{"binaryData":"` + b64("x") + `","versionToUpdate":"1"}`, 400, "FAILED_PRECONDITION", nil},
		{"config not base64", "POST", dev + "dev1/updateConfigurationToDevice", `{"binaryData":"***"}`, 400, "INVALID_ARGUMENT", nil},
		{"config without binaryData", "POST", dev + "dev1/updateConfigurationToDevice", `{"subfolder":"a"}`, 400, "INVALID_ARGUMENT", nil},
		{"config versions", "GET", dev + "dev1/configVersions", "", 200, "", func(t *testing.T, b map[string]any) {
			cfgs := b["deviceConfigs"].([]any)
			require.Len(t, cfgs, 2)
			require.Equal(t, float64(2), cfgs[0].(map[string]any)["version"], "newest first")
		}},
		{"config versions, one", "GET", dev + "dev1/configVersions?numVersions=1", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Len(t, b["deviceConfigs"], 1)
		}},
		{"device shows its config", "GET", dev + "dev1", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, float64(2), b["config"].(map[string]any)["version"])
		}},
		{"command, nobody subscribed", "POST", dev + "dev1/sendCommandToDevice", `{"binaryData":"` + b64("reboot") + `","subfolder":"a/b"}`, 400, "FAILED_PRECONDITION", nil},
		{"command, bad subfolder", "POST", dev + "dev1/sendCommandToDevice", `{"binaryData":"` + b64("reboot") + `","subfolder":"/a"}`, 400, "INVALID_ARGUMENT", nil},
		{"broadcast", "POST", reg + "/sendBroadcastToDevice", `{"binaryData":"` + b64("all") + `"}`, 200, "", func(t *testing.T, b map[string]any) {
			require.Empty(t, b)
		}},
		{"states", "GET", dev + "dev1/states?numStates=5", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []any{}, b["deviceStates"])
		}},
		{"devices last seen", "GET", koreBase + "/devices?sortByClientOnline=true", "", 200, "", func(t *testing.T, b map[string]any) {
			requireShape(t, b, listShape)
			require.Len(t, b["devices"], 4)
			requireShape(t, b["devices"].([]any)[0].(map[string]any), map[string]string{"id": "string", "registry": "string", "clientOnline": "bool", "subscription": "string"})
		}},
		{"delete a registry with devices", "DELETE", reg, "", 400, "FAILED_PRECONDITION", nil},
		{"delete device", "DELETE", dev + "dev2", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Empty(t, b)
		}},
		{"deleted device", "GET", dev + "dev2", "", 404, "NOT_FOUND", nil},
		{"delete gateway drops its bindings", "DELETE", dev + "gw", "", 200, "", nil},
		{"bindings gone", "GET", dev + "dev1", "", 200, "", func(t *testing.T, b map[string]any) {
			require.Equal(t, []any{}, b["gateway"])
		}},
		{"wrong subscription", "GET", "/omnicore/subscriptions/other/registries", "", 404, "NOT_FOUND", nil},
		{"unknown operation", "POST", reg + "/devices/dev1/reboot", `{}`, 404, "NOT_FOUND", nil},
	}
	for _, st := range steps {
		code, body := api.do(st.method, st.path, st.body)
		require.Equal(t, st.status, code, "%s: %v", st.name, body)
		if st.koreStatus != "" {
			requireKoreError(t, body, st.status, st.koreStatus)
		}
		if st.check != nil {
			t.Run(st.name, func(t *testing.T) { st.check(t, body) })
		}
	}
}

func ids(list any) []string {
	var out []string
	for _, d := range list.([]any) {
		out = append(out, d.(map[string]any)["id"].(string))
	}
	return out
}

// TestRESTGuard: the REST API keeps every guard of the admin API, answers in
// KORE's error shape, and takes the token both ways KORE does.
func TestRESTGuard(t *testing.T) {
	t.Parallel()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	const token = "0123456789abcdef0123"
	api := newRESTAPI(t, srv, emulator.AdminToken(token))
	path := koreBase + "/registries"
	tests := []struct {
		name   string
		hdr    map[string]string
		method string
		body   string
		status int
		kore   string
	}{
		{"no token", nil, "GET", "", 401, "UNAUTHENTICATED"},
		{"wrong bearer", map[string]string{"Authorization": "Bearer nope"}, "GET", "", 401, "UNAUTHENTICATED"},
		{"bearer", map[string]string{"Authorization": "Bearer " + token}, "GET", "", 200, ""},
		{"x-api-key", map[string]string{"x-api-key": token}, "GET", "", 200, ""},
		{"wrong x-api-key", map[string]string{"x-api-key": token + "x"}, "GET", "", 401, "UNAUTHENTICATED"},
		{"foreign Origin", map[string]string{"x-api-key": token, "Origin": "http://evil.example"}, "GET", "", 403, "PERMISSION_DENIED"},
		{"rebinding Host", map[string]string{"x-api-key": token, "Host": "evil.example"}, "GET", "", 403, "PERMISSION_DENIED"},
		{"form post", map[string]string{"x-api-key": token, "Content-Type": "text/plain"}, "POST", `{"id":"r1"}`, 415, "INVALID_ARGUMENT"},
		{"DELETE with a form body", map[string]string{"x-api-key": token, "Content-Type": "text/plain"}, "DELETE", `x`, 415, "INVALID_ARGUMENT"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req, err := http.NewRequest(tc.method, api.url+path, strings.NewReader(tc.body))
			require.NoError(t, err)
			for k, v := range tc.hdr {
				if k == "Host" {
					req.Host = v
				} else {
					req.Header.Set(k, v)
				}
			}
			resp, err := (&http.Client{Timeout: wait}).Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			require.Equal(t, tc.status, resp.StatusCode)
			if tc.kore != "" {
				var body map[string]any
				require.NoError(t, json.NewDecoder(resp.Body).Decode(&body))
				requireKoreError(t, body, tc.status, tc.kore)
			}
		})
	}

	// A bodiless DELETE (what KORE's SDKs send) passes; an oversized body does not.
	api.hdr.Set("x-api-key", token)
	code, _ := api.do("POST", path, `{"id":"r1"}`)
	require.Equal(t, 200, code)
	code, body := api.do("DELETE", path+"/r1", "")
	require.Equal(t, 200, code, "%v", body)
	code, body = api.do("POST", path, `{"id":"r2","logLevel":"`+strings.Repeat("x", 1<<20)+`"}`)
	requireKoreError(t, body, 413, "RESOURCE_EXHAUSTED")
	require.Equal(t, 413, code)

	// The console's files need no token; the admin API does.
	resp, err := (&http.Client{Timeout: wait}).Get(api.url + "/console/")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 200, resp.StatusCode)
	resp, err = (&http.Client{Timeout: wait}).Get(api.url + "/v1/stats")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, 401, resp.StatusCode)
}

// TestRESTPersistence: what the REST API provisions survives a restart with
// the same state directory, configs included.
func TestRESTPersistence(t *testing.T) {
	t.Parallel()
	state := t.TempDir()
	srv := emulator.NewServer(emulator.WithStateDir(state))
	api := newRESTAPI(t, srv)
	_, pub := emulator.NewDeviceKey(t, t.TempDir(), "gw", omnicore.ES256)
	for _, st := range []struct{ path, body string }{
		{koreBase + "/registries", `{"id":"r1","logLevel":"INFO"}`},
		{koreBase + "/registries/r1/devices", `{"id":"gw","isGateway":true,"credentials":[{"publicKey":{"format":"ES256_PEM","key":` + jsonQuote(string(pub.PEM)) + `}}]}`},
		{koreBase + "/registries/r1/devices", `{"id":"dev1","blocked":true,"metadata":{"a":"b"}}`},
		{koreBase + "/registries/r1/bindDeviceToGateway", `{"deviceId":"dev1","gatewayId":"gw"}`},
		{koreBase + "/registries/r1/devices/dev1/updateConfigurationToDevice", `{"binaryData":"` + b64("v1") + `"}`},
		{koreBase + "/registries/r1/devices/dev1/updateConfigurationToDevice", `{"binaryData":"` + b64("v2") + `"}`},
	} {
		code, body := api.do("POST", st.path, st.body)
		require.Equal(t, 200, code, "%s: %v", st.path, body)
	}
	_, before := api.do("GET", koreBase+"/registries/r1/devices", "")
	srv.Close()
	require.FileExists(t, filepath.Join(state, emulator.ProvisioningFile))

	srv2 := emulator.NewServer(emulator.WithStateDir(state))
	t.Cleanup(srv2.Close)
	api2 := newRESTAPI(t, srv2)
	_, after := api2.do("GET", koreBase+"/registries/r1/devices", "")
	require.Equal(t, before, after)
	_, cfgs := api2.do("GET", koreBase+"/registries/r1/devices/dev1/configVersions", "")
	require.Len(t, cfgs["deviceConfigs"], 2)
	payload, version, err := srv2.Config("r1", "dev1")
	require.NoError(t, err)
	require.Equal(t, "v2", string(payload))
	require.Equal(t, 2, version)
	// numIds keep counting after a restart.
	code, created := api2.do("POST", koreBase+"/registries/r1/devices", `{"id":"dev2"}`)
	require.Equal(t, 200, code)
	require.Equal(t, "3", created["numId"])

	// Another subscription cannot take the state over.
	_, err = emulator.Start(emulator.WithStateDir(state), emulator.WithSubscription("other"))
	require.ErrorContains(t, err, "subscription")
}

// TestRESTAndAdminShareTheStore: the REST API and the /v1 admin API act on
// one registry.
func TestRESTAndAdminShareTheStore(t *testing.T) {
	t.Parallel()
	srv := emulator.NewServer()
	t.Cleanup(srv.Close)
	api := newRESTAPI(t, srv)
	for _, st := range []struct{ path, body string }{
		{koreBase + "/registries", `{"id":"r1"}`},
		{koreBase + "/registries/r1/devices", `{"id":"dev1","blocked":true}`},
	} {
		code, body := api.do("POST", st.path, st.body)
		require.Equal(t, 200, code, "%v", body)
	}
	code, raw := httpDo(t, "GET", api.url+"/v1/devices", "")
	require.Equal(t, 200, code)
	var devs []emulator.DeviceStatus
	require.NoError(t, json.Unmarshal(raw, &devs))
	require.Equal(t, []emulator.DeviceStatus{{Registry: "r1", ID: "dev1", Blocked: true}}, devs)

	code, raw = httpDo(t, "PUT", api.url+"/v1/registries/r1/devices/dev1/config", `{"from":"admin"}`)
	require.Equal(t, 200, code, string(raw))
	_, cfgs := api.do("GET", koreBase+"/registries/r1/devices/dev1/configVersions", "")
	require.Equal(t, b64(`{"from":"admin"}`), cfgs["deviceConfigs"].([]any)[0].(map[string]any)["binaryData"])
}
