package share

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/encoding/protowire"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

func TestShareFrameRoundTrip(t *testing.T) {
	received := time.Unix(1700000000, 123456789)
	tests := []struct {
		name string
		in   frame
		// compact: the header travels in compact form from version 3 on
		compact bool
	}{
		{"hello", frame{wireHeader: wireHeader{Op: opHello, ID: 1, Version: shareProtoVersion, Key: "gw-abc", PID: 42}}, false},
		{"publish with binary payload", frame{
			wireHeader: wireHeader{Op: opPublish, ID: 7, Device: "dev-1", Kind: omnicore.KindEvents, Subfolder: "a/b", QoS: 1, Deadline: received.UnixNano()},
			Payload:    []byte{0, 1, 2, 0xff, '\n', '{'},
		}, true},
		{"publish of the largest telemetry", frame{
			wireHeader: wireHeader{Op: opPublish, ID: 8, Device: "dev-1", Kind: omnicore.KindEvents, QoS: 1},
			Payload:    bytes.Repeat([]byte("x"), omnicore.MaxTelemetryBytes),
		}, true},
		{"publish with a deadline before 1970 and an unknown kind", frame{
			wireHeader: wireHeader{Op: opPublish, ID: 1 << 60, Device: "d", Kind: "other", Deadline: -5},
		}, true},
		{"inbound message", *inboundFrame(3, gateway.Inbound{Device: "dev-2", Kind: omnicore.KindCommands, Subfolder: "reboot", Topic: "/reg/dev-2/commands/reboot", Payload: []byte(`{"now":true}`), Received: received}), true},
		{"error response", *respond(9, fmt.Errorf("%w: device %q: not bound", gateway.ErrAttachRefused, "dev-3")), true},
		{"kept subscription", frame{wireHeader: wireHeader{Op: opResponse, ID: 4, Code: codeAttachRefused, Error: "x", Kept: true}}, true},
		{"owner's ping", frame{wireHeader: wireHeader{Op: opPing, Connected: true, Error: "last connect: refused"}}, true},
		{"cancel", frame{wireHeader: wireHeader{Op: opCancel, ID: 12}}, true},
		{"stats response", frame{wireHeader: wireHeader{Op: opResponse, ID: 10, Stats: &gateway.Stats{Connected: true, Acked: 5, ErrorsByType: map[string]uint64{"X": 1}, DroppedByReason: map[string]uint64{}}}}, false},
		{"gauges", frame{wireHeader: wireHeader{Op: opReportGauges, Reason: "spool", Gauges: map[string]int64{"spool_bytes": 7}}}, false},
		{"count drop", frame{wireHeader: wireHeader{Op: opCountDrop, Reason: "too_large", N: 3}}, true},
	}
	for _, version := range []int{2, 3} {
		t.Run(fmt.Sprintf("version %d", version), func(t *testing.T) {
			var buf bytes.Buffer
			bw := bufio.NewWriter(&buf)
			fw := newFrameWriter(bw, version)
			var starts []int
			for _, tt := range tests {
				require.NoError(t, bw.Flush())
				starts = append(starts, buf.Len())
				in := tt.in
				require.NoError(t, fw.write(&in), tt.name)
			}
			require.NoError(t, bw.Flush())
			data := buf.Bytes()
			br := bufio.NewReader(&buf)
			for i, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					wantCompact := tt.compact && version >= compactVersion
					require.Equal(t, wantCompact, data[starts[i]+8] != '{', "compact header")
					got, err := readFrame(br)
					require.NoError(t, err)
					require.Equal(t, tt.in.wireHeader, got.wireHeader)
					require.Equal(t, len(tt.in.Payload), len(got.Payload))
					if len(tt.in.Payload) > 0 {
						require.Equal(t, tt.in.Payload, got.Payload)
					}
				})
			}
			_, err := readFrame(br)
			require.ErrorIs(t, err, io.EOF, "a clean end between frames is io.EOF")
		})
	}

	in := inboundFrame(3, gateway.Inbound{Device: "d", Kind: omnicore.KindConfig, Payload: []byte("p"), Received: received}).inbound()
	require.Equal(t, received, in.Received)
	require.Equal(t, omnicore.KindConfig, in.Kind)
}

// TestShareCompactHeaderSkipsUnknownFields: a later version may add fields
// to the compact header; this one reads past them.
func TestShareCompactHeaderSkipsUnknownFields(t *testing.T) {
	want := wireHeader{Op: opResponse, ID: 3, Error: "e"}
	b := appendCompact(nil, &want)
	b = protowire.AppendTag(b, 99, protowire.BytesType)
	b = protowire.AppendString(b, "from the future")
	b = protowire.AppendTag(b, 100, protowire.Fixed64Type)
	b = protowire.AppendFixed64(b, 1)
	b = protowire.AppendTag(b, 101, protowire.VarintType)
	b = protowire.AppendVarint(b, 300)
	var got wireHeader
	require.NoError(t, decodeCompact(b, &got))
	require.Equal(t, want, got)
}

