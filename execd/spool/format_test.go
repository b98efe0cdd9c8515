package spool

import (
	"encoding/binary"
	"sort"
	"testing"

	"github.com/stretchr/testify/require"
)

// segmentOf frames n records as a segment file's bytes, and returns the
// offset of each record.
func segmentOf(n int) ([]byte, []int) {
	data := []byte(segmentMagic)
	offs := make([]int, n)
	for i := range n {
		offs[i] = len(data)
		data = appendRecord(data, int64(1000+i), payload(i))
	}
	return data, offs
}

// TestScanSegmentTornOrBadLength: a record running past the end is a torn
// append only when nothing valid follows it; a damaged length field with
// valid records after it is damage, and the records after it are counted.
func TestScanSegmentTornOrBadLength(t *testing.T) {
	tests := []struct {
		name string
		// damage changes the bytes of a segment of 200 records.
		damage  func(data []byte, offs []int) []byte
		records int // valid records before the problem
		torn    bool
		after   int // valid records found after the problem
	}{
		{
			name:    "clean",
			damage:  func(d []byte, _ []int) []byte { return d },
			records: 200,
		},
		{
			name:    "torn last record",
			damage:  func(d []byte, _ []int) []byte { return d[:len(d)-5] },
			records: 199,
			torn:    true,
		},
		{
			name:    "torn in the header of the last record",
			damage:  func(d []byte, o []int) []byte { return d[:o[199]+7] },
			records: 199,
			torn:    true,
		},
		{
			name:    "zeros after the last record (power cut)",
			damage:  func(d []byte, _ []int) []byte { return append(d, make([]byte, 4096)...) },
			records: 200,
			torn:    true,
		},
		{
			name: "one bit of a length field flipped: the record runs past the end",
			damage: func(d []byte, o []int) []byte {
				d[o[48]+2] ^= 0x10 // +1 MiB
				return d
			},
			records: 48,
			after:   151,
		},
		{
			name: "one bit of a length field flipped: the record is shorter",
			damage: func(d []byte, o []int) []byte {
				d[o[48]] ^= 0x04
				return d
			},
			records: 48,
			after:   151,
		},
		{
			name: "length over the limit",
			damage: func(d []byte, o []int) []byte {
				binary.LittleEndian.PutUint32(d[o[10]:], MaxRecord+1)
				return d
			},
			records: 10,
			after:   189,
		},
		{
			name: "length of the last record flipped: as torn as can be told",
			damage: func(d []byte, o []int) []byte {
				d[o[199]+2] ^= 0x10
				return d
			},
			records: 199,
			torn:    true,
		},
		{
			name: "payload byte flipped",
			damage: func(d []byte, o []int) []byte {
				d[o[100]+recordHeader+3] ^= 0x55
				return d
			},
			records: 100,
			after:   99,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data, offs := segmentOf(200)
			r := scanSegment(tt.damage(data, offs))
			require.Equal(t, tt.records, r.records)
			require.Equal(t, tt.torn, r.torn, r.problem)
			require.Equal(t, tt.after, r.after)
			require.Equal(t, tt.records == 200 && !tt.torn, r.problem == "", r.problem)
		})
	}
}

// TestSalvageFindsEveryIntactRecord: after the damage scanSegment stopped
// at, salvage finds every record whose CRC holds, in order, past further
// damage, and says where each further damaged stretch starts.
func TestSalvageFindsEveryIntactRecord(t *testing.T) {
	tests := []struct {
		name      string
		damage    func(data []byte, offs []int) []byte
		from      func(offs []int) int // where the salvage starts
		records   []int                // the records found, by index
		stretches func(offs []int) []int
	}{
		{
			name:    "one payload byte flipped",
			damage:  func(d []byte, o []int) []byte { d[o[100]+recordHeader+3] ^= 0x55; return d },
			from:    func(o []int) int { return o[100] + 1 },
			records: seq(101, 200),
		},
		{
			name: "two records damaged",
			damage: func(d []byte, o []int) []byte {
				d[o[10]+recordHeader] ^= 0x01
				d[o[150]+5] ^= 0x01 // its CRC
				return d
			},
			from:      func(o []int) int { return o[10] + 1 },
			records:   append(seq(11, 150), seq(151, 200)...),
			stretches: func(o []int) []int { return []int{o[150]} },
		},
		{
			name:    "a length field flipped",
			damage:  func(d []byte, o []int) []byte { d[o[48]+2] ^= 0x10; return d },
			from:    func(o []int) int { return o[48] + 1 },
			records: seq(49, 200),
		},
		{
			name:    "zeros after the last record are no damage",
			damage:  func(d []byte, o []int) []byte { d[o[5]+recordHeader] ^= 0x01; return append(d, make([]byte, 512)...) },
			from:    func(o []int) int { return o[5] + 1 },
			records: seq(6, 200),
		},
		{
			name: "a torn record at the end is a stretch",
			damage: func(d []byte, o []int) []byte {
				d[o[5]+recordHeader] ^= 0x01
				return d[:len(d)-3]
			},
			from:      func(o []int) int { return o[5] + 1 },
			records:   seq(6, 199),
			stretches: func(o []int) []int { return []int{o[199]} },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			data, offs := segmentOf(200)
			data = tt.damage(data, offs)
			spans, stretches := salvage(data, tt.from(offs))
			var got []int
			for _, sp := range spans {
				i := sort.SearchInts(offs, sp.off)
				require.Equal(t, offs[i], sp.off, "a span starts at a record")
				got = append(got, i)
			}
			require.Equal(t, tt.records, got)
			var want []int
			if tt.stretches != nil {
				want = tt.stretches(offs)
			}
			require.Equal(t, want, stretches)
		})
	}
}

// seq is the integers from lo up to hi, hi excluded.
func seq(lo, hi int) []int {
	out := make([]int, 0, hi-lo)
	for i := lo; i < hi; i++ {
		out = append(out, i)
	}
	return out
}
