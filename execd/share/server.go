package share

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"sync"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

const (
	// maxClientRequests bounds the requests of one client running at once
	// on the owner; past it the owner stops reading that client's socket
	// (back-pressure, nothing lost).
	maxClientRequests = 4096
	// maxQueuedMessages and maxQueuedBytes bound the inbound messages
	// waiting for one client. A client that falls that far behind is
	// disconnected (counted and logged): it reconnects and subscribes again.
	maxQueuedMessages = 4096
	maxQueuedBytes    = 32 << 20
	// shareWriteTimeout is how long the owner waits for a client to take
	// bytes off its socket before giving up on it.
	shareWriteTimeout = 30 * time.Second
)

// dropSlowClient is the drop reason for inbound messages lost because a
// sharing process did not keep up.
const dropSlowClient = "share_client_too_slow"

// shareServer serves the owner's session to the other processes of the user.
type shareServer struct {
	conn gateway.Conn
	name string
	sock string
	log  telegraf.Logger
	uid  int
	ln   *net.UnixListener
	// allow decides on a peer; checkPeer against uid, replaced by tests.
	allow func(peerCred) error
	// settings and pluginFile of the owner, compared with each client's at
	// hello: a client with other settings is refused (codeConflict).
	settings   map[string]string
	pluginFile string
	// health reports the owner session's bridge connection, sent to the
	// clients with every ping; nil means always connected (tests).
	health func() (bool, error)
	// yield, when set, is called once when a client with other settings
	// arrives while the bridge refuses the owner's credentials: the owner
	// hands the connection over to that client (see handshake).
	yield     func(error)
	yieldOnce sync.Once
	// queue bounds per client (maxQueuedMessages, maxQueuedBytes).
	maxMsgs, maxBytes int
	// maxVersion is the newest protocol version served: shareProtoVersion,
	// lowered by tests to stand in for an owner of an older release.
	maxVersion int

	ctx    context.Context
	cancel context.CancelFunc

	mu      sync.Mutex
	clients map[*serverClient]struct{}
	wg      sync.WaitGroup
}

// listenShare serves conn on rz.sock, replacing a stale socket file left by
// an owner that died. The caller holds the owner lock, so no live owner can
// be serving on it.
func listenShare(conn gateway.Conn, rz *rendezvous, log telegraf.Logger) (*shareServer, error) {
	s, err := newShareServer(conn, rz, log)
	if err != nil {
		return nil, err
	}
	s.start()
	return s, nil
}

// newShareServer listens; start accepts.
func newShareServer(conn gateway.Conn, rz *rendezvous, log telegraf.Logger) (*shareServer, error) {
	if log == nil {
		log = gateway.DiscardLogger{}
	}
	if err := os.Remove(rz.sock); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("removing the stale socket: %w", err)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: rz.sock, Net: "unix"})
	if err != nil {
		return nil, err
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(rz.sock, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &shareServer{
		conn:     conn,
		name:     rz.name,
		sock:     rz.sock,
		log:      log,
		uid:      os.Geteuid(),
		ln:       ln,
		ctx:      ctx,
		cancel:   cancel,
		clients:  make(map[*serverClient]struct{}),
		maxMsgs:  maxQueuedMessages,
		maxBytes: maxQueuedBytes,

		maxVersion: shareProtoVersion,
	}
	s.allow = func(c peerCred) error { return checkPeer(c, s.uid) }
	return s, nil
}

func (s *shareServer) start() {
	s.wg.Add(2)
	go s.accept(s.ln)
	go s.heartbeat()
}

// heartbeat pings every client every shareHeartbeat with the session's
// health, so clients can tell a hung owner from a quiet one and hear why
// the owner cannot connect. A ping is queued, never written in place: a
// slow client never blocks the owner.
func (s *shareServer) heartbeat() {
	defer s.wg.Done()
	t := time.NewTicker(shareHeartbeat)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		f := s.pingFrame()
		s.mu.Lock()
		for c := range s.clients {
			c.out.push(f)
		}
		s.mu.Unlock()
	}
}

