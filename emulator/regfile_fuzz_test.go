package emulator_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// FuzzRegistryFile feeds the command's registry file parser and loader
// arbitrary files: they never panic, and whatever they load holds only IDs
// the bridge's rules accept.
func FuzzRegistryFile(f *testing.F) {
	for _, s := range []string{
		`{"subscription":"s","registries":[]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"g","gateway":true},{"id":"d","bound_to":["g"],"config":"{}"}]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"g","gateway":true,"auth_method":"DEVICE_AUTH_TOKEN_ONLY","public_keys":[{"algorithm":"ES256","generate":true}]}]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a","public_keys":[{"algorithm":"ES256","pem":"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}]}]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a","public_keys":[{"algorithm":"ES256","pem_file":"missing.pub"}]}]}]}`,
		`{"subscription":"s","registries":[{"id":"r/x","devices":[]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a/+/#"}]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"a"},{"id":"a"}]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[]},{"id":"r","devices":[]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"d","bound_to":["d"]}]}]}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"d","config":"` + strings.Repeat("x", 70000) + `"}]}]}`,
		`{"subscription":"s/../x","registries":null}`,
		`{"subscription":"s","registries":[{"id":"r","devices":[{"id":"g","gateway":true,"auth_method":""}]}]}`,
		`{"subscription":"s"}{"extra":1}`,
		`{"subscription":"s","registries":[{"id":"` + strings.Repeat("r", 300) + `"}]}`,
		`[]`, `null`, ``, `{`, `{"subscription":1}`, "\xff",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		path := filepath.Join(dir, "registry.json")
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		rf, err := emulator.ReadRegistryFile(path)
		if err != nil {
			return
		}
		if err := omnicore.ValidateID(rf.Subscription); err != nil {
			t.Fatalf("accepted subscription %q: %v", rf.Subscription, err)
		}
		for _, r := range rf.Registries {
			for _, d := range r.Devices {
				for _, k := range d.PublicKeys {
					// Keys are read from the file system: stay in dir.
					if k.PEMFile != "" && (filepath.IsAbs(k.PEMFile) || strings.Contains(k.PEMFile, "..")) {
						t.Skip("pem_file outside the registry file's directory")
					}
				}
			}
		}
		srv, err := emulator.Start(emulator.WithSubscription(rf.Subscription), emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
		if err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		_, _ = srv.ApplyRegistryFile(rf, dir, filepath.Join(dir, "keys"))
		// Whatever got in, complete or not, obeys the ID rules.
		for _, d := range srv.Devices() {
			if err := omnicore.ValidateID(d.Registry); err != nil {
				t.Fatalf("registry %q loaded: %v", d.Registry, err)
			}
			if err := omnicore.ValidateID(d.ID); err != nil {
				t.Fatalf("device %q loaded: %v", d.ID, err)
			}
		}
	})
}

// FuzzAdminAPI sends arbitrary requests to the admin API: it never panics,
// answers only with the statuses it documents, always in JSON (redirects
// apart), and a config it accepts is stored exactly.
func FuzzAdminAPI(f *testing.F) {
	for _, s := range []struct{ method, path, query, body string }{
		{"PUT", "/v1/registries/r/devices/d/config", "", `{"a":1}`},
		{"POST", "/v1/registries/r/devices/d/config", "", ""},
		{"POST", "/v1/registries/r/devices/d/commands", "subfolder=a/b", "go"},
		{"POST", "/v1/registries/r/devices/d/commands", "subfolder=%2B/%23", "x"},
		{"POST", "/v1/registries/r/devices/nobody/config", "", "x"},
		{"PUT", "/v1/registries/r%2Fx/devices/d/config", "", "x"},
		{"PUT", "/v1/registries/r/devices/../config", "", "x"},
		{"GET", "/v1/telemetry", "since=-1", ""},
		{"GET", "/v1/telemetry", "since=99999999999999999999", ""},
		{"GET", "/v1/telemetry", "since=abc", ""},
		{"GET", "/v1/telemetry", "since=0&limit=1", ""},
		{"GET", "/v1/telemetry", "limit=-5", ""},
		{"GET", "/v1/devices", "", ""},
		{"GET", "/v1/attachments", "", ""},
		{"GET", "/v1/connections", "", ""},
		{"GET", "/v1/errors", "", ""},
		{"GET", "/v1/stats", "", ""},
		{"POST", "/v1/kick", "client_id=nobody", ""},
		{"POST", "/v1/kick", "", ""},
		{"DELETE", "/v1/devices", "", ""},
		{"GET", "//v1//devices", "", ""},
		{"PUT", "/v1/registries/r/devices/d/config", "", strings.Repeat("x", omnicore.MaxConfigBytes+1)},
		{"GET", "/\x00", "", ""},
	} {
		f.Add(s.method, s.path, s.query, []byte(s.body))
	}
	srv, err := emulator.Start(emulator.WithTCPAddr(""), emulator.WithTLSAddr(""))
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(srv.Close)
	if err := srv.AddRegistry("r"); err != nil {
		f.Fatal(err)
	}
	if err := srv.AddDevice("r", emulator.Device{ID: "d"}); err != nil {
		f.Fatal(err)
	}
	api := srv.AdminHandler(emulator.AdminHost("admin"))
	allowed := map[int]bool{200: true, 301: true, 307: true, 308: true, 400: true, 404: true, 405: true, 409: true, 413: true}
	f.Fuzz(func(t *testing.T, method, path, query string, body []byte) {
		target := path
		if query != "" {
			target += "?" + query
		}
		req, err := http.NewRequest(method, "http://admin"+target, bytes.NewReader(body))
		if err != nil || req.URL.Path == "" || req.URL.Host != "admin" {
			return
		}
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		api.ServeHTTP(rec, req)
		if !allowed[rec.Code] {
			t.Fatalf("%s %s: status %d: %s", method, target, rec.Code, rec.Body)
		}
		if strings.HasPrefix(rec.Header().Get("Content-Type"), "application/json") && !json.Valid(rec.Body.Bytes()) {
			t.Fatalf("%s %s: invalid JSON %q", method, target, rec.Body)
		}
		if rec.Code == 200 && strings.HasSuffix(req.URL.Path, "/config") && (method == "PUT" || method == "POST") {
			var answer struct {
				Version int `json:"version"`
			}
			if err := json.Unmarshal(rec.Body.Bytes(), &answer); err != nil {
				t.Fatalf("%s %s: %v", method, target, err)
			}
			got, version, err := srv.Config("r", "d")
			if err != nil || version != answer.Version || !bytes.Equal(got, body) {
				t.Fatalf("%s %s: stored config %q version %d (%v), want %q version %d", method, target, got, version, err, body, answer.Version)
			}
		}
	})
}
