package spool

import (
	"errors"
	"fmt"
	"math"
	"syscall"
)

// The spool's side of its filesystem: the free space that caps it, and the
// disk failures it rides out.

// freeSpace is what the filesystem of dir has free for this user.
func freeSpace(dir string) (int64, error) {
	avail, _, err := freeSpaceAndInodes(dir)
	return avail, err
}

// minFreeInodes is how many free inodes, beyond those the spool freed
// itself since its disk failed, the disk needs before the spool tries it
// again: a new segment and the cursor's temporary file. Counting the
// spool's own (each released segment it deletes frees an inode that the
// next segment takes at once) made an inode-full disk seem to work and
// fail again at every segment: an E! and an I! each time.
const minFreeInodes = 2

// freeSpaceAndInodes is the free bytes and inodes of the filesystem of dir
// for this user; inodes is -1 when the filesystem does not count them.
func freeSpaceAndInodes(dir string) (avail, inodes int64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, 0, err
	}
	avail = int64(st.Bavail) * int64(st.Bsize) //nolint:unconvert // the field types differ between systems
	inodes = -1
	if st.Files > 0 {
		inodes = int64(st.Ffree) //nolint:unconvert // the field types differ between systems
	}
	return avail, inodes, nil
}

// capToDisk caps the effective MaxSize by what the filesystem can take at
// Open (with a warning), and derives the segment size from it.
func (s *Spool) capToDisk() {
	s.maxSize = s.opts.MaxSize
	s.diskLimit = math.MaxInt64
	if avail, err := freeSpace(s.opts.Dir); err == nil {
		s.diskLimit = s.onDiskLocked() + avail - diskReserve
		if s.diskLimit < s.maxSize {
			s.maxSize = max(s.diskLimit, MinMaxSize)
			s.opts.Log.Warnf("spool_max_size is %d bytes but the spool's filesystem has only %d bytes free (%d bytes already spooled, %d kept free): "+
				"the spool holds at most %d bytes (%.1f MiB) in this run",
				s.opts.MaxSize, avail, s.onDiskLocked(), diskReserve, s.maxSize, float64(s.maxSize)/(1<<20))
		}
	}
	s.sizeSegments()
}

// sizeSegments derives the segment size from the effective MaxSize.
func (s *Spool) sizeSegments() {
	s.segSize = min(max(s.maxSize/8, minSegmentSize), maxSegmentSize)
	if s.opts.SegmentSize > 0 {
		s.segSize = min(s.opts.SegmentSize, s.maxSize/4)
	}
}

// onDiskLocked is the bytes of the spool's segments on the disk.
func (s *Spool) onDiskLocked() int64 { return s.total - int64(len(s.wbuf)) }

// limitLocked is what the spool's bytes may reach now: the effective
// MaxSize, or less when the filesystem is nearly full.
func (s *Spool) limitLocked() int64 { return min(s.maxSize, s.diskLimit) }

// diskFailedLocked records a failure of the disk under the spool and
// returns the error to give: ErrDiskFailed wrapping op and the cause. The
// first failure of an outage is logged at E!, once (unless QuietDisk). The
// caller holds mu.
func (s *Spool) diskFailedLocked(op string, err error) error {
	e := fmt.Errorf("%w: %s: %w", ErrDiskFailed, op, err)
	if s.diskErr == nil && !s.probing {
		s.freedInodes = 0
		s.stats.DiskFailures++
		if !s.opts.QuietDisk {
			s.opts.Log.Errorf("The spool's disk failed (%s: %v): new metrics are not spooled until it works again (tried every %s); "+
				"the metrics already spooled are still sent", op, err, s.retryInterval())
		}
	}
	s.diskErr = e
	return e
}

func (s *Spool) diskFailed(op string, err error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.diskFailedLocked(op, err)
}

func (s *Spool) retryInterval() string {
	if s.opts.SyncInterval > 0 {
		return s.opts.SyncInterval.String()
	}
	return cursorPersistInterval.String()
}

