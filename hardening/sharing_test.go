package hardening

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/e2e"
)

// TestSharingConflictingPluginFiles runs real processes of the execd binary
// for one gateway with plugin files that disagree (issue cases 1 and 4): the
// input starts first and owns the connection; the output, whose file
// differs, exits 1 with an E! line naming the differing options and both
// plugin files, and never connects, so the bridge kicks nobody.
func TestSharingConflictingPluginFiles(t *testing.T) {
	tests := []struct {
		name    string
		output  func(w *world, g *e2e.Gateway) []string
		differs []string
	}{
		{"device_auth only in the output (case 1)", func(w *world, _ *e2e.Gateway) []string {
			return []string{`device_auth = "token"`, "device_key_dir = " + e2e.Quote(w.dir)}
		}, []string{"device_auth", "device_key_dir"}},
		{"server spelled another way (case 4)", func(_ *world, g *e2e.Gateway) []string {
			g.Servers = []string{strings.Replace(g.Servers[0], "127.0.0.1", "localhost", 1)}
			return nil
		}, []string{"servers", "localhost"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(t)
			gw := w.gateway("dev1")
			inPath := w.write("input.conf", gw.InputFile([]string{"dev1"}))
			in := startPlugin(t, w.env, "-config", inPath)
			w.waitEmulator(30*time.Second, "the input connected", func() bool { return w.openConnection() != 0 })

			outGw := gw
			outPath := w.write("output.conf", outGw.OutputFile(tt.output(w, &outGw)...))
			out := startPlugin(t, w.env, "-config", outPath)
			select {
			case <-out.done:
			case <-time.After(30 * time.Second):
				require.FailNow(t, "the conflicting output did not exit", out.stderr.String())
			}
			require.Equal(t, 1, out.cmd.ProcessState.ExitCode(), out.stderr.String())
			var line string
			for _, l := range strings.Split(out.stderr.String(), "\n") {
				if strings.HasPrefix(l, "E! ") && strings.Contains(l, "other connection options") {
					line = l
				}
			}
			require.NotEmpty(t, line, "an E! line; stderr:\n%s", out.stderr.String())
			for _, want := range append([]string{e2e.Quote(inPath), e2e.Quote(outPath)}, tt.differs...) {
				require.Contains(t, line, want)
			}
			require.Empty(t, w.connectionsClosed(), "no connection was kicked")
			require.Equal(t, 0, in.stop(t), in.stderr.String())
			require.Contains(t, in.stderr.String(), "W! [inputs.omnicore] Refused process")
		})
	}
}

// TestSharingDirectoryChecked (issue cases 3 and 7): a sharing directory
// another user created, or one that is not private, stops the program at
// start with an E! that names it, and its mode is never changed. The
// program never runs unshared by itself.
func TestSharingDirectoryChecked(t *testing.T) {
	w := newWorld(t)
	gw := w.gateway("dev1")
	path := w.write("output.conf", gw.OutputFile())
	base, err := os.MkdirTemp("", "ocd")
	require.NoError(t, err)
	t.Cleanup(func() { os.RemoveAll(base) })
	tests := []struct {
		name    string
		setup   func(dir string) []string // returns the environment
		wantErr string
		mode    os.FileMode
	}{
		{"world-writable runtime directory of ours (case 7)", func(dir string) []string {
			require.NoError(t, os.Mkdir(dir, 0o700))
			require.NoError(t, os.Chmod(dir, 0o777|os.ModeSticky))
			return []string{"TELEGRAF_OMNICORE_RUNTIME_DIR=" + dir, "STATE_DIRECTORY=" + w.state}
		}, "it must be private", 0o777 | os.ModeSticky},
		{"share directory squatted under the state directory (case 3)", func(dir string) []string {
			require.NoError(t, os.Mkdir(dir, 0o755))
			squat := filepath.Join(dir, "share")
			require.NoError(t, os.Mkdir(squat, 0o777))
			require.NoError(t, os.Chmod(squat, 0o777))
			if os.Geteuid() == 0 {
				require.NoError(t, os.Chown(squat, 65534, 65534))
			}
			return []string{"TELEGRAF_OMNICORE_RUNTIME_DIR=", "STATE_DIRECTORY=" + dir}
		}, "share", 0},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(base, string(rune('a'+i)))
			env := tt.setup(dir)
			res := runPlugin(t, "", nil, env, "-config", path)
			require.Equal(t, 1, res.code, res.stderr)
			require.Contains(t, res.stderr, "E! Cannot share the gateway connection with the other plugin processes")
			require.Contains(t, res.stderr, tt.wantErr)
			require.Contains(t, res.stderr, dir)
			if tt.mode != 0 {
				fi, err := os.Lstat(dir)
				require.NoError(t, err)
				require.Equal(t, tt.mode, fi.Mode()&(os.ModePerm|os.ModeSticky), "never re-moded")
			}
			require.Zero(t, w.openConnection(), "it did not connect unshared")
		})
	}
	t.Run("sharing switched off explicitly", func(t *testing.T) {
		res := runPlugin(t, "", nil, []string{"TELEGRAF_OMNICORE_SHARING=off", "TELEGRAF_OMNICORE_RUNTIME_DIR=" + filepath.Join(base, "never"), "STATE_DIRECTORY=" + w.state}, "-config", path)
		require.Equal(t, 0, res.code, res.stderr)
		require.Contains(t, res.stderr, "W! TELEGRAF_OMNICORE_SHARING=off")
		_, err := os.Stat(filepath.Join(base, "never"))
		require.ErrorIs(t, err, os.ErrNotExist)
	})
}
