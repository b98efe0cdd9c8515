package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Paths of the installed files. The root sample.conf and the plugins'
// READMEs name the same paths; the packaging test checks they agree.
const (
	BinDir       = "/usr/bin"
	WiringSample = "/etc/telegraf/telegraf.d/omnicore.conf.sample"
	PluginDir    = "/etc/telegraf/omnicore"
	DocDir       = "/usr/share/doc/telegraf-omnicore"
	// SystemdDropIn sets the state directory of Telegraf's own unit.
	SystemdDropIn = "/usr/lib/systemd/system/telegraf.service.d/telegraf-omnicore.conf"
)

// kind is what a file is to the packages.
type kind int

const (
	kindBinary kind = iota // mode 0755
	kindConfig             // a configuration file: an upgrade keeps the user's edits
	kindFile               // mode 0644
)

// file is one file of a release: where it comes from and where it goes.
type file struct {
	// src is its path on disk.
	src string
	// pkg is its path when the package is installed ("" for tarballs only).
	pkg string
	// tar is its path inside the tarball's top directory ("" for packages only).
	tar string
	kind
}

// docs are the repository's files installed as documentation, by their
// path in the repository, which is also their path under DocDir and in the
// tarball so that the README's relative links work there. The emulator's
// README goes only into the tarballs, like the emulator.
var docs = []string{
	"README.md",
	"LICENSE",
	"plugins/outputs/omnicore/README.md",
	"plugins/inputs/omnicore/README.md",
	"execd/share/SHARING.md",
	"docs/reliability.md",
	"docs/pool.md",
	"docs/bridge.md",
}

// pluginFileHeader introduces a plugin file made from a plugin's sample.conf.
const pluginFileHeader = `# telegraf-omnicore plugin file: the one [[%[1]s.omnicore]] table that the
# [[%[1]s.execd]] block of /etc/telegraf/telegraf.d/omnicore.conf runs with
#   /usr/bin/telegraf-omnicore -config /etc/telegraf/omnicore/%[2]s
# The package installs that wiring as omnicore.conf.sample: copy it to
# omnicore.conf to turn the plugins on. Keep this file out of telegraf.d/:
# Telegraf itself does not know [[%[1]s.omnicore]] and would refuse to start.
# Every option: /usr/share/doc/telegraf-omnicore/plugins/%[1]s/omnicore/README.md
#
`

// releaseFiles lists the files of a release for one platform, whose
// binaries are in binDir; the plugin files are generated into stage.
func releaseFiles(repo, stage, binDir string) ([]file, error) {
	files := []file{
		{src: filepath.Join(binDir, "telegraf-omnicore"), pkg: BinDir + "/telegraf-omnicore", tar: "telegraf-omnicore", kind: kindBinary},
		// The emulator is a test bridge, not something a gateway runs: it
		// ships in the tarballs (and go install), not in the packages.
		{src: filepath.Join(binDir, "omnicore-emulator"), tar: "omnicore-emulator", kind: kindBinary},
		{src: filepath.Join(repo, "sample.conf"), pkg: WiringSample, tar: "sample.conf", kind: kindConfig},
		{src: filepath.Join(repo, "tools", "dist", "package", "telegraf.service.d.conf"), pkg: SystemdDropIn, tar: "systemd/telegraf.service.d/telegraf-omnicore.conf", kind: kindFile},
		{src: filepath.Join(repo, "emulator", "README.md"), tar: "emulator/README.md", kind: kindFile},
		// The emulator's -registry flag needs a registry file; the README's
		// emulator commands use this one.
		{src: filepath.Join(repo, "testdata", "registry.json"), tar: "emulator/registry.json", kind: kindFile},
	}
	for _, plugin := range []struct{ category, name string }{{"outputs", "output.conf"}, {"inputs", "input.conf"}} {
		sample, err := os.ReadFile(filepath.Join(repo, "plugins", plugin.category, "omnicore", "sample.conf"))
		if err != nil {
			return nil, err
		}
		if !strings.Contains(string(sample), "[["+plugin.category+".omnicore]]") {
			return nil, fmt.Errorf("plugins/%s/omnicore/sample.conf has no [[%s.omnicore]] table", plugin.category, plugin.category)
		}
		path := filepath.Join(stage, plugin.name)
		content := fmt.Sprintf(pluginFileHeader, plugin.category, plugin.name) + string(sample)
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			return nil, err
		}
		files = append(files, file{src: path, pkg: PluginDir + "/" + plugin.name, tar: plugin.name, kind: kindConfig})
	}
	for _, d := range docs {
		files = append(files, file{src: filepath.Join(repo, filepath.FromSlash(d)), pkg: DocDir + "/" + d, tar: d, kind: kindFile})
	}
	for _, f := range files {
		if f.kind == kindBinary {
			continue // built later
		}
		if _, err := os.Stat(f.src); err != nil {
			return nil, err
		}
	}
	return files, nil
}

func (k kind) mode() os.FileMode {
	if k == kindBinary {
		return 0o755
	}
	return 0o644
}
