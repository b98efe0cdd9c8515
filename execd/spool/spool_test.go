package spool

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
)

func open(t *testing.T, dir string, tweak func(*Options)) (*Spool, *testutil.CaptureLogger) {
	t.Helper()
	log := &testutil.CaptureLogger{Name: "spool_test"}
	opts := Options{Dir: dir, MaxSize: 1 << 20, SyncInterval: 10 * time.Millisecond, Log: log}
	if tweak != nil {
		tweak(&opts)
	}
	s, err := Open(context.Background(), opts)
	require.NoError(t, err)
	t.Cleanup(func() { s.Close() })
	return s, log
}

func payload(i int) []byte { return []byte(fmt.Sprintf("m,device_id=dev-%02d n=%di %d", i%10, i, i)) }

func appendN(t *testing.T, s *Spool, from, n int) {
	t.Helper()
	for i := from; i < from+n; i++ {
		require.NoError(t, s.Append(payload(i)))
	}
	require.NoError(t, s.Commit())
}

// readAll reads every committed record, in batches of batch.
func readAll(t *testing.T, s *Spool, batch int) []Record {
	t.Helper()
	var out []Record
	for {
		recs, err := s.Read(batch)
		require.NoError(t, err)
		if len(recs) == 0 {
			return out
		}
		out = append(out, recs...)
	}
}

func payloads(recs []Record) []string {
	out := make([]string, len(recs))
	for i, r := range recs {
		out[i] = string(r.Payload)
	}
	return out
}

func want(from, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = string(payload(from + i))
	}
	return out
}

func segments(t *testing.T, dir string) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(dir, "*.seg"))
	require.NoError(t, err)
	sort.Strings(m)
	return m
}

func TestSpoolReplaysOnlyUnreleased(t *testing.T) {
	tests := []struct {
		name       string
		n          int
		release    int // records released before the restart
		segSize    int64
		closeFirst bool // a clean Close, else the process "dies" (no Close)
	}{
		{name: "nothing released", n: 100, release: 0, closeFirst: true},
		{name: "some released", n: 100, release: 37, closeFirst: true},
		{name: "all released", n: 100, release: 100, closeFirst: true},
		{name: "many segments, half released", n: 2000, release: 1000, segSize: 4096, closeFirst: true},
		{name: "released across segments, killed", n: 2000, release: 1999, segSize: 4096},
		{name: "killed, nothing released", n: 500, segSize: 4096},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "spool")
			s, _ := open(t, dir, func(o *Options) { o.SegmentSize = tt.segSize })
			appendN(t, s, 0, tt.n)
			got := readAll(t, s, 64)
			require.Equal(t, want(0, tt.n), payloads(got))
			if tt.release > 0 {
				require.NoError(t, s.Release(got[tt.release-1].End))
			}
			st := s.Stats()
			require.EqualValues(t, tt.n-tt.release, st.Records)
			if tt.closeFirst {
				require.NoError(t, s.Close())
			} else {
				crash(t, s)
			}

			s2, _ := open(t, dir, func(o *Options) { o.SegmentSize = tt.segSize })
			require.EqualValues(t, tt.n-tt.release, s2.Stats().Replayed)
			again := readAll(t, s2, 100)
			require.Equal(t, want(tt.release, tt.n-tt.release), payloads(again))
			if len(again) > 0 {
				require.NoError(t, s2.Release(again[len(again)-1].End))
			}
			require.Len(t, segments(t, dir), 1, "fully released segments are deleted")
			require.Zero(t, s2.Stats().Records)
		})
	}
}

// crash ends s as a SIGKILL would once the sync loop ran: written, cursor
// persisted, files closed without Close.
func crash(t *testing.T, s *Spool) {
	t.Helper()
	close(s.stop)
	<-s.done
	require.NoError(t, s.flush(true))
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.closeFiles()
}

