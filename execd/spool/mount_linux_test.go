package spool

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

// smallFilesystem mounts a tmpfs of size bytes on a new temporary
// directory and returns it; it is unmounted at the end of the test. The
// test is skipped when it does not run as root or the mount fails.
func smallFilesystem(t *testing.T, size int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a small tmpfs needs root: run the disk tests as root to check the spool on a full filesystem")
	}
	dir := t.TempDir()
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, "size="+strconv.FormatInt(size, 10)+",mode=0700"); err != nil {
		t.Skipf("cannot mount a tmpfs of %d bytes on %s (%v): skipping the small filesystem test", size, dir, err)
	}
	t.Cleanup(func() { require.NoError(t, syscall.Unmount(dir, syscall.MNT_DETACH)) })
	return dir
}

// readOnlyFilesystem mounts a new ext4 filesystem of size bytes on a loop
// device with errors=remount-ro, so that failRO can turn it read-only under
// open files, as the kernel does when the disk fails. Skipped when it does
// not run as root or the tools or loop devices are missing.
func readOnlyFilesystem(t *testing.T, size int64) (dir string, failRO func(), remount func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting an ext4 image needs root: run the disk tests as root to check the spool on a read-only filesystem")
	}
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skip("mkfs.ext4 is not installed: skipping the read-only filesystem test")
	}
	tmp := t.TempDir()
	img := filepath.Join(tmp, "fs.img")
	dir = filepath.Join(tmp, "mnt")
	require.NoError(t, os.Mkdir(dir, 0o700))
	require.NoError(t, os.WriteFile(img, nil, 0o600))
	require.NoError(t, os.Truncate(img, size))
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4 failed (%v: %s): skipping the read-only filesystem test", err, out)
	}
	mount := func() {
		if out, err := exec.Command("mount", "-o", "loop,errors=remount-ro", img, dir).CombinedOutput(); err != nil {
			t.Skipf("cannot mount an ext4 image on a loop device (%v: %s): skipping the read-only filesystem test", err, out)
		}
	}
	mount()
	mounted := true
	t.Cleanup(func() {
		if mounted {
			_ = exec.Command("umount", dir).Run()
		}
	})
	failRO = func() {
		// The kernel's own test hook: an ext4 error, which errors=remount-ro
		// answers by making the filesystem read-only under open files.
		var st syscall.Stat_t
		require.NoError(t, syscall.Stat(dir, &st))
		dev := "loop" + strconv.FormatUint(uint64(unix.Minor(st.Dev)), 10)
		path := "/sys/fs/ext4/" + dev + "/trigger_fs_error"
		if err := os.WriteFile(path, []byte("spool test\n"), 0o200); err != nil {
			t.Skipf("cannot trigger an ext4 error through %s (%v): skipping the read-only filesystem test", path, err)
		}
	}
	remount = func() {
		out, err := exec.Command("umount", dir).CombinedOutput()
		require.NoError(t, err, "%s", out)
		mounted = false
		mount()
		mounted = true
	}
	return dir, failRO, remount
}
