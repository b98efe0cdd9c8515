package spool

import (
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"
)

// used is the bytes in use on the filesystem of dir.
func used(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	require.NoError(t, syscall.Statfs(dir, &st))
	return int64(st.Blocks-st.Bfree) * int64(st.Bsize)
}

// bridgeUp appends n records and releases each batch once it is read, as
// the runner does with the bridge up. It returns the most bytes the
// filesystem of dir had in use meanwhile, how many records were delivered
// (read back in order and released) and the error that stopped it.
func bridgeUp(t *testing.T, s *Spool, dir string, n int) (peak int64, delivered int, err error) {
	t.Helper()
	for i := 0; i < n; i += 100 {
		for j := i; j < i+100; j++ {
			if err := s.Append(payload(j)); err != nil {
				return peak, delivered, err
			}
		}
		if err := s.Commit(); err != nil {
			return peak, delivered, err
		}
		recs, err := s.Read(1000)
		require.NoError(t, err)
		require.Equal(t, want(i, 100), payloads(recs))
		require.NoError(t, s.Release(recs[len(recs)-1].End))
		delivered += len(recs)
		peak = max(peak, used(t, dir))
	}
	return peak, delivered, nil
}

// TestSpoolFootprintBridgeUp: with the bridge up, the spool's footprint
// stays near the unacknowledged backlog, on a 4 MiB filesystem with the
// default spool_max_size (1 GiB).
func TestSpoolFootprintBridgeUp(t *testing.T) {
	fs := smallFilesystem(t, 4<<20)
	s, log := open(t, fs+"/s", func(o *Options) { o.MaxSize = 0 })
	const n = 200_000 // about 9 MiB of records, twice the filesystem
	peak, delivered, err := bridgeUp(t, s, fs, n)
	t.Logf("bridge up on a 4 MiB tmpfs: %d of %d records delivered, peak use %d bytes, stopped by: %v", delivered, n, peak, err)
	require.NoError(t, err)
	require.Equal(t, n, delivered)
	require.Less(t, peak, int64(512<<10), "the footprint follows the backlog (100 records), not the segment size")

	// spool_max_size was capped by the free space, with a warning.
	require.Less(t, s.Stats().MaxSize, int64(4<<20))
	require.Contains(t, strings.Join(log.Warnings(), "\n"), "the spool holds at most")
}
