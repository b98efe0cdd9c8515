package runner

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// tmpfs mounts a tmpfs of size bytes on a new directory, skipping the test
// when it cannot (not root, no mount).
func tmpfs(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := filepath.Join(t.TempDir(), "disk")
	require.NoError(t, os.Mkdir(dir, 0o700))
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("mount: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", "-l", dir).Run() })
	return dir
}

func remount(t *testing.T, dir, mode string) {
	t.Helper()
	out, err := exec.Command("mount", "-o", "remount,"+mode, dir).CombinedOutput()
	require.NoError(t, err, "%s", out)
}

// tally counts what a run delivered against what was sent.
func tally(t *testing.T, out *testOutput, sent int) (received, dup, lost int) {
	t.Helper()
	seen := map[int64]int{}
	for _, v := range values(flatten(out.getWritten())) {
		seen[v]++
	}
	for i := range sent {
		switch n := seen[int64(i)]; {
		case n == 0:
			lost++
		case n > 1:
			dup += n - 1
		}
	}
	return len(seen), dup, lost
}

// A disk smaller than spool_max_size fills: the spool's disk fails, not the
// gateway. Standard input is still read, the lines go to memory and on to
// the bridge, one E! says so, one I! says when the disk takes lines again.
func TestDiskFullIsAnOutageOfTheDisk(t *testing.T) {
	for _, bridgeDown := range []bool{false, true} {
		name := "bridge up"
		if bridgeDown {
			name = "bridge down during the disk failure"
		}
		t.Run(name, func(t *testing.T) {
			disk := tmpfs(t, "256k")
			out := newTestOutput()
			out.failWrites = bridgeDown
			gate := make(chan struct{})
			if !bridgeDown {
				// The bridge takes the first batch only once the disk is
				// full, then everything.
				out.block = gate
			}
			h := start(t, out, filepath.Join(disk, "spool"), 500, 10*time.Millisecond, func(r *Runner) {
				r.cfg.Spool.MaxSize = 4 << 20 // far over the disk
				// Segments small enough to be released and deleted on this
				// disk (the spool's own sizing is another change's).
				r.cfg.Spool.SegmentSize = 32 << 10
				r.probeEvery = 100 * time.Millisecond
			})
			const n = 20000 // about 1.2 MB of line protocol
			done := make(chan struct{})
			go func() {
				defer close(done)
				h.write(t, lines("m", 0, n))
			}()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
				t.Fatalf("stdin not read with the disk full: %d bytes read", h.read.n.Load())
			}
			waitFor(t, 10*time.Second, "the disk failure", func() bool { return h.count('E', "The spool's disk failed") == 1 })
			close(gate)
			out.setFailing(false)
			waitFor(t, 20*time.Second, "every metric delivered", func() bool { _, _, lost := tally(t, out, n); return lost == 0 })
			received, dup, lost := tally(t, out, n)
			t.Logf("sent %d, received %d, duplicated %d, lost %d", n, received, dup, lost)
			require.Zero(t, lost)
			// The spool empties, the disk has room again: new lines go to
			// the spool again.
			waitFor(t, 10*time.Second, "the disk recovery", func() bool {
				h.write(t, line("m", n))
				return h.count('I', "The spool's disk works again") == 1
			}, h.texts)
			require.Equal(t, 1, h.count('E', "The spool's disk failed"), "%v", h.texts())
			require.NoError(t, h.stdin.Close())
			require.NoError(t, h.wait(t, 10*time.Second))
		})
	}
}

// ext4ErrorsRO mounts a small ext4 image with errors=remount-ro and returns
// the directory and a function that makes the kernel turn it read-only, as
// it does on an I/O error of an SD card: with files open for writing, which
// a plain "mount -o remount,ro" refuses. Skips when it cannot.
func ext4ErrorsRO(t *testing.T) (dir string, fail func()) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a loop device needs root")
	}
	base := t.TempDir()
	img := filepath.Join(base, "disk.img")
	dir = filepath.Join(base, "disk")
	require.NoError(t, os.Mkdir(dir, 0o700))
	if out, err := exec.Command("sh", "-c", "truncate -s 16M "+img+" && mkfs.ext4 -q "+img).CombinedOutput(); err != nil {
		t.Skipf("mkfs.ext4: %v: %s", err, out)
	}
	if out, err := exec.Command("mount", "-o", "loop,errors=remount-ro", img, dir).CombinedOutput(); err != nil {
		t.Skipf("mount: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", dir).Run() }) // the loop device is detached with it
	src, err := exec.Command("findmnt", "-n", "-o", "SOURCE", dir).Output()
	require.NoError(t, err)
	trigger := filepath.Join("/sys/fs/ext4", filepath.Base(strings.TrimSpace(string(src))), "trigger_fs_error")
	if _, err := os.Stat(trigger); err != nil {
		t.Skipf("no %s: %v", trigger, err)
	}
	return dir, func() { require.NoError(t, os.WriteFile(trigger, []byte("1"), 0o200)) }
}

// A spool whose filesystem turns read-only while it runs (ext4's
// errors=remount-ro): the same as a full disk, and the lines already in the
// spool are still read and published.
func TestReadOnlyDisk(t *testing.T) {
	disk, fail := ext4ErrorsRO(t)
	out := newTestOutput()
	out.failWrites = true
	h := start(t, out, filepath.Join(disk, "spool"), 500, 10*time.Millisecond, func(r *Runner) {
		r.probeEvery = 100 * time.Millisecond
	})
	const n = 4000
	h.write(t, lines("m", 0, n/2))
	waitFor(t, 10*time.Second, "the first half spooled", func() bool { return h.read.n.Load() == int64(len(lines("m", 0, n/2))) })
	time.Sleep(50 * time.Millisecond) // not a wait for an event: lets the spool's group commit write the first half
	fail()
	h.write(t, lines("m", n/2, n/2))
	waitFor(t, 10*time.Second, "the disk failure", func() bool { return h.count('E', "The spool's disk failed") == 1 })
	out.setFailing(false)
	waitFor(t, 20*time.Second, "every metric delivered", func() bool { _, _, lost := tally(t, out, n); return lost == 0 })
	received, dup, lost := tally(t, out, n)
	t.Logf("read-only: sent %d, received %d, duplicated %d, lost %d", n, received, dup, lost)
	require.Zero(t, lost)
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))
	require.Equal(t, 1, h.count('E', "The spool's disk failed"), "%v", h.texts())
}

// A spool that cannot be opened for its disk's reason (read-only) starts
// the runner with memory instead of failing, and is opened once it can be.
func TestOpenOnAFailedDiskStartsWithMemory(t *testing.T) {
	disk := tmpfs(t, "16m")
	remount(t, disk, "ro")
	out := newTestOutput()
	h := start(t, out, filepath.Join(disk, "spool"), 100, 10*time.Millisecond, func(r *Runner) {
		r.probeEvery = 100 * time.Millisecond
	})
	h.write(t, lines("m", 0, 300))
	waitWritten(t, out, 300)
	require.Equal(t, 1, h.count('E', "Opening the spool "), "%v", h.texts())
	remount(t, disk, "rw")
	waitFor(t, 10*time.Second, "the spool opened", func() bool { return h.count('I', "opened after its disk failed") == 1 })
	h.write(t, lines("m", 300, 100))
	waitWritten(t, out, 400)
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))
	received, dup, lost := tally(t, out, 400)
	require.Zero(t, lost, "received %d, duplicated %d", received, dup)
}
