package spool

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"

	"github.com/telegraf-omnicore/telegraf-omnicore/internal/disktest"
)

// fill writes a file in dir until the filesystem is full, and returns a
// function that removes it.
func fill(t *testing.T, dir string) (unfill func()) {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	require.NoError(t, err)
	chunk := make([]byte, 4096)
	for {
		if _, err = f.Write(chunk); err != nil {
			break
		}
	}
	require.ErrorIs(t, err, syscall.ENOSPC)
	require.NoError(t, f.Close())
	return func() { require.NoError(t, os.Remove(path)) }
}

// ledger counts the records of a disk test: what was appended (Append
// returned nil), and what came back: read, or handed back by Unwritten.
type ledger struct {
	appended []string
	back     []string
}

// appendUntil appends up to limit records from next on, committing every
// commitEvery (never when 0: records pile up in memory until a segment is
// full), until an Append or a Commit fails, and returns that error.
func (l *ledger) appendUntil(t *testing.T, s *Spool, next *int, limit, commitEvery int) error {
	t.Helper()
	for range limit {
		p := payload(*next)
		if err := s.Append(p); err != nil {
			return err
		}
		*next++
		l.appended = append(l.appended, string(p))
		if commitEvery > 0 && *next%commitEvery == 0 {
			if err := s.Commit(); err != nil {
				return err
			}
		}
	}
	return s.Commit()
}

// readRelease reads every committed record and releases them.
func (l *ledger) readRelease(t *testing.T, s *Spool) {
	t.Helper()
	recs := readAll(t, s, 100)
	if len(recs) > 0 {
		require.NoError(t, s.Release(recs[len(recs)-1].End), "releasing works while the disk fails")
	}
	l.back = append(l.back, payloads(recs)...)
}

func (l *ledger) unwritten(s *Spool) int {
	u := s.Unwritten()
	for _, p := range u {
		l.back = append(l.back, string(p))
	}
	return len(u)
}

// TestSpoolDiskFull: the filesystem fills up under an open spool (another
// writer took the space): Append fails with ErrDiskFailed wrapping ENOSPC,
// logged once; what was committed is still read and released; the records
// held in memory are handed back by Unwritten; once space is freed the
// spool appends again, without reopening. Every record is counted.
// With QuietDisk the same happens without the spool's E! and I!: its
// caller reports the outage.
func TestSpoolDiskFull(t *testing.T) {
	for _, quiet := range []bool{false, true} {
		t.Run(fmt.Sprintf("QuietDisk=%v", quiet), func(t *testing.T) { testSpoolDiskFull(t, quiet) })
	}
}

func testSpoolDiskFull(t *testing.T, quiet bool) {
	fs := smallFilesystem(t, 1<<20)
	// The sync loop stays out of the way: the test runs its disk check.
	s, log := open(t, fs+"/s", func(o *Options) { o.MaxSize = 0; o.SyncInterval = time.Hour; o.QuietDisk = quiet })
	var l ledger
	next := 0
	require.NoError(t, l.appendUntil(t, s, &next, 1000, 10))

	unfill := fill(t, fs)
	err := l.appendUntil(t, s, &next, 100_000, 0)
	require.ErrorIs(t, err, ErrDiskFailed)
	require.ErrorIs(t, err, syscall.ENOSPC)
	require.ErrorIs(t, s.Append(payload(next)), ErrDiskFailed, "Append fails fast while the disk is failed")
	require.ErrorIs(t, s.DiskErr(), syscall.ENOSPC)
	require.EqualValues(t, 1, s.Stats().DiskFailures)
	held := s.Stats().UnwrittenRecords
	require.Positive(t, held, "records appended since the last write are held")
	l.readRelease(t, s)
	require.EqualValues(t, held, l.unwritten(s))
	require.NoError(t, s.Commit(), "nothing left to write")

	// Still full: the check finds no room and the disk stays failed.
	s.checkDisk()
	require.Error(t, s.DiskErr())
	require.ErrorIs(t, s.Append(payload(next)), ErrDiskFailed)

	unfill()
	s.checkDisk()
	require.NoError(t, s.DiskErr())
	require.NoError(t, l.appendUntil(t, s, &next, 1000, 10), "appends work again without reopening")
	l.readRelease(t, s)

	require.Equal(t, l.appended, l.back, "every record appended was read back or handed back, in order")
	require.EqualValues(t, 1, s.Stats().DiskFailures)
	logged := 1
	if quiet {
		logged = 0
	}
	require.Len(t, log.Errors(), logged, "E! for the outage: %v", log.Errors())
	require.Len(t, infos(log, "disk works again"), logged)
	require.NoError(t, s.Close())
}

