// Package spool is a durable, bounded, append-only queue of records on disk:
// the store and forward of the execd output. Records are appended in order,
// read back in the same order from a read cursor, and released up to a
// position once they were delivered. The release position is persisted, so a
// new process reads again exactly the records that were not released: delivery
// through a spool is at least once.
//
// On disk a spool is a private directory (0700, checked, never re-moded) with:
//
//   - segment files NNNNNNNNNNNNNNNNNNNN.seg, append-only, each a header and
//     records framed with their length and a CRC-32C (see format.go); a
//     segment is deleted once every record in it is released;
//   - cursor, the release position (segment and offset) with its own CRC;
//   - lock, flock'ed by the process that owns the spool, so that two
//     processes never replay one spool twice: Open waits for the lock.
//
// Appended records become visible to the reader at Commit, and are fsync'ed
// at least every SyncInterval (0: at every Commit). The spool holds at most
// MaxSize bytes of segments, capped at Open by what its filesystem has free
// (with a warning) and checked against the free space as it grows; when a
// record does not fit, Append returns ErrFull (ErrDiskLow when it is the
// filesystem that is full; back-pressure: the caller waits for Space) or,
// with DropOldest, deletes the oldest segment and counts the records it
// drops.
//
// Disk use follows the backlog: segments are small (at most 4 MiB), a
// segment whose records are all released is deleted at once, and the active
// segment is sealed early once everything in it is released, so with the
// reader keeping up the spool holds little more than what is unreleased.
//
// A disk that fails (full, read-only, I/O errors) is an outage of the disk,
// not of the spool: the failing Append, Commit or segment start returns an
// error wrapping ErrDiskFailed and the cause, logged once at E!; Append and
// Commit then fail fast while Read and Release go on with what was written;
// the records appended but not written are handed back by Unwritten; the
// spool retries the disk every SyncInterval (100 ms when 0) and logs one I!
// when it works again, after which Append works again without reopening.
// Open on such a disk reads the old segments and opens in that state
// instead of failing; an Open that fails because of the disk (a new spool
// on a read-only filesystem) returns an error wrapping ErrDiskFailed.
//
// Damage found at Open: a torn last record (an append interrupted by a power
// cut: the file ends inside the record, or zeros follow) is truncated with a
// warning giving the bytes dropped; a segment damaged anywhere else, or a
// bad record in the last segment with valid records after it, is renamed
// aside (.corrupt) and rewritten with its intact records (their CRCs show
// them so), those before the damage and those after it, with an error
// counting the damaged stretches as lost metrics; the segments after it
// replay. A segment found empty before the last one lost its records: a
// warning says so, with their number estimated from the other segments.
package spool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

// FullPolicy is what Append does when a record does not fit in MaxSize.
type FullPolicy string

const (
	// Backpressure refuses the record with ErrFull; the caller stops taking
	// input until Space.
	Backpressure FullPolicy = "backpressure"
	// DropOldest deletes the oldest segment, counting its unread records
	// as dropped.
	DropOldest FullPolicy = "drop_oldest"
)

// Defaults of Options.
const (
	DefaultMaxSize      = 1 << 30
	DefaultSyncInterval = 100 * time.Millisecond
	// MinMaxSize is the smallest MaxSize: a few segments of a few KiB.
	MinMaxSize = 16 << 10
	// maxSegmentSize caps a segment, which is also what one damaged byte
	// can cost at most, and what the spool may hold beyond its backlog.
	maxSegmentSize = 4 << 20
	// minSegmentSize is the smallest segment a small effective MaxSize
	// gives.
	minSegmentSize = 4 << 10
	// diskReserve is what the spool leaves free on its filesystem: room
	// for the cursor, a segment's header, the filesystem's block rounding
	// and what is written between two checks of the free space.
	diskReserve = 256 << 10
	// writeBuffer is how many appended bytes are held in memory before
	// they are written to the segment even without a Commit.
	writeBuffer = 256 << 10
	// readChunk is how much the reader reads from a segment at once.
	readChunk = 256 << 10
	// cursorPersistInterval is how often a changed release position is
	// written when SyncInterval is 0.
	cursorPersistInterval = 100 * time.Millisecond
)

