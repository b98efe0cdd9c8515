package share

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Wire protocol of the local sharing socket (see SHARING.md).
//
// Every frame is
//
//	uint32 big-endian: length of the rest of the frame (4 + H + P)
//	uint32 big-endian: H, the length of the header
//	H bytes:           the header (wireHeader): one JSON object, or from
//	                   version 3 on its compact form (header.go)
//	P bytes:           the payload (publish and inbound messages), raw
//
// so payloads travel without base64 and a reader always knows how much to
// read. Requests carry an ID chosen by the client; the server answers each
// request whose ID is not 0 with exactly one "resp" frame carrying the same
// ID, in completion order (requests run concurrently). Inbound messages are
// "msg" frames naming the client's subscription ID.
//
// Versions: 2 has JSON headers only; 3 adds the compact header. The hello
// and its answer are always JSON, so that any two versions understand each
// other's handshake. A client says hello with the newest version it speaks;
// an owner answers in the same version when it speaks it, else refuses and
// names its own newest version, and a client that speaks that one too says
// hello again in it (dialOwner). So a binary of version 3 shares a gateway
// with one of version 2, over JSON headers.
const (
	shareProtoVersion = 3
	// shareProtoMinVersion is the oldest version this binary still speaks.
	shareProtoMinVersion = 2
	// compactVersion is the first version with compact headers.
	compactVersion = 3
	// maxHeaderBytes bounds the JSON header of a frame.
	maxHeaderBytes = 64 << 10
	// maxFrameBytes bounds a whole frame: the largest payload the bridge
	// takes is 256 KiB of telemetry; inbound messages are smaller. A bigger
	// length is a protocol error and closes the connection.
	maxFrameBytes = 1 << 20
)

// Operations.
const (
	opHello           = "hello"            // client → server, first frame; answered
	opPublish         = "publish"          // answered after the bridge's PUBACK
	opAttach          = "attach"           // answered when attached
	opDetach          = "detach"           // answered when the detach is acknowledged
	opSubscribe       = "subscribe"        // Sub = client subscription ID; answered
	opSubscribeAll    = "subscribe_all"    // Sub; not answered (never fails)
	opSubscribeErrors = "subscribe_errors" // Sub; not answered (never fails)
	opUnsubscribe     = "unsubscribe"      // Sub; not answered
	opCountDrop       = "count_drop"       // Reason, N; not answered
	opReportGauges    = "report_gauges"    // Reason = source, Gauges; not answered
	opStats           = "stats"            // answered with gateway.Stats
	opCancel          = "cancel"           // ID of a request whose caller gave up; not answered
	opPing            = "ping"             // both ways every shareHeartbeat; the owner's carries Connected and Error
	opResponse        = "resp"             // server → client: outcome of request ID
	opMessage         = "msg"              // server → client: inbound message for subscription Sub
)

// Error codes of a response, mapped back to the package's sentinel errors so
// that errors.Is works the same on both sides of the socket.
const (
	codeAttachRefused = "attach_refused"
	codeInvalidDevice = "invalid_device"
	codeTooLarge      = "too_large"
	codeClosed        = "closed" // the owner is shutting down: try the next owner
	codeCanceled      = "canceled"
	codeDeadline      = "deadline"
	codeProtocol      = "protocol"
	codeConflict      = "conflict" // hello: other connection options; the client stops
	codeOther         = "error"
)

