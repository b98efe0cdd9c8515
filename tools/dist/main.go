// Command dist builds the release of telegraf-omnicore (make dist): static
// binaries of telegraf-omnicore and omnicore-emulator for each platform, a
// tarball per platform, .deb and .rpm packages built with nfpm, and
// SHA256SUMS.
//
//	go -C tools/dist run . -repo ../.. -out ../../dist
//
// It is its own module (tools/dist/go.mod) because nfpm's requirements are
// newer than Telegraf v1.37.2's: in the product's go.mod they would raise
// requirements it shares with Telegraf, which must stay at Telegraf's
// versions so that Telegraf can import the plugins at no cost.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// Formats are the artefacts -formats may name.
var Formats = []string{"tar.gz", "deb", "rpm"}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		fmt.Fprintln(os.Stderr, "dist:", err)
		os.Exit(1)
	}
}

type options struct {
	repo, out, version string
	platforms          []Platform
	formats            []string
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("dist", flag.ContinueOnError)
	fs.SetOutput(stderr)
	repo := fs.String("repo", "", "root of the telegraf-omnicore checkout (required)")
	out := fs.String("out", "", "output directory; must be empty or missing (required)")
	version := fs.String("version", "", "release version (a vMAJOR.MINOR.PATCH tag); default: git describe --tags --always --dirty")
	platforms := fs.String("platforms", "linux/amd64,linux/arm64,linux/arm/v7", "comma-separated targets")
	formats := fs.String("formats", strings.Join(Formats, ","), "comma-separated artefacts: tar.gz, deb, rpm")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if fs.NArg() > 0 {
		return options{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *repo == "" || *out == "" {
		return options{}, errors.New("-repo and -out are required")
	}
	o := options{version: *version}
	var err error
	if o.repo, err = filepath.Abs(*repo); err != nil {
		return options{}, err
	}
	if _, err := os.Stat(filepath.Join(o.repo, "cmd", "telegraf-omnicore")); err != nil {
		return options{}, fmt.Errorf("-repo %s is not the telegraf-omnicore repository: %w", *repo, err)
	}
	if o.out, err = filepath.Abs(*out); err != nil {
		return options{}, err
	}
	if o.platforms, err = ParsePlatforms(*platforms); err != nil {
		return options{}, err
	}
	for _, f := range strings.Split(*formats, ",") {
		f = strings.TrimSpace(f)
		if !slices.Contains(Formats, f) {
			return options{}, fmt.Errorf("unknown format %q: want tar.gz, deb or rpm", f)
		}
		if !slices.Contains(o.formats, f) {
			o.formats = append(o.formats, f)
		}
	}
	return o, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	v, err := gitVersion(o.repo, o.version)
	if err != nil {
		return err
	}
	if err := emptyDir(o.out); err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "telegraf-omnicore-dist-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	fmt.Fprintf(stdout, "dist: telegraf-omnicore %s (package version %s)\n", v.Binary, v.Package())

	var artefacts []string
	for _, p := range o.platforms {
		binDir := filepath.Join(work, p.TarArch)
		if err := os.Mkdir(binDir, 0o755); err != nil {
			return err
		}
		rel, err := releaseFiles(o.repo, binDir, binDir)
		if err != nil {
			return err
		}
		// The emulator goes only into the tarballs.
		cmds := []string{"./cmd/telegraf-omnicore"}
		if slices.Contains(o.formats, "tar.gz") {
			cmds = append(cmds, "./cmd/omnicore-emulator")
		}
		for _, c := range cmds {
			if _, err := buildCommand(ctx, o.repo, p, c, v.Binary, binDir); err != nil {
				return err
			}
		}
		for _, format := range o.formats {
			var path string
			if format == "tar.gz" {
				path, err = writeTarball(o.out, v, p, rel)
			} else {
				path, err = writePackage(format, packageInfo(o.repo, p, v, rel), o.out)
			}
			if err != nil {
				return err
			}
			artefacts = append(artefacts, path)
		}
	}
	sums, err := writeSums(o.out, artefacts)
	if err != nil {
		return err
	}
	for _, a := range append(artefacts, sums) {
		fi, err := os.Stat(a)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%10d  %s\n", fi.Size(), a)
	}
	return nil
}

// emptyDir creates dir, or checks that it is empty: artefacts of an older
// build must not end up next to this one's SHA256SUMS.
func emptyDir(dir string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return os.MkdirAll(dir, 0o755)
	}
	if err != nil {
		return err
	}
	if len(entries) > 0 {
		return fmt.Errorf("output directory %s is not empty (make dist removes it first)", dir)
	}
	return nil
}

// writeSums writes SHA256SUMS for the artefacts, in sha256sum's format.
func writeSums(dir string, artefacts []string) (string, error) {
	var b strings.Builder
	for _, a := range artefacts {
		f, err := os.Open(a)
		if err != nil {
			return "", err
		}
		h := sha256.New()
		_, err = io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&b, "%s  %s\n", hex.EncodeToString(h.Sum(nil)), filepath.Base(a))
	}
	path := filepath.Join(dir, "SHA256SUMS")
	return path, os.WriteFile(path, []byte(b.String()), 0o644)
}
