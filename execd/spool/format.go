package spool

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
)

// The on-disk format. There is no library for this: Telegraf's own disk
// buffer (tidwall/wal) keeps no CRC per record, truncates nothing torn and
// has no notion of a release cursor shared with a reader, so the few dozen
// lines of framing are written here.
//
// A segment file is a header followed by records:
//
//	header: "OCSPOOL" 0x01 (8 bytes)
//	record: length uint32 LE | crc uint32 LE | appended int64 LE | payload
//
// length is the payload's length; crc is the CRC-32C (Castagnoli) of the
// length, the append time and the payload, so a torn or flipped record is
// found; appended is the append time in Unix milliseconds, for the age of the
// oldest record.
const (
	segmentMagic = "OCSPOOL\x01"
	headerSize   = len(segmentMagic)
	recordHeader = 16
	// MaxRecord is the longest payload a record may hold; a length over it
	// is damage.
	MaxRecord = 64 << 20
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// appendRecord appends the framed record to dst.
func appendRecord(dst []byte, appendedMs int64, payload []byte) []byte {
	var h [recordHeader]byte
	binary.LittleEndian.PutUint32(h[0:4], uint32(len(payload)))
	binary.LittleEndian.PutUint64(h[8:16], uint64(appendedMs))
	crc := crc32.Update(0, castagnoli, h[0:4])
	crc = crc32.Update(crc, castagnoli, h[8:16])
	crc = crc32.Update(crc, castagnoli, payload)
	binary.LittleEndian.PutUint32(h[4:8], crc)
	dst = append(dst, h[:]...)
	return append(dst, payload...)
}

// errShort means buf ends inside a record: more bytes are needed (or, at the
// end of a file, the record is torn).
var errShort = errors.New("record incomplete")

// errDamaged means the bytes at the position are not a valid record.
type errDamaged struct{ reason string }

func (e *errDamaged) Error() string { return e.reason }

// decodeRecord decodes the record at the start of buf. It returns the
// payload (a sub-slice of buf), the append time and the record's total size;
// errShort when buf ends inside the record, *errDamaged when the bytes are
// not a record.
func decodeRecord(buf []byte) (payload []byte, appendedMs int64, size int, err error) {
	if len(buf) < recordHeader {
		return nil, 0, 0, errShort
	}
	n := binary.LittleEndian.Uint32(buf[0:4])
	if n > MaxRecord {
		return nil, 0, 0, &errDamaged{fmt.Sprintf("record length %d over the limit of %d", n, MaxRecord)}
	}
	size = recordHeader + int(n)
	if len(buf) < size {
		return nil, 0, 0, errShort
	}
	crc := crc32.Update(0, castagnoli, buf[0:4])
	crc = crc32.Update(crc, castagnoli, buf[8:16])
	crc = crc32.Update(crc, castagnoli, buf[recordHeader:size])
	if crc != binary.LittleEndian.Uint32(buf[4:8]) {
		return nil, 0, 0, &errDamaged{"record checksum mismatch"}
	}
	return buf[recordHeader:size], int64(binary.LittleEndian.Uint64(buf[8:16])), size, nil
}

// scanResult is what scanSegment found in a segment's bytes.
type scanResult struct {
	// valid is the length of the undamaged prefix: the header and every
	// record up to the first damaged or torn one.
	valid   int64
	records int
	// firstMs is the append time of the first record (0 when none).
	firstMs int64
	// problem says why the scan stopped before the end ("" when it did not).
	problem string
	// torn is set when the scan stopped at a record that runs past the end
	// of the data, or zeros only follow, and no valid record follows:
	// what an interrupted append leaves.
	torn bool
	// after counts the valid records found after the damage (none when
	// torn): what a bad length field would hide.
	after int
}

// salvageFrom is where the intact records after the damage are looked for:
// past the damaged record scanSegment stopped at, or right after a damaged
// header (valid 0), where records may start.
func (r scanResult) salvageFrom() int {
	if r.valid == 0 {
		return headerSize
	}
	return int(r.valid) + 1
}

// scanSegment checks the segment bytes data: its header, then each record
// in turn until the end or the first record that is damaged or runs past the
// end. It never fails: what is wrong is in the result.
func scanSegment(data []byte) scanResult {
	var r scanResult
	if len(data) < headerSize {
		r.problem = fmt.Sprintf("segment of %d bytes has no complete header", len(data))
		r.torn = true
		return r
	}
	if string(data[:headerSize]) != segmentMagic {
		r.problem = "not a spool segment (bad header)"
		r.after = validAfter(data, headerSize)
		return r
	}
	off := headerSize
	r.valid = int64(off)
	for off < len(data) {
		_, ms, size, err := decodeRecord(data[off:])
		if err != nil {
			r.problem = fmt.Sprintf("%v at offset %d", err, off)
			r.after = validAfter(data, off+1)
			// A power cut can leave the file longer than what was written,
			// the rest reading as zeros: that is a torn append too. A
			// record running past the end with valid records after it is
			// not: its length field is damaged.
			r.torn = r.after == 0 && (errors.Is(err, errShort) || allZero(data[off:]))
			return r
		}
		if r.records == 0 {
			r.firstMs = ms
		}
		r.records++
		off += size
		r.valid = int64(off)
	}
	return r
}

// validAfter counts the valid records that follow one another from the
// first valid record at or after from (0 when there is none).
func validAfter(data []byte, from int) int {
	off := nextValid(data, from)
	if off < 0 {
		return 0
	}
	count := 0
	for off < len(data) {
		_, _, size, err := decodeRecord(data[off:])
		if err != nil {
			break
		}
		count++
		off += size
	}
	return count
}

// nextValid is the offset of the first valid record at or after from, byte
// by byte, -1 when there is none. A false match needs a length that fits
// and a matching CRC-32C, about one chance in 2^32 at each offset tried.
func nextValid(data []byte, from int) int {
	for off := from; off+recordHeader <= len(data); off++ {
		if n := binary.LittleEndian.Uint32(data[off:]); n > MaxRecord || off+recordHeader+int(n) > len(data) {
			continue
		}
		if _, _, _, err := decodeRecord(data[off:]); err == nil {
			return off
		}
	}
	return -1
}

// recordSpan is a valid record's place in a segment's bytes.
type recordSpan struct{ off, size int }

// salvage finds every valid record at or after from in a damaged segment's
// bytes: it decodes records in turn and, at each further damage, looks for
// the next valid record as nextValid does. It returns the records in order
// and the offsets of the damaged stretches it skipped after the first one
// (each held at least one record, or the torn end of one).
//
// Why: one flipped byte used to cost every record after it in its segment
// (up to 4 MiB of metrics), though their own CRCs show them intact.
func salvage(data []byte, from int) (spans []recordSpan, stretches []int) {
	off := nextValid(data, from)
	for off >= 0 && off < len(data) {
		_, _, size, err := decodeRecord(data[off:])
		if err == nil {
			spans = append(spans, recordSpan{off, size})
			off += size
			continue
		}
		if allZero(data[off:]) {
			break // what a power cut leaves after the last write
		}
		stretches = append(stretches, off)
		off = nextValid(data, off+1)
	}
	return spans, stretches
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// SegmentRecords returns the payloads of the segment file at path: every
// intact record, those after a damaged one too, as a new Open replays them
// (a diagnostic: tests and tools use it to see what a spool holds without
// opening it).
func SegmentRecords(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return intactRecords(data), nil
}

// intactRecords are the payloads of a segment's bytes that Open replays:
// the records before any damage, then those salvage finds after it.
func intactRecords(data []byte) [][]byte {
	r := scanSegment(data)
	out := make([][]byte, 0, r.records)
	for off := int64(headerSize); off < r.valid; {
		p, _, size, err := decodeRecord(data[off:])
		if err != nil {
			break
		}
		out = append(out, p)
		off += int64(size)
	}
	if r.problem != "" && !r.torn {
		spans, _ := salvage(data, r.salvageFrom())
		for _, sp := range spans {
			out = append(out, data[sp.off+recordHeader:sp.off+sp.size])
		}
	}
	return out
}
