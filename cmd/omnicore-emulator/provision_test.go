package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestProvisioningSurvivesRestart: the registry file seeds the state
// directory once; what the REST API changes after is what the next start
// has, and the file is not applied again.
func TestProvisioningSurvivesRestart(t *testing.T) {
	state := t.TempDir()
	in := startArgs(t, "-registry", registryFile, "-state-dir", state)
	require.Equal(t, in.info["admin"]+"/omnicore/subscriptions/demo-sub", in.info["api"])
	require.Equal(t, in.info["admin"]+"/console/", in.info["console"])
	require.NotEmpty(t, in.info["key demo-registry/demo-gateway"])
	status, body := api(t, in, "POST", "/omnicore/subscriptions/demo-sub/registries/demo-registry/devices", `{"id":"added-by-api"}`)
	require.Equal(t, 200, status, string(body))
	status, body = api(t, in, "DELETE", "/omnicore/subscriptions/demo-sub/registries/demo-registry/devices/sensor-05", "")
	require.Equal(t, 200, status, string(body))
	require.NoError(t, in.stop(t))
	require.FileExists(t, filepath.Join(state, "provisioning.json"))

	again := startArgs(t, "-registry", registryFile, "-state-dir", state)
	require.Contains(t, again.info["registry"], "not applied")
	require.Equal(t, in.info["key demo-registry/demo-gateway"], again.info["key demo-registry/demo-gateway"], "generated keys are listed again")
	status, _ = api(t, again, "GET", "/omnicore/subscriptions/demo-sub/registries/demo-registry/devices/added-by-api", "")
	require.Equal(t, 200, status)
	status, _ = api(t, again, "GET", "/omnicore/subscriptions/demo-sub/registries/demo-registry/devices/sensor-05", "")
	require.Equal(t, 404, status)
	require.NoError(t, again.stop(t))

	// Without a registry file: the saved subscription.
	third := startArgs(t, "-state-dir", state)
	require.Equal(t, "demo-sub", third.info["subscription"])
	require.NoError(t, third.stop(t))
}

// TestSubscriptionOnly starts empty and provisions with the REST API alone.
func TestSubscriptionOnly(t *testing.T) {
	in := startArgs(t, "-subscription", "fresh-sub", "-state-dir", t.TempDir())
	status, body := api(t, in, "POST", "/omnicore/subscriptions/fresh-sub/registries", `{"id":"r1"}`)
	require.Equal(t, 200, status, string(body))
	status, body = api(t, in, "GET", "/omnicore/subscriptions/fresh-sub/registries", "")
	require.Equal(t, 200, status)
	var list struct {
		DeviceRegistries []struct {
			ID string `json:"id"`
		} `json:"deviceRegistries"`
		TotalCount int `json:"totalCount"`
	}
	require.NoError(t, json.Unmarshal(body, &list))
	require.Equal(t, 1, list.TotalCount)
	require.Equal(t, "r1", list.DeviceRegistries[0].ID)

	// A different subscription on the same state is refused.
	state := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(state, "provisioning.json"), []byte(`{"format":1,"subscription":"old-sub"}`), 0o600))
	err := run(t.Context(), []string{"-subscription", "new-sub", "-state-dir", state, "-mqtt", "127.0.0.1:0", "-mqtts", "", "-admin", ""}, os.Stdout, os.Stderr)
	require.ErrorContains(t, err, "old-sub")
}
