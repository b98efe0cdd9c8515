package emulator

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/require"
)

// store records n messages of the given payload sizes as handleData does.
func (s *Server) storeSizes(sizes ...int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range sizes {
		s.storeLocked(Message{Index: s.recvTotal, Payload: bytes.Repeat([]byte{byte(s.recvTotal)}, n)})
		s.recvTotal++
	}
}

func repeat(n, size int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = size
	}
	return out
}

// TestReceivedBudgets stores messages under a count and a byte budget: the
// kept messages are always the newest, contiguous, within both budgets (a
// single message larger than the byte budget alone excepted), and the byte
// tally matches what is kept.
func TestReceivedBudgets(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		maxCount  int
		maxBytes  int64
		sizes     []int
		wantKept  int
		wantBytes int64
	}{
		{name: "no budget", sizes: repeat(50, 100), wantKept: 50, wantBytes: 5000},
		{name: "count only", maxCount: 10, sizes: repeat(25, 100), wantKept: 10, wantBytes: 1000},
		// 10 x 100 fit; the 11th drops down to half the budget (5), then is kept.
		{name: "bytes only", maxBytes: 1000, sizes: repeat(11, 100), wantKept: 5, wantBytes: 500},
		{name: "bytes only, just full", maxBytes: 1000, sizes: repeat(10, 100), wantKept: 10, wantBytes: 1000},
		{name: "bytes reached before the count", maxCount: 100, maxBytes: 1000, sizes: repeat(30, 100), wantKept: 6, wantBytes: 600},
		{name: "count reached before the bytes", maxCount: 4, maxBytes: 1 << 20, sizes: repeat(5, 100), wantKept: 3, wantBytes: 300},
		{name: "one big message drops all", maxBytes: 1000, sizes: []int{100, 100, 900}, wantKept: 1, wantBytes: 900},
		{name: "a message over the budget is kept alone", maxBytes: 1000, sizes: []int{100, 5000}, wantKept: 1, wantBytes: 5000},
		{name: "empty payloads count against the count only", maxCount: 3, maxBytes: 10, sizes: repeat(7, 0), wantKept: 3, wantBytes: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Start(WithTCPAddr(""), WithTLSAddr(""), WithMaxReceived(tc.maxCount), WithMaxReceivedBytes(tc.maxBytes))
			require.NoError(t, err)
			defer s.Close()
			s.storeSizes(tc.sizes...)
			kept := s.Received()
			require.Len(t, kept, tc.wantKept)
			var sum int64
			for i, m := range kept {
				require.Equal(t, len(tc.sizes)-len(kept)+i, m.Index, "the newest, contiguous")
				require.Len(t, m.Payload, tc.sizes[m.Index])
				sum += int64(len(m.Payload))
			}
			require.Equal(t, tc.wantBytes, sum)
			s.mu.Lock()
			require.Equal(t, sum, s.receivedBytes)
			s.mu.Unlock()
			if tc.maxCount > 0 {
				require.LessOrEqual(t, len(kept), tc.maxCount)
			}
			if tc.maxBytes > 0 && len(kept) > 1 {
				require.LessOrEqual(t, sum, tc.maxBytes)
			}
		})
	}
}

// TestReceivedPageBytes: a page stops at maxPageBytes of payload, but always
// holds one message, however large.
func TestReceivedPageBytes(t *testing.T) {
	t.Parallel()
	s, err := Start(WithTCPAddr(""), WithTLSAddr(""))
	require.NoError(t, err)
	defer s.Close()
	const mib = 1 << 20
	s.storeSizes(repeat(10, mib)...)
	s.storeSizes(maxPageBytes + 1)
	s.storeSizes(1)

	page := s.ReceivedPageSince(0, 1000)
	require.Len(t, page.Messages, maxPageBytes/mib)
	require.Equal(t, maxPageBytes/mib, page.Next)
	require.True(t, page.More)

	page = s.ReceivedPageSince(page.Next, 1000)
	require.Len(t, page.Messages, 2, "the rest of the 1 MiB messages; the big one does not fit")
	require.True(t, page.More)

	page = s.ReceivedPageSince(page.Next, 1000)
	require.Len(t, page.Messages, 1, "alone, over the page size")
	require.Len(t, page.Messages[0].Payload, maxPageBytes+1)

	page = s.ReceivedPageSince(page.Next, 1000)
	require.Len(t, page.Messages, 1)
	require.False(t, page.More)
	require.Equal(t, 12, page.Next)

	page = s.ReceivedPageSince(99, 1000)
	require.Empty(t, page.Messages)
	require.Equal(t, 12, page.Next, "a cursor past the end comes back to the end")
	require.False(t, page.More)
}