// wireHeader is the JSON header of every frame; unused fields are omitted.
type wireHeader struct {
	Op        string            `json:"op"`
	ID        uint64            `json:"id,omitempty"`
	Sub       uint64            `json:"sub,omitempty"`
	Device    string            `json:"device,omitempty"`
	Kind      omnicore.Kind     `json:"kind,omitempty"`
	Subfolder string            `json:"subfolder,omitempty"`
	Topic     string            `json:"topic,omitempty"`
	QoS       byte              `json:"qos,omitempty"`
	Received  int64             `json:"received,omitempty"` // unix nanoseconds
	Deadline  int64             `json:"deadline,omitempty"` // unix nanoseconds; 0 = none
	Reason    string            `json:"reason,omitempty"`
	N         uint64            `json:"n,omitempty"`
	Code      string            `json:"code,omitempty"` // responses: "" = success
	Error     string            `json:"error,omitempty"`
	Kept      bool              `json:"kept,omitempty"` // subscribe failed but stays registered
	Stats     *gateway.Stats    `json:"stats,omitempty"`
	Gauges    map[string]int64  `json:"gauges,omitempty"`
	Version   int               `json:"version,omitempty"`
	Key       string            `json:"key,omitempty"` // hello: the rendezvous name of the gateway identity
	Gateway   string            `json:"gateway,omitempty"`
	PID       int               `json:"pid,omitempty"`
	Settings  map[string]string `json:"settings,omitempty"`  // hello and its response: gateway.Config.Settings
	File      string            `json:"file,omitempty"`      // hello and its response: the plugin file
	Connected bool              `json:"connected,omitempty"` // owner's ping: connected to the bridge
}

// frame is one decoded frame.
type frame struct {
	wireHeader
	Payload []byte
}

var errFrameTooLarge = errors.New("sharing protocol: frame too large")

// frameWriter writes frames to a buffered writer (the caller flushes), with
// compact headers once the peer speaks them.
type frameWriter struct {
	w       *bufio.Writer
	compact bool
	hdr     []byte // scratch for compact headers
}

func newFrameWriter(w *bufio.Writer, version int) *frameWriter {
	return &frameWriter{w: w, compact: version >= compactVersion}
}

// write appends one frame.
func (fw *frameWriter) write(f *frame) error {
	var hdr []byte
	if fw.compact && f.compactable() {
		fw.hdr = appendCompact(fw.hdr[:0], &f.wireHeader)
		hdr = fw.hdr
	} else {
		var err error
		if hdr, err = json.Marshal(&f.wireHeader); err != nil {
			return err
		}
	}
	if len(hdr) > maxHeaderBytes {
		return errFrameTooLarge
	}
	total := 4 + len(hdr) + len(f.Payload)
	if total > maxFrameBytes {
		return errFrameTooLarge
	}
	var pre [8]byte
	binary.BigEndian.PutUint32(pre[0:4], uint32(total))
	binary.BigEndian.PutUint32(pre[4:8], uint32(len(hdr)))
	if _, err := fw.w.Write(pre[:]); err != nil {
		return err
	}
	if _, err := fw.w.Write(hdr); err != nil {
		return err
	}
	_, err := fw.w.Write(f.Payload)
	return err
}

// writeJSONFrame writes f with a JSON header and flushes: the handshake,
// which every version reads.
func writeJSONFrame(w *bufio.Writer, f *frame) error {
	if err := newFrameWriter(w, shareProtoMinVersion).write(f); err != nil {
		return err
	}
	return w.Flush()
}

// readFrame reads one frame, with a JSON or a compact header. A malformed
// or oversized frame is an error after which the stream cannot be trusted:
// the caller closes the connection.
func readFrame(r *bufio.Reader) (*frame, error) {
	var pre [8]byte
	if _, err := io.ReadFull(r, pre[:4]); err != nil {
		return nil, err // io.EOF: clean end between frames
	}
	total := binary.BigEndian.Uint32(pre[0:4])
	if total < 4 || total > maxFrameBytes {
		return nil, fmt.Errorf("%w: %d bytes", errFrameTooLarge, total)
	}
	if _, err := io.ReadFull(r, pre[4:8]); err != nil {
		return nil, unexpectedEOF(err)
	}
	h := binary.BigEndian.Uint32(pre[4:8])
	if h > maxHeaderBytes || h > total-4 {
		return nil, fmt.Errorf("sharing protocol: header of %d bytes in a frame of %d", h, total)
	}
	buf := make([]byte, total-4)
	if _, err := io.ReadFull(r, buf); err != nil {
		return nil, unexpectedEOF(err)
	}
	f := &frame{}
	switch {
	case h == 0:
		return nil, errors.New("sharing protocol: frame without header")
	case buf[0] == '{':
		if err := json.Unmarshal(buf[:h], &f.wireHeader); err != nil {
			return nil, fmt.Errorf("sharing protocol: bad header: %w", err)
		}
	default:
		if err := decodeCompact(buf[:h], &f.wireHeader); err != nil {
			return nil, err
		}
	}
	if f.Op == "" {
		return nil, errors.New("sharing protocol: frame without op")
	}
	if int(h) < len(buf) {
		f.Payload = buf[h:]
	}
	return f, nil
}

