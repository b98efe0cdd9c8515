package main

import (
	"archive/tar"
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"sort"
)

// TarballName is the name of a platform's tarball, as Telegraf names its
// own (telegraf-1.37.2_linux_armhf.tar.gz).
func TarballName(v Version, p Platform) string {
	return fmt.Sprintf("%s-%s_linux_%s.tar.gz", PackageName, v.Package(), p.TarArch)
}

// writeTarball writes the files with a tarball path under one top
// directory, root-owned and stamped with the commit's time.
func writeTarball(dir string, v Version, p Platform, rel []file) (string, error) {
	out := filepath.Join(dir, TarballName(v, p))
	f, err := os.OpenFile(out, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o644)
	if err != nil {
		return "", err
	}
	defer f.Close()
	gz := gzip.NewWriter(f)
	tw := tar.NewWriter(gz)
	top := fmt.Sprintf("%s-%s", PackageName, v.Package())

	var entries []file
	dirs := map[string]bool{top: true}
	for _, r := range rel {
		if r.tar == "" {
			continue
		}
		entries = append(entries, r)
		for d := path.Dir(r.tar); d != "."; d = path.Dir(d) {
			dirs[path.Join(top, d)] = true
		}
	}
	sortedDirs := make([]string, 0, len(dirs))
	for d := range dirs {
		sortedDirs = append(sortedDirs, d)
	}
	sort.Strings(sortedDirs)
	sort.Slice(entries, func(i, j int) bool { return entries[i].tar < entries[j].tar })

	header := func(name string, mode int64, typ byte, size int64) *tar.Header {
		return &tar.Header{Name: name, Mode: mode, Typeflag: typ, Size: size, ModTime: v.Time,
			Uname: "root", Gname: "root", Format: tar.FormatPAX}
	}
	for _, d := range sortedDirs {
		if err := tw.WriteHeader(header(d+"/", 0o755, tar.TypeDir, 0)); err != nil {
			return "", err
		}
	}
	for _, e := range entries {
		if err := addFile(tw, header(path.Join(top, e.tar), int64(e.mode()), tar.TypeReg, 0), e.src); err != nil {
			return "", err
		}
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := gz.Close(); err != nil {
		return "", err
	}
	return out, f.Close()
}

func addFile(tw *tar.Writer, h *tar.Header, src string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		return err
	}
	h.Size = fi.Size()
	if err := tw.WriteHeader(h); err != nil {
		return err
	}
	_, err = io.Copy(tw, in)
	return err
}
