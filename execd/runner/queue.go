package runner

import (
	"errors"
	"sync"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
)

// errMemoryFull is returned by queue.Append when a line would go to memory
// and memory holds MemoryLimit bytes already.
var errMemoryFull = errors.New("memory queue full")

// commitEvery is how many lines are appended to the spool at most before a
// Commit, when standard input never pauses.
const commitEvery = 1024

// item is one line taken by the publisher, with how far it reaches into each
// tier of the queue.
type item struct {
	payload  []byte
	appended time.Time
	mark     mark
}

// mark is how far a batch reaches into the queue's tiers: Release(mark)
// releases everything up to it.
type mark struct {
	spoolEnd spool.Position
	inSpool  bool
	memSeq   uint64 // 0: nothing from memory
}

func (m *mark) extend(o mark) {
	if o.inSpool {
		m.spoolEnd, m.inSpool = o.spoolEnd, true
	}
	if o.memSeq != 0 {
		m.memSeq = o.memSeq
	}
}

type memEntry struct {
	seq      uint64
	payload  []byte
	appended time.Time
}

// queue is what stands between standard input and the publisher: the spool
// on disk when there is one and its disk works, and memory for what the
// spool cannot take (no spool, spool full, disk failed), bounded by
// memLimit. The publisher reads the spool first, then memory, which is the
// order the lines arrived in: a line goes to memory only while memory holds
// unread lines or the spool refuses it, and memory's unread lines move into
// the spool (in order) as soon as it takes them again.
//
// A failure of the spool's disk is reported here, once (E!), and its end
// once (I!) when memory's lines are back in the spool: the spool is opened
// with QuietDisk. The spool tries its disk again by itself; the queue sees
// it working again through DiskErr, and takes back the lines appended but
// not written when the disk failed (Unwritten) into memory.
//
// Append is for one goroutine (the reader), Read for one other (the
// publisher); Release, Stats and the channels for any.
type queue struct {
	log      telegraf.Logger
	memLimit int64

	mu          sync.Mutex
	sp          *spool.Spool // nil: no spool (off, or not opened yet)
	spoolDown   bool         // the spool's disk failed: lines go to memory
	downSince   time.Time
	uncommitted int        // lines appended to the spool since its last Commit
	mem         []memEntry // not released, in order
	memRead     int        // mem[:memRead] are read (in flight), the rest unread
	memBytes    int64
	nextSeq     uint64
	ready       chan struct{} // closed when memory gets a line
	space       chan struct{} // closed when memory frees space
	lastRelease time.Time
	closed      bool
	fullWarned  bool
	recovering  bool // the disk works again; memory is moving back
	movedBack   int  // lines moved back since the disk failed

	droppedMemory int64 // lines dropped from (or not let into) full memory
	tooLarge      int64 // lines the spool can never hold
}

// newQueue returns a queue over sp (nil: memory only until Attach). A
// spool opened on a failed disk starts the queue with its disk failed.
func newQueue(log telegraf.Logger, sp *spool.Spool, memLimit int64) *queue {
	q := &queue{
		log:         log,
		memLimit:    memLimit,
		ready:       make(chan struct{}),
		space:       make(chan struct{}),
		lastRelease: time.Now(),
	}
	if sp != nil {
		q.Attach(sp)
	}
	return q
}

// IsDiskError reports whether an error of spool.Open, or of creating the
// spool's directory, is the disk's (no space, read-only, I/O error): the
// runner then starts with memory and tries the spool again, instead of
// exiting.
func IsDiskError(err error) bool { return spool.IsDiskFailure(err) }

// Append queues line (copied). It returns spool.ErrTooLarge for a line the
// spool can never hold, spool.ErrClosed after close, and errMemoryFull
// when the line must go to memory and memory is full.
func (q *queue) Append(line []byte) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return spool.ErrClosed
	}
	q.moveLocked()
	if q.sp != nil && q.memRead == len(q.mem) && !q.spoolDown {
		err := q.sp.Append(line)
		switch {
		case err == nil:
			q.uncommitted++
			if q.uncommitted >= commitEvery {
				q.commitLocked()
			}
			return nil
		case errors.Is(err, spool.ErrTooLarge):
			q.tooLarge++
			return err
		case errors.Is(err, spool.ErrClosed):
			return err
		case errors.Is(err, spool.ErrFull):
			if !q.fullWarned {
				q.fullWarned = true
				q.log.Warnf("The spool is full: new metrics wait in memory (up to %d MiB) until the bridge acknowledges metrics and they move into the spool. Logged once", q.memLimit>>20)
			}
		case errors.Is(err, spool.ErrDiskFailed):
			// The line was not appended: it follows the unwritten ones
			// into memory.
			q.diskFailedLocked(err)
		}
	}
	return q.memAppendLocked(line)
}