func infos(log *testutil.CaptureLogger, what string) []string {
	var out []string
	for _, m := range log.Messages() {
		if m.Level == 'I' && strings.Contains(m.Text, what) {
			out = append(out, m.Text)
		}
	}
	return out
}

// TestSpoolDiskFullRecoversByItself: the sync loop finds the disk working
// again and signals Space; a backpressured Append on a filesystem nearly
// full is ErrDiskLow, an ErrFull.
func TestSpoolDiskFullRecoversByItself(t *testing.T) {
	fs := smallFilesystem(t, 1<<20)
	s, _ := open(t, fs+"/s", func(o *Options) { o.MaxSize = 0; o.SyncInterval = 5 * time.Millisecond })
	var l ledger
	next := 0
	unfill := fill(t, fs)
	err := l.appendUntil(t, s, &next, 100_000, 10)
	require.True(t, errors.Is(err, ErrDiskFailed) || errors.Is(err, ErrDiskLow), "%v", err)
	if errors.Is(err, ErrDiskLow) {
		require.ErrorIs(t, err, ErrFull)
	}
	space := s.Space()
	unfill()
	select {
	case <-space:
	case <-time.After(10 * time.Second):
		t.Fatal("no Space after the filesystem was emptied")
	}
	require.NoError(t, s.DiskErr())
	require.NoError(t, l.appendUntil(t, s, &next, 100, 10))
	l.readRelease(t, s)
	l.unwritten(s)
	require.Equal(t, l.appended, l.back)
}

// TestSpoolOpensOnFullDisk: a spool reopened on a full filesystem opens
// (it cannot start a segment, which a crash loop once came of), replays
// what it holds, and appends once releasing freed space.
func TestSpoolOpensOnFullDisk(t *testing.T) {
	fs := smallFilesystem(t, 1<<20)
	dir := fs + "/s"
	const n = 12_000 // about 540 KiB: releasing them frees more than the 256 KiB the spool keeps free
	s, _ := open(t, dir, func(o *Options) { o.MaxSize = 0; o.SegmentSize = 16 << 10 })
	appendN(t, s, 0, n)
	require.NoError(t, s.Close())
	unfill := fill(t, fs)
	defer unfill()

	s2, log := open(t, dir, func(o *Options) { o.MaxSize = 0; o.SyncInterval = time.Hour })
	require.ErrorIs(t, s2.DiskErr(), syscall.ENOSPC, "the new segment cannot be created")
	require.Contains(t, strings.Join(log.Warnings(), "\n"), "the spool holds at most")
	require.EqualValues(t, n, s2.Stats().Replayed)
	got := readAll(t, s2, 500)
	require.Equal(t, want(0, n), payloads(got))
	require.ErrorIs(t, s2.Append(payload(n)), ErrDiskFailed)
	require.NoError(t, s2.Release(got[len(got)-1].End))

	// Releasing deleted the old segments: there is room again.
	s2.checkDisk()
	require.NoError(t, s2.DiskErr())
	appendN(t, s2, n, 10)
	require.Equal(t, want(n, 10), payloads(readAll(t, s2, 100)))
}

// TestSpoolReadOnlyDisk: the filesystem turns read-only under an open
// spool (ext4 errors=remount-ro after a disk error): Append fails with
// ErrDiskFailed wrapping EROFS; committed records are still read and
// released; Close returns at once; the spool reopens on the read-only
// filesystem and replays; after a remount, nothing appended was lost.
func TestSpoolReadOnlyDisk(t *testing.T) {
	fs, failRO, remount := readOnlyFilesystem(t, 16<<20)
	dir := fs + "/s"
	s, log := open(t, dir, func(o *Options) { o.MaxSize = 0; o.SegmentSize = 16 << 10; o.SyncInterval = time.Hour })
	var l ledger
	next := 0
	require.NoError(t, l.appendUntil(t, s, &next, 1000, 10))
	recs, err := s.Read(400)
	require.NoError(t, err)
	require.NoError(t, s.Release(recs[399].End))
	require.NoError(t, s.flush(true)) // the release is on disk

	failRO()
	err = l.appendUntil(t, s, &next, 100_000, 10)
	require.ErrorIs(t, err, ErrDiskFailed)
	require.ErrorIs(t, err, syscall.EROFS)
	// Committed records stay readable and releasable.
	more := readAll(t, s, 100)
	require.NotEmpty(t, more)
	require.NoError(t, s.Release(more[len(more)-1].End))
	unwritten := l.unwritten(s)
	start := time.Now()
	require.NoError(t, s.Close(), "nothing was left unwritten")
	require.Less(t, time.Since(start), time.Second, "Close does not wait on the disk")
	require.Len(t, log.Errors(), 1, "one E! for the outage: %v", log.Errors())

	// Reopened on the read-only filesystem: what was not released before
	// it failed replays (what was released since could not be recorded:
	// sent again, at least once).
	s2, _ := open(t, dir, func(o *Options) { o.MaxSize = 0; o.SegmentSize = 16 << 10 })
	require.ErrorIs(t, s2.DiskErr(), syscall.EROFS)
	replayed := payloads(readAll(t, s2, 100))
	written := l.appended[:len(l.appended)-unwritten]
	require.Equal(t, written[400:], replayed, "everything written and not released before the failure replays")
	require.NoError(t, s2.Close())

	// After a remount: the journal the failure aborted may have lost the
	// last cursor (never fsync'ed, by design): more may replay, never less.
	remount()
	s3, _ := open(t, dir, func(o *Options) { o.MaxSize = 0; o.SegmentSize = 16 << 10 })
	require.NoError(t, s3.DiskErr())
	again := payloads(readAll(t, s3, 100))
	require.GreaterOrEqual(t, len(again), len(written)-400)
	require.Equal(t, written[len(written)-len(again):], again, "what replays is the written tail, in order")
	appendN(t, s3, next, 10)
	require.Equal(t, want(next, 10), payloads(readAll(t, s3, 100)))
}

