// Package statedir finds the product's state directory, which holds the
// output's spool and the cross-process sharing rendezvous, and creates private
// subdirectories in it that no other local user can create, squat or read.
//
// The state directory is the first of these that applies:
//
//  1. $STATE_DIRECTORY, which systemd sets from a unit's StateDirectory=
//     (the first entry when it lists several);
//  2. /var/lib/telegraf-omnicore, when it exists and is writable, or can be
//     created (the packages create it, owned by the telegraf user);
//  3. a per-user directory: $XDG_STATE_HOME/telegraf-omnicore, else
//     ~/.local/state/telegraf-omnicore.
//
// The state directory must be a real directory (not a symbolic link), owned
// by the effective user or root, and not writable by group or others. Subdirectories are created with mode 0700; an existing
// one must be owned by the effective user and have no group or other
// permission bits. Nothing here ever changes the mode or owner of a directory
// it did not just create: a directory that fails a check is an error that
// names the path, what is wrong and the fix.
package statedir

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// SystemDir is the state directory the packages create.
const SystemDir = "/var/lib/telegraf-omnicore"

// EnvStateDirectory is systemd's variable for a unit's StateDirectory=.
const EnvStateDirectory = "STATE_DIRECTORY"

// lookups are what Resolve reads from its environment, replaceable in tests.
type lookups struct {
	getenv    func(string) string
	systemDir string
	homeDir   func() (string, error)
}

var defaultLookups = lookups{getenv: os.Getenv, systemDir: SystemDir, homeDir: os.UserHomeDir}

// Resolve returns the state directory, creating it when it is the per-user
// one, and checks it as the package comment says.
func Resolve() (string, error) { return defaultLookups.resolve() }

func (l lookups) resolve() (string, error) {
	if v := l.getenv(EnvStateDirectory); v != "" {
		dir, _, _ := strings.Cut(v, ":")
		if !filepath.IsAbs(dir) {
			return "", fmt.Errorf("$%s=%q is not an absolute path", EnvStateDirectory, v)
		}
		return dir, checkBase(dir)
	}
	if usable(l.systemDir) {
		return l.systemDir, checkBase(l.systemDir)
	}
	base := l.getenv("XDG_STATE_HOME")
	if base == "" || !filepath.IsAbs(base) {
		home, err := l.homeDir()
		if err != nil || home == "" || !filepath.IsAbs(home) {
			return "", fmt.Errorf("no state directory: $%s is not set, %s is not writable and there is no home directory; set $%s or create %s writable for this user",
				EnvStateDirectory, l.systemDir, EnvStateDirectory, l.systemDir)
		}
		base = filepath.Join(home, ".local", "state")
	}
	if err := os.MkdirAll(base, 0o700); err != nil {
		return "", fmt.Errorf("creating the state directory's parent: %w", err)
	}
	dir := filepath.Join(base, "telegraf-omnicore")
	return dir, mkPrivate(dir)
}

// usable reports whether dir exists and is writable, or could be created.
func usable(dir string) bool {
	if _, err := os.Lstat(dir); err == nil {
		return unix.Access(dir, unix.W_OK|unix.X_OK) == nil
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return false
	}
	return true
}

// checkBase checks the state directory itself: a real directory, owned by us
// or root, not writable by group or others (anyone who can write it could
// replace our private subdirectories).
func checkBase(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("state directory %s is not a directory (a symbolic link or a file); point $%s at a real directory", dir, EnvStateDirectory)
	}
	uid := ownerOf(fi)
	if uid != os.Geteuid() && uid != 0 {
		return fmt.Errorf("state directory %s is owned by uid %d, not by this user (uid %d) or root; fix with: chown %d %s",
			dir, uid, os.Geteuid(), os.Geteuid(), dir)
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("state directory %s has mode %04o: group or others may write it, so another user could squat the spool or the sharing socket; fix with: chmod go-w %s",
			dir, fi.Mode().Perm(), dir)
	}
	return nil
}

// Private returns the subdirectory name of parent (a path relative to it,
// which may have several elements), created with mode 0700 where missing.
// An existing directory must be a real directory owned by the effective user
// with no group or other permission bits; it is never changed.
func Private(parent string, name ...string) (string, error) {
	dir := parent
	for _, elem := range name {
		if elem == "" || elem == "." || elem == ".." || strings.ContainsRune(elem, filepath.Separator) {
			return "", fmt.Errorf("invalid state subdirectory name %q", elem)
		}
		dir = filepath.Join(dir, elem)
		if err := mkPrivate(dir); err != nil {
			return "", err
		}
	}
	return dir, nil
}

// mkPrivate creates dir with mode 0700, or checks the one that is there.
func mkPrivate(dir string) error {
	err := os.Mkdir(dir, 0o700)
	if err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("creating private directory: %w", err)
	}
	return CheckPrivate(dir)
}

// CheckPrivate checks that dir is a real directory owned by the effective
// user with no group or other permission bits.
func CheckPrivate(dir string) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory (a symbolic link or a file): remove it, or choose another directory", dir)
	}
	if uid := ownerOf(fi); uid != os.Geteuid() {
		return fmt.Errorf("%s is owned by uid %d, not by this user (uid %d): another user may have created it; remove it, or run as its owner", dir, uid, os.Geteuid())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%s has mode %04o; it must be private to its owner (0700), fix with: chmod 0700 %s", dir, perm, dir)
	}
	return nil
}

func ownerOf(fi fs.FileInfo) int {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return int(st.Uid)
	}
	return -1
}