func TestSpoolReadsWhileAppending(t *testing.T) {
	dir := t.TempDir() + "/s"
	s, _ := open(t, dir, func(o *Options) { o.SegmentSize = 2048 })
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 5000 {
			if err := s.Append(payload(i)); err != nil {
				panic(err)
			}
			if i%7 == 0 {
				if err := s.Commit(); err != nil {
					panic(err)
				}
			}
		}
		_ = s.Commit()
	}()
	var got []Record
	for len(got) < 5000 {
		ready := s.Ready()
		recs, err := s.Read(100)
		require.NoError(t, err)
		if len(recs) == 0 {
			select {
			case <-ready:
			case <-time.After(10 * time.Second):
				t.Fatal("no records committed")
			}
			continue
		}
		got = append(got, recs...)
		require.NoError(t, s.Release(recs[len(recs)-1].End))
	}
	<-done
	require.Equal(t, want(0, 5000), payloads(got))
	require.LessOrEqual(t, len(segments(t, dir)), 2)
}

func TestSpoolFull(t *testing.T) {
	tests := []struct {
		name   string
		policy FullPolicy
	}{
		{name: "backpressure", policy: Backpressure},
		{name: "drop oldest", policy: DropOldest},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir() + "/s"
			s, _ := open(t, dir, func(o *Options) { o.MaxSize = MinMaxSize; o.Full = tt.policy })
			n := 0
			var err error
			for ; n < 2000; n++ {
				if err = s.Append(payload(n)); err != nil {
					break
				}
			}
			require.NoError(t, s.Commit())
			st := s.Stats()
			require.LessOrEqual(t, st.Bytes, int64(MinMaxSize))
			if tt.policy == Backpressure {
				require.ErrorIs(t, err, ErrFull)
				require.Zero(t, st.DroppedFull)
				space := s.Space()
				got := readAll(t, s, 1000)
				require.Equal(t, want(0, n), payloads(got), "nothing dropped")
				require.NoError(t, s.Release(got[len(got)-1].End))
				select {
				case <-space:
				default:
					t.Fatal("releasing did not signal space")
				}
				require.NoError(t, s.Append(payload(n)), "fits again once released")
				return
			}
			require.NoError(t, err)
			require.Positive(t, st.DroppedFull)
			got := readAll(t, s, 1000)
			require.EqualValues(t, 2000, int64(len(got))+st.DroppedFull, "every record read or counted as dropped")
			require.Equal(t, want(2000-len(got), len(got)), payloads(got), "the newest are kept, in order")
		})
	}
}

func TestSpoolTooLarge(t *testing.T) {
	s, _ := open(t, t.TempDir()+"/s", func(o *Options) { o.MaxSize = MinMaxSize })
	require.ErrorIs(t, s.Append(make([]byte, MinMaxSize)), ErrTooLarge)
	require.NoError(t, s.Append(payload(1)))
}

