package statecheck

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

func TestRun(t *testing.T) {
	tests := []struct {
		name string
		// during runs as the tests, in the system directory sys.
		during   func(t *testing.T, sys string) int
		wantCode int
		wantMsg  string
	}{
		{
			name:   "nothing written",
			during: func(*testing.T, string) int { return 0 },
		},
		{
			name:     "failing tests keep their code",
			during:   func(*testing.T, string) int { return 3 },
			wantCode: 3,
		},
		{
			name: "a spool directory left behind",
			during: func(t *testing.T, sys string) int {
				require.NoError(t, os.MkdirAll(filepath.Join(sys, "spool", "edge-gw-1"), 0o700))
				return 0
			},
			wantCode: 1,
			wantMsg:  "edge-gw-1",
		},
		{
			name: "files of a running product do not count",
			during: func(t *testing.T, sys string) int {
				require.NoError(t, os.WriteFile(filepath.Join(sys, "existing", "00000000000000000002.seg"), nil, 0o600))
				return 0
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv(statedir.EnvStateDirectory, "/before")
			sys := filepath.Join(t.TempDir(), "var-lib")
			require.NoError(t, os.MkdirAll(filepath.Join(sys, "existing"), 0o700))
			var stderr bytes.Buffer
			var during string
			code := run(sys, func() int {
				during = os.Getenv(statedir.EnvStateDirectory)
				fi, err := os.Stat(during)
				require.NoError(t, err)
				require.True(t, fi.IsDir())
				return tt.during(t, sys)
			}, &stderr)
			require.Equal(t, tt.wantCode, code)
			if tt.wantMsg == "" {
				require.Empty(t, stderr.String())
			} else {
				require.Contains(t, stderr.String(), tt.wantMsg)
				require.Contains(t, stderr.String(), "STATE_DIRECTORY")
			}
			require.NotEqual(t, "/before", during, "the tests got a state directory of their own")
			require.NoDirExists(t, during, "removed after the run")
		})
	}
}

func TestRunMissingSystemDirectory(t *testing.T) {
	sys := filepath.Join(t.TempDir(), "absent")
	var stderr bytes.Buffer
	code := run(sys, func() int {
		require.NoError(t, os.MkdirAll(filepath.Join(sys, "spool"), 0o700))
		return 0
	}, &stderr)
	require.Equal(t, 1, code, "a system directory created by the tests counts")
	require.Contains(t, stderr.String(), "spool")
}
