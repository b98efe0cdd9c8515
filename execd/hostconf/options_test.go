package hostconf

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/config"
	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

func TestSplitHostOptions(t *testing.T) {
	def := DefaultOptions()
	tests := []struct {
		name   string
		file   string
		want   func(*Options)
		legacy []string
		errs   []string
	}{
		{name: "none: the defaults", file: "[[outputs.omnicore_test]]\n  topic = \"t\"\n"},
		{
			name: "the table",
			file: "[[outputs.omnicore_test]]\n  topic = \"t\"\n\n[telegraf_omnicore]\n  spool_dir = \"/x\"\n  spool_max_size = \"32MiB\"\n  spool_full = \"drop_oldest\"\n  spool_sync_interval = \"0s\"\n  spool = true # comment\n",
			want: func(o *Options) {
				o.SpoolDir, o.SpoolMaxSize, o.SpoolFull, o.SpoolSyncInterval = "/x", config.Size(32<<20), "drop_oldest", 0
			},
		},
		{
			name: "the table before the plugin",
			file: "[telegraf_omnicore]\n  spool = false\n[[outputs.omnicore_test]]\n  topic = \"t\"\n",
			want: func(o *Options) { o.Spool = false },
		},
		{
			name:   "legacy keys in the output's table",
			file:   "[[outputs.omnicore_test]]\n  topic = \"t\"\n  spool_max_size = \"32MiB\"\n  spool = false\n",
			want:   func(o *Options) { o.SpoolMaxSize, o.Spool = config.Size(32<<20), false },
			legacy: []string{"spool", "spool_max_size"},
		},
		{
			name: "keys of a subtable are not the output's",
			file: "[[outputs.omnicore_test]]\n  topic = \"t\"\n[[outputs.omnicore_test.sub]]\n  spool = 1\n",
		},
		{
			name: "environment in spool_dir",
			file: "[[outputs.omnicore_test]]\n[telegraf_omnicore]\n  spool_dir = \"${HOST_OPTIONS_TEST}/spool\"\n",
			want: func(o *Options) { o.SpoolDir = "/env/spool" },
		},
		{
			name: "both places",
			file: "[[outputs.omnicore_test]]\n  spool_full = \"drop_oldest\"\n[telegraf_omnicore]\n  spool_full = \"backpressure\"\n",
			errs: []string{"spool_full is set both in [telegraf_omnicore] and in the output's table"},
		},
		{
			name: "unknown key",
			file: "[[outputs.omnicore_test]]\n[telegraf_omnicore]\n  spool_max = \"1MiB\"\n",
			errs: []string{"[telegraf_omnicore]", `unknown option "spool_max"`},
		},
		{
			name: "twice",
			file: "[telegraf_omnicore]\n[[outputs.omnicore_test]]\n[telegraf_omnicore]\n",
			errs: []string{"line 3: [telegraf_omnicore] appears twice"},
		},
		{
			name: "array of tables",
			file: "[[telegraf_omnicore]]\n",
			errs: []string{"line 1: [telegraf_omnicore] is a table"},
		},
	}
	t.Setenv("HOST_OPTIONS_TEST", "/env")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rest, sec, err := Split([]byte(tt.file))
			if len(tt.errs) > 0 {
				require.Error(t, err)
				for _, e := range tt.errs {
					require.ErrorContains(t, err, e)
				}
				return
			}
			require.NoError(t, err)
			want := def
			if tt.want != nil {
				tt.want(&want)
			}
			require.Equal(t, want, sec.Options)
			require.Equal(t, tt.legacy, sec.Legacy)
			require.Equal(t, strings.Count(tt.file, "\n"), strings.Count(string(rest), "\n"), "line numbers kept")
			require.NotContains(t, string(rest), "telegraf_omnicore")
		})
	}
}

// The commented [telegraf_omnicore] table of outputs.omnicore's sample.conf
// holds the real defaults.
func TestSampleConfHostTable(t *testing.T) {
	b, err := os.ReadFile("../../plugins/outputs/omnicore/sample.conf")
	require.NoError(t, err)
	sample := string(b)
	i := strings.Index(sample, "# [telegraf_omnicore]")
	require.GreaterOrEqual(t, i, 0, "sample.conf documents [telegraf_omnicore]")
	uncommented := regexp.MustCompile(`(?m)^# ([a-z_\[\]]+)`).ReplaceAllString(sample[i:], "$1")
	_, sec, err := Split([]byte(uncommented))
	require.NoError(t, err)
	require.True(t, sec.Set)
	require.Equal(t, DefaultOptions(), sec.Options)
}

// The spool's directory is named after the gateway and the output, not the
// connection options; a spool an earlier version named after the servers
// too is adopted.
func TestSpoolDirIdentityAndAdoption(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	require.NoError(t, os.Mkdir(state, 0o700))
	t.Setenv("STATE_DIRECTORY", state)

	dir, err := SpoolDir("gw-1", "projects/p/locations/l/registries/r/devices/gw-1", "")
	require.NoError(t, err)
	again, err := SpoolDir("gw-1", "projects/p/locations/l/registries/r/devices/gw-1", "")
	require.NoError(t, err)
	require.Equal(t, dir, again)
	other, err := SpoolDir("gw-1", "projects/p/locations/l/registries/r/devices/gw-1", "second")
	require.NoError(t, err)
	require.NotEqual(t, dir, other, "another output (alias) has its own spool")

	// An old-scheme directory of this gateway holding 2,000 metrics, and
	// one of another gateway.
	log := &testutil.CaptureLogger{}
	fill := func(name string, n int) string {
		d := filepath.Join(state, "spool", name)
		sp, err := spool.Open(context.Background(), spool.Options{Dir: d, Log: log})
		require.NoError(t, err)
		for i := range n {
			require.NoError(t, sp.Append([]byte("m value="+itoa(i)+"i")))
		}
		require.NoError(t, sp.Close())
		return d
	}
	old := fill("gw-1-0123456789abcdef", 2000)
	foreign := fill("gw-2-0123456789abcdef", 5)

	opts := spool.Options{MaxSize: 1 << 30, SyncInterval: 100 * time.Millisecond}
	AdoptEarlierSpools(dir, "gw-1", opts, log)
	require.NoDirExists(t, old)
	require.DirExists(t, foreign)
	require.DirExists(t, other, "this version's spool of another output is not adopted")

	o := opts
	o.Dir, o.Log = dir, log
	sp, err := spool.Open(context.Background(), o)
	require.NoError(t, err)
	defer sp.Close()
	require.Equal(t, int64(2000), sp.Stats().Replayed)
	recs, err := sp.Read(1)
	require.NoError(t, err)
	require.Equal(t, "m value=0i", string(recs[0].Payload))
	var adopted int
	for _, e := range log.Messages() {
		if strings.Contains(e.Text, "Adopted 2000 metrics") && strings.Contains(e.Text, old) {
			adopted++
		}
	}
	require.Equal(t, 1, adopted, "%v", log.Messages())
}

func itoa(i int) string { return strconv.Itoa(i) }