// damage describes a spool to damage and what must survive.
func TestSpoolDamage(t *testing.T) {
	tests := []struct {
		name string
		// damage is applied to the closed spool's segment files (sorted).
		damage func(t *testing.T, segs []string)
		// kept is how many of the 300 records replay.
		kept     func(counts []int) int
		warn     string // a warning that must be logged
		errLine  string // an error that must be logged
		aside    bool   // a .corrupt file is left
		truncate bool
		// lost is how many records Stats.LostRecords counts (0 when nil),
		// give or take lostDelta.
		lost      func(counts []int) int
		lostDelta float64
	}{
		{
			name: "torn last record",
			damage: func(t *testing.T, segs []string) {
				last := segs[len(segs)-1]
				fi, err := os.Stat(last)
				require.NoError(t, err)
				require.NoError(t, os.Truncate(last, fi.Size()-5))
			},
			kept:     func(c []int) int { return sum(c) - 1 },
			warn:     "ends with a torn record",
			truncate: true,
		},
		{
			name: "zeros after the last record (power cut)",
			damage: func(t *testing.T, segs []string) {
				f, err := os.OpenFile(segs[len(segs)-1], os.O_WRONLY|os.O_APPEND, 0)
				require.NoError(t, err)
				_, err = f.Write(make([]byte, 4096))
				require.NoError(t, err)
				require.NoError(t, f.Close())
			},
			kept:     sum,
			warn:     "dropping 4096 bytes",
			truncate: true,
		},
		{
			// The records after the damage are intact (their CRCs say
			// so): only the damaged one is lost.
			name: "byte flipped in a middle segment",
			damage: func(t *testing.T, segs []string) {
				flip(t, segs[1], int64(headerSize+recordHeader+3), 0x55) // the payload of its first record
			},
			kept:    func(c []int) int { return sum(c) - 1 },
			errLine: "keeping its 0 records before the damage and",
			aside:   true,
			lost:    func([]int) int { return 1 },
		},
		{
			name: "two records damaged in a middle segment",
			damage: func(t *testing.T, segs []string) {
				second, fifth := recordOffset(t, segs[1], 2), recordOffset(t, segs[1], 5)
				flip(t, segs[1], second+recordHeader+1, 0x55)
				flip(t, segs[1], fifth+recordHeader+1, 0x55)
			},
			kept:    func(c []int) int { return sum(c) - 2 },
			errLine: "at least 2 metrics are lost",
			aside:   true,
			lost:    func([]int) int { return 2 },
		},
		{
			name: "byte flipped in the middle of a middle segment",
			damage: func(t *testing.T, segs []string) {
				fi, err := os.Stat(segs[2])
				require.NoError(t, err)
				flip(t, segs[2], fi.Size()-10, 0x55) // its last record
			},
			kept:    func(c []int) int { return sum(c) - 1 },
			errLine: "is damaged",
			aside:   true,
			lost:    func([]int) int { return 1 },
		},
		{
			name: "bit flipped in a length field of the last segment",
			damage: func(t *testing.T, segs []string) {
				last := segs[len(segs)-1]
				flip(t, last, recordOffset(t, last, 10)+2, 0x10) // the length of its 11th record, +1 MiB
			},
			kept:    func(c []int) int { return sum(c) - 1 },
			errLine: "keeping its 10 records before the damage and",
			aside:   true,
			lost:    func([]int) int { return 1 },
		},
		{
			name: "bad header",
			damage: func(t *testing.T, segs []string) {
				flip(t, segs[0], 0, 0x55)
			},
			kept:  sum,
			warn:  "not a spool segment (bad header)",
			aside: true,
		},
		{
			name: "zero-length segment in the middle",
			damage: func(t *testing.T, segs []string) {
				require.NoError(t, os.Truncate(segs[1], 0))
			},
			kept:      func(c []int) int { return sum(c) - c[1] },
			warn:      "its metrics were lost, about",
			lost:      func(c []int) int { return c[1] },
			lostDelta: 2,
		},
		{
			name: "zero-length segment at the end",
			damage: func(t *testing.T, segs []string) {
				require.NoError(t, os.WriteFile(filepath.Join(filepath.Dir(segs[0]), segmentName(999)), nil, 0o600))
			},
			kept: sum,
		},
		{
			name: "damaged cursor",
			damage: func(t *testing.T, segs []string) {
				require.NoError(t, os.WriteFile(filepath.Join(filepath.Dir(segs[0]), "cursor"), []byte("garbage"), 0o600))
			},
			kept: sum,
			warn: "cursor is damaged",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir() + "/s"
			s, _ := open(t, dir, func(o *Options) { o.SegmentSize = 2048 })
			appendN(t, s, 0, 300)
			require.NoError(t, s.Close())
			segs := segments(t, dir)
			require.GreaterOrEqual(t, len(segs), 4)
			counts := recordCounts(t, segs)
			sizes := map[string]int64{}
			for _, seg := range segs {
				fi, err := os.Stat(seg)
				require.NoError(t, err)
				sizes[seg+".corrupt"] = fi.Size()
			}
			tt.damage(t, segs)

			s2, log := open(t, dir, func(o *Options) { o.SegmentSize = 2048 })
			got := readAll(t, s2, 50)
			require.Len(t, got, tt.kept(counts))
			// What replays is a subsequence of what was appended, in order.
			all := want(0, 300)
			j := 0
			for _, p := range payloads(got) {
				for j < len(all) && all[j] != p {
					j++
				}
				require.Less(t, j, len(all), "record %q was not appended, or out of order", p)
			}
			if tt.warn != "" {
				require.Contains(t, strings.Join(log.Warnings(), "\n"), tt.warn)
			}
			if tt.errLine != "" {
				require.Contains(t, strings.Join(log.Errors(), "\n"), tt.errLine)
				require.EqualValues(t, 1, s2.Stats().CorruptSegments)
			} else {
				require.Empty(t, log.Errors())
			}
			corrupt, _ := filepath.Glob(filepath.Join(dir, "*.corrupt"))
			require.Equal(t, tt.aside, len(corrupt) == 1)
			if tt.aside {
				// Set aside whole: what was after the damage is still there.
				fi, err := os.Stat(corrupt[0])
				require.NoError(t, err)
				require.Equal(t, sizes[corrupt[0]], fi.Size())
			}
			require.InDelta(t, lost(tt.lost, counts), s2.Stats().LostRecords, tt.lostDelta)
			require.Equal(t, tt.truncate, s2.Stats().TruncatedBytes > 0)

			// Reopening the repaired spool finds nothing more to repair.
			require.NoError(t, s2.Close())
			s3, log3 := open(t, dir, func(o *Options) { o.SegmentSize = 2048 })
			require.Len(t, readAll(t, s3, 50), tt.kept(counts))
			require.Empty(t, log3.Errors())
			require.Empty(t, log3.Warnings())
		})
	}
}