// recoveryDoneLocked logs the end of a disk failure once memory holds no
// unread line. A disk that fails again while they move (a backlog larger
// than the disk) is the same failure: no second E!.
func (q *queue) recoveryDoneLocked() {
	if !q.recovering || q.spoolDown || q.memRead < len(q.mem) {
		return
	}
	q.recovering = false
	q.log.Infof("The spool's disk works again after %s; %d metrics held in memory meanwhile moved back into the spool",
		time.Since(q.downSince).Round(time.Second), q.movedBack)
	q.movedBack = 0
}

// AppendDroppingOldest queues line in memory even when memory is full, by
// dropping its oldest unread lines (or, when every line in memory is in
// flight, line itself); it returns how many lines were dropped.
func (q *queue) AppendDroppingOldest(line []byte) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return 1
	}
	dropped := 0
	if q.memBytes+int64(len(line)) > q.memLimit {
		// Drop a sixteenth of the limit at once, not a line per line: the
		// lines behind the dropped ones move down once per chunk.
		target := q.memLimit - q.memLimit/16 - int64(len(line))
		n := q.memRead
		for n < len(q.mem) && q.memBytes > target {
			q.memBytes -= int64(len(q.mem[n].payload))
			n++
		}
		dropped = n - q.memRead
		q.mem = append(q.mem[:q.memRead], q.mem[n:]...)
	}
	if q.memBytes+int64(len(line)) > q.memLimit {
		dropped++ // nothing left to drop but in-flight lines: drop this one
	} else {
		_ = q.memAppendLocked(line)
	}
	q.droppedMemory += int64(dropped)
	return dropped
}

func (q *queue) memAppendLocked(line []byte) error {
	if q.memBytes+int64(len(line)) > q.memLimit {
		return errMemoryFull
	}
	q.nextSeq++
	q.mem = append(q.mem, memEntry{seq: q.nextSeq, payload: append([]byte(nil), line...), appended: time.Now()})
	q.memBytes += int64(len(line))
	close(q.ready)
	q.ready = make(chan struct{})
	return nil
}

// Commit makes what was appended to the spool visible to the publisher.
func (q *queue) Commit() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.spoolDown {
		q.commitLocked()
	}
}

func (q *queue) commitLocked() bool {
	if q.sp == nil || q.closed {
		return false
	}
	if err := q.sp.Commit(); err != nil {
		if errors.Is(err, spool.ErrDiskFailed) {
			q.diskFailedLocked(err)
		}
		return false
	}
	q.uncommitted = 0
	return true
}

// diskFailedLocked switches new lines to memory after a disk failure; the
// lines the spool took but could not write go to memory first, in order
// (they are older than any line memory holds unread: a line goes into the
// spool only while memory holds none).
func (q *queue) diskFailedLocked(err error) {
	if !q.spoolDown && !q.recovering {
		q.downSince = time.Now()
		q.log.Errorf("The spool's disk failed (%v): new metrics are held in memory (up to %d MiB) and published from there; "+
			"the metrics already in the spool stay there and are published first. The spool tries its disk again until it works",
			err, q.memLimit>>20)
	}
	q.spoolDown = true
	q.uncommitted = 0
	for _, line := range q.sp.Unwritten() {
		if q.memAppendLocked(line) != nil {
			q.droppedMemory++
		}
	}
}

// moveLocked moves memory's unread lines into the spool while it takes
// them, once its disk works again after a failure (the spool tries it by
// itself).
func (q *queue) moveLocked() {
	if q.sp == nil {
		return
	}
	if q.spoolDown {
		if q.sp.DiskErr() != nil {
			return
		}
		q.spoolDown, q.recovering = false, true
	}
	defer q.recoveryDoneLocked()
	if q.memRead == len(q.mem) {
		return
	}
	// What was appended before is written first, so that a failure below
	// hands back moved lines only.
	if q.uncommitted > 0 && !q.commitLocked() {
		return
	}
	moved := 0
	var err error
	for ; q.memRead+moved < len(q.mem); moved++ {
		// Up to the first line the spool refuses: full, too large for it
		// (published from memory then), or its disk failed.
		if err = q.sp.Append(q.mem[q.memRead+moved].payload); err != nil {
			break
		}
	}
	if moved > 0 && !errors.Is(err, spool.ErrDiskFailed) {
		err = q.sp.Commit()
	}
	if errors.Is(err, spool.ErrDiskFailed) {
		// The moved lines are still in memory: what the spool could not
		// write of them is dropped there, what it wrote is in both (at
		// least once).
		_ = q.sp.Unwritten()
		q.diskFailedLocked(err)
		return
	}
	if moved == 0 || err != nil {
		return
	}
	for _, e := range q.mem[q.memRead : q.memRead+moved] {
		q.memBytes -= int64(len(e.payload))
	}
	q.mem = append(q.mem[:q.memRead], q.mem[q.memRead+moved:]...)
	q.signalSpaceLocked()
	if q.recovering {
		q.movedBack += moved
	}
}

