package main

import (
	"fmt"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Version is what one build is called.
type Version struct {
	// Binary is what -version prints: the `git describe` output
	// ("v1.2.0", "v1.2.0-3-g1a2b3c4", "1a2b3c4-dirty").
	Binary string
	// Upstream is the package version without prerelease and build
	// metadata: "1.2.0", or "0.0.0" before the first tag.
	Upstream string
	// Prerelease is a tag's prerelease part ("rc.1" of v1.2.0-rc.1); the
	// packages sort it before Upstream (deb "1.2.0~rc.1").
	Prerelease string
	// Metadata tells an untagged or dirty build apart: commits since the
	// tag (or since the first commit), the commit and "dirty"
	// ("3.g1a2b3c4.dirty"); the packages sort it after Upstream
	// (deb "1.2.0+3.g1a2b3c4").
	Metadata string
	// Time is the commit's time: the modification time of every file in
	// the tarballs and packages, so that a build is reproducible.
	Time time.Time
}

// Package is the Debian form of the version, also used in tarball names.
func (v Version) Package() string {
	s := v.Upstream
	if v.Prerelease != "" {
		s += "~" + v.Prerelease
	}
	if v.Metadata != "" {
		s += "+" + v.Metadata
	}
	return s
}

var (
	// Both without the "-dirty" suffix, which a prerelease would swallow.
	taggedRe   = regexp.MustCompile(`^v(\d+\.\d+\.\d+)(?:-([0-9A-Za-z.]+))?(?:-(\d+)-g([0-9a-f]{4,}))?$`)
	untaggedRe = regexp.MustCompile(`^[0-9a-f]{4,}$`)
)

// ParseVersion parses the output of `git describe --tags --always --dirty`
// (tags are vMAJOR.MINOR.PATCH with an optional -PRERELEASE). commits is
// the number of commits of HEAD, used as the sequence of untagged builds.
func ParseVersion(describe string, commits int, at time.Time) (Version, error) {
	v := Version{Binary: describe, Time: at.UTC()}
	var meta []string
	rest, dirty := strings.CutSuffix(describe, "-dirty")
	if m := taggedRe.FindStringSubmatch(rest); m != nil {
		v.Upstream, v.Prerelease = m[1], m[2]
		if m[3] != "" {
			meta = append(meta, m[3], "g"+m[4])
		}
	} else if untaggedRe.MatchString(rest) {
		v.Upstream = "0.0.0"
		meta = append(meta, strconv.Itoa(commits), "g"+rest)
	} else {
		return Version{}, fmt.Errorf("version %q: want a tag vMAJOR.MINOR.PATCH[-PRERELEASE], `git describe --tags --always --dirty` of one, or a commit hash", describe)
	}
	if dirty {
		meta = append(meta, "dirty")
	}
	v.Metadata = strings.Join(meta, ".")
	return v, nil
}

// gitVersion is the version of the checkout at repo; override, when not
// empty, replaces `git describe` (a release build from a source tarball).
func gitVersion(repo, override string) (Version, error) {
	git := func(args ...string) (string, error) {
		out, err := exec.Command("git", append([]string{"-C", repo}, args...)...).Output()
		if err != nil {
			if ee, ok := err.(*exec.ExitError); ok {
				return "", fmt.Errorf("git %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(ee.Stderr)))
			}
			return "", fmt.Errorf("git %s: %w", strings.Join(args, " "), err)
		}
		return strings.TrimSpace(string(out)), nil
	}
	describe := override
	if describe == "" {
		var err error
		if describe, err = git("describe", "--tags", "--always", "--dirty", "--match", "v[0-9]*"); err != nil {
			return Version{}, fmt.Errorf("%w (not a git checkout? pass -version)", err)
		}
	}
	at := time.Now()
	commits := 0
	if count, err := git("rev-list", "--count", "HEAD"); err == nil {
		commits, _ = strconv.Atoi(count)
		if ct, err := git("log", "-1", "--format=%ct"); err == nil {
			if sec, err := strconv.ParseInt(ct, 10, 64); err == nil {
				at = time.Unix(sec, 0)
			}
		}
	} else if override == "" {
		return Version{}, err
	}
	return ParseVersion(describe, commits, at)
}