func (s *shareServer) pingFrame() *frame {
	f := &frame{wireHeader: wireHeader{Op: opPing, Connected: true}}
	if s.health != nil {
		connected, err := s.health()
		f.Connected = connected
		if err != nil {
			f.Error = err.Error()
		}
	}
	return f
}

// relisten serves a new socket file when the old one was removed from under
// the owner (by a temporary-files cleaner, or by hand).
func (s *shareServer) relisten() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ctx.Err() != nil {
		return nil
	}
	if err := os.Remove(s.sock); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: s.sock, Net: "unix"})
	if err != nil {
		return err
	}
	ln.SetUnlinkOnClose(true)
	if err := os.Chmod(s.sock, 0o600); err != nil {
		ln.Close()
		return err
	}
	old := s.ln
	old.SetUnlinkOnClose(false) // its file is gone; the new one must stay
	old.Close()
	s.ln = ln
	s.wg.Add(1)
	go s.accept(ln)
	return nil
}

func (s *shareServer) accept(ln *net.UnixListener) {
	defer s.wg.Done()
	pause := shareRetryMin
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if s.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors and the like: wait a little.
			s.log.Warnf("Accepting on %q: %v", s.sock, err)
			if !sleepCtx(s.ctx, pause) {
				return
			}
			pause = min(pause*2, shareRetryMax)
			continue
		}
		pause = shareRetryMin
		cred, err := connCredentials(c)
		if err == nil {
			err = s.allow(cred)
		}
		if err != nil {
			s.log.Warnf("Refused a connection to the gateway socket %q: %v", s.sock, err)
			c.Close()
			continue
		}
		cl := s.newClient(c, cred)
		s.mu.Lock()
		if s.ctx.Err() != nil {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.clients[cl] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			cl.serve()
			s.mu.Lock()
			delete(s.clients, cl)
			s.mu.Unlock()
		}()
	}
}

// stopAccepting closes the listener and removes the socket file.
func (s *shareServer) stopAccepting() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ln.Close()
}

// closeClients disconnects every client and waits for their goroutines.
func (s *shareServer) closeClients() {
	s.mu.Lock()
	s.ln.Close()
	s.cancel()
	for c := range s.clients {
		c.kill()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// clientCount is the number of processes connected.
func (s *shareServer) clientCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.clients)
}

// serverClient is one connected process.
type serverClient struct {
	srv  *shareServer
	conn *net.UnixConn
	pid  int

	ctx    context.Context
	cancel context.CancelFunc
	out    *frameQueue
	sem    chan struct{}
	reqs   sync.WaitGroup

	mu      sync.Mutex
	subs    map[uint64]*serverSub
	pending map[uint64]context.CancelFunc
	slow    bool
}

// serverSub is a client subscription; sub is nil while Subscribe runs.
type serverSub struct {
	sub gateway.Subscription
}

func (s *shareServer) newClient(c *net.UnixConn, cred peerCred) *serverClient {
	ctx, cancel := context.WithCancel(s.ctx)
	return &serverClient{
		srv:     s,
		conn:    c,
		pid:     cred.PID,
		ctx:     ctx,
		cancel:  cancel,
		out:     newFrameQueue(),
		sem:     make(chan struct{}, maxClientRequests),
		subs:    make(map[uint64]*serverSub),
		pending: make(map[uint64]context.CancelFunc),
	}
}

func (c *serverClient) kill() {
	c.cancel()
	c.conn.Close()
}

