package share

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// The compact header of protocol version 3: the fields of wireHeader in the
// protobuf wire format (protowire: numbered fields, unknown ones skipped),
// for every frame whose header has no map or struct field (publish, resp
// without stats, msg, cancel, ping...). Encoding and decoding JSON was about
// a fifth of the CPU of a publish through the socket (four JSON headers per
// message: request and response, each written and read); this is a few
// varints and strings. Frames with maps (hello, stats, report_gauges) keep
// their JSON header: a JSON header starts with '{', a compact one with the
// tag of field 1 (the op), so a reader tells them apart by the first byte.
//
// Why no generated protobuf message: the header is a flat list of a few
// scalars, and its JSON form must stay (the hello has to be readable by
// every version); one Go struct with both encodings keeps the two in step.

// Field numbers of the compact header; never reuse one.
const (
	fieldOp protowire.Number = iota + 1
	fieldID
	fieldSub
	fieldDevice
	fieldKind
	fieldSubfolder
	fieldTopic
	fieldQoS
	fieldReceived
	fieldDeadline
	fieldReason
	fieldN
	fieldCode
	fieldError
	fieldKept
	fieldConnected
)

// opCodes numbers the operations in compact headers; never reuse a number.
var opCodes = map[string]uint64{
	opPublish: 1, opAttach: 2, opDetach: 3, opSubscribe: 4, opSubscribeAll: 5,
	opSubscribeErrors: 6, opUnsubscribe: 7, opCountDrop: 8, opStats: 9,
	opCancel: 10, opPing: 11, opResponse: 12, opMessage: 13,
}

// opNames is opCodes reversed.
var opNames = func() map[uint64]string {
	m := make(map[uint64]string, len(opCodes))
	for op, code := range opCodes {
		m[code] = op
	}
	return m
}()

// compactable reports whether h can travel in a compact header: an op with
// a code and no map or struct field.
func (h *wireHeader) compactable() bool {
	_, ok := opCodes[h.Op]
	return ok && h.Stats == nil && h.Gauges == nil && h.Settings == nil &&
		h.Version == 0 && h.Key == "" && h.Gateway == "" && h.PID == 0 && h.File == ""
}

// appendCompact appends h's compact encoding to b; h must be compactable.
func appendCompact(b []byte, h *wireHeader) []byte {
	b = protowire.AppendTag(b, fieldOp, protowire.VarintType)
	b = protowire.AppendVarint(b, opCodes[h.Op])
	varint := func(num protowire.Number, v uint64) {
		if v != 0 {
			b = protowire.AppendTag(b, num, protowire.VarintType)
			b = protowire.AppendVarint(b, v)
		}
	}
	str := func(num protowire.Number, s string) {
		if s != "" {
			b = protowire.AppendTag(b, num, protowire.BytesType)
			b = protowire.AppendString(b, s)
		}
	}
	varint(fieldID, h.ID)
	varint(fieldSub, h.Sub)
	str(fieldDevice, h.Device)
	str(fieldKind, string(h.Kind))
	str(fieldSubfolder, h.Subfolder)
	str(fieldTopic, h.Topic)
	varint(fieldQoS, uint64(h.QoS))
	varint(fieldReceived, protowire.EncodeZigZag(h.Received))
	varint(fieldDeadline, protowire.EncodeZigZag(h.Deadline))
	str(fieldReason, h.Reason)
	varint(fieldN, h.N)
	str(fieldCode, h.Code)
	str(fieldError, h.Error)
	varint(fieldKept, protowire.EncodeBool(h.Kept))
	varint(fieldConnected, protowire.EncodeBool(h.Connected))
	return b
}

var errCompactHeader = errors.New("sharing protocol: bad compact header")

// decodeCompact decodes a compact header into h. Fields of unknown numbers
// are skipped, so a later version may add some.
func decodeCompact(b []byte, h *wireHeader) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return fmt.Errorf("%w: %w", errCompactHeader, protowire.ParseError(n))
		}
		b = b[n:]
		var v uint64
		var s []byte
		switch typ {
		case protowire.VarintType:
			v, n = protowire.ConsumeVarint(b)
		case protowire.BytesType:
			s, n = protowire.ConsumeBytes(b)
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
		}
		if n < 0 {
			return fmt.Errorf("%w: field %d: %w", errCompactHeader, num, protowire.ParseError(n))
		}
		b = b[n:]
		switch num {
		case fieldOp:
			op, ok := opNames[v]
			if !ok {
				return fmt.Errorf("%w: unknown op %d", errCompactHeader, v)
			}
			h.Op = op
		case fieldID:
			h.ID = v
		case fieldSub:
			h.Sub = v
		case fieldDevice:
			h.Device = string(s)
		case fieldKind:
			h.Kind = kindOf(s)
		case fieldSubfolder:
			h.Subfolder = string(s)
		case fieldTopic:
			h.Topic = string(s)
		case fieldQoS:
			h.QoS = byte(v)
		case fieldReceived:
			h.Received = protowire.DecodeZigZag(v)
		case fieldDeadline:
			h.Deadline = protowire.DecodeZigZag(v)
		case fieldReason:
			h.Reason = string(s)
		case fieldN:
			h.N = v
		case fieldCode:
			h.Code = string(s)
		case fieldError:
			h.Error = string(s)
		case fieldKept:
			h.Kept = protowire.DecodeBool(v)
		case fieldConnected:
			h.Connected = protowire.DecodeBool(v)
		}
	}
	if h.Op == "" {
		return fmt.Errorf("%w: no op", errCompactHeader)
	}
	return nil
}

var knownKinds = []omnicore.Kind{omnicore.KindEvents, omnicore.KindState, omnicore.KindConfig, omnicore.KindCommands, omnicore.KindErrors}

// kindOf returns the kind named by s without allocating for the known ones.
func kindOf(s []byte) omnicore.Kind {
	for _, k := range knownKinds {
		if string(k) == string(s) {
			return k
		}
	}
	return omnicore.Kind(s)
}