// Options configure Open.
type Options struct {
	// Dir is the spool directory; it is created (0700) when missing and
	// must otherwise be owned by this user with no group or other access.
	Dir string
	// MaxSize bounds the bytes of all segments (DefaultMaxSize when 0).
	MaxSize int64
	// SyncInterval is the longest time between an Append and the fsync
	// that makes it durable; 0 fsyncs at every Commit.
	SyncInterval time.Duration
	// Full is the policy when full (Backpressure when "").
	Full FullPolicy
	// SegmentSize is the size at which a segment is sealed and the next
	// one started (0: the effective MaxSize/8, at most 4 MiB).
	SegmentSize int64
	// Log gets the damage reports and the lock wait.
	Log telegraf.Logger
	// QuietDisk leaves the disk's failures and recoveries to the caller to
	// report: the spool does not log them (the E! when the disk fails, the
	// I! when it works again), and counts them in Stats all the same. For
	// a caller that holds what the spool cannot take, and says so in its
	// own lines: one E! and one I! per outage of the disk, not two.
	QuietDisk bool
}

// Errors of Append.
var (
	// ErrFull means the record does not fit (Backpressure): wait for Space
	// and append it again.
	ErrFull = errors.New("spool full")
	// ErrTooLarge means the record can never fit in the spool.
	ErrTooLarge = errors.New("record larger than the spool can hold")
	// ErrClosed means the spool was closed.
	ErrClosed = errors.New("spool closed")
	// ErrDiskLow means the record does not fit because the spool's
	// filesystem is nearly full (less than 256 KiB would be left), though
	// MaxSize is not reached. It is an ErrFull (errors.Is(err, ErrFull)):
	// the same back-pressure or dropping applies, and Space is signalled
	// when space is released or the filesystem gains free space.
	ErrDiskLow = fmt.Errorf("%w: its filesystem is nearly full", ErrFull)
	// ErrDiskFailed means the disk failed under the spool: a write,
	// fsync, file creation or removal failed (ENOSPC, EROFS, EIO, ...).
	// Errors wrapping it also wrap the cause. The record was not appended;
	// what was committed before stays readable and releasable; Append and
	// Commit fail fast with it until the spool found the disk working
	// again (DiskErr returns nil again).
	ErrDiskFailed = errors.New("spool disk failed")
)

// Position is a place in the spool: the end of a record, as returned with
// it by Read and passed to Release.
type Position struct {
	Seq   uint64 // segment
	Off   int64  // byte offset in the segment
	Index int    // records before Off in the segment
}

func (p Position) before(q Position) bool {
	return p.Seq < q.Seq || (p.Seq == q.Seq && p.Off < q.Off)
}

// Record is one record read from the spool.
type Record struct {
	Payload  []byte
	Appended time.Time
	End      Position // release up to here once the record is delivered
}

// Stats are the spool's figures.
type Stats struct {
	Bytes           int64         // bytes of the segments on disk, plus appends not yet written
	Records         int64         // records not yet released
	Segments        int           // segment files
	OldestAge       time.Duration // age of the oldest record not released (0 when none)
	Replayed        int64         // records found not released at Open
	TruncatedBytes  int64         // bytes of torn records truncated at Open
	DroppedFull     int64         // records dropped by DropOldest
	CorruptSegments int64         // segments found damaged and set aside
	// MaxSize is the effective MaxSize: the configured one, or less when
	// the filesystem had less free space at Open.
	MaxSize int64
	// LostRecords are records found lost at Open: in a segment found
	// empty before the last one (estimated from the other segments), or
	// damaged (one per damaged stretch of a segment; the intact records
	// around it replay).
	LostRecords int64
	// DiskFailures counts the disk failures (each logged once at E!).
	DiskFailures int64
	// UnwrittenRecords are records appended but not written to the disk
	// because it failed: take them with Unwritten.
	UnwrittenRecords int64
}

type segment struct {
	seq     uint64
	size    int64 // bytes written to the file (what the reader may read)
	records int   // records in those bytes
	firstMs int64 // append time of its first record
}

// Spool is an open spool. Append and Commit are for one writer goroutine,
// Read for one reader goroutine; Release, Stats and Space may be called from
// any goroutine.
type Spool struct {
	opts    Options
	segSize int64
	lock    *os.File

	mu      sync.Mutex
	segs    []*segment // in order; the last is the active one, being appended to
	active  *os.File   // write handle of the active segment; nil while its file could not be created
	maxSize int64      // the effective MaxSize
	// diskLimit is what the spool's bytes may reach before the filesystem
	// is left with less than diskReserve free, as of the last check.
	diskLimit int64
	diskErr   error // the disk failure in progress (nil: none)
	// freedInodes counts the segment files deleted during the disk
	// failure in progress: inodes the spool freed itself, not a sign that
	// the disk has room again (see minFreeInodes).
	freedInodes int64
	activeTail  bool   // a failed write left bytes after the active segment's size
	probing     bool   // checkDisk is trying a failed disk: failures are not logged again
	fullWait    bool   // an Append returned ErrFull since the last signal of Space
	wbuf        []byte // appended bytes not yet written to active
	wrecords    int    // records in wbuf
	wfirstMs    int64  // append time of wbuf's first record
	total       int64  // bytes of all segments plus wbuf
	released    Position
	read        Position
	unsynced    bool // bytes written to active since its last fsync
	dirDirty    bool // entries created or removed since the directory's last fsync
	cursorAt    Position
	ready       chan struct{} // closed at the next Commit that adds records
	space       chan struct{} // closed at the next release of space
	closed      bool
	stats       Stats

	rmu  sync.Mutex // the reader's state below
	rseq uint64
	rf   *os.File
	rbuf []byte
	roff int64 // segment offset of rbuf[0]

	stop chan struct{}
	done chan struct{}
}

