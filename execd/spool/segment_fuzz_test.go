package spool

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/influxdata/telegraf/testutil"
	"github.com/stretchr/testify/require"
)

// FuzzSegmentReader feeds the segment reader valid records followed by
// arbitrary bytes, as the last segment or as one before it. Whatever the
// bytes: Open never fails or panics on them, every valid record before them
// replays in order, nothing replays that was not appended or that the bytes
// forged, and a second Open finds nothing left to repair.
func FuzzSegmentReader(f *testing.F) {
	f.Add("a x=1 1\nb x=2 2", []byte{}, false)
	f.Add("a x=1 1", []byte{0, 0, 0, 0, 0, 0}, false)
	f.Add("a x=1 1\nb", []byte{0xff, 0xff, 0xff, 0x7f, 1, 2, 3, 4}, true)
	f.Add("", []byte("OCSPOOL\x01"), true)
	f.Add("m n=1i", appendRecord(nil, 1, []byte("forged")), true)
	f.Add("m n=1i", appendRecord(nil, 1, []byte("forged"))[:20], false)
	f.Add("m n=1i", bytes.Repeat([]byte{0}, 64), false)
	f.Fuzz(func(t *testing.T, records string, garbage []byte, middle bool) {
		payloads := []string{}
		if records != "" {
			payloads = strings.Split(records, "\n")
		}
		seg := []byte(segmentMagic)
		for _, p := range payloads {
			seg = appendRecord(seg, 1, []byte(p))
		}
		// garbage that happens to be whole valid records also replays;
		// find what the reader may legitimately return from it.
		forged := len(intactRecords(append([]byte(segmentMagic), garbage...)))
		seg = append(seg, garbage...)

		dir := filepath.Join(t.TempDir(), "s")
		require.NoError(t, os.Mkdir(dir, 0o700))
		require.NoError(t, os.WriteFile(filepath.Join(dir, segmentName(1)), seg, 0o600))
		after := []string{}
		if middle {
			next := appendRecord([]byte(segmentMagic), 2, []byte("after"))
			require.NoError(t, os.WriteFile(filepath.Join(dir, segmentName(2)), next, 0o600))
			after = append(after, "after")
		}

		read := func() []string {
			s, err := Open(context.Background(), Options{Dir: dir, Log: &testutil.CaptureLogger{}})
			require.NoError(t, err)
			defer s.Close()
			got := []string{}
			for {
				recs, err := s.Read(7)
				require.NoError(t, err)
				if len(recs) == 0 {
					return got
				}
				for _, r := range recs {
					got = append(got, string(r.Payload))
				}
			}
		}
		got := read()
		require.GreaterOrEqual(t, len(got), len(payloads)+len(after), "a valid record was lost")
		require.Equal(t, payloads, got[:len(payloads)], "the valid records, in order")
		extra := got[len(payloads) : len(got)-len(after)]
		require.LessOrEqual(t, len(extra), forged, "records replayed that the bytes do not hold")
		require.Equal(t, after, got[len(got)-len(after):], "the next segment replays")
		require.Equal(t, got, read(), "a second Open replays the same")
	})
}
