package main

import (
	"bytes"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// TestCheckSubcommand runs `telegraf-omnicore check` through run: the
// subcommand takes its own flags and exit status (execd/check tests the
// checks themselves against the emulator).
func TestCheckSubcommand(t *testing.T) {
	t.Setenv("STATE_DIRECTORY", t.TempDir())
	for _, tc := range []struct {
		name string
		args []string
		code int
		out  string
	}{
		{"no config", []string{"check"}, 2, "usage: telegraf-omnicore check -config FILE"},
		{"missing file", []string{"check", "-config", filepath.Join(t.TempDir(), "none.conf")}, 1, "✘ config "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(tc.args, environment{stdout: &stdout, stderr: &stderr, plugins: defaultPlugins})
			require.Equal(t, tc.code, code, "stdout: %s\nstderr: %s", stdout.String(), stderr.String())
			require.Contains(t, stdout.String(), tc.out)
		})
	}
}