func lost(f func([]int) int, counts []int) int {
	if f == nil {
		return 0
	}
	return f(counts)
}

// recordOffset is the offset of the record k (from 0) in the segment file.
func recordOffset(t *testing.T, path string, k int) int64 {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	off := headerSize
	for range k {
		_, _, size, err := decodeRecord(b[off:])
		require.NoError(t, err)
		off += size
	}
	return int64(off)
}

func sum(c []int) int {
	n := 0
	for _, v := range c {
		n += v
	}
	return n
}

// flip flips the bits of mask in the byte at off of the file at path.
func flip(t *testing.T, path string, off int64, mask byte) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	b[off] ^= mask
	require.NoError(t, os.WriteFile(path, b, 0o600))
}

func recordCounts(t *testing.T, segs []string) []int {
	t.Helper()
	out := make([]int, len(segs))
	for i, p := range segs {
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		r := scanSegment(b)
		require.Empty(t, r.problem)
		out[i] = r.records
	}
	return out
}

func TestSpoolDirectoryChecked(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, dir string)
		err     string
	}{
		{name: "group readable", prepare: func(t *testing.T, dir string) { require.NoError(t, os.Mkdir(dir, 0o750)) }, err: "must be private"},
		{name: "world writable", prepare: func(t *testing.T, dir string) {
			require.NoError(t, os.Mkdir(dir, 0o700))
			require.NoError(t, os.Chmod(dir, 0o777))
		}, err: "must be private"},
		{name: "a symlink", prepare: func(t *testing.T, dir string) {
			target := dir + "-target"
			require.NoError(t, os.Mkdir(target, 0o700))
			require.NoError(t, os.Symlink(target, dir))
		}, err: "not a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "spool")
			tt.prepare(t, dir)
			_, err := Open(context.Background(), Options{Dir: dir, Log: &testutil.CaptureLogger{}})
			require.ErrorContains(t, err, tt.err)
			require.ErrorContains(t, err, dir)
			fi, lerr := os.Lstat(dir)
			require.NoError(t, lerr)
			if fi.Mode()&os.ModeSymlink == 0 {
				require.NotEqual(t, os.FileMode(0o700), fi.Mode().Perm(), "the mode is never changed")
			}
		})
	}
}

