package spool

import (
	"encoding/binary"
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
