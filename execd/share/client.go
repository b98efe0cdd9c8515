package share

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// remoteConn is a Conn served by the owning process over the sharing socket.
// Calls are pipelined: each is a request frame with its own ID, queued for
// one writer goroutine, and waits for its own response, so many publishes
// are in flight at once. Once the socket fails every call returns
// errOwnerGone and the shareConn above moves to the next owner.
type remoteConn struct {
	gateway  string
	ownerPID int
	log      telegraf.Logger
	conn     *net.UnixConn
	out      *frameQueue
	inbound  chan *frame

	dead     chan struct{}
	deadOnce sync.Once
	deadErr  error

	nextID  atomic.Uint64
	nextSub atomic.Uint64

	mu       sync.Mutex
	pending  map[uint64]chan *frame
	handlers map[uint64]gateway.Handler

	// lastHeard is when the owner last sent anything (unix ns); the
	// owner's health comes with its pings.
	lastHeard      atomic.Int64
	ownerConnected atomic.Bool
	ownerErr       atomic.Pointer[string]
	// silentReported is watch's own state: it said the owner is silent.
	silentReported bool
}

// dialOwner connects to the owner's socket, checks that the owner runs as
// this user, and shakes hands: the hello carries this process's connection
// settings and plugin file, and an owner whose settings differ answers with
// a *conflictError. An owner of an older protocol version refuses the hello
// and names its version; when this process speaks that one too, it says
// hello again in it.
func dialOwner(ctx context.Context, rz *rendezvous, log telegraf.Logger, settings map[string]string, pluginFile string) (*remoteConn, error) {
	ctx, cancel := context.WithTimeout(ctx, shareDialTimeout)
	defer cancel()
	rc, err := dialVersion(ctx, rz, log, settings, pluginFile, shareProtoVersion)
	var old *olderOwnerError
	if errors.As(err, &old) {
		rc, err = dialVersion(ctx, rz, log, settings, pluginFile, old.version)
	}
	return rc, err
}

// olderOwnerError is an owner's refusal of the hello's version, naming an
// older version this process speaks too.
type olderOwnerError struct {
	version int
	msg     string
}

func (e *olderOwnerError) Error() string { return e.msg }

// dialVersion connects and says hello in protocol version.
func dialVersion(ctx context.Context, rz *rendezvous, log telegraf.Logger, settings map[string]string, pluginFile string, version int) (*remoteConn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", rz.sock)
	if err != nil {
		return nil, err
	}
	uc := c.(*net.UnixConn)
	cred, err := connCredentials(uc)
	if err == nil {
		err = checkPeer(cred, os.Geteuid())
	}
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("socket %q: %w", rz.sock, err)
	}
	dl, _ := ctx.Deadline()
	_ = uc.SetDeadline(dl)
	br := bufio.NewReaderSize(uc, 64<<10)
	hello := &frame{wireHeader: wireHeader{Op: opHello, ID: 1, Version: version, Key: rz.name, PID: os.Getpid(), Settings: settings, File: pluginFile}}
	if err := writeJSONFrame(bufio.NewWriter(uc), hello); err != nil {
		uc.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	resp, err := readFrame(br)
	if err == nil && (resp.Op != opResponse || resp.ID != 1) {
		err = fmt.Errorf("unexpected %q frame", resp.Op)
	}
	if err == nil && resp.Code == codeConflict {
		uc.Close()
		return nil, &conflictError{pid: resp.PID, file: resp.File, settings: resp.Settings}
	}
	if err == nil && resp.Code == codeProtocol && resp.Version < version && resp.Version >= shareProtoMinVersion {
		uc.Close()
		return nil, &olderOwnerError{version: resp.Version, msg: resp.Error}
	}
	if err == nil && resp.Code != "" {
		err = errors.New(resp.Error)
	}
	if err != nil {
		uc.Close()
		return nil, fmt.Errorf("handshake: %w", err)
	}
	_ = uc.SetDeadline(time.Time{})
	if log == nil {
		log = gateway.DiscardLogger{}
	}
	rc := &remoteConn{
		gateway:  resp.Gateway,
		ownerPID: resp.PID,
		log:      log,
		conn:     uc,
		out:      newFrameQueue(),
		inbound:  make(chan *frame, 1024),
		dead:     make(chan struct{}),
		pending:  make(map[uint64]chan *frame),
		handlers: make(map[uint64]gateway.Handler),
	}
	rc.nextID.Store(1)
	rc.lastHeard.Store(time.Now().UnixNano())
	rc.ownerConnected.Store(true) // until its first ping says otherwise
	go rc.ping()
	go rc.readLoop(br)
	go func() {
		if err := writeLoop(uc, rc.out, rc.dead, version, 0, nil); err != nil {
			rc.fail(err)
		}
	}()
	go rc.dispatch()
	return rc, nil
}

