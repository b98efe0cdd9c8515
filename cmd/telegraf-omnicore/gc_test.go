package main

import (
	"os"
	"runtime/debug"
	"testing"

	"github.com/stretchr/testify/require"
)

// tuneGC sets the collector's target unless the environment chose one.
func TestTuneGC(t *testing.T) {
	prev := debug.SetGCPercent(100)
	defer debug.SetGCPercent(prev)
	old, had := os.LookupEnv("GOGC")
	defer func() {
		if had {
			os.Setenv("GOGC", old)
		} else {
			os.Unsetenv("GOGC")
		}
	}()

	for _, tc := range []struct {
		name string
		env  *string
		want int
	}{
		{name: "GOGC unset", want: gcPercent},
		{name: "GOGC set", env: ptr("100"), want: 100},
		{name: "GOGC=off", env: ptr("off"), want: 100},
	} {
		t.Run(tc.name, func(t *testing.T) {
			debug.SetGCPercent(100)
			if tc.env == nil {
				require.NoError(t, os.Unsetenv("GOGC"))
			} else {
				require.NoError(t, os.Setenv("GOGC", *tc.env))
			}
			tuneGC()
			require.Equal(t, tc.want, debug.SetGCPercent(100))
		})
	}
}

func ptr(s string) *string { return &s }
