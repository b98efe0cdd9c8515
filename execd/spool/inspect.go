package spool

import (
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Summary is what Inspect finds in a spool directory.
type Summary struct {
	Bytes    int64 // bytes of the segment files
	Segments int
	// Oldest is the append time of the oldest record not released (zero
	// when every record is released, or when it cannot be read).
	Oldest time.Time
}

// Inspect reads a spool directory without opening the spool: it takes no
// lock, repairs nothing and writes nothing, so it may run beside the process
// that has the spool open (whose appends it may see half-written: a torn
// record only makes the answer a little stale). A missing directory is an
// error wrapping fs.ErrNotExist.
func Inspect(dir string) (Summary, error) {
	var sum Summary
	entries, err := os.ReadDir(dir)
	if err != nil {
		return sum, err
	}
	cursor, cursorOK := Position{}, false
	if b, err := os.ReadFile(filepath.Join(dir, "cursor")); err == nil {
		cursor, cursorOK = decodeCursor(b)
	}
	var seqs []uint64
	for _, e := range entries {
		num, ok := strings.CutSuffix(e.Name(), ".seg")
		if !ok || !e.Type().IsRegular() {
			continue
		}
		seq, err := strconv.ParseUint(num, 10, 64)
		if err != nil {
			continue
		}
		fi, err := e.Info()
		if err != nil {
			continue // deleted since ReadDir: released
		}
		sum.Bytes += fi.Size()
		sum.Segments++
		if !cursorOK || seq >= cursor.Seq {
			seqs = append(seqs, seq)
		}
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })
	// The oldest record not released is at the cursor when it is inside a
	// segment, else at the start of the next segment that has one.
	for _, seq := range seqs {
		off := int64(headerSize)
		if cursorOK && seq == cursor.Seq {
			off = cursor.Off
		}
		if ms := appendTimeIn(dir, Position{Seq: seq, Off: off}); ms > 0 {
			sum.Oldest = time.UnixMilli(ms)
			break
		}
	}
	return sum, nil
}

// decodeCursor decodes the cursor file's bytes; ok is false when they are
// damaged.
func decodeCursor(b []byte) (Position, bool) {
	if len(b) != cursorSize || crc32.Checksum(b[:16], castagnoli) != binary.LittleEndian.Uint32(b[16:]) {
		return Position{}, false
	}
	return Position{Seq: binary.LittleEndian.Uint64(b[0:8]), Off: int64(binary.LittleEndian.Uint64(b[8:16]))}, true
}

// appendTimeIn reads the append time of the record at p in the spool
// directory dir (0 when there is no complete record header there).
func appendTimeIn(dir string, p Position) int64 {
	f, err := os.Open(filepath.Join(dir, segmentName(p.Seq)))
	if err != nil {
		return 0
	}
	defer f.Close()
	var h [recordHeader]byte
	if _, err := f.ReadAt(h[:], p.Off); err != nil {
		return 0
	}
	return int64(binary.LittleEndian.Uint64(h[8:16]))
}
