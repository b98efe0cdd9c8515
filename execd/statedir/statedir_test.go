package statedir

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestResolve(t *testing.T) {
	tests := []struct {
		name    string
		env     map[string]string
		system  func(t *testing.T, root string) string // returns the system dir path
		want    func(root string) string
		wantErr string
	}{
		{
			name: "systemd STATE_DIRECTORY wins, first of a list",
			env:  map[string]string{"STATE_DIRECTORY": "{root}/sd:{root}/other"},
			system: func(t *testing.T, root string) string {
				require.NoError(t, os.Mkdir(filepath.Join(root, "sd"), 0o755))
				return filepath.Join(root, "varlib-unused")
			},
			want: func(root string) string { return filepath.Join(root, "sd") },
		},
		{
			name:    "relative STATE_DIRECTORY is an error",
			env:     map[string]string{"STATE_DIRECTORY": "relative/dir"},
			wantErr: "not an absolute path",
		},
		{
			name: "writable system directory",
			system: func(t *testing.T, root string) string {
				d := filepath.Join(root, "varlib")
				require.NoError(t, os.Mkdir(d, 0o750))
				return d
			},
			want: func(root string) string { return filepath.Join(root, "varlib") },
		},
		{
			name: "system directory that cannot be created falls back to the user's",
			system: func(t *testing.T, root string) string {
				return filepath.Join(root, "missing-parent", "varlib")
			},
			env:  map[string]string{"XDG_STATE_HOME": "{root}/xdg"},
			want: func(root string) string { return filepath.Join(root, "xdg", "telegraf-omnicore") },
		},
		{
			name: "world-writable STATE_DIRECTORY is refused",
			env:  map[string]string{"STATE_DIRECTORY": "{root}/open"},
			system: func(t *testing.T, root string) string {
				d := filepath.Join(root, "open")
				require.NoError(t, os.Mkdir(d, 0o700))
				require.NoError(t, os.Chmod(d, 0o777))
				return filepath.Join(root, "nope", "nope")
			},
			wantErr: "group or others may write it",
		},
		{
			name: "symbolic link as STATE_DIRECTORY is refused",
			env:  map[string]string{"STATE_DIRECTORY": "{root}/link"},
			system: func(t *testing.T, root string) string {
				require.NoError(t, os.Symlink(root, filepath.Join(root, "link")))
				return filepath.Join(root, "nope", "nope")
			},
			wantErr: "not a directory",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := t.TempDir()
			sys := filepath.Join(root, "no", "such")
			if tt.system != nil {
				sys = tt.system(t, root)
			}
			env := map[string]string{}
			for k, v := range tt.env {
				env[k] = strings.ReplaceAll(v, "{root}", root)
			}
			l := lookups{
				getenv:    func(k string) string { return env[k] },
				systemDir: sys,
				homeDir:   func() (string, error) { return filepath.Join(root, "home"), nil },
			}
			got, err := l.resolve()
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want(root), got)
		})
	}
}

func TestResolveHomeFallbackIsPrivate(t *testing.T) {
	root := t.TempDir()
	l := lookups{
		getenv:    func(string) string { return "" },
		systemDir: filepath.Join(root, "no", "such"),
		homeDir:   func() (string, error) { return filepath.Join(root, "home"), nil },
	}
	got, err := l.resolve()
	require.NoError(t, err)
	require.Equal(t, filepath.Join(root, "home", ".local", "state", "telegraf-omnicore"), got)
	fi, err := os.Stat(got)
	require.NoError(t, err)
	require.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
}

func TestPrivate(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, parent string)
		elems   []string
		wantErr string
	}{
		{name: "created 0700", elems: []string{"spool", "gw-abc"}},
		{
			name:  "existing private directory is used",
			elems: []string{"share"},
			prepare: func(t *testing.T, parent string) {
				require.NoError(t, os.Mkdir(filepath.Join(parent, "share"), 0o700))
			},
		},
		{
			name:  "squatted world-writable directory is refused and left as it is",
			elems: []string{"share"},
			prepare: func(t *testing.T, parent string) {
				d := filepath.Join(parent, "share")
				require.NoError(t, os.Mkdir(d, 0o700))
				require.NoError(t, os.Chmod(d, 0o1777))
			},
			wantErr: "must be private to its owner",
		},
		{
			name:  "symbolic link is refused",
			elems: []string{"share"},
			prepare: func(t *testing.T, parent string) {
				require.NoError(t, os.Symlink(t.TempDir(), filepath.Join(parent, "share")))
			},
			wantErr: "not a directory",
		},
		{
			name:  "a file in the way is refused",
			elems: []string{"share"},
			prepare: func(t *testing.T, parent string) {
				require.NoError(t, os.WriteFile(filepath.Join(parent, "share"), nil, 0o600))
			},
			wantErr: "not a directory",
		},
		{name: "dot-dot is refused", elems: []string{".."}, wantErr: "invalid state subdirectory name"},
		{name: "separator is refused", elems: []string{"a/b"}, wantErr: "invalid state subdirectory name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			parent := t.TempDir()
			if tt.prepare != nil {
				tt.prepare(t, parent)
			}
			var before os.FileInfo
			if len(tt.elems) > 0 {
				before, _ = os.Lstat(filepath.Join(parent, tt.elems[0]))
			}
			dir, err := Private(parent, tt.elems...)
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				if before != nil {
					after, err := os.Lstat(filepath.Join(parent, tt.elems[0]))
					require.NoError(t, err)
					require.Equal(t, before.Mode(), after.Mode(), "the mode of a directory we did not create must not change")
				}
				return
			}
			require.NoError(t, err)
			fi, err := os.Stat(dir)
			require.NoError(t, err)
			require.True(t, fi.IsDir())
			require.Equal(t, os.FileMode(0o700), fi.Mode().Perm())
		})
	}
}