// Open opens (or creates) the spool in opts.Dir, waiting for the lock while
// another process holds it (until ctx is done), and checks every segment as
// the package comment says.
func Open(ctx context.Context, opts Options) (*Spool, error) {
	if opts.Dir == "" {
		return nil, errors.New("spool: no directory")
	}
	if opts.MaxSize == 0 {
		opts.MaxSize = DefaultMaxSize
	}
	if opts.MaxSize < MinMaxSize {
		return nil, fmt.Errorf("spool_max_size %d bytes is below the minimum of %d", opts.MaxSize, MinMaxSize)
	}
	if opts.SyncInterval < 0 {
		return nil, fmt.Errorf("spool_sync_interval %s must not be negative", opts.SyncInterval)
	}
	switch opts.Full {
	case "":
		opts.Full = Backpressure
	case Backpressure, DropOldest:
	default:
		return nil, fmt.Errorf("spool_full %q must be %q or %q", opts.Full, Backpressure, DropOldest)
	}
	if opts.Log == nil {
		return nil, errors.New("spool: no logger")
	}
	s := &Spool{opts: opts}
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return nil, openErr("creating the spool directory", err)
	}
	if err := statedir.CheckPrivate(opts.Dir); err != nil {
		return nil, fmt.Errorf("spool directory: %w", err)
	}
	lock, err := acquireLock(ctx, filepath.Join(opts.Dir, "lock"), opts.Log)
	if err != nil {
		return nil, err
	}
	s.lock = lock
	s.ready = make(chan struct{})
	s.space = make(chan struct{})
	if err := s.recover(); err != nil {
		s.closeFiles()
		return nil, err
	}
	s.stop = make(chan struct{})
	s.done = make(chan struct{})
	go s.syncLoop()
	return s, nil
}

// acquireLock takes the exclusive flock of path, waiting while another
// process holds it. The holder's process ID is in the file, for the message.
func acquireLock(ctx context.Context, path string, log telegraf.Logger) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if errors.Is(err, syscall.EROFS) {
		// A read-only filesystem: the spool still replays what it holds,
		// and flock works on a file opened for reading.
		f, err = os.Open(path)
	}
	if err != nil {
		return nil, openErr("opening the spool lock", err)
	}
	warned := false
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("locking the spool: %w", err)
		}
		if !warned {
			holder, _ := os.ReadFile(path)
			log.Warnf("Spool %s is locked by another process (pid %s), likely a previous instance still stopping: waiting for it to exit before replaying. "+
				"If two outputs of the same gateway run at once, give them different aliases or spool_dir",
				filepath.Dir(path), strings.TrimSpace(string(holder)))
			warned = true
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for the spool lock: %w", ctx.Err())
		}
	}
	if warned {
		log.Info("Spool lock acquired")
	}
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return f, nil
}

func segmentName(seq uint64) string { return fmt.Sprintf("%020d.seg", seq) }

