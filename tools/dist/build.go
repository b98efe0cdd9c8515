package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Platform is a target of the release.
type Platform struct {
	GOARCH string
	// GOARM is the ARM version for GOARCH=arm.
	GOARM string
	// Arch is the architecture as nfpm names it: it maps it to the deb's
	// and the rpm's names (arm7: armhf, armv7hl).
	Arch string
	// TarArch names the tarball, as Telegraf names its own.
	TarArch string
}

func (p Platform) String() string {
	if p.GOARM != "" {
		return "linux/" + p.GOARCH + "/v" + p.GOARM
	}
	return "linux/" + p.GOARCH
}

// Platforms are the supported targets by the name -platforms takes.
var Platforms = map[string]Platform{
	"linux/amd64": {GOARCH: "amd64", Arch: "amd64", TarArch: "amd64"},
	"linux/arm64": {GOARCH: "arm64", Arch: "arm64", TarArch: "arm64"},
	// ARMv7 with hardware floating point: Raspberry Pi 2 and later, most
	// industrial ARM gateways; what Debian calls armhf.
	"linux/arm/v7": {GOARCH: "arm", GOARM: "7", Arch: "arm7", TarArch: "armhf"},
}

// ParsePlatforms parses the comma-separated -platforms list.
func ParsePlatforms(list string) ([]Platform, error) {
	var out []Platform
	seen := map[string]bool{}
	for _, name := range strings.Split(list, ",") {
		name = strings.TrimSpace(name)
		p, ok := Platforms[name]
		if !ok {
			return nil, fmt.Errorf("unsupported platform %q: want linux/amd64, linux/arm64 or linux/arm/v7", name)
		}
		if !seen[name] {
			seen[name] = true
			out = append(out, p)
		}
	}
	return out, nil
}

// buildCommand builds the main package pkg ("./cmd/telegraf-omnicore") of
// the repository for p into dir: static (no cgo), without local paths, and
// with the version that -version prints.
func buildCommand(ctx context.Context, repo string, p Platform, pkg, version, dir string) (string, error) {
	out := filepath.Join(dir, filepath.Base(pkg))
	cmd := exec.CommandContext(ctx, goCommand(), "build", "-trimpath",
		"-ldflags", "-s -w -X main.version="+version, "-o", out, pkg)
	cmd.Dir = repo
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH="+p.GOARCH, "GOARM="+p.GOARM)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build %s for %s: %w\n%s", pkg, p, err, stderr.String())
	}
	return out, nil
}

// goCommand is the go command: $GO (as the Makefile passes it), else "go".
func goCommand() string {
	if g := os.Getenv("GO"); g != "" {
		return g
	}
	return "go"
}