// openErr is the error of an Open that failed at op: it wraps ErrDiskFailed
// too when the cause is the disk's (full, read-only, I/O error, quota), so
// that the caller can tell a disk outage from a misconfiguration.
func openErr(op string, err error) error {
	if isDiskCause(err) {
		return fmt.Errorf("%w: %s: %w", ErrDiskFailed, op, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// IsDiskFailure reports whether err is a failure of the disk: an error of
// the spool wrapping ErrDiskFailed, or, from whatever else writes next to
// it (the spool's parent directories), no space, a read-only filesystem,
// an I/O error or an exceeded quota.
func IsDiskFailure(err error) bool { return errors.Is(err, ErrDiskFailed) || isDiskCause(err) }

func isDiskCause(err error) bool {
	for _, disk := range []error{syscall.ENOSPC, syscall.EROFS, syscall.EIO, syscall.EDQUOT} {
		if errors.Is(err, disk) {
			return true
		}
	}
	return false
}

// DiskErr returns the disk failure in progress, wrapping ErrDiskFailed and
// its cause; nil when the disk works.
func (s *Spool) DiskErr() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.diskErr
}

// Unwritten takes the records appended but not written because the disk
// failed: it returns their payloads in append order and removes them from
// the spool, for the caller to deliver another way (or count as lost). It
// returns nil while the disk works (appended records are then written at
// the next Commit).
func (s *Spool) Unwritten() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.diskErr == nil || s.wrecords == 0 {
		return nil
	}
	out := make([][]byte, 0, s.wrecords)
	for off := 0; off < len(s.wbuf); {
		p, _, size, err := decodeRecord(s.wbuf[off:])
		if err != nil {
			break // cannot happen: wbuf holds what appendRecord framed
		}
		out = append(out, append([]byte(nil), p...))
		off += size
	}
	s.total -= int64(len(s.wbuf))
	s.wbuf = s.wbuf[:0]
	s.wrecords = 0
	return out
}

// checkDisk refreshes the free space of the filesystem and, while the disk
// is failed, tries it again: the held records written, the active segment
// created, the released segments deleted, the cursor written. When that
// all works and the filesystem has room, the disk is back: logged once at
// I! (unless QuietDisk), the effective MaxSize raised to what the
// filesystem now allows (when Open capped it lower), and Space is
// signalled.
func (s *Spool) checkDisk() {
	avail, inodes, statErr := freeSpaceAndInodes(s.opts.Dir)
	s.mu.Lock()
	defer s.mu.Unlock()
	if statErr == nil {
		before := s.diskLimit
		s.diskLimit = s.onDiskLocked() + avail - diskReserve
		if s.fullWait && s.diskLimit > before {
			s.signalSpaceLocked()
		}
	}
	if s.diskErr == nil || statErr != nil || avail < diskReserve || (inodes >= 0 && inodes < s.freedInodes+minFreeInodes) {
		return
	}
	failed, freed := s.diskErr, s.freedInodes
	s.diskErr, s.freedInodes = nil, 0
	s.probing = true
	err := s.probeLocked()
	s.probing = false
	if err != nil {
		s.diskErr, s.freedInodes = failed, freed
		return
	}
	// A cap taken at Open on a disk that was full grows with the room.
	if m := min(s.opts.MaxSize, s.diskLimit); m > s.maxSize {
		s.maxSize = m
		s.sizeSegments()
	}
	if !s.opts.QuietDisk {
		s.opts.Log.Infof("The spool's disk works again: spooling new metrics again (%d bytes free; the spool holds at most %d bytes)", avail, s.maxSize)
	}
	s.signalSpaceLocked()
}

// probeLocked does what a failed disk refused, failing at the first error.
func (s *Spool) probeLocked() error {
	act := s.segs[len(s.segs)-1]
	if s.active == nil {
		f, err := createSegment(s.opts.Dir, act.seq)
		if err != nil {
			return err
		}
		s.active = f
	}
	if err := s.writeLocked(); err != nil {
		return err
	}
	if err := s.active.Sync(); err != nil {
		return err
	}
	if s.deleteReleasedLocked() {
		s.signalSpaceLocked()
	}
	if s.diskErr != nil {
		return s.diskErr
	}
	if err := s.writeCursor(s.released); err != nil {
		return err
	}
	return fsyncDir(s.opts.Dir)
}