// ping tells the owner this process is alive, every shareHeartbeat.
func (rc *remoteConn) ping() {
	t := time.NewTicker(shareHeartbeat)
	defer t.Stop()
	for {
		select {
		case <-rc.dead:
			return
		case <-t.C:
			rc.out.push(&frame{wireHeader: wireHeader{Op: opPing}})
		}
	}
}

// heard is when the owner last sent anything.
func (rc *remoteConn) heard() time.Time { return time.Unix(0, rc.lastHeard.Load()) }

// ownerHealth is what the owner's last ping said about its bridge
// connection: connected, or the error of its last connect.
func (rc *remoteConn) ownerHealth() (bool, string) {
	e := ""
	if p := rc.ownerErr.Load(); p != nil {
		e = *p
	}
	return rc.ownerConnected.Load(), e
}

// fail ends the connection; the first cause is kept.
func (rc *remoteConn) fail(err error) {
	rc.deadOnce.Do(func() {
		rc.deadErr = err
		close(rc.dead)
		rc.conn.Close()
		rc.out.close()
	})
}

func (rc *remoteConn) cause() error {
	select {
	case <-rc.dead:
		return rc.deadErr
	default:
		return nil
	}
}

func (rc *remoteConn) readLoop(br *bufio.Reader) {
	for {
		f, err := readFrame(br)
		if err != nil {
			rc.fail(fmt.Errorf("socket closed: %w", err))
			return
		}
		rc.lastHeard.Store(time.Now().UnixNano())
		switch f.Op {
		case opPing:
			rc.ownerConnected.Store(f.Connected)
			e := f.Error
			rc.ownerErr.Store(&e)
		case opResponse:
			rc.mu.Lock()
			ch := rc.pending[f.ID]
			delete(rc.pending, f.ID)
			rc.mu.Unlock()
			if ch != nil {
				ch <- f
			}
		case opMessage:
			// Blocks while the handlers are busy: back-pressure up to the
			// owner, which disconnects this process if it falls too far
			// behind.
			select {
			case rc.inbound <- f:
			case <-rc.dead:
				return
			}
		default:
			rc.fail(fmt.Errorf("protocol error: unexpected %q frame", f.Op))
			return
		}
	}
}

// dispatch calls the handlers in the order the owner sent the messages.
func (rc *remoteConn) dispatch() {
	deliver := func(f *frame) {
		rc.mu.Lock()
		h := rc.handlers[f.Sub]
		rc.mu.Unlock()
		if h != nil {
			h(f.inbound())
		}
	}
	for {
		select {
		case f := <-rc.inbound:
			deliver(f)
		case <-rc.dead:
			// Deliver what was already received.
			for {
				select {
				case f := <-rc.inbound:
					deliver(f)
				default:
					return
				}
			}
		}
	}
}

// call sends a request and waits for its response. A response that arrived
// wins over a simultaneous failure or cancellation: an acknowledged message
// is never reported as failed.
func (rc *remoteConn) call(ctx context.Context, f *frame) (*frame, error) {
	f.ID = rc.nextID.Add(1)
	if dl, ok := ctx.Deadline(); ok {
		f.Deadline = dl.UnixNano()
	}
	ch := make(chan *frame, 1)
	rc.mu.Lock()
	rc.pending[f.ID] = ch
	rc.mu.Unlock()
	forget := func() (*frame, bool) {
		rc.mu.Lock()
		delete(rc.pending, f.ID)
		rc.mu.Unlock()
		select {
		case r := <-ch:
			return r, true
		default:
			return nil, false
		}
	}
	if !rc.out.push(f) {
		forget()
		return nil, errOwnerGone
	}
	select {
	case r := <-ch:
		return r, responseError(r)
	case <-rc.dead:
		if r, ok := forget(); ok {
			return r, responseError(r)
		}
		return nil, errOwnerGone
	case <-ctx.Done():
		if r, ok := forget(); ok {
			return r, responseError(r)
		}
		rc.out.push(&frame{wireHeader: wireHeader{Op: opCancel, ID: f.ID}})
		return nil, ctx.Err()
	}
}

// result maps errors of the owner's side of a call whose caller is still
// waiting: a deadline or cancellation there that is not the caller's own
// means the owner gave up (it is shutting down), so the call is retried.
func result(ctx context.Context, err error) error {
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, context.Canceled):
		return errOwnerGone
	}
	return err
}

// GatewayID implements Conn.
func (rc *remoteConn) GatewayID() string { return rc.gateway }

