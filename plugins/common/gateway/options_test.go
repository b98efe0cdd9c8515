package gateway

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func TestDeviceKeyDirLoosePermissionsWarned(t *testing.T) {
	dir := t.TempDir()
	gwKey, _, err := omnicore.WriteKeyPair(dir, "gw", omnicore.ES256)
	require.NoError(t, err)
	keyDir := filepath.Join(dir, "devices")
	require.NoError(t, os.Mkdir(keyDir, 0o700))
	tests := []struct {
		name string
		mode os.FileMode
		warn bool
	}{
		{"private", 0o600, false},
		{"group readable", 0o640, true},
		{"world readable", 0o644, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			priv, _, err := omnicore.GenerateKeyPEM(omnicore.ES256)
			require.NoError(t, err)
			path := filepath.Join(keyDir, "dev.pem")
			require.NoError(t, os.WriteFile(path, priv, tt.mode))
			require.NoError(t, os.Chmod(path, tt.mode))
			opt := DefaultOptions()
			opt.Servers = []string{"tls://127.0.0.1:8883"}
			opt.SubscriptionID, opt.RegistryID, opt.GatewayID = "sub", "reg", "gw"
			opt.PrivateKey, opt.Algorithm = gwKey, omnicore.ES256
			opt.DeviceAuth, opt.DeviceKeyDir = DeviceAuthToken, keyDir
			log := &testutil.CaptureLogger{}
			_, err = opt.Validate(log)
			require.NoError(t, err)
			warned := false
			for _, m := range log.Warnings() {
				if strings.Contains(m, "device key") && strings.Contains(m, "dev.pem") {
					warned = true
				}
			}
			require.Equal(t, tt.warn, warned)
		})
	}
}