func unexpectedEOF(err error) error {
	if errors.Is(err, io.EOF) {
		return io.ErrUnexpectedEOF
	}
	return err
}

// remoteError is an error returned by the owner's session, carried over the
// socket: its text is the owner's, and errors.Is matches the same sentinel.
type remoteError struct {
	sentinel error
	msg      string
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.sentinel }

// errorCode maps an error of the owner's session to a response code.
func errorCode(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, gateway.ErrAttachRefused):
		return codeAttachRefused
	case errors.Is(err, gateway.ErrInvalidDevice):
		return codeInvalidDevice
	case errors.Is(err, gateway.ErrTooLarge):
		return codeTooLarge
	case errors.Is(err, gateway.ErrClosed):
		return codeClosed
	case errors.Is(err, context.DeadlineExceeded):
		return codeDeadline
	case errors.Is(err, context.Canceled):
		return codeCanceled
	}
	return codeOther
}

// responseError turns a response back into an error; nil on success.
func responseError(f *frame) error {
	var sentinel error
	switch f.Code {
	case "":
		return nil
	case codeAttachRefused:
		sentinel = gateway.ErrAttachRefused
	case codeInvalidDevice:
		sentinel = gateway.ErrInvalidDevice
	case codeTooLarge:
		sentinel = gateway.ErrTooLarge
	case codeClosed:
		return errOwnerGone
	case codeDeadline:
		sentinel = context.DeadlineExceeded
	case codeCanceled:
		sentinel = context.Canceled
	default:
		return errors.New(f.Error)
	}
	return &remoteError{sentinel: sentinel, msg: f.Error}
}

func respond(id uint64, err error) *frame {
	f := &frame{wireHeader: wireHeader{Op: opResponse, ID: id}}
	if err != nil {
		f.Code = errorCode(err)
		f.Error = err.Error()
	}
	return f
}

func inboundFrame(sub uint64, in gateway.Inbound) *frame {
	return &frame{
		wireHeader: wireHeader{
			Op:        opMessage,
			Sub:       sub,
			Device:    in.Device,
			Kind:      in.Kind,
			Subfolder: in.Subfolder,
			Topic:     in.Topic,
			Received:  in.Received.UnixNano(),
		},
		Payload: in.Payload,
	}
}

func (f *frame) inbound() gateway.Inbound {
	in := gateway.Inbound{
		Device:    f.Device,
		Kind:      f.Kind,
		Subfolder: f.Subfolder,
		Topic:     f.Topic,
		Payload:   f.Payload,
	}
	if f.Received != 0 {
		in.Received = time.Unix(0, f.Received)
	}
	return in
}

// frameQueue is an outbound queue drained by one writer goroutine, so that
// many callers pipeline frames without waiting for each other's round trips
// and the writer batches them into few syscalls. Inbound messages are
// counted, so the server can bound what a slow client holds.
type frameQueue struct {
	notify chan struct{}
	mu     sync.Mutex
	frames []*frame
	msgs   int
	bytes  int
	closed bool
}

func newFrameQueue() *frameQueue {
	return &frameQueue{notify: make(chan struct{}, 1)}
}