func (c *serverClient) serve() {
	defer c.cleanup()
	br := bufio.NewReaderSize(c.conn, 64<<10)
	version, err := c.handshake(br)
	if err != nil {
		c.srv.log.Debugf("Handshake with process %d on %q failed: %v", c.pid, c.srv.sock, err)
		return
	}
	c.srv.log.Debugf("Process %d now shares the connection of gateway %q", c.pid, c.srv.conn.GatewayID())
	writerDone := make(chan struct{})
	go func() {
		defer close(writerDone)
		if err := writeLoop(c.conn, c.out, c.ctx.Done(), version, shareWriteTimeout, c.conn.SetWriteDeadline); err != nil && c.ctx.Err() == nil {
			c.srv.log.Warnf("Writing to process %d failed: %v; disconnecting it", c.pid, err)
		}
		c.kill()
	}()
	c.out.push(c.srv.pingFrame()) // the client learns the owner's health at once
	for {
		// A client pings every shareHeartbeat: one silent much longer is
		// stopped or hung, and is let go with what it holds.
		_ = c.conn.SetReadDeadline(time.Now().Add(shareClientSilence))
		f, err := readFrame(br)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && c.ctx.Err() == nil {
				c.srv.log.Warnf("Process %d sent nothing for %s (stopped or hung?); disconnecting it", c.pid, shareClientSilence)
			} else if c.ctx.Err() == nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				c.srv.log.Warnf("Reading from process %d failed: %v; disconnecting it", c.pid, err)
			}
			break
		}
		if !c.handle(f) {
			break
		}
	}
	c.kill()
	<-writerDone
}

// handshake checks the client's hello and answers it, before the writer
// runs; it returns the protocol version the two speak: the client's, when
// this owner speaks it. A newer client is refused with this owner's newest
// version, which it then says hello in if it can (see dialOwner).
func (c *serverClient) handshake(br *bufio.Reader) (int, error) {
	_ = c.conn.SetDeadline(time.Now().Add(shareDialTimeout))
	defer func() { _ = c.conn.SetDeadline(time.Time{}) }()
	f, err := readFrame(br)
	if err != nil {
		return 0, err
	}
	resp := &frame{wireHeader: wireHeader{
		Op:       opResponse,
		ID:       f.ID,
		Version:  c.srv.maxVersion,
		Gateway:  c.srv.conn.GatewayID(),
		PID:      os.Getpid(),
		Settings: c.srv.settings,
		File:     c.srv.pluginFile,
	}}
	pid := c.pid
	if pid <= 0 {
		pid = f.PID
	}
	switch {
	case f.Op != opHello:
		err = fmt.Errorf("expected %q, got %q", opHello, f.Op)
	case f.Version < shareProtoMinVersion || f.Version > c.srv.maxVersion:
		err = fmt.Errorf("protocol version %d, this owner speaks %d to %d (run the same telegraf-omnicore version for every plugin of a gateway)", f.Version, shareProtoMinVersion, c.srv.maxVersion)
	case f.Key != c.srv.name:
		err = fmt.Errorf("socket of gateway %q, not %q", c.srv.name, f.Key)
	}
	if err != nil {
		resp.Code, resp.Error = codeProtocol, err.Error()
	} else {
		resp.Version = f.Version
		if diff := gateway.DescribeDiff(c.srv.settings, f.Settings); c.srv.settings != nil && diff != "" {
			err = c.srv.refuseOther(resp, pid, f.File, diff)
		}
	}
	if werr := writeJSONFrame(bufio.NewWriter(c.conn), resp); werr != nil {
		return 0, werr
	}
	if err == nil && f.PID > 0 && c.pid <= 0 {
		c.pid = f.PID
	}
	return f.Version, err
}