// recover reads the cursor and every segment, repairs what is damaged, caps
// MaxSize by the free space and starts a new active segment. A disk that
// fails meanwhile (a repair, a removal or the new segment) does not fail
// it: the spool opens with the disk failed, replaying what it could read.
func (s *Spool) recover() error {
	dir := s.opts.Dir
	cursor, cursorOK := s.readCursor()
	entries, err := os.ReadDir(dir)
	if err != nil {
		return openErr("reading the spool directory", err)
	}
	var seqs []uint64
	for _, e := range entries {
		name := e.Name()
		if strings.HasSuffix(name, ".tmp") {
			_ = os.Remove(filepath.Join(dir, name)) // an unfinished rewrite
			continue
		}
		num, ok := strings.CutSuffix(name, ".seg")
		if !ok {
			continue
		}
		seq, err := strconv.ParseUint(num, 10, 64)
		if err != nil || e.Type()&fs.ModeType != 0 {
			s.opts.Log.Warnf("Ignoring %s in the spool directory: not a segment file", name)
			continue
		}
		seqs = append(seqs, seq)
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })

	var lastSeq uint64
	if len(seqs) > 0 {
		lastSeq = seqs[len(seqs)-1]
	}
	var emptied []uint64 // segments before the last found empty: their records are lost
	for i, seq := range seqs {
		path := filepath.Join(dir, segmentName(seq))
		if cursorOK && seq < cursor.Seq {
			// Released before the last stop: only its deletion was lost.
			if err := os.Remove(path); err != nil {
				s.diskFailedLocked("removing a released spool segment", err)
			}
			continue
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return openErr("reading spool segment", err)
		}
		last := i == len(seqs)-1
		if !last && len(data) < headerSize {
			emptied = append(emptied, seq)
		}
		var released *int64
		if cursorOK && seq == cursor.Seq {
			released = &cursor.Off
		}
		seg := s.checkSegment(path, seq, data, last, released)
		if seg == nil {
			continue
		}
		s.segs = append(s.segs, seg)
		s.total += seg.size
	}
	s.reportEmptied(emptied)

	// The release position: the cursor when its segment is still there,
	// else the start of the first segment (everything there is unreleased).
	if len(s.segs) > 0 {
		s.released = Position{Seq: s.segs[0].seq, Off: int64(headerSize)}
		if cursorOK && cursor.Seq == s.segs[0].seq {
			data, err := os.ReadFile(filepath.Join(dir, segmentName(cursor.Seq)))
			if err != nil {
				return openErr("reading spool segment", err)
			}
			s.released = boundaryAt(data[:min(s.segs[0].size, int64(len(data)))], cursor.Seq, cursor.Off)
		}
	}
	s.read = s.released
	for _, seg := range s.segs {
		s.stats.Replayed += int64(seg.records)
	}
	s.stats.Replayed -= int64(s.released.Index)
	s.capToDisk()

	// A new active segment after everything, and after the cursor. When
	// its file cannot be created, it is created at the first write.
	next := max(lastSeq, cursor.Seq) + 1
	s.segs = append(s.segs, &segment{seq: next, size: int64(headerSize)})
	s.total += int64(headerSize)
	if f, err := createSegment(dir, next); err != nil {
		s.diskFailedLocked("starting a spool segment", err)
	} else {
		s.active = f
		s.unsynced = true
		s.dirDirty = true
	}
	if len(s.segs) == 1 {
		s.released = Position{Seq: next, Off: int64(headerSize)}
		s.read = s.released
	}
	s.deleteReleasedLocked()
	s.cursorAt = Position{Seq: ^uint64(0)} // unknown: written at the first persist
	if err := s.syncDir(); err != nil {
		s.diskFailedLocked("fsync of the spool directory", err)
	}
	return nil
}

// writeFileSync writes data to path through a temporary file, fsync'ed
// before it is renamed into place.
func writeFileSync(path string, data []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

// createSegment creates the file of segment seq with its header, open for
// appending. A file left by an earlier failed attempt is overwritten: seq
// is after every segment holding records.
func createSegment(dir string, seq uint64) (*os.File, error) {
	path := filepath.Join(dir, segmentName(seq))
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := f.Write([]byte(segmentMagic)); err != nil {
		f.Close()
		_ = os.Remove(path)
		return nil, err
	}
	return f, nil
}

const cursorSize = 20

// readCursor reads the persisted release position; ok is false when there
// is none or it is damaged (then every segment replays).
func (s *Spool) readCursor() (Position, bool) {
	b, err := os.ReadFile(filepath.Join(s.opts.Dir, "cursor"))
	if errors.Is(err, fs.ErrNotExist) {
		return Position{}, false
	}
	var p Position
	ok := false
	if err == nil {
		p, ok = decodeCursor(b)
	}
	if !ok {
		s.opts.Log.Warnf("The spool's release cursor is damaged or unreadable: replaying every segment (metrics already delivered may be sent again)")
	}
	return p, ok
}

// persistCursor writes the release position when it changed (or always). A cursor that
// is older than the truth only replays records again (duplicates), never
// loses any, so it is renamed into place without an fsync of its own.
func (s *Spool) persistCursor(always bool) error {
	s.mu.Lock()
	p := s.released
	s.mu.Unlock()
	if p == s.cursorAt && !always {
		return nil
	}
	if err := s.writeCursor(p); err != nil {
		return err
	}
	s.cursorAt = p
	return nil
}

// writeCursor writes the release position p to the cursor file.
func (s *Spool) writeCursor(p Position) error {
	var b [cursorSize]byte
	binary.LittleEndian.PutUint64(b[0:8], p.Seq)
	binary.LittleEndian.PutUint64(b[8:16], uint64(p.Off))
	binary.LittleEndian.PutUint32(b[16:], crc32.Checksum(b[:16], castagnoli))
	path := filepath.Join(s.opts.Dir, "cursor")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b[:], 0o600); err != nil {
		_ = os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, path)
}