// push queues f; it reports false when the queue is closed.
func (fq *frameQueue) push(f *frame) bool {
	fq.mu.Lock()
	if fq.closed {
		fq.mu.Unlock()
		return false
	}
	fq.frames = append(fq.frames, f)
	if f.Op == opMessage {
		fq.msgs++
		fq.bytes += len(f.Payload)
	}
	fq.mu.Unlock()
	select {
	case fq.notify <- struct{}{}:
	default:
	}
	return true
}

// pushMessage queues an inbound message unless that would take the queue
// over maxMsgs messages or maxBytes payload bytes; then it reports false
// and the number of messages already waiting.
func (fq *frameQueue) pushMessage(f *frame, maxMsgs, maxBytes int) (ok bool, waiting int) {
	fq.mu.Lock()
	if fq.closed {
		fq.mu.Unlock()
		return false, 0
	}
	if fq.msgs >= maxMsgs || (fq.msgs > 0 && fq.bytes+len(f.Payload) > maxBytes) {
		n := fq.msgs
		fq.mu.Unlock()
		return false, n
	}
	fq.mu.Unlock()
	return fq.push(f), 0
}

// take returns everything queued, waiting for at least one frame; nil when
// done is closed or the queue was closed.
func (fq *frameQueue) take(done <-chan struct{}) []*frame {
	for {
		fq.mu.Lock()
		if len(fq.frames) > 0 {
			fs := fq.frames
			fq.frames = nil
			fq.mu.Unlock()
			return fs
		}
		closed := fq.closed
		fq.mu.Unlock()
		if closed {
			return nil
		}
		select {
		case <-fq.notify:
		case <-done:
			return nil
		}
	}
}

// poll returns what is queued, without waiting.
func (fq *frameQueue) poll() []*frame {
	fq.mu.Lock()
	defer fq.mu.Unlock()
	fs := fq.frames
	fq.frames = nil
	return fs
}

// written accounts for messages the writer has handed to the socket.
func (fq *frameQueue) written(fs []*frame) {
	n, b := 0, 0
	for _, f := range fs {
		if f.Op == opMessage {
			n++
			b += len(f.Payload)
		}
	}
	if n == 0 {
		return
	}
	fq.mu.Lock()
	fq.msgs -= n
	fq.bytes -= b
	fq.mu.Unlock()
}

// close stops the queue and returns how many inbound messages it still held.
func (fq *frameQueue) close() int {
	fq.mu.Lock()
	defer fq.mu.Unlock()
	fq.closed = true
	n := fq.msgs
	fq.frames = nil
	fq.msgs, fq.bytes = 0, 0
	select {
	case fq.notify <- struct{}{}:
	default:
	}
	return n
}

// writeLoop drains fq into conn until done closes or a write fails, with
// the headers of the negotiated version.
//
// Before each write it yields (runtime.Gosched) so that the goroutines the
// last frames woke (callers answered, owner's requests acknowledged) queue
// their frames first, and one write carries them all: the callers are
// woken one by one, and without the yield most writes carried one or two
// frames, a syscall each and a wake-up of the reader in the other process.
// A yield with nothing else to run returns at once, so a lone frame is not
// delayed.
func writeLoop(w io.Writer, fq *frameQueue, done <-chan struct{}, version int, timeout time.Duration, setDeadline func(time.Time) error) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	fw := newFrameWriter(bw, version)
	for {
		fs := fq.take(done)
		if fs == nil {
			return nil
		}
		if setDeadline != nil && timeout > 0 {
			_ = setDeadline(time.Now().Add(timeout))
		}
		for len(fs) > 0 {
			for _, f := range fs {
				if err := fw.write(f); err != nil {
					return err
				}
			}
			fq.written(fs)
			if bw.Buffered() >= bw.Size()/2 {
				break
			}
			runtime.Gosched()
			fs = fq.poll()
		}
		if err := bw.Flush(); err != nil {
			return err
		}
	}
}
