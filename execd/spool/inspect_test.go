package spool

import (
	"encoding/binary"
	"hash/crc32"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// TestInspect reads segments and cursors written byte by byte, with distinct
// append times: the oldest record not released follows the cursor, within a
// segment and across segments, and a torn segment adds only its bytes.
func TestInspect(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "spool")
	_, err := Inspect(dir)
	require.ErrorIs(t, err, fs.ErrNotExist)
	require.NoError(t, os.Mkdir(dir, 0o700))

	segment := func(seq uint64, times ...int64) []int64 {
		data := []byte(segmentMagic)
		var ends []int64
		for _, ms := range times {
			data = appendRecord(data, ms, []byte("m v=1"))
			ends = append(ends, int64(len(data)))
		}
		require.NoError(t, os.WriteFile(filepath.Join(dir, segmentName(seq)), data, 0o600))
		return ends
	}
	cursor := func(seq uint64, off int64) {
		var b [cursorSize]byte
		binary.LittleEndian.PutUint64(b[0:8], seq)
		binary.LittleEndian.PutUint64(b[8:16], uint64(off))
		binary.LittleEndian.PutUint32(b[16:], crc32.Checksum(b[:16], castagnoli))
		require.NoError(t, os.WriteFile(filepath.Join(dir, "cursor"), b[:], 0o600))
	}
	ends1 := segment(1, 1000, 2000, 3000)
	ends2 := segment(2, 4000, 5000)
	// A torn append: half a record header.
	require.NoError(t, os.WriteFile(filepath.Join(dir, segmentName(3)), append([]byte(segmentMagic), 1, 2, 3), 0o600))
	bytes := ends1[2] + ends2[1] + int64(headerSize) + 3

	for _, tc := range []struct {
		name   string
		seq    uint64
		off    int64
		oldest int64 // ms, 0: none
	}{
		{"no cursor", 0, 0, 1000},
		{"inside the first segment", 1, ends1[1], 3000},
		{"at the end of the first segment", 1, ends1[2], 4000},
		{"inside the second segment", 2, ends2[0], 5000},
		{"everything released", 2, ends2[1], 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.seq == 0 {
				require.NoError(t, os.RemoveAll(filepath.Join(dir, "cursor")))
			} else {
				cursor(tc.seq, tc.off)
			}
			sum, err := Inspect(dir)
			require.NoError(t, err)
			require.Equal(t, bytes, sum.Bytes)
			require.Equal(t, 3, sum.Segments)
			if tc.oldest == 0 {
				require.True(t, sum.Oldest.IsZero(), "oldest %v", sum.Oldest)
			} else {
				require.Equal(t, time.UnixMilli(tc.oldest), sum.Oldest)
			}
		})
	}
}
