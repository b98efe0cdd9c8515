package gateway

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestAckedRing(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	msg := func(dev string) Message { return Message{Device: dev, Payload: []byte(dev)} }
	type lookup struct {
		id     uint16
		device string
		at     time.Duration
		want   bool
	}
	tests := []struct {
		name    string
		keep    func(r *ackedRing)
		lookups []lookup
	}{
		{
			name: "the newest message of a reused packet ID is the one found",
			keep: func(r *ackedRing) {
				r.keep(7, msg("a"), t0)
				r.keep(7, msg("b"), t0.Add(time.Millisecond))
			},
			lookups: []lookup{{id: 7, device: "a", want: false}, {id: 7, device: "b", want: true}},
		},
		{
			name:    "taken once",
			keep:    func(r *ackedRing) { r.keep(1, msg("a"), t0) },
			lookups: []lookup{{id: 1, device: "a", want: true}, {id: 1, device: "a", want: false}},
		},
		{
			name: "older than the window",
			keep: func(r *ackedRing) { r.keep(1, msg("a"), t0) },
			lookups: []lookup{
				{id: 1, device: "a", at: ackedWindow + time.Millisecond, want: false},
			},
		},
		{
			name: "at most ackedMax, the oldest go first, across wrap-arounds",
			keep: func(r *ackedRing) {
				for i := range ackedMax + 100 {
					r.keep(uint16(i), msg("a"), t0)
				}
			},
			lookups: []lookup{
				{id: 99, device: "a", want: false},
				{id: 100, device: "a", want: true},
				{id: ackedMax + 99, device: "a", want: true},
			},
		},
		{
			name:    "unknown packet ID",
			keep:    func(r *ackedRing) { r.keep(1, msg("a"), t0) },
			lookups: []lookup{{id: 2, device: "a", want: false}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var r ackedRing
			tt.keep(&r)
			require.LessOrEqual(t, r.n, ackedMax)
			for _, l := range tt.lookups {
				got, ok := r.take(l.id, l.device, t0.Add(l.at))
				require.Equal(t, l.want, ok, "packet %d of %q", l.id, l.device)
				if ok {
					require.Equal(t, msg(l.device), got)
				}
			}
		})
	}
}

func TestAckedRingDropsExpiredOnKeep(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	var r ackedRing
	for i := range 10 {
		r.keep(uint16(i), Message{Device: "a", Payload: make([]byte, 1000)}, t0)
	}
	r.keep(100, Message{Device: "a"}, t0.Add(ackedWindow+time.Second))
	require.Equal(t, 1, r.n, "expired messages (and their payloads) are let go of")
	_, ok := r.take(100, "a", t0.Add(ackedWindow+time.Second))
	require.True(t, ok)
}