// Attach gives the queue its spool: at start, or once it could be opened
// after its disk failed. A spool that opened on a failed disk (it replays
// what it holds, and takes nothing new) is a disk failure.
func (q *queue) Attach(sp *spool.Spool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		_ = sp.Close()
		return
	}
	q.sp = sp
	if err := sp.DiskErr(); err != nil {
		q.diskFailedLocked(err)
	} else {
		q.spoolDown = false
	}
	q.moveLocked()
	// Wake the publisher, which waits on memory's channel only.
	close(q.ready)
	q.ready = make(chan struct{})
}

// Read returns up to max lines in order: the spool's, then memory's.
func (q *queue) Read(max int) ([]item, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return nil, spool.ErrClosed
	}
	var out []item
	if q.sp != nil {
		recs, err := q.sp.Read(max)
		if err != nil {
			return nil, err
		}
		for _, rec := range recs {
			out = append(out, item{payload: rec.Payload, appended: rec.Appended, mark: mark{spoolEnd: rec.End, inSpool: true}})
		}
		if len(out) > 0 {
			// Memory's lines are newer than any the spool holds; taking
			// them before the spool is read to its end could reorder
			// lines the spool is still committing.
			return out, nil
		}
	}
	for len(out) < max && q.memRead < len(q.mem) {
		e := q.mem[q.memRead]
		q.memRead++
		out = append(out, item{payload: e.payload, appended: e.appended, mark: mark{memSeq: e.seq}})
	}
	return out, nil
}

// Ready returns channels closed when lines are next added (spool, memory).
func (q *queue) Ready() (spoolReady, memReady <-chan struct{}) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.sp != nil {
		spoolReady = q.sp.Ready()
	}
	return spoolReady, q.ready
}

// Space returns a channel closed when memory next frees space.
func (q *queue) Space() <-chan struct{} {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.space
}

func (q *queue) signalSpaceLocked() {
	close(q.space)
	q.space = make(chan struct{})
}

// Release marks everything up to m as delivered.
func (q *queue) Release(m mark) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.lastRelease = time.Now()
	if m.inSpool && q.sp != nil {
		if err := q.sp.Release(m.spoolEnd); err != nil && !errors.Is(err, spool.ErrClosed) {
			q.log.Errorf("Releasing written metrics from the spool: %v", err)
		}
	}
	if m.memSeq == 0 {
		return
	}
	n := 0
	for n < len(q.mem) && q.mem[n].seq <= m.memSeq {
		q.memBytes -= int64(len(q.mem[n].payload))
		n++
	}
	if n > 0 {
		q.mem = append(q.mem[:0], q.mem[n:]...)
		q.memRead = max(0, q.memRead-n)
		q.signalSpaceLocked()
	}
}

// SinceRelease is the time since the publisher last released a batch.
func (q *queue) SinceRelease() time.Duration {
	q.mu.Lock()
	defer q.mu.Unlock()
	return time.Since(q.lastRelease)
}

// queueStats are the queue's figures.
type queueStats struct {
	spool         spool.Stats
	hasSpool      bool
	spoolDown     bool
	memRecords    int64
	memBytes      int64
	droppedMemory int64
	tooLarge      int64
}

func (q *queue) Stats() queueStats {
	q.mu.Lock()
	defer q.mu.Unlock()
	st := queueStats{
		hasSpool:      q.sp != nil,
		spoolDown:     q.spoolDown,
		memRecords:    int64(len(q.mem)),
		memBytes:      q.memBytes,
		droppedMemory: q.droppedMemory,
		tooLarge:      q.tooLarge,
	}
	if q.sp != nil {
		st.spool = q.sp.Stats()
	}
	return st
}

// Backlog is the number of lines not delivered yet.
func (q *queue) Backlog() int64 {
	st := q.Stats()
	return st.spool.Records + st.memRecords
}

// Close moves what memory still holds (delivered or not: nothing released
// it) into the spool when it takes it, closes the spool and returns how
// many lines in memory could not be kept.
func (q *queue) Close() (lost int64, err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closed {
		return 0, nil
	}
	q.closed = true
	if q.sp == nil {
		return int64(len(q.mem)), nil
	}
	q.memRead = 0 // what was in flight was not acknowledged: keep it too
	q.closed = false
	if !q.spoolDown {
		// Lines the spool cannot write now are held in memory, and
		// counted there, not lost by the spool's Close.
		q.commitLocked()
	}
	q.moveLocked()
	q.closed = true
	lost = int64(len(q.mem))
	return lost, q.sp.Close()
}
