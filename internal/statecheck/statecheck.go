// Package statecheck keeps test runs out of the system's state directory.
// A package whose tests start the product (or run it in process) wraps its
// TestMain in Run: the tests get a state directory of their own, through
// STATE_DIRECTORY, which every child inherits; and the run fails, naming the
// paths, when /var/lib/telegraf-omnicore gained a directory meanwhile: a
// test (or a harness) gave a child an environment without it, and the
// product wrote its spool or rendezvous into the system (which, as root, it
// can).
package statecheck

import (
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

// Run runs tests (a TestMain's m.Run, or what wraps it) with
// STATE_DIRECTORY set to a new temporary directory, removed afterwards,
// and returns their exit code, or 1 when the system's state directory
// gained directories during the run.
func Run(tests func() int) int {
	return run(statedir.SystemDir, tests, os.Stderr)
}

func run(systemDir string, tests func() int, stderr io.Writer) int {
	dir, err := os.MkdirTemp("", "telegraf-omnicore-state-")
	if err == nil {
		// Readable by the other users some tests run the product as; not
		// writable by them, as statedir requires.
		err = os.Chmod(dir, 0o755)
	}
	old, had := os.LookupEnv(statedir.EnvStateDirectory)
	if err == nil {
		err = os.Setenv(statedir.EnvStateDirectory, dir)
	}
	defer func() {
		if had {
			os.Setenv(statedir.EnvStateDirectory, old)
		} else {
			os.Unsetenv(statedir.EnvStateDirectory)
		}
	}()
	if err != nil {
		fmt.Fprintf(stderr, "statecheck: a state directory for the tests: %v\n", err)
		return 1
	}
	defer os.RemoveAll(dir)

	before := directories(systemDir)
	code := tests()
	var added []string
	for _, d := range directories(systemDir) {
		if _, ok := slices.BinarySearch(before, d); !ok {
			added = append(added, d)
		}
	}
	if len(added) > 0 {
		fmt.Fprintf(stderr, "FAIL: the tests left %d directories in %s, the system's state directory: %q. "+
			"A test or harness started the product without a state directory of its own: give it STATE_DIRECTORY "+
			"(or spool_dir), or keep the environment statecheck.Run sets\n", len(added), systemDir, added)
		if code == 0 {
			code = 1
		}
	}
	return code
}

// directories lists root and every directory under it, sorted;
// none when root is missing or unreadable. Only directories count: a spool
// or a rendezvous is one, while the files of a product running on this
// machine come and go.
func directories(root string) []string {
	var out []string
	_ = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil //nolint:nilerr // what cannot be read was not written by the tests either
		}
		if d.IsDir() {
			out = append(out, path)
		}
		return nil
	})
	slices.Sort(out)
	return out
}