// Publish implements Conn: it returns nil only after the owner's session
// acknowledged the message.
func (rc *remoteConn) Publish(ctx context.Context, msg gateway.Message) error {
	f := &frame{
		wireHeader: wireHeader{Op: opPublish, Device: msg.Device, Kind: msg.Kind, Subfolder: msg.Subfolder, QoS: msg.QoS},
		// Copied: the caller may reuse its buffer once Publish returned,
		// which on cancellation can be before the frame is written.
		Payload: append([]byte(nil), msg.Payload...),
	}
	_, err := rc.call(ctx, f)
	return result(ctx, err)
}

// Attach implements Conn.
func (rc *remoteConn) Attach(ctx context.Context, device string) error {
	_, err := rc.call(ctx, &frame{wireHeader: wireHeader{Op: opAttach, Device: device}})
	return result(ctx, err)
}

// Detach implements Conn.
func (rc *remoteConn) Detach(ctx context.Context, device string) error {
	_, err := rc.call(ctx, &frame{wireHeader: wireHeader{Op: opDetach, Device: device}})
	return result(ctx, err)
}

// Subscribe implements Conn.
func (rc *remoteConn) Subscribe(ctx context.Context, device string, h gateway.Handler) (gateway.Subscription, error) {
	id := rc.nextSub.Add(1)
	rc.mu.Lock()
	rc.handlers[id] = h
	rc.mu.Unlock()
	r, err := rc.call(ctx, &frame{wireHeader: wireHeader{Op: opSubscribe, Sub: id, Device: device}})
	err = result(ctx, err)
	sub := remoteSub{rc: rc, id: id}
	if err != nil && (r == nil || !r.Kept) {
		sub.forget()
		if ctx.Err() != nil {
			// The owner may still register it: make sure it does not stay.
			rc.out.push(&frame{wireHeader: wireHeader{Op: opUnsubscribe, Sub: id}})
		}
		return nil, err
	}
	return sub, err
}

// SubscribeAll implements Conn.
func (rc *remoteConn) SubscribeAll(h gateway.Handler) gateway.Subscription {
	return rc.subscribeAsync(opSubscribeAll, h)
}

// SubscribeErrors implements Conn.
func (rc *remoteConn) SubscribeErrors(h gateway.Handler) gateway.Subscription {
	return rc.subscribeAsync(opSubscribeErrors, h)
}

// subscribeAsync registers a subscription that cannot fail. The request is
// queued before it returns, so it reaches the owner before any later call.
func (rc *remoteConn) subscribeAsync(op string, h gateway.Handler) gateway.Subscription {
	id := rc.nextSub.Add(1)
	rc.mu.Lock()
	rc.handlers[id] = h
	rc.mu.Unlock()
	rc.out.push(&frame{wireHeader: wireHeader{Op: op, Sub: id}})
	return remoteSub{rc: rc, id: id}
}

type remoteSub struct {
	rc *remoteConn
	id uint64
}

func (s remoteSub) forget() {
	s.rc.mu.Lock()
	delete(s.rc.handlers, s.id)
	s.rc.mu.Unlock()
}

// Unsubscribe implements Subscription.
func (s remoteSub) Unsubscribe() {
	s.forget()
	s.rc.out.push(&frame{wireHeader: wireHeader{Op: opUnsubscribe, Sub: s.id}})
}

// CountDrop implements Conn.
func (rc *remoteConn) CountDrop(reason string, n uint64) { rc.countDrop(reason, n) }

// countDrop reports false when the owner is gone.
func (rc *remoteConn) countDrop(reason string, n uint64) bool {
	return rc.out.push(&frame{wireHeader: wireHeader{Op: opCountDrop, Reason: reason, N: n}})
}

// ReportGauges implements Conn. Like CountDrop it is not answered; a report
// lost with the owner is replaced by the next one.
func (rc *remoteConn) ReportGauges(source string, gauges map[string]int64) {
	rc.out.push(&frame{wireHeader: wireHeader{Op: opReportGauges, Reason: source, Gauges: gauges}})
}

// Stats implements Conn.
func (rc *remoteConn) Stats() gateway.Stats {
	ctx, cancel := context.WithTimeout(context.Background(), shareDialTimeout)
	defer cancel()
	st, err := rc.stats(ctx)
	if err != nil {
		return gateway.Stats{ErrorsByType: map[string]uint64{}, DroppedByReason: map[string]uint64{}}
	}
	return st
}

func (rc *remoteConn) stats(ctx context.Context) (gateway.Stats, error) {
	r, err := rc.call(ctx, &frame{wireHeader: wireHeader{Op: opStats}})
	if err != nil {
		return gateway.Stats{}, err
	}
	if r.Stats == nil {
		return gateway.Stats{}, errors.New("owner sent no stats")
	}
	st := *r.Stats
	if st.ErrorsByType == nil {
		st.ErrorsByType = map[string]uint64{}
	}
	if st.DroppedByReason == nil {
		st.DroppedByReason = map[string]uint64{}
	}
	return st, nil
}