func TestShareFrameRejected(t *testing.T) {
	raw := func(total, header uint32, rest []byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, total)
		b = binary.BigEndian.AppendUint32(b, header)
		return append(b, rest...)
	}
	hdr := []byte(`{"op":"publish"}`)
	tests := []struct {
		name    string
		data    []byte
		wantErr error
	}{
		{"length over the limit", raw(maxFrameBytes+1, 2, nil), errFrameTooLarge},
		{"length too small", raw(3, 0, nil), errFrameTooLarge},
		{"header longer than the frame", raw(10, 20, nil), nil},
		{"truncated body", raw(uint32(4+len(hdr)+10), uint32(len(hdr)), hdr), io.ErrUnexpectedEOF},
		{"truncated prefix", []byte{0, 0, 0, 20, 0}, io.ErrUnexpectedEOF},
		{"header not JSON", raw(4+3, 3, []byte("{{{")), nil},
		{"header without op", raw(4+2, 2, []byte("{}")), nil},
		{"empty header", raw(4, 0, nil), nil},
		{"compact header with an unknown op", raw(4+2, 2, []byte{0x08, 99}), errCompactHeader},
		{"compact header without op", raw(4+2, 2, []byte{0x10, 1}), errCompactHeader},
		{"compact header cut in a string", raw(4+3, 3, []byte{0x08, 1, 0x22}), errCompactHeader},
		{"compact header with a string past its end", raw(4+4, 4, []byte{0x08, 1, 0x22, 9}), errCompactHeader},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := readFrame(bufio.NewReader(bytes.NewReader(tt.data)))
			require.Error(t, err)
			require.NotErrorIs(t, err, io.EOF)
			if tt.wantErr != nil {
				require.ErrorIs(t, err, tt.wantErr)
			}
		})
	}

	t.Run("writer refuses an oversized payload", func(t *testing.T) {
		var buf bytes.Buffer
		bw := bufio.NewWriter(&buf)
		for _, version := range []int{2, 3} {
			err := newFrameWriter(bw, version).write(&frame{wireHeader: wireHeader{Op: opPublish}, Payload: make([]byte, maxFrameBytes)})
			require.ErrorIs(t, err, errFrameTooLarge)
		}
		require.NoError(t, bw.Flush())
		require.Zero(t, buf.Len(), "nothing of a refused frame is written")
	})
}

func TestShareErrorsCrossTheSocket(t *testing.T) {
	tests := []struct {
		name     string
		err      error
		sentinel error
	}{
		{"attach refused", fmt.Errorf("%w: device %q: not bound", gateway.ErrAttachRefused, "d"), gateway.ErrAttachRefused},
		{"invalid device", fmt.Errorf("%w: empty ID", gateway.ErrInvalidDevice), gateway.ErrInvalidDevice},
		{"too large", fmt.Errorf("%w: 300000 bytes", gateway.ErrTooLarge), gateway.ErrTooLarge},
		{"owner closing", gateway.ErrClosed, errOwnerGone},
		{"deadline", context.DeadlineExceeded, context.DeadlineExceeded},
		{"canceled", context.Canceled, context.Canceled},
		{"other", errors.New("state has no subfolders"), nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := respond(1, tt.err)
			require.NotEmpty(t, r.Code)
			got := responseError(r)
			require.Error(t, got)
			if tt.sentinel != nil {
				require.ErrorIs(t, got, tt.sentinel)
			}
			if tt.sentinel != errOwnerGone {
				require.Equal(t, tt.err.Error(), got.Error(), "the owner's text is kept")
			}
		})
	}
	require.NoError(t, responseError(respond(1, nil)))
}

func TestShareCheckPeer(t *testing.T) {
	tests := []struct {
		name string
		cred peerCred
		self int
		ok   bool
	}{
		{"same user", peerCred{UID: 1000, PID: 12}, 1000, true},
		{"root peer of a normal user", peerCred{UID: 0, PID: 1}, 1000, false},
		{"other user", peerCred{UID: 1001, PID: 77}, 1000, false},
		{"other user, pid unknown", peerCred{UID: 501, PID: -1}, 502, false},
		{"root and root", peerCred{UID: 0, PID: 5}, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := checkPeer(tt.cred, tt.self)
			if tt.ok {
				require.NoError(t, err)
			} else {
				require.ErrorContains(t, err, fmt.Sprintf("uid %d", tt.cred.UID))
			}
		})
	}
}

func TestShareFrameQueueBounds(t *testing.T) {
	fq := newFrameQueue()
	msg := func(n int) *frame { return &frame{wireHeader: wireHeader{Op: opMessage}, Payload: make([]byte, n)} }
	tests := []struct {
		name    string
		f       *frame
		ok      bool
		waiting int
	}{
		{"first", msg(10), true, 0},
		{"second", msg(10), true, 0},
		{"over the byte budget", msg(100), false, 2},
		{"a response is never refused", respond(1, nil), true, 0},
		{"third fits", msg(5), true, 0},
		{"over the count", msg(1), false, 3},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.f.Op != opMessage {
				require.True(t, fq.push(tt.f))
				return
			}
			ok, waiting := fq.pushMessage(tt.f, 3, 50)
			require.Equal(t, tt.ok, ok)
			require.Equal(t, tt.waiting, waiting)
		})
	}
	fs := fq.take(nil)
	require.Len(t, fs, 4)
	fq.written(fs)
	ok, _ := fq.pushMessage(msg(40), 3, 50)
	require.True(t, ok, "written messages free their budget")
	require.Equal(t, 1, fq.close())
	require.False(t, fq.push(respond(2, nil)))
	require.Nil(t, fq.take(nil))
}
