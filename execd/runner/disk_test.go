package runner

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/internal/disktest"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

// tmpfs mounts a tmpfs with options (size, nr_inodes) on a new directory,
// skipping the test when it cannot (not root, no mount).
func tmpfs(t *testing.T, options string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := filepath.Join(t.TempDir(), "disk")
	require.NoError(t, os.Mkdir(dir, 0o700))
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", options+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
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

// writeAll writes s to the runner's stdin, failing the test when the
// runner does not read it all within 30 s (while what says).
func (h *harness) writeAll(t *testing.T, s, what string) {
	t.Helper()
	done := make(chan struct{})
	var err error
	go func() {
		defer close(done)
		_, err = io.WriteString(h.stdin, s)
	}()
	select {
	case <-done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatalf("stdin not read with %s: %d bytes read", what, h.read.n.Load())
	}
}

// movedBack is the number of lines the I! of a disk recovery says moved
// from memory back into the spool.
func movedBack(t *testing.T, h *harness) int {
	t.Helper()
	re := regexp.MustCompile(`works again after \S+; (\d+) metrics held in memory meanwhile moved back`)
	for _, text := range h.texts() {
		if m := re.FindStringSubmatch(text); m != nil {
			n, err := strconv.Atoi(m[1])
			require.NoError(t, err)
			return n
		}
	}
	require.FailNow(t, "no I! for the recovery", "%v", h.texts())
	return 0
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

// deliveredAll waits until every one of sent metrics was delivered, and
// requires none lost or duplicated.
func deliveredAll(t *testing.T, out *testOutput, sent int) {
	t.Helper()
	waitFor(t, 20*time.Second, "every metric delivered", func() bool { _, _, lost := tally(t, out, sent); return lost == 0 })
	received, dup, lost := tally(t, out, sent)
	t.Logf("sent %d, received %d, duplicated %d, lost %d", sent, received, dup, lost)
	require.Zero(t, lost)
	require.Zero(t, dup)
	require.Equal(t, sent, received)
}

// bridgeStates are the two ways the bridge meets a disk event: up, taking
// its first batch only once the event happened (then everything), or down
// until the event happened.
var bridgeStates = []struct {
	name string
	down bool
}{
	{"bridge up", false},
	{"bridge down during the disk event", true},
}

// startOnDisk starts a runner spooling on a new tmpfs (mount options), its
// bridge down or blocked (the bridgeStates) until up is called.
func startOnDisk(t *testing.T, options string, down bool, tweak func(*Runner)) (disk string, h *harness, out *testOutput, r *Runner, up func()) {
	t.Helper()
	disk = tmpfs(t, options)
	out = newTestOutput()
	out.failWrites = down
	gate := make(chan struct{})
	if !down {
		out.block = gate
	}
	h = start(t, out, filepath.Join(disk, "spool"), 500, 10*time.Millisecond, func(rr *Runner) {
		r = rr
		tweak(r)
	})
	return disk, h, out, r, func() {
		close(gate)
		out.setFailing(false)
	}
}

// A disk smaller than spool_max_size caps the spool (its W!), which is no
// failure of the disk: once the spool holds what the disk allows, lines go
// to memory (the spool is full: W!) and on to the bridge, none lost, and
// no E! says the disk failed, because it never did.
func TestSmallDiskCapsTheSpool(t *testing.T) {
	for _, tc := range bridgeStates {
		t.Run(tc.name, func(t *testing.T) {
			_, h, out, r, up := startOnDisk(t, "size=1m", tc.down, func(r *Runner) {
				r.cfg.Spool.MaxSize = 4 << 20 // far over the disk
			})
			const n = 20000 // about 1.2 MB of line protocol
			h.writeAll(t, lines("m", 0, n), "the spool capped")
			require.Equal(t, 1, h.count('W', "the spool holds at most"), "the cap: %v", h.texts())
			waitFor(t, 10*time.Second, "the spool full", func() bool { return h.count('W', "The spool is full") == 1 }, h.texts)
			up()
			deliveredAll(t, out, n)
			waitFor(t, 10*time.Second, "memory emptied", func() bool { return r.q.Stats().memRecords == 0 })
			// The spool takes new lines again.
			h.write(t, lines("m", n, 100))
			deliveredAll(t, out, n+100)
			st := r.q.Stats()
			require.False(t, st.spoolDown)
			require.Zero(t, st.spool.DiskFailures)
			require.LessOrEqual(t, st.spool.MaxSize, int64(1<<20-256<<10), "capped by the disk")
			require.NoError(t, h.stdin.Close())
			require.NoError(t, h.wait(t, 10*time.Second))
			require.Zero(t, h.count('E', "The spool's disk failed"), "no disk failure: %v", h.texts())
			require.Zero(t, h.count('E', "Closing the spool"), "%v", h.texts())
		})
	}
}

// The disk fails under the open spool (another program took every inode:
// the next segment cannot be created): an outage of the disk, not of the
// gateway. Standard input is still read, the lines go to memory and on to
// the bridge, none lost; exactly one E! says the disk failed and one I!
// that it works again (the spool's own lines are left to the runner), and
// the spool takes new lines again without a restart.
func TestDiskFailureIsAnOutageOfTheDisk(t *testing.T) {
	for _, tc := range bridgeStates {
		t.Run(tc.name, func(t *testing.T) {
			disk, h, out, r, up := startOnDisk(t, "size=4m,nr_inodes=256", tc.down, func(r *Runner) {
				// Segments that fill (and a new file is needed) within
				// a few hundred lines.
				r.cfg.Spool.SegmentSize = 16 << 10
			})
			const n = 8000 // about 450 KB of line protocol: within spool_max_size
			h.write(t, lines("m", 0, n/2))
			waitFor(t, 10*time.Second, "the first half read", func() bool { return h.read.n.Load() == int64(len(lines("m", 0, n/2))) })
			unfill := disktest.FillInodes(t, disk)
			h.writeAll(t, lines("m", n/2, n/2), "the disk failed")
			waitFor(t, 10*time.Second, "the disk failure", func() bool { return h.count('E', "The spool's disk failed") == 1 }, h.texts)
			require.True(t, r.q.Stats().spoolDown)
			// Every line queued (none appended meanwhile: the runner sees
			// the disk again at the next line, after the filler is gone),
			// the unwritten ones in memory, none twice.
			waitFor(t, 10*time.Second, "every line queued", func() bool { return r.q.Backlog() == n })
			if !tc.down {
				// Published from memory while the disk fails.
				up()
				deliveredAll(t, out, n)
			}
			unfill()
			// The spool finds its disk again by itself; the next line
			// (each one a new metric, counted) sees it, and what memory
			// holds unread moves back into the spool before the I!.
			sent := n
			waitFor(t, 10*time.Second, "the disk recovery", func() bool {
				h.write(t, line("m", sent))
				sent++
				return h.count('I', "The spool's disk works again") == 1
			}, h.texts)
			moved := movedBack(t, h)
			if tc.down {
				require.Positive(t, moved, "memory moved back into the spool: %v", h.texts())
				require.EqualValues(t, sent, r.q.Backlog(), "each line once, in the spool or memory")
				up()
			}
			t.Logf("moved back into the spool: %d", moved)
			h.write(t, lines("m", sent, 1000)) // into the spool again: more than one segment
			sent += 1000
			deliveredAll(t, out, sent)
			st := r.q.Stats()
			require.False(t, st.spoolDown)
			require.EqualValues(t, 1, st.spool.DiskFailures)
			require.NoError(t, h.stdin.Close())
			require.NoError(t, h.wait(t, 10*time.Second))
			require.Equal(t, 1, h.count('E', "The spool's disk failed"), "one E! for the outage: %v", h.texts())
			require.Equal(t, 1, h.count('I', "disk works again"), "one I! for the recovery: %v", h.texts())
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
// errors=remount-ro): an outage of the disk as above (one E!, from the
// runner: the spool's own is left to it), the lines already in the spool
// are still read and published, and those the spool took but could not
// write are handed back to memory, not lost at the stop. An ext4 turned
// read-only by an error stays so until it is mounted again: no I!.
func TestReadOnlyDisk(t *testing.T) {
	disk, fail := ext4ErrorsRO(t)
	out := newTestOutput()
	out.failWrites = true
	var r *Runner
	h := start(t, out, filepath.Join(disk, "spool"), 500, 10*time.Millisecond, func(rr *Runner) {
		r = rr
		// Start with the spool: on a loaded machine opening it on the
		// loop device took longer than lockWait, and the first half went
		// to memory instead (CI, 2026-12-07).
		r.lockWait = time.Minute
	})
	const n = 4000
	h.write(t, lines("m", 0, n/2))
	waitFor(t, 10*time.Second, "the first half spooled", func() bool {
		if h.read.n.Load() != int64(len(lines("m", 0, n/2))) {
			return false
		}
		st := r.q.Stats().spool
		return st.Records == n/2 && st.UnwrittenRecords == 0
	})
	fail()
	h.write(t, lines("m", n/2, n/2))
	waitFor(t, 10*time.Second, "the disk failure", func() bool { return h.count('E', "The spool's disk failed") == 1 }, h.texts)
	out.setFailing(false)
	deliveredAll(t, out, n)
	waitFor(t, 10*time.Second, "everything released", func() bool { return r.q.Backlog() == 0 })
	st := r.q.Stats()
	require.True(t, st.spoolDown, "the disk is still read-only")
	require.EqualValues(t, 1, st.spool.DiskFailures)
	require.NoError(t, h.stdin.Close())
	require.NoError(t, h.wait(t, 10*time.Second))
	require.Equal(t, 1, h.count('E', "The spool's disk failed"), "%v", h.texts())
	require.Zero(t, h.count('I', "disk works again"), "%v", h.texts())
	require.Zero(t, h.count('E', "Closing the spool"), "nothing the spool took is lost at the stop: %v", h.texts())
	require.Zero(t, h.count('I', "Stopping with"), "nothing left to send: %v", h.texts())
}

// A spool that cannot be opened for its disk's reason (read-only) starts
// the runner with memory instead of failing, and is opened once it can be.
func TestOpenOnAFailedDiskStartsWithMemory(t *testing.T) {
	disk := tmpfs(t, "size=16m")
	remount(t, disk, "ro")
	out := newTestOutput()
	h := start(t, out, filepath.Join(disk, "spool"), 100, 10*time.Millisecond, func(r *Runner) {
		r.reopenEvery = 100 * time.Millisecond
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

// IsDiskError tells the disk's errors (the runner rides them out with
// memory) from the others (a loud error at start): the spool's, and those
// of creating its directory (hostconf.SpoolDir), which are not the spool's.
func TestIsDiskError(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		disk bool
	}{
		{"the spool's disk failure", fmt.Errorf("%w: creating the spool directory: %w", spool.ErrDiskFailed, syscall.EROFS), true},
		{"a read-only state directory", fmt.Errorf("creating private directory: %w", &os.PathError{Op: "mkdir", Path: "/x", Err: syscall.EROFS}), true},
		{"no space", fmt.Errorf("x: %w", syscall.ENOSPC), true},
		{"an I/O error", syscall.EIO, true},
		{"a quota", syscall.EDQUOT, true},
		{"a spool full (back-pressure)", spool.ErrDiskLow, false},
		{"no permission", fmt.Errorf("x: %w", syscall.EACCES), false},
		{"a bad option", errors.New("spool_max_size 1 bytes is below the minimum"), false},
		{"none", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) { require.Equal(t, tc.disk, IsDiskError(tc.err)) })
	}
}
