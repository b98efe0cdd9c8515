package main

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestParseVersion(t *testing.T) {
	at := time.Unix(1_800_000_000, 0)
	tests := []struct {
		describe string
		commits  int
		pkg      string
		wantErr  string
	}{
		{describe: "v1.2.0", pkg: "1.2.0"},
		{describe: "v1.2.0-dirty", pkg: "1.2.0+dirty"},
		{describe: "v1.2.0-3-g1a2b3c4", pkg: "1.2.0+3.g1a2b3c4"},
		{describe: "v1.2.0-3-g1a2b3c4-dirty", pkg: "1.2.0+3.g1a2b3c4.dirty"},
		{describe: "v1.2.0-rc.1", pkg: "1.2.0~rc.1"},
		{describe: "v1.2.0-rc1-2-gabcdef0", pkg: "1.2.0~rc1+2.gabcdef0"},
		{describe: "1a2b3c4", commits: 19, pkg: "0.0.0+19.g1a2b3c4"},
		{describe: "1a2b3c4-dirty", commits: 19, pkg: "0.0.0+19.g1a2b3c4.dirty"},
		{describe: "1.2.0", wantErr: "want a tag"},
		{describe: "v1.2", wantErr: "want a tag"},
		{describe: "release-7", wantErr: "want a tag"},
		{describe: "", wantErr: "want a tag"},
	}
	for _, tc := range tests {
		t.Run(tc.describe, func(t *testing.T) {
			v, err := ParseVersion(tc.describe, tc.commits, at)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.pkg, v.Package())
			require.Equal(t, tc.describe, v.Binary)
			require.Equal(t, at.UTC(), v.Time)
		})
	}
}

func TestParseFlags(t *testing.T) {
	repo, err := filepath.Abs("../..")
	require.NoError(t, err)
	tests := []struct {
		name    string
		args    []string
		wantErr string
	}{
		{name: "defaults", args: []string{"-repo", repo, "-out", "x"}},
		{name: "no repo", args: []string{"-out", "x"}, wantErr: "-repo and -out are required"},
		{name: "not the repository", args: []string{"-repo", t.TempDir(), "-out", "x"}, wantErr: "not the telegraf-omnicore repository"},
		{name: "unknown platform", args: []string{"-repo", repo, "-out", "x", "-platforms", "linux/386"}, wantErr: `unsupported platform "linux/386"`},
		{name: "arm without version", args: []string{"-repo", repo, "-out", "x", "-platforms", "linux/arm"}, wantErr: "unsupported platform"},
		{name: "unknown format", args: []string{"-repo", repo, "-out", "x", "-formats", "deb,apk"}, wantErr: `unknown format "apk"`},
		{name: "extra argument", args: []string{"-repo", repo, "-out", "x", "extra"}, wantErr: "unexpected arguments"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseFlags(tc.args, io.Discard)
			if tc.wantErr != "" {
				require.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			require.Len(t, o.platforms, 3)
			require.Equal(t, Formats, o.formats)
		})
	}
}

func TestOutputDirMustBeEmpty(t *testing.T) {
	out := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(out, "old.deb"), nil, 0o644))
	err := run(context.Background(), []string{"-repo", "../..", "-out", out, "-version", "v1.0.0"}, io.Discard, io.Discard)
	require.ErrorContains(t, err, "is not empty")
}

// TestTarball builds the amd64 tarball (both binaries: the slow part is
// their link) and checks its layout and modes. The packages are checked by
// the packaging test of the main module, which installs them.
func TestTarball(t *testing.T) {
	if testing.Short() {
		t.Skip("builds both binaries")
	}
	out := t.TempDir()
	require.NoError(t, run(context.Background(), []string{"-repo", "../..", "-out", out, "-version", "v1.2.3",
		"-platforms", "linux/amd64", "-formats", "tar.gz"}, io.Discard, io.Discard))
	f, err := os.Open(filepath.Join(out, "telegraf-omnicore-1.2.3_linux_amd64.tar.gz"))
	require.NoError(t, err)
	defer f.Close()
	gz, err := gzip.NewReader(f)
	require.NoError(t, err)
	tr := tar.NewReader(gz)
	modes := map[string]int64{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		require.NoError(t, err)
		require.Equal(t, "root", h.Uname)
		modes[h.Name] = h.Mode
		if name := filepath.Base(h.Name); name == "telegraf-omnicore" || name == "omnicore-emulator" {
			// The binaries print the version make dist gave them.
			bin := filepath.Join(t.TempDir(), name)
			b, err := io.ReadAll(tr)
			require.NoError(t, err)
			require.NoError(t, os.WriteFile(bin, b, 0o755))
			out, err := exec.Command(bin, "-version").Output()
			require.NoError(t, err)
			require.True(t, strings.HasPrefix(string(out), name+" v1.2.3 ("), string(out))
		}
	}
	top := "telegraf-omnicore-1.2.3/"
	for name, mode := range map[string]int64{
		"telegraf-omnicore": 0o755, "omnicore-emulator": 0o755,
		"README.md": 0o644, "LICENSE": 0o644, "sample.conf": 0o644, "output.conf": 0o644, "input.conf": 0o644,
		"plugins/outputs/omnicore/README.md": 0o644, "plugins/inputs/omnicore/README.md": 0o644,
		"systemd/telegraf.service.d/telegraf-omnicore.conf": 0o644, "emulator/README.md": 0o644, "emulator/registry.json": 0o644,
	} {
		require.Contains(t, modes, top+name)
		require.Equalf(t, mode, modes[top+name], "mode of %s", name)
	}
	sums, err := os.ReadFile(filepath.Join(out, "SHA256SUMS"))
	require.NoError(t, err)
	require.Regexp(t, `^[0-9a-f]{64}  telegraf-omnicore-1\.2\.3_linux_amd64\.tar\.gz\n$`, string(sums))
}

// TestGitVersion: without -version, the version is this checkout's
// git describe, which every build names the same way.
func TestGitVersion(t *testing.T) {
	if _, err := exec.LookPath("git"); err != nil {
		t.Skip("git is not installed")
	}
	describe, err := exec.Command("git", "-C", "../..", "describe", "--tags", "--always", "--dirty", "--match", "v[0-9]*").Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	v, err := gitVersion("../..", "")
	require.NoError(t, err)
	require.Equal(t, strings.TrimSpace(string(describe)), v.Binary)
	require.NotEmpty(t, v.Package())
	require.False(t, v.Time.IsZero())

	v, err = gitVersion("../..", "v2.0.0")
	require.NoError(t, err)
	require.Equal(t, "2.0.0", v.Package())
}