// Append adds one record. It is held in memory until Commit (or until
// enough bytes are appended) and is durable after the next fsync. When it
// returns an error, the record was not appended.
func (s *Spool) Append(payload []byte) error {
	size := int64(recordHeader + len(payload))
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if len(payload) > MaxRecord || size > s.maxSize-s.segSize-int64(headerSize) {
		return fmt.Errorf("%w: %d bytes", ErrTooLarge, len(payload))
	}
	if s.diskErr != nil {
		return s.diskErr
	}
	act := s.segs[len(s.segs)-1]
	written := act.size + int64(len(s.wbuf))
	if (written+size > s.segSize || s.idleLocked()) && written > int64(headerSize) {
		// Sealed first, so that a full spool can always free the segment
		// the record does not fit in.
		if err := s.rotateLocked(); err != nil {
			return err
		}
	}
	for s.total+size > s.limitLocked() {
		if act := s.segs[len(s.segs)-1]; len(s.wbuf) == 0 && act.size > int64(headerSize) &&
			!s.released.before(Position{Seq: act.seq, Off: act.size}) {
			// All of it is released: a new segment frees it.
			if err := s.rotateLocked(); err != nil {
				return err
			}
			continue
		}
		if s.opts.Full == Backpressure || len(s.segs) < 2 {
			if err := s.writeLocked(); err != nil {
				return err
			}
			if s.total+size <= s.limitLocked() {
				break // the filesystem had more room than last seen
			}
			s.fullWait = true
			if s.diskLimit < s.maxSize {
				return ErrDiskLow
			}
			return ErrFull
		}
		if err := s.dropOldestLocked(); err != nil {
			return err
		}
	}
	if len(s.wbuf) > 0 && int64(len(s.wbuf))+size > writeBuffer {
		if err := s.writeLocked(); err != nil {
			return err
		}
	}
	ms := time.Now().UnixMilli()
	if s.wrecords == 0 {
		s.wfirstMs = ms
	}
	s.wbuf = appendRecord(s.wbuf, ms, payload)
	s.wrecords++
	s.total += size
	return nil
}

// idleLocked reports whether every record of the active segment is
// written and released, and the segment is big enough that sealing it
// early (and deleting it) is worth a new file: with the reader keeping up,
// the spool's footprint then stays near what is not released.
func (s *Spool) idleLocked() bool {
	act := s.segs[len(s.segs)-1]
	return len(s.wbuf) == 0 && act.size >= s.segSize/4 && !s.released.before(Position{Seq: act.seq, Off: act.size})
}

// writeLocked writes wbuf to the active segment and wakes the reader. On
// failure wbuf is kept, and the disk failed.
func (s *Spool) writeLocked() error {
	if len(s.wbuf) == 0 {
		return nil
	}
	act := s.segs[len(s.segs)-1]
	if s.active == nil {
		f, err := createSegment(s.opts.Dir, act.seq)
		if err != nil {
			return s.diskFailedLocked("starting a spool segment", err)
		}
		s.active = f
		s.dirDirty = true
	}
	if s.activeTail {
		if err := s.active.Truncate(act.size); err != nil {
			return s.diskFailedLocked("truncating the spool segment after a failed write", err)
		}
		s.activeTail = false
	}
	n, err := s.active.Write(s.wbuf)
	if err != nil {
		// Keep the file at a record boundary: what was written of wbuf is
		// cut off again (at the next write when the disk refuses it now),
		// and wbuf stays for the next attempt.
		if n > 0 {
			s.activeTail = s.active.Truncate(act.size) != nil
		}
		return s.diskFailedLocked("writing the spool", err)
	}
	if act.records == 0 {
		act.firstMs = s.wfirstMs
	}
	act.size += int64(len(s.wbuf))
	act.records += s.wrecords
	s.wbuf = s.wbuf[:0]
	s.wrecords = 0
	s.unsynced = true
	close(s.ready)
	s.ready = make(chan struct{})
	return nil
}