func TestSpoolOptionsChecked(t *testing.T) {
	tests := []struct {
		name string
		opts Options
		err  string
	}{
		{name: "too small", opts: Options{MaxSize: 1000}, err: "below the minimum"},
		{name: "negative sync", opts: Options{SyncInterval: -1}, err: "must not be negative"},
		{name: "bad policy", opts: Options{Full: "panic"}, err: `spool_full "panic"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.opts.Dir = t.TempDir() + "/s"
			tt.opts.Log = &testutil.CaptureLogger{}
			_, err := Open(context.Background(), tt.opts)
			require.ErrorContains(t, err, tt.err)
		})
	}
}

func TestSpoolLockWaits(t *testing.T) {
	dir := t.TempDir() + "/s"
	s, _ := open(t, dir, nil)
	appendN(t, s, 0, 10)

	log := &testutil.CaptureLogger{}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	_, err := Open(ctx, Options{Dir: dir, Log: log})
	require.ErrorIs(t, err, context.DeadlineExceeded)
	require.Contains(t, strings.Join(log.Warnings(), "\n"), fmt.Sprintf("locked by another process (pid %d)", os.Getpid()))

	// The second waits, and replays once the first is gone.
	opened := make(chan *Spool, 1)
	go func() {
		s2, err := Open(context.Background(), Options{Dir: dir, Log: log})
		if err != nil {
			panic(err)
		}
		opened <- s2
	}()
	select {
	case <-opened:
		t.Fatal("opened while locked")
	case <-time.After(200 * time.Millisecond):
	}
	require.NoError(t, s.Close())
	s2 := <-opened
	defer s2.Close()
	require.Equal(t, want(0, 10), payloads(readAll(t, s2, 100)))
}

func TestSpoolStats(t *testing.T) {
	s, _ := open(t, t.TempDir()+"/s", func(o *Options) { o.SegmentSize = 1024 })
	require.Zero(t, s.Stats().OldestAge)
	appendN(t, s, 0, 100)
	time.Sleep(20 * time.Millisecond) // an age to measure
	st := s.Stats()
	require.EqualValues(t, 100, st.Records)
	require.Positive(t, st.OldestAge)
	require.Greater(t, st.Segments, 1)
	got := readAll(t, s, 40)
	require.NoError(t, s.Release(got[49].End))
	require.EqualValues(t, 50, s.Stats().Records)
	require.Positive(t, s.Stats().OldestAge)
	require.NoError(t, s.Release(got[99].End))
	require.Zero(t, s.Stats().Records)
	require.Zero(t, s.Stats().OldestAge)
}

// Damage in the segment of the release cursor: what was released before the
// stop is neither replayed nor counted lost, and the intact records after
// the damage replay once each.
func TestSpoolDamageAroundTheCursor(t *testing.T) {
	tests := []struct {
		name    string
		damaged int // the record whose payload gets a flipped byte
		want    []string
		lost    int64
		logged  string
	}{
		{
			name:    "damage after the cursor",
			damaged: 60,
			want:    append(want(40, 20), want(61, 39)...),
			lost:    1,
			logged:  "keeping its 60 records before the damage and 39 intact ones after it; at least 1 metrics are lost",
		},
		{
			name:    "damage before the cursor, in what was delivered",
			damaged: 20,
			want:    want(40, 60),
			logged:  "no metric is lost",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir() + "/s"
			s, _ := open(t, dir, nil)
			appendN(t, s, 0, 100)
			got := readAll(t, s, 100)
			require.Len(t, got, 100)
			require.NoError(t, s.Release(got[39].End))
			require.NoError(t, s.Close())
			segs := segments(t, dir)
			require.Len(t, segs, 1, "one segment holds the cursor and the damage")
			flip(t, segs[0], recordOffset(t, segs[0], tt.damaged)+recordHeader+2, 0x55)

			s2, log := open(t, dir, nil)
			require.Equal(t, tt.want, payloads(readAll(t, s2, 50)))
			require.Equal(t, tt.lost, s2.Stats().LostRecords)
			require.Contains(t, strings.Join(append(log.Errors(), log.Warnings()...), "\n"), tt.logged)

			// The rewritten segment and the cursor agree after a restart.
			require.NoError(t, s2.Close())
			s3, log3 := open(t, dir, nil)
			require.Equal(t, tt.want, payloads(readAll(t, s3, 50)))
			require.Empty(t, log3.Errors())
		})
	}
}
