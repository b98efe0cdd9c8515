package omnicore

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

func TestSpoolSettings(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	require.NoError(t, os.Mkdir(state, 0o700))
	t.Setenv("STATE_DIRECTORY", state)

	settings := func(t *testing.T, output string, mutate func(*OmniCore)) SpoolSettings {
		t.Helper()
		o := factoryPlugin(t)
		if mutate != nil {
			mutate(o)
		}
		require.NoError(t, o.Init())
		st, err := o.SpoolSettings(output)
		require.NoError(t, err)
		return st
	}

	def := settings(t, "", nil)
	require.Equal(t, SpoolSettings{Enabled: true, Dir: def.Dir, MaxSize: 1 << 30, SyncInterval: 100 * time.Millisecond, Full: spool.Backpressure}, def)
	require.Equal(t, filepath.Join(state, "spool"), filepath.Dir(def.Dir))
	require.True(t, strings.HasPrefix(filepath.Base(def.Dir), "gw-"), def.Dir)
	fi, err := os.Stat(def.Dir)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm())

	tests := []struct {
		name   string
		output string
		mutate func(*OmniCore)
		same   bool // the same spool as the default
	}{
		{name: "same gateway and output", same: true},
		{name: "another output (alias)", output: "second"},
		{name: "another gateway", mutate: func(o *OmniCore) { o.GatewayID = "gw2" }},
		{name: "another server", mutate: func(o *OmniCore) { o.Servers = []string{"tcp://127.0.0.1:1884"} }},
		{name: "options that do not name the gateway", mutate: func(o *OmniCore) { o.QoS = 0; o.SpoolMaxSize = 1 << 20 }, same: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := settings(t, tt.output, tt.mutate)
			require.Equal(t, tt.same, st.Dir == def.Dir, st.Dir)
		})
	}

	t.Run("spool_dir and spool = false resolve nothing", func(t *testing.T) {
		t.Setenv("STATE_DIRECTORY", "relative/path") // an error if it were resolved
		st := settings(t, "", func(o *OmniCore) { o.SpoolDir = "/somewhere/spool" })
		require.Equal(t, "/somewhere/spool", st.Dir)
		st = settings(t, "", func(o *OmniCore) { o.Spool = false })
		require.False(t, st.Enabled)
		require.Empty(t, st.Dir)
	})

	t.Run("a state directory others may write is refused", func(t *testing.T) {
		loose := filepath.Join(t.TempDir(), "loose")
		require.NoError(t, os.Mkdir(loose, 0o700))
		require.NoError(t, os.Chmod(loose, 0o777))
		t.Setenv("STATE_DIRECTORY", loose)
		o := factoryPlugin(t)
		require.NoError(t, o.Init())
		_, err := o.SpoolSettings("")
		require.ErrorContains(t, err, "chmod go-w")
	})
}