// rotateLocked seals the active segment (written and fsync'ed) and starts
// the next; segments fully released are deleted. When the next cannot be
// started, the active one stays.
func (s *Spool) rotateLocked() error {
	if err := s.writeLocked(); err != nil {
		return err
	}
	act := s.segs[len(s.segs)-1]
	released := !s.released.before(Position{Seq: act.seq, Off: act.size})
	if s.active != nil {
		// Even when all of it is released: its deletion may not survive a
		// power cut, and a sealed segment found empty at the next start
		// would be reported as lost.
		if err := s.active.Sync(); err != nil {
			return s.diskFailedLocked("sealing a spool segment", err)
		}
	}
	f, err := createSegment(s.opts.Dir, act.seq+1)
	if err != nil {
		return s.diskFailedLocked("starting a spool segment", err)
	}
	if s.active != nil {
		s.active.Close()
	}
	s.active = f
	s.segs = append(s.segs, &segment{seq: act.seq + 1, size: int64(headerSize)})
	s.total += int64(headerSize)
	s.unsynced = true
	s.dirDirty = true
	if released {
		s.released = Position{Seq: act.seq + 1, Off: int64(headerSize)}
		if s.read.before(s.released) {
			s.read = s.released
		}
	}
	s.deleteReleasedLocked()
	return nil
}

// dropOldestLocked deletes the oldest segment (never the active one),
// counting its records that were not read yet as dropped.
func (s *Spool) dropOldestLocked() error {
	seg := s.segs[0]
	dropped := seg.records
	if s.read.Seq == seg.seq {
		dropped -= s.read.Index
	} else if s.read.Seq > seg.seq {
		dropped = 0 // read already: those in flight are delivered from memory
	}
	if err := os.Remove(filepath.Join(s.opts.Dir, segmentName(seg.seq))); err != nil {
		return s.diskFailedLocked("dropping the oldest spool segment", err)
	}
	s.stats.DroppedFull += int64(dropped)
	s.total -= seg.size
	s.segs = s.segs[1:]
	s.dirDirty = true
	first := Position{Seq: s.segs[0].seq, Off: int64(headerSize)}
	if s.released.before(first) {
		s.released = first
	}
	if s.read.before(first) {
		s.read = first
	}
	return nil
}

// Commit writes the records appended so far to the active segment, where
// the reader finds them, and fsyncs them when SyncInterval is 0. While the
// disk is failed it returns the failure when records wait to be written
// (take them with Unwritten), nil when none do.
func (s *Spool) Commit() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if s.diskErr != nil {
		err := s.diskErr
		if len(s.wbuf) == 0 {
			err = nil
		}
		s.mu.Unlock()
		return err
	}
	err := s.writeLocked()
	s.mu.Unlock()
	if err != nil || s.opts.SyncInterval > 0 {
		return err
	}
	return s.syncActive()
}

// syncActive fsyncs the active segment when it has unsynced bytes.
func (s *Spool) syncActive() error {
	s.mu.Lock()
	f, dirty := s.active, s.unsynced
	s.unsynced = false
	s.mu.Unlock()
	if !dirty || f == nil {
		return nil
	}
	if err := f.Sync(); err != nil {
		if errors.Is(err, os.ErrClosed) {
			return nil // sealed meanwhile, and fsync'ed by the rotation
		}
		s.mu.Lock()
		s.unsynced = true
		err = s.diskFailedLocked("fsync of the spool", err)
		s.mu.Unlock()
		return err
	}
	return nil
}

func (s *Spool) syncDir() error {
	s.mu.Lock()
	dirty := s.dirDirty
	s.dirDirty = false
	s.mu.Unlock()
	if !dirty {
		return nil
	}
	return fsyncDir(s.opts.Dir)
}

// fsyncDir makes the entries created, renamed or removed in dir durable.
func fsyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// syncLoop is the group commit: every SyncInterval it writes what was
// appended, fsyncs the active segment and the directory, and persists the
// release position; it checks the free space of the filesystem, and while
// the disk is failed it tries it again.
func (s *Spool) syncLoop() {
	defer close(s.done)
	interval := s.opts.SyncInterval
	if interval == 0 {
		interval = cursorPersistInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-tick.C:
		}
		s.checkDisk()
		// A failure is logged once, when the disk fails (diskFailedLocked).
		_ = s.flush(s.opts.SyncInterval > 0)
	}
}

