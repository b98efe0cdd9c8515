// Package disktest fails disks for tests of what writes to them (the
// execd output's spool and runner).
package disktest

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// FillInodes creates empty files in dir until its filesystem has no inode
// left, as another program's many small files do, and returns a function
// that removes them. A full inode table fails the next file creation with
// ENOSPC though the filesystem has bytes free: a failure of the disk that a
// check of the free space cannot foresee, and that ends without a remount.
func FillInodes(t *testing.T, dir string) (unfill func()) {
	t.Helper()
	var names []string
	for i := 0; ; i++ {
		name := filepath.Join(dir, fmt.Sprintf("filler-%d", i))
		f, err := os.Create(name)
		if err != nil {
			require.ErrorIs(t, err, syscall.ENOSPC)
			break
		}
		require.NoError(t, f.Close())
		names = append(names, name)
	}
	return func() {
		for _, name := range names {
			require.NoError(t, os.Remove(name))
		}
	}
}