// refuseOther answers the hello of a process whose connection options
// differ. Normally the process is refused and stops (codeConflict): the
// owner's options rule. But when the bridge refuses this owner's own
// credentials, the other process may be the correctly configured one: the
// owner then hands the connection over to it (the client is told to try
// again, codeClosed) and stops itself, so a wrong key never holds a correct
// plugin hostage. If the other process is wrong too, the bridge refuses it
// the same way, and the next process with other options gets its turn.
func (s *shareServer) refuseOther(resp *frame, pid int, file, diff string) error {
	if s.yield != nil && s.health != nil {
		if connected, lastErr := s.health(); !connected && errors.Is(lastErr, gateway.ErrNotAuthorized) {
			err := fmt.Errorf("%w: the bridge refuses the credentials of this process (plugin file %s) for gateway %q: %v. Process %d (plugin file %s) connects as the same gateway with other options (%s): handing the connection over to it, and this process stops; fix this plugin file",
				gateway.ErrConflict, fileName(s.pluginFile), s.conn.GatewayID(), lastErr, pid, fileName(file), diff)
			s.yieldOnce.Do(func() { s.yield(err) })
			resp.Code, resp.Error = codeClosed, "the owner hands the connection over"
			return err
		}
	}
	s.log.Warnf("Refused process %d (plugin file %s): it connects as gateway %q with other connection options than this process (plugin file %s): %s",
		pid, fileName(file), s.conn.GatewayID(), fileName(s.pluginFile), diff)
	resp.Code, resp.Error = codeConflict, "other connection options"
	return errors.New("other connection options")
}

// cleanup runs when the client is gone: its requests are cancelled and its
// subscriptions removed.
func (c *serverClient) cleanup() {
	c.kill()
	c.mu.Lock()
	for _, cancel := range c.pending {
		cancel()
	}
	c.mu.Unlock()
	c.reqs.Wait()
	c.out.close()
	c.mu.Lock()
	subs := c.subs
	c.subs = make(map[uint64]*serverSub)
	c.mu.Unlock()
	for _, e := range subs {
		if e.sub != nil {
			e.sub.Unsubscribe()
		}
	}
	c.srv.log.Debugf("Process %d stopped sharing the connection of gateway %q", c.pid, c.srv.conn.GatewayID())
}

// handle runs one request; false ends the connection.
func (c *serverClient) handle(f *frame) bool {
	conn := c.srv.conn
	switch f.Op {
	case opPublish, opAttach, opDetach, opSubscribe:
		select {
		case c.sem <- struct{}{}:
		case <-c.ctx.Done():
			return false
		}
		ctx, cancel, ok := c.requestContext(f)
		if !ok {
			<-c.sem
			c.srv.log.Warnf("Process %d sent request %d while its request %d was still pending; disconnecting it", c.pid, f.ID, f.ID)
			return false
		}
		c.reqs.Add(1)
		go func() {
			defer c.reqs.Done()
			resp := c.run(ctx, f)
			cancel()
			if f.ID != 0 {
				c.mu.Lock()
				delete(c.pending, f.ID)
				c.mu.Unlock()
				if c.ctx.Err() == nil {
					c.out.push(resp)
				}
			}
			<-c.sem
		}()
	case opSubscribeAll, opSubscribeErrors:
		e := &serverSub{}
		c.replaceSub(f.Sub, e)
		var sub gateway.Subscription
		if f.Op == opSubscribeAll {
			sub = conn.SubscribeAll(c.forward(f.Sub, e))
		} else {
			sub = conn.SubscribeErrors(c.forward(f.Sub, e))
		}
		c.settle(f.Sub, e, sub)
	case opPing:
		// The read deadline was renewed by reading it.
	case opUnsubscribe:
		c.replaceSub(f.Sub, nil)
	case opCountDrop:
		conn.CountDrop(f.Reason, f.N)
	case opReportGauges:
		conn.ReportGauges(f.Reason, f.Gauges)
	case opStats:
		st := conn.Stats()
		resp := respond(f.ID, nil)
		resp.Stats = &st
		c.out.push(resp)
	case opCancel:
		c.mu.Lock()
		cancel := c.pending[f.ID]
		c.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	default:
		c.srv.log.Warnf("Process %d sent an unknown request %q; disconnecting it", c.pid, f.Op)
		return false
	}
	return true
}