// flush writes and (when data) fsyncs pending appends, then syncs the
// directory and persists the cursor. While the disk is failed it does
// nothing: checkDisk tries the disk.
func (s *Spool) flush(data bool) error {
	s.mu.Lock()
	err := s.diskErr
	s.mu.Unlock()
	if err != nil {
		return err
	}
	if data {
		s.mu.Lock()
		err := s.writeLocked()
		s.mu.Unlock()
		if err != nil {
			return err
		}
		if err := s.syncActive(); err != nil {
			return err
		}
	}
	if err := s.syncDir(); err != nil {
		return s.diskFailed("fsync of the spool directory", err)
	}
	if err := s.persistCursor(false); err != nil {
		return s.diskFailed("writing the spool cursor", err)
	}
	return nil
}

// Ready returns a channel closed when records are next committed: take it
// before a Read that found nothing, then wait on it.
func (s *Spool) Ready() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ready
}

// Space returns a channel closed when space is next released: take it
// before an Append that failed with ErrFull, then wait on it.
func (s *Spool) Space() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.space
}

// Read returns up to max committed records after the read cursor, in order,
// and moves the cursor past them; none when there are none yet. A record
// found damaged is reported and the rest of its segment skipped.
func (s *Spool) Read(max int) ([]Record, error) {
	s.rmu.Lock()
	defer s.rmu.Unlock()
	var out []Record
	for len(out) < max {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return out, ErrClosed
		}
		i := s.findLocked(s.read.Seq)
		if i < 0 {
			// Deleted under the cursor (drop_oldest): go on from the first.
			s.read = Position{Seq: s.segs[0].seq, Off: int64(headerSize)}
			i = 0
		}
		pos, limit, last := s.read, s.segs[i].size, i == len(s.segs)-1
		if s.rf != nil && s.rseq < pos.Seq {
			// Released and deleted: holding it open would keep its blocks
			// in use.
			s.rf.Close()
			s.rf = nil
		}
		var next uint64
		if !last {
			next = s.segs[i+1].seq
		}
		s.mu.Unlock()

		if pos.Off >= limit {
			if last {
				break
			}
			s.advance(pos, Position{Seq: next, Off: int64(headerSize)})
			continue
		}
		payload, ms, size, err := s.recordAt(pos, limit)
		if err != nil {
			s.opts.Log.Errorf("Spool segment %s is damaged at offset %d (%v): skipping the rest of it (%d bytes)",
				segmentName(pos.Seq), pos.Off, err, limit-pos.Off)
			s.mu.Lock()
			s.stats.CorruptSegments++
			s.mu.Unlock()
			s.advance(pos, Position{Seq: pos.Seq, Off: limit, Index: pos.Index})
			continue
		}
		end := Position{Seq: pos.Seq, Off: pos.Off + int64(size), Index: pos.Index + 1}
		if s.advance(pos, end) {
			out = append(out, Record{Payload: append([]byte(nil), payload...), Appended: time.UnixMilli(ms), End: end})
		}
	}
	return out, nil
}

// advance moves the read cursor from pos to to, unless it was moved meanwhile
// (by a drop); it reports whether it did.
func (s *Spool) advance(pos, to Position) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.read != pos {
		return false
	}
	s.read = to
	return true
}

func (s *Spool) findLocked(seq uint64) int {
	i := sort.Search(len(s.segs), func(i int) bool { return s.segs[i].seq >= seq })
	if i < len(s.segs) && s.segs[i].seq == seq {
		return i
	}
	return -1
}

// recordAt decodes the record at pos, reading the segment in chunks of
// readChunk bytes, never past limit (what was written).
func (s *Spool) recordAt(pos Position, limit int64) ([]byte, int64, int, error) {
	if s.rf == nil || s.rseq != pos.Seq {
		if s.rf != nil {
			s.rf.Close()
			s.rf = nil
		}
		f, err := os.Open(filepath.Join(s.opts.Dir, segmentName(pos.Seq)))
		if err != nil {
			return nil, 0, 0, err
		}
		s.rf, s.rseq, s.rbuf = f, pos.Seq, s.rbuf[:0]
	}
	need := recordHeader
	for {
		start := pos.Off - s.roff
		if pos.Off >= s.roff && start+int64(need) <= int64(len(s.rbuf)) {
			payload, ms, size, err := decodeRecord(s.rbuf[start:])
			if errors.Is(err, errShort) {
				need = recordHeader + int(binary.LittleEndian.Uint32(s.rbuf[start:]))
				if pos.Off+int64(need) > limit {
					return nil, 0, 0, errors.New("record runs past the written end")
				}
				continue
			}
			return payload, ms, size, err
		}
		n := min(max(int64(need), readChunk), limit-pos.Off)
		if n < int64(need) {
			return nil, 0, 0, errors.New("record runs past the written end")
		}
		if int64(cap(s.rbuf)) < n {
			s.rbuf = make([]byte, n)
		}
		s.rbuf = s.rbuf[:n]
		if _, err := s.rf.ReadAt(s.rbuf, pos.Off); err != nil && !errors.Is(err, io.EOF) {
			s.rbuf = s.rbuf[:0]
			return nil, 0, 0, err
		}
		s.roff = pos.Off
	}
}