// TestSpoolOpenNew: a new spool on a full filesystem opens with its disk
// failed and appends once there is room; one that cannot be created (a
// read-only filesystem) fails Open with ErrDiskFailed wrapping EROFS, an
// outage of the disk the caller can tell from a bad option.
func TestSpoolOpenNew(t *testing.T) {
	t.Run("full", func(t *testing.T) {
		fs := smallFilesystem(t, 1<<20)
		unfill := fill(t, fs)
		s, _ := open(t, fs+"/s", func(o *Options) { o.MaxSize = 0; o.SyncInterval = time.Hour })
		require.ErrorIs(t, s.DiskErr(), syscall.ENOSPC)
		require.ErrorIs(t, s.Append(payload(0)), ErrDiskFailed)
		require.EqualValues(t, MinMaxSize, s.Stats().MaxSize, "capped at Open by a full disk")
		unfill()
		s.checkDisk()
		require.Greater(t, s.Stats().MaxSize, int64(512<<10), "the cap grows with the room")
		appendN(t, s, 0, 10_000)
		require.Equal(t, want(0, 10_000), payloads(readAll(t, s, 1000)))
	})
	t.Run("read-only", func(t *testing.T) {
		fs, failRO, _ := readOnlyFilesystem(t, 8<<20)
		failRO()
		_, err := Open(context.Background(), Options{Dir: fs + "/s", Log: &testutil.CaptureLogger{}})
		require.ErrorIs(t, err, ErrDiskFailed)
		require.ErrorIs(t, err, syscall.EROFS)
	})
}

// TestSpoolInodesFullIsOneOutage: another program takes every inode of the
// spool's filesystem while bytes stay free, and the bridge keeps
// acknowledging: each released segment the spool deletes frees an inode
// that the next segment takes at once, so a check of the free bytes alone
// saw the disk working again and failing again at every segment (an E!
// and an I! per segment). It is one outage: one E!, no I! until inodes
// are free again, then one I!; every record read back or handed back.
func TestSpoolInodesFullIsOneOutage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	fs := t.TempDir()
	if err := syscall.Mount("tmpfs", fs, "tmpfs", 0, "size=4m,nr_inodes=64,mode=0700"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { require.NoError(t, syscall.Unmount(fs, syscall.MNT_DETACH)) })
	s, log := open(t, fs+"/s", func(o *Options) { o.SegmentSize = 4 << 10; o.SyncInterval = time.Hour })
	var l ledger
	next := 0
	require.NoError(t, l.appendUntil(t, s, &next, 500, 10))
	unfill := disktest.FillInodes(t, fs)
	failed := 0
	for range 30 { // the bridge acknowledges: read, release, check, append
		if err := l.appendUntil(t, s, &next, 200, 10); err != nil {
			require.ErrorIs(t, err, ErrDiskFailed)
			failed++
		}
		l.readRelease(t, s)
		l.unwritten(s)
		s.checkDisk()
	}
	require.Positive(t, failed, "the inode-full disk failed the spool")
	require.Len(t, log.Errors(), 1, "one E! for the outage: %v", log.Errors())
	require.Empty(t, infos(log, "disk works again"), "no recovery while no inode is free")

	unfill()
	s.checkDisk()
	require.NoError(t, s.DiskErr())
	require.NoError(t, l.appendUntil(t, s, &next, 500, 10))
	l.readRelease(t, s)
	l.unwritten(s)
	require.Equal(t, l.appended, l.back, "every record appended was read back or handed back, in order")
	require.Len(t, infos(log, "disk works again"), 1)
	require.EqualValues(t, 1, s.Stats().DiskFailures)
	require.NoError(t, s.Close())
}