// requestContext is the context of a request that waits for the bridge: it
// ends at the caller's deadline, on the caller's cancel frame, or when the
// client goes (cleanup cancels every pending request).
//
// It does not derive from c.ctx: a child of a cancelable context is added to
// and removed from its parent's set of children under the parent's lock, for
// every request of the client, which cost a sixth of the CPU of a publish
// through the socket (BenchmarkShareSocketPublish). A request without an ID
// cannot be canceled by the client and is not pending; it derives from c.ctx.
// A request whose ID is pending already breaks the protocol: not ok.
func (c *serverClient) requestContext(f *frame) (context.Context, context.CancelFunc, bool) {
	parent := context.Background()
	if f.ID == 0 {
		parent = c.ctx
	}
	var ctx context.Context
	var cancel context.CancelFunc
	if f.Deadline != 0 {
		ctx, cancel = context.WithDeadline(parent, time.Unix(0, f.Deadline))
	} else {
		ctx, cancel = context.WithCancel(parent)
	}
	if f.ID != 0 {
		c.mu.Lock()
		_, dup := c.pending[f.ID]
		if !dup {
			c.pending[f.ID] = cancel
		}
		c.mu.Unlock()
		if dup {
			cancel()
			return nil, nil, false
		}
	}
	return ctx, cancel, true
}

// run performs a request that waits for the bridge.
func (c *serverClient) run(ctx context.Context, f *frame) *frame {
	conn := c.srv.conn
	switch f.Op {
	case opPublish:
		err := conn.Publish(ctx, gateway.Message{Device: f.Device, Kind: f.Kind, Subfolder: f.Subfolder, Payload: f.Payload, QoS: f.QoS})
		return respond(f.ID, err)
	case opAttach:
		return respond(f.ID, conn.Attach(ctx, f.Device))
	case opDetach:
		return respond(f.ID, conn.Detach(ctx, f.Device))
	default: // opSubscribe
		e := &serverSub{}
		c.replaceSub(f.Sub, e)
		sub, err := conn.Subscribe(ctx, f.Device, c.forward(f.Sub, e))
		kept := c.settle(f.Sub, e, sub)
		resp := respond(f.ID, err)
		resp.Kept = kept && err != nil
		return resp
	}
}

// replaceSub makes e (nil: nothing) the entry of subscription id and ends
// the one it replaces.
func (c *serverClient) replaceSub(id uint64, e *serverSub) {
	c.mu.Lock()
	old := c.subs[id]
	if e == nil {
		delete(c.subs, id)
	} else {
		c.subs[id] = e
	}
	c.mu.Unlock()
	if old != nil && old.sub != nil {
		old.sub.Unsubscribe()
	}
}

// settle stores sub in e unless e was replaced or the client left meanwhile;
// it reports whether sub stays registered.
func (c *serverClient) settle(id uint64, e *serverSub, sub gateway.Subscription) bool {
	if sub == nil {
		c.mu.Lock()
		if c.subs[id] == e {
			delete(c.subs, id)
		}
		c.mu.Unlock()
		return false
	}
	c.mu.Lock()
	current := c.subs[id] == e && c.ctx.Err() == nil
	if current {
		e.sub = sub
	}
	c.mu.Unlock()
	if !current {
		sub.Unsubscribe()
	}
	return current
}

// forward is the handler registered for a client subscription: it queues
// the message for the client, or disconnects a client too far behind.
func (c *serverClient) forward(id uint64, e *serverSub) gateway.Handler {
	return func(in gateway.Inbound) {
		c.mu.Lock()
		current := c.subs[id] == e
		c.mu.Unlock()
		if !current || c.ctx.Err() != nil {
			return
		}
		ok, waiting := c.out.pushMessage(inboundFrame(id, in), c.srv.maxMsgs, c.srv.maxBytes)
		if ok || c.ctx.Err() != nil {
			return
		}
		c.mu.Lock()
		first := !c.slow
		c.slow = true
		c.mu.Unlock()
		if first {
			lost := uint64(waiting) + 1
			c.srv.conn.CountDrop(dropSlowClient, lost)
			c.srv.log.Errorf("Process %d does not take the inbound messages of gateway %q fast enough (%d waiting): disconnected it, %d messages lost to it; it reconnects and subscribes again", c.pid, c.srv.conn.GatewayID(), waiting, lost)
			c.kill()
		}
	}
}
