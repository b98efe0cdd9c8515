// Package gomodcheck holds the test that keeps this module importable into
// Telegraf v1.37.2 at no cost: a Telegraf tree that imports our plugins must
// not have to raise its Go version or bump any of its dependencies.
package gomodcheck

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/mod/modfile"
	"golang.org/x/mod/semver"
)

func parseModFile(t *testing.T, path string) *modfile.File {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	f, err := modfile.Parse(path, data, nil)
	require.NoError(t, err)
	return f
}

// telegrafGoMod returns the path of the go.mod of the Telegraf version this
// module requires, as the go command resolved it into the module cache.
func telegrafGoMod(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "mod", "download", "-json", "github.com/influxdata/telegraf").Output()
	require.NoError(t, err, "go mod download github.com/influxdata/telegraf")
	var info struct{ GoMod, Version string }
	require.NoError(t, json.Unmarshal(out, &info))
	require.NotEmpty(t, info.GoMod)
	return info.GoMod
}

func TestImportableIntoTelegraf(t *testing.T) {
	ours := parseModFile(t, filepath.Join("..", "..", "go.mod"))
	theirs := parseModFile(t, telegrafGoMod(t))

	require.NotNil(t, ours.Go)
	require.NotNil(t, theirs.Go)
	require.LessOrEqual(t, semver.Compare("v"+ours.Go.Version, "v"+theirs.Go.Version), 0,
		"our go directive %s is above Telegraf's %s: importing us would raise Telegraf's Go version", ours.Go.Version, theirs.Go.Version)
	require.Nil(t, ours.Toolchain, "a toolchain line would force one on Telegraf's builders")

	theirVersions := make(map[string]string, len(theirs.Require))
	for _, r := range theirs.Require {
		theirVersions[r.Mod.Path] = r.Mod.Version
	}
	var shared int
	for _, r := range ours.Require {
		v, ok := theirVersions[r.Mod.Path]
		if !ok {
			continue
		}
		shared++
		require.LessOrEqualf(t, semver.Compare(r.Mod.Version, v), 0,
			"%s: we require %s, Telegraf %s; importing us would bump Telegraf's dependency", r.Mod.Path, r.Mod.Version, v)
	}
	require.Greater(t, shared, 50, "too few shared requirements found: is Telegraf's go.mod the right file?")
}
