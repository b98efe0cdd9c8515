package main

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/goreleaser/nfpm/v2"
	_ "github.com/goreleaser/nfpm/v2/deb" // registers the deb packager
	"github.com/goreleaser/nfpm/v2/files"
	_ "github.com/goreleaser/nfpm/v2/rpm" // registers the rpm packager
)

// PackageName is the name of the .deb and .rpm.
const PackageName = "telegraf-omnicore"

const description = `OmniCore gateway plugins for Telegraf
outputs.omnicore publishes Telegraf metrics as the telemetry and state of
devices behind an OmniCore (KORE Wireless) gateway over the MQTT bridge;
inputs.omnicore turns the config, commands and errors the bridge sends back
into metrics. Both run in an unmodified Telegraf through execd. The wiring
is installed as /etc/telegraf/telegraf.d/omnicore.conf.sample and stays off
until it is copied to omnicore.conf.`

// packageInfo is what nfpm packs for one platform: the files of the
// release that have a package path, the state directory's scripts and the
// metadata.
func packageInfo(repo string, p Platform, v Version, rel []file) *nfpm.Info {
	owned := func(c *files.Content) *files.Content {
		if c.FileInfo == nil {
			c.FileInfo = &files.ContentFileInfo{}
		}
		c.FileInfo.Owner, c.FileInfo.Group, c.FileInfo.MTime = "root", "root", v.Time
		return c
	}
	contents := files.Contents{
		// The plugin files' directory, owned so that the package manager
		// removes it on purge; the key and CA the user adds live there too.
		owned(&files.Content{Destination: PluginDir, Type: files.TypeDir, FileInfo: &files.ContentFileInfo{Mode: 0o755}}),
	}
	for _, f := range rel {
		if f.pkg == "" {
			continue
		}
		c := &files.Content{Source: f.src, Destination: f.pkg, FileInfo: &files.ContentFileInfo{Mode: f.mode()}}
		if f.kind == kindConfig {
			// A conffile for dpkg, %config(noreplace) for rpm: an upgrade
			// keeps the user's edits, a removal keeps the file.
			c.Type = files.TypeConfigNoReplace
		}
		contents = append(contents, owned(c))
	}
	scripts := filepath.Join(repo, "tools", "dist", "package")
	info := &nfpm.Info{
		Name:          PackageName,
		Arch:          p.Arch,
		Platform:      "linux",
		Version:       v.Upstream,
		VersionSchema: "none",
		Prerelease:    v.Prerelease,
		// rpm: Version-Release; the deb has no Debian revision.
		VersionMetadata: v.Metadata,
		Section:         "net",
		Priority:        "optional",
		Maintainer:      "The telegraf-omnicore authors",
		Vendor:          "The telegraf-omnicore authors",
		Homepage:        "https://github.com/telegraf-omnicore/telegraf-omnicore",
		License:         "MIT",
		Description:     description,
		MTime:           v.Time,
		Overridables: nfpm.Overridables{
			// Telegraf may come from a tarball or a container, so it is
			// suggested, not required.
			Suggests: []string{"telegraf"},
			Contents: contents,
			Scripts: nfpm.Scripts{
				PostInstall: filepath.Join(scripts, "postinstall.sh"),
				PostRemove:  filepath.Join(scripts, "postremove.sh"),
			},
			// A fixed build host keeps the rpm reproducible.
			RPM: nfpm.RPM{Summary: "OmniCore gateway plugins for Telegraf", Group: "Applications/System", BuildHost: "localhost"},
		},
	}
	return info
}

// writePackage builds the package of format ("deb" or "rpm") into dir and
// returns its path.
func writePackage(format string, info *nfpm.Info, dir string) (string, error) {
	packager, err := nfpm.Get(format)
	if err != nil {
		return "", err
	}
	// Packagers change the Info they get (architecture names, defaults).
	info = nfpm.WithDefaults(copyInfo(info))
	if err := nfpm.PrepareForPackager(info, format); err != nil {
		return "", fmt.Errorf("%s: %w", format, err)
	}
	path := filepath.Join(dir, packager.ConventionalFileName(info))
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return "", err
	}
	if err := packager.Package(info, f); err != nil {
		f.Close()
		return "", fmt.Errorf("%s: %w", filepath.Base(path), err)
	}
	return path, f.Close()
}

func copyInfo(info *nfpm.Info) *nfpm.Info {
	c := *info
	c.Contents = make(files.Contents, len(info.Contents))
	for i, content := range info.Contents {
		cc := *content
		if content.FileInfo != nil {
			fi := *content.FileInfo
			cc.FileInfo = &fi
		}
		c.Contents[i] = &cc
	}
	return &c
}