// Release marks every record up to p as delivered: fully released segments
// are deleted, and the position is persisted within SyncInterval (100 ms
// when 0). A segment the disk refuses to delete is deleted once it works
// again (the failure is logged once and returned by DiskErr, not here).
func (s *Spool) Release(p Position) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if !s.released.before(p) {
		return nil
	}
	s.released = p
	if s.deleteReleasedLocked() {
		s.signalSpaceLocked()
	}
	return nil
}

// signalSpaceLocked wakes whoever waits on Space.
func (s *Spool) signalSpaceLocked() {
	close(s.space)
	s.space = make(chan struct{})
	s.fullWait = false
}

// deleteReleasedLocked deletes the segments before the active one whose
// records are all released, and reports whether it deleted any.
func (s *Spool) deleteReleasedLocked() bool {
	p := s.released
	freed := false
	for len(s.segs) > 1 {
		seg := s.segs[0]
		if seg.seq > p.Seq || (seg.seq == p.Seq && p.Off < seg.size) {
			break
		}
		if err := os.Remove(filepath.Join(s.opts.Dir, segmentName(seg.seq))); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.diskFailedLocked("deleting a released spool segment", err)
			break
		}
		s.total -= seg.size
		s.segs = s.segs[1:]
		s.dirDirty = true
		freed = true
		if s.diskErr != nil {
			s.freedInodes++
		}
	}
	if first := (Position{Seq: s.segs[0].seq, Off: int64(headerSize)}); s.released.before(first) {
		s.released = first
	}
	if s.read.before(s.released) {
		s.read = s.released
	}
	return freed
}

// Stats returns the spool's figures now.
func (s *Spool) Stats() Stats {
	s.mu.Lock()
	st := s.stats
	st.Bytes = s.total
	st.Segments = len(s.segs)
	st.MaxSize = s.maxSize
	st.UnwrittenRecords = int64(s.wrecords)
	var records int64
	for _, seg := range s.segs {
		if seg.seq < s.released.Seq {
			continue // released, but its deletion failed (the disk did)
		}
		records += int64(seg.records)
	}
	records += int64(s.wrecords)
	p := s.released
	var oldestMs int64
	if i := s.findLocked(p.Seq); i >= 0 {
		records -= int64(p.Index)
		if p.Off >= s.segs[i].size {
			// The next record is in a later segment (or not written yet).
			if i+1 < len(s.segs) && s.segs[i+1].records > 0 {
				oldestMs = s.segs[i+1].firstMs
			} else if s.wrecords > 0 {
				oldestMs = s.wfirstMs
			}
			p = Position{}
		}
	}
	st.Records = records
	s.mu.Unlock()
	if oldestMs == 0 && p.Seq != 0 && records > 0 {
		oldestMs = s.appendTimeAt(p)
	}
	if oldestMs > 0 {
		st.OldestAge = max(0, time.Since(time.UnixMilli(oldestMs)))
	}
	return st
}

// appendTimeAt reads the append time of the record at p (0 when it cannot).
func (s *Spool) appendTimeAt(p Position) int64 { return appendTimeIn(s.opts.Dir, p) }

// Close writes and fsyncs what was appended, persists the release position
// and releases the lock. While the disk is failed it tries it once more;
// records appended but still not written are lost then, and the error
// (wrapping ErrDiskFailed) gives their number: take them with Unwritten
// before Close to deliver them another way. It does not wait on the disk
// beyond that one try.
func (s *Spool) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.mu.Unlock()
	close(s.stop)
	<-s.done
	s.checkDisk()
	err := s.flush(true)
	s.mu.Lock()
	s.closed = true
	if s.diskErr != nil {
		err = nil // logged when the disk failed
		if s.wrecords > 0 {
			err = fmt.Errorf("%d metrics appended to the spool were not written to its disk and are lost: %w", s.wrecords, s.diskErr)
		}
	}
	s.mu.Unlock()
	s.rmu.Lock()
	if s.rf != nil {
		s.rf.Close()
		s.rf = nil
	}
	s.rmu.Unlock()
	s.closeFiles()
	return err
}

func (s *Spool) closeFiles() {
	if s.active != nil {
		s.active.Close()
	}
	if s.lock != nil {
		s.lock.Close() // releases the flock
	}
}
