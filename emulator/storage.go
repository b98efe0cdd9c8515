package emulator

import "slices"

// maxPageBytes bounds the payload bytes of one telemetry page (one message at
// least is always returned): a page's JSON holds each payload as text and as
// base64, so a page is a few times this on the wire.
const maxPageBytes = 8 << 20

// storeLocked keeps an accepted message for Received and the telemetry API,
// within the WithMaxReceived count and the WithMaxReceivedBytes payload
// budget. When either would be exceeded, the oldest messages are dropped at
// once until both are at half their budget, so that trimming stays amortised
// O(1). A single message larger than the byte budget is still kept (alone).
func (s *Server) storeLocked(msg Message) {
	size := int64(len(msg.Payload))
	overCount := s.maxReceived > 0 && len(s.received) >= s.maxReceived
	overBytes := s.maxReceivedBytes > 0 && s.receivedBytes+size > s.maxReceivedBytes
	if overCount || overBytes {
		n, kept := 0, s.receivedBytes
		for n < len(s.received) &&
			((s.maxReceived > 0 && len(s.received)-n > s.maxReceived/2) ||
				(s.maxReceivedBytes > 0 && kept+size > s.maxReceivedBytes/2)) {
			kept -= int64(len(s.received[n].Payload))
			n++
		}
		// slices.Delete zeroes the vacated tail, so the dropped payloads
		// are garbage at once.
		s.received = slices.Delete(s.received, 0, n)
		s.receivedBytes = kept
	}
	s.received = append(s.received, msg)
	s.receivedBytes += size
}

// ReceivedPage is one page of the kept messages, oldest first.
type ReceivedPage struct {
	// Messages are the kept messages with Index >= since, at most limit of
	// them and about maxPageBytes of payload (at least one).
	Messages []Message
	// Next is the index to pass as since for the following page.
	Next int
	// More reports that messages from Next on are already kept: ask again
	// at once rather than wait.
	More bool
	// Dropped counts the messages from since on that are no longer kept
	// (the WithMaxReceived/WithMaxReceivedBytes budgets dropped them).
	Dropped int
}

// ReceivedPageSince returns at most limit kept messages with Index >= since.
// The Message structs are copies; their payloads are shared, read-only.
func (s *Server) ReceivedPageSince(since, limit int) ReceivedPage {
	s.mu.Lock()
	defer s.mu.Unlock()
	first := s.recvTotal - len(s.received)
	start := max(since, first)
	page := ReceivedPage{Next: s.recvTotal, Dropped: max(first-since, 0)}
	if start >= s.recvTotal || limit <= 0 {
		page.Next = min(start, s.recvTotal)
		page.More = page.Next < s.recvTotal
		return page
	}
	bytes := 0
	for _, m := range s.received[start-first:] {
		if len(page.Messages) == limit || (len(page.Messages) > 0 && bytes+len(m.Payload) > maxPageBytes) {
			break
		}
		bytes += len(m.Payload)
		page.Messages = append(page.Messages, m)
	}
	page.Next = page.Messages[len(page.Messages)-1].Index + 1
	page.More = page.Next < s.recvTotal
	return page
}
