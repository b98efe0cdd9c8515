package main

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// Bad values are a loud error at start, with the table's name.
func TestHostOptionsChecked(t *testing.T) {
	tests := []struct {
		table string
		err   string
	}{
		{"spool_full = \"block\"", `[telegraf_omnicore] spool_full "block" must be "backpressure" or "drop_oldest"`},
		{"spool_max_size = \"1KiB\"", "[telegraf_omnicore] spool_max_size 1024 bytes is below the minimum"},
		{"spool_sync_interval = \"-1s\"", "[telegraf_omnicore] spool_sync_interval -1s must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.table, func(t *testing.T) {
			path := writeFile(t, t.TempDir(), "p.conf", "[[outputs.omnicore_test]]\n[telegraf_omnicore]\n  "+tt.table+"\n")
			_, err := loadPluginFile(path, testPlugins)
			require.ErrorContains(t, err, tt.err)
		})
	}
	t.Run("on an input", func(t *testing.T) {
		path := writeFile(t, t.TempDir(), "p.conf", "[[inputs.omnicore_test]]\n[telegraf_omnicore]\n  spool = false\n")
		_, err := loadPluginFile(path, testPlugins)
		require.ErrorContains(t, err, "has no effect in an input's plugin file")
	})
}
