package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/influxdata/telegraf"
	"golang.org/x/time/rate"

	"github.com/telegraf-omnicore/telegraf-omnicore/internal/redact"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/ratelog"
)

// Session is one gateway connection to the OmniCore bridge. It follows paho
// autopaho's idea: a single goroutine owns the connection and rebuilds all
// per-connection state (errors subscription, attachments, subscriptions) on
// every connect; callers only ever wait for a ready connection.
type Session struct {
	cfg      *Config
	log      telegraf.Logger
	clientID string

	ctx    context.Context
	cancel context.CancelFunc
	done   chan struct{} // closed when the connection owner exits

	window  chan struct{} // bounds messages in flight (attaches included)
	limiter *rate.Limiter // optional per-connection message rate
	inbound chan queued   // routed messages waiting for handlers

	mu        sync.Mutex
	conn      *connection // current connection, nil while down
	connReady chan struct{}
	devices   map[string]*device
	handlers  map[uint64]*handlerEntry
	nextSubID uint64
	lastErr   error
	started   bool
	closed    bool
	// prevConnect is when the connection before the current one was made:
	// a reconnect re-attaches only devices used since then.
	prevConnect, lastConnect time.Time
	// stateNext keeps, for devices forgotten by Detach, the earliest time
	// of their next state message, so that pacing survives a detach.
	stateNext map[string]time.Time
	// refused keeps the devices the bridge refused while they back off,
	// apart from devices, so that they hold no max_devices slot (see
	// refusal). probation counts the devices of devices on their first
	// attach, which hold a slot only until it ends; slotFreed is closed
	// and replaced whenever a device leaves devices.
	refused   map[string]*refusal
	probation int
	slotFreed chan struct{}
	// warn logs each kind of per-device warning at most once per
	// warnInterval, with the count held back.
	warn *ratelog.Limiter
	// dupLog reports a probable duplicate client ID at most once per
	// duplicateLogInterval.
	dupLog *ratelog.Limiter

	c counters
}

// connection is the state of one MQTT connection: everything in it dies with
// the connection and is rebuilt on the next.
type connection struct {
	gen      uint64
	client   mqtt.Client
	lost     chan struct{} // closed when the connection is gone
	lostOnce sync.Once
	ready    chan struct{} // closed once rebuilt and open for publishing
	draining atomic.Bool   // token renewal in progress: no new publishes
	inflight atomic.Int64  // publishes written and not yet resolved
	lastAck  atomic.Int64  // unix nanos of the last acknowledgement
	expires  time.Time     // token exp

	// readPublishes counts PUBLISH packets read off the wire, routed those our
	// handler has processed; see publishCountingConn for why.
	readPublishes atomic.Uint64
	routed        atomic.Uint64

	mu       sync.Mutex
	pending  map[uint16]chan struct{} // packet ID -> signal "bridge says device not found"
	routedCh chan struct{}            // closed and replaced whenever routed grows
	// acked keeps each data message acknowledged in the last ackedWindow
	// by packet ID, oldest first in ackedOrder: a GATEWAY_DEVICE_NOT_FOUND
	// naming the packet ID after the PUBACK sends it again.
	acked      map[uint16]*ackedMsg
	ackedOrder []uint16

	// raw is the network connection under paho, closed to abort a connect.
	raw atomic.Pointer[net.Conn]

	// publishes feeds the connection's publishers (see startPublishers).
	publishes chan publishRequest

	// tick is closed and replaced every ackTickDivisor-th of the ack
	// timeout: see ackTick.
	tick atomic.Pointer[chan struct{}]
}

// ackTickDivisor sets the acknowledgement clock's period: the ack timeout
// divided by this. A message without a PUBACK is given up on between the
// timeout and 1/8 more.
const ackTickDivisor = 8

// ackTick returns the channel the connection's acknowledgement clock closes
// next. Messages waiting for their PUBACK check their age when it closes.
//
// Why not a timer per message: with 100 messages in flight, creating and
// stopping a timer per message cost 5% of the process's CPU (the runtime's
// timer heap lock); one clock per connection costs a channel per tick.
func (cs *connection) ackTick() <-chan struct{} { return *cs.tick.Load() }

// startAckClock runs the connection's acknowledgement clock until the
// connection is lost.
func (cs *connection) startAckClock(timeout time.Duration) {
	first := make(chan struct{})
	cs.tick.Store(&first)
	period := max(timeout/ackTickDivisor, time.Millisecond)
	go func() {
		t := time.NewTicker(period)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				next := make(chan struct{})
				close(*cs.tick.Swap(&next))
			case <-cs.lost:
				return
			}
		}
	}()
}

// publishRequest asks a publisher of a connection to hand a message to
// paho; the token comes back on reply (buffered, so a publisher never waits
// for a caller that gave up).
type publishRequest struct {
	topic   string
	qos     byte
	payload []byte
	reply   chan mqtt.Token
}

// publishersPerConn is how many goroutines of a connection hand messages to
// paho. paho takes one message at a time (its outbound channel is
// unbuffered, read by its single writer); several keep a message ready for
// the writer even when the machine is busy and a woken publisher waits to
// be scheduled.
const publishersPerConn = 8

// replyChans recycles the reply channels of publishRequest: only those
// whose token was received go back, so a recycled channel is always empty.
var replyChans = sync.Pool{New: func() any { return make(chan mqtt.Token, 1) }}

// startPublishers starts the goroutines that call paho's Publish for the
// connection. paho's Publish blocks while its writer is stalled (until the
// write timeout, even after the connection is gone); callers hand their
// message over and wait on the reply or on lost, so a lost connection or
// an ended context frees them at once. A few long-lived goroutines per
// connection do what a goroutine per message did, without its cost. They
// end with the connection (one stuck in paho ends when paho gives up).
func (cs *connection) startPublishers() {
	cs.publishes = make(chan publishRequest)
	for range publishersPerConn {
		go func() {
			for {
				select {
				case r := <-cs.publishes:
					r.reply <- cs.client.Publish(r.topic, r.qos, false, r.payload)
				case <-cs.lost:
					return
				}
			}
		}()
	}
}

// ackedMsg is an acknowledged message kept for ackedWindow.
type ackedMsg struct {
	msg Message
	at  time.Time
}

const (
	// ackedWindow is how long an acknowledged message is kept in case the
	// bridge names it in an error after its PUBACK; ackedMax bounds how
	// many are kept (the oldest go first).
	ackedWindow = 5 * time.Second
	ackedMax    = 10000
)

type device struct {
	id          string
	wanted      bool   // attached by request; re-attached after reconnects
	attachedGen uint64 // connection generation the device is attached on
	subGen      uint64 // connection generation its config/commands are subscribed on
	attempt     *attachAttempt
	failures    int
	retryAt     time.Time // refused: no new attach before this
	lastErr     error
	lastUsed    time.Time
	config      []byte // latest config received, for late subscribers
	hasConfig   bool
	stateTurn   chan struct{} // one state message of the device at a time
	nextState   time.Time     // earliest time the next state message may go
	// probation: admitted for a first attach that has not succeeded yet,
	// by a caller that does not listen to the device. It leaves devices
	// when that attach fails, so a junk ID holds its slot for one round
	// trip, never for detach_idle.
	probation bool
}

// refusal is what the session remembers of a device the bridge refused,
// outside the device table: enough to answer at once while it backs off
// and to lengthen the next back-off. At most maxRefusals are kept.
type refusal struct {
	failures int
	retryAt  time.Time
	err      error
}

// warnInterval is how often one kind of per-device warning is logged, as
// the README promises; the others go to debug level and are counted.
const warnInterval = 10 * time.Second

type attachAttempt struct {
	gen     uint64
	done    chan struct{}
	err     error
	refused atomic.Pointer[string] // set by the errors handler
	signal  chan struct{}          // closed when refused is set
	once    sync.Once
}

// queued is an inbound message waiting for dispatch; to, when set, limits it
// to one handler (a config replayed to a late subscriber).
type queued struct {
	in Inbound
	to *handlerEntry
}

type handlerEntry struct {
	device string // "" for SubscribeAll and errors
	all    bool
	errors bool
	h      Handler

	// Touched only by the dispatch goroutine: which devices' config this
	// handler has had, and configs replayed to it that the bridge may still
	// send too (the same payload arriving next is then not delivered twice).
	hadConfig map[string]bool
	replayed  map[string]string
}

type counters struct {
	connects, connectFailures, connectionLost, renewals atomic.Uint64
	attachesOK, attachesFailed, detaches                atomic.Uint64
	published, acked, retries, received                 atomic.Uint64
	devicesRefused, resentAfterError                    atomic.Uint64
	duplicateSuspected                                  atomic.Uint64
	mu                                                  sync.Mutex
	errorsByType, droppedByReason                       map[string]uint64
	gauges                                              gaugeBook
}

// Internal drop reasons.
const (
	dropInboundUnroutable = "inbound_unroutable"
	// dropErrorAfterAck counts messages the bridge acknowledged, then
	// reported as not delivered, and that could not be sent again.
	dropErrorAfterAck = "error_after_ack"
)

// New builds a session from a validated Config. It does no network I/O.
func New(cfg *Config) (*Session, error) {
	if cfg == nil || cfg.Signer == nil {
		return nil, errors.New("gateway: config not validated")
	}
	log := cfg.Log
	if log == nil {
		log = DiscardLogger{}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s := &Session{
		cfg:       cfg,
		log:       log,
		clientID:  omnicore.ClientID(cfg.SubscriptionID, cfg.RegistryID, cfg.GatewayID),
		ctx:       ctx,
		cancel:    cancel,
		done:      make(chan struct{}),
		window:    make(chan struct{}, cfg.MaxInflight),
		inbound:   make(chan queued, 1024),
		connReady: make(chan struct{}),
		devices:   make(map[string]*device),
		handlers:  make(map[uint64]*handlerEntry),
		stateNext: make(map[string]time.Time),
		refused:   make(map[string]*refusal),
		slotFreed: make(chan struct{}),
		warn:      ratelog.New(log, warnInterval),
		dupLog:    ratelog.New(log, duplicateLogInterval),
	}
	s.c.errorsByType = make(map[string]uint64)
	s.c.droppedByReason = make(map[string]uint64)
	if cfg.MaxMessageRate > 0 {
		burst := max(1, int(cfg.MaxMessageRate/10))
		s.limiter = rate.NewLimiter(rate.Limit(cfg.MaxMessageRate), burst)
	}
	return s, nil
}

// Start launches the connection owner and the inbound dispatcher. It returns
// at once; use WaitReady to wait for the first connection.
func (s *Session) Start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return
	}
	s.started = true
	go s.dispatch()
	go s.run()
	go s.healLoop()
	if s.cfg.DetachIdle > 0 {
		go s.detachIdleLoop()
	}
}

// WaitReady waits until a connection is up and rebuilt. It returns the last
// connection error when ctx ends first.
func (s *Session) WaitReady(ctx context.Context) error {
	_, err := s.ready(ctx)
	if err != nil {
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.lastErr != nil {
			return fmt.Errorf("%w (last connection error: %w)", err, s.lastErr)
		}
	}
	return err
}

// Close stops the session: new calls fail with ErrClosed, in-flight messages
// get until ctx ends to be acknowledged, then the connection is closed.
func (s *Session) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	cs := s.conn
	started := s.started
	s.mu.Unlock()
	if cs != nil {
		cs.drain(ctx)
	}
	s.cancel()
	if started {
		select {
		case <-s.done:
		case <-ctx.Done():
		}
	}
	return nil
}

// Done is closed once the session's MQTT connection is closed for good
// after Close (a connect in progress included). Whoever hands the gateway
// over to another process waits for it, so that the bridge never sees the
// next connection before this one is gone.
func (s *Session) Done() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.started {
		ch := make(chan struct{})
		close(ch)
		return ch
	}
	return s.done
}

// Health reports whether the session is connected and the error of its
// last failed connect (nil once a connect succeeded).
func (s *Session) Health() (connected bool, lastErr error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn != nil && !s.conn.isLost(), s.lastErr
}

// GatewayID implements Conn.
func (s *Session) GatewayID() string { return s.cfg.GatewayID }

// ---------------------------------------------------------------------------
// Connection owner

func (s *Session) run() {
	defer close(s.done)
	backoff := s.cfg.MinReconnect
	var gen uint64
	// renewing: this connect follows a token renewal, which is routine
	// (every token_lifetime) and logged at debug level.
	renewing := false
	// shortLived counts the connections in a row the bridge closed soon
	// after connecting (see noteLoss).
	shortLived := 0
	for s.ctx.Err() == nil {
		gen++
		cs, err := s.connect(gen)
		if err != nil && s.ctx.Err() != nil {
			return // closed while connecting: not a failure
		}
		if err != nil {
			s.c.connectFailures.Add(1)
			s.setLastErr(err)
			wait := jitter(backoff)
			s.log.Errorf("Connecting to the bridge as %q failed: %v; retrying in %s", s.clientID, err, wait.Round(time.Millisecond))
			backoff = min(backoff*2, s.cfg.MaxReconnect)
			if !sleepCtx(s.ctx, wait) {
				return
			}
			continue
		}
		backoff = s.cfg.MinReconnect
		s.c.connects.Add(1)
		s.setLastErr(nil)
		connectedAt := time.Now()
		s.mu.Lock()
		s.prevConnect, s.lastConnect = s.lastConnect, connectedAt
		s.mu.Unlock()
		if renewing {
			s.log.Debugf("Connected to the bridge as %q with the renewed token", s.clientID)
		} else {
			s.log.Infof("Connected to the bridge as %q", s.clientID)
		}

		s.mu.Lock()
		s.conn = cs
		s.mu.Unlock()
		if err := s.rebuild(cs, renewing); err != nil {
			s.log.Warnf("Restoring gateway state after connect failed: %v; reconnecting", err)
			s.lose(cs)
		}
		s.openForPublishing(cs)

		renew := time.NewTimer(max(time.Until(cs.expires)-s.cfg.RenewBefore, time.Second))
		planned := false
		renewing = false
		select {
		case <-cs.lost:
			if s.ctx.Err() != nil {
				// Lost because the session is closing: not a failure,
				// and there is no reconnect.
				planned = true
				break
			}
			s.c.connectionLost.Add(1)
			s.warn.Warnf("connection_lost", "Connection to the bridge lost; reconnecting")
			shortLived = s.noteLoss(shortLived, time.Since(connectedAt))
		case <-renew.C:
			planned, renewing = true, true
			s.c.renewals.Add(1)
			s.log.Debugf("Renewing the gateway token: reconnecting with a fresh JWT")
		case <-s.ctx.Done():
			planned = true
		}
		renew.Stop()
		if planned {
			shortLived = 0
		}
		s.takeDown(cs, planned)
		if !planned {
			// A short pause before the first retry avoids a hot loop when
			// the bridge closes every connection at once (e.g. a kick).
			if !sleepCtx(s.ctx, jitter(s.cfg.MinReconnect)) {
				return
			}
		}
	}
}

// A connection the bridge closes within shortLivedConnection of its CONNACK,
// duplicateAfter times in a row, is most likely a second connection with the
// same client ID: the bridge keeps one per client ID and closes the older
// one whenever the other connects, so two processes of one gateway kick
// each other off in turn.
const (
	shortLivedConnection = 5 * time.Second
	duplicateAfter       = 3
	// duplicateLogInterval is how often the duplicate is reported while
	// the kicks go on.
	duplicateLogInterval = time.Minute
)

// noteLoss counts an unplanned loss of a connection that lived for lived
// and returns the new count of short-lived connections in a row; from
// duplicateAfter on it reports a probable duplicate client ID.
func (s *Session) noteLoss(shortLived int, lived time.Duration) int {
	if lived > shortLivedConnection {
		return 0
	}
	shortLived++
	if shortLived >= duplicateAfter {
		s.c.duplicateSuspected.Add(1)
		s.dupLog.Errorf("duplicate_client_id", "The bridge closed %d connections in a row within %s of connecting: probably a second connection "+
			"with the same gateway ID %q (another host, a cloned image, a test run or `telegraf --test` with this configuration). "+
			"The bridge keeps one connection per client ID %q and closes the other whenever one connects; stop the other process or give it its own gateway",
			shortLived, shortLivedConnection, s.cfg.GatewayID, s.clientID)
	}
	return shortLived
}

// connect makes one MQTT connection with a freshly minted token.
func (s *Session) connect(gen uint64) (*connection, error) {
	now := time.Now()
	token, err := s.cfg.Signer.Token(s.cfg.SubscriptionID, now, s.cfg.TokenLifetime)
	if err != nil {
		return nil, fmt.Errorf("minting the gateway JWT: %w", err)
	}
	cs := &connection{
		gen:   gen,
		lost:  make(chan struct{}),
		ready: make(chan struct{}),
		// The JWT's exp is in whole seconds, rounded down: renew against
		// that, not against the unrounded lifetime.
		expires:  time.Unix(now.Add(s.cfg.TokenLifetime).Unix(), 0),
		pending:  make(map[uint16]chan struct{}),
		routedCh: make(chan struct{}),
		acked:    make(map[uint16]*ackedMsg),
	}
	cs.lastAck.Store(now.UnixNano())
	opts := mqtt.NewClientOptions()
	for _, srv := range s.cfg.Servers {
		opts.AddBroker(srv)
	}
	opts.SetClientID(s.clientID)
	opts.SetUsername(omnicore.Username)
	opts.SetPassword(token)
	opts.SetProtocolVersion(4)
	opts.SetCleanSession(true)
	opts.SetAutoReconnect(false)
	opts.SetConnectRetry(false)
	opts.SetResumeSubs(false)
	opts.SetKeepAlive(s.cfg.KeepAlive)
	opts.SetPingTimeout(min(s.cfg.Timeout, s.cfg.KeepAlive))
	opts.SetConnectTimeout(s.cfg.ConnectionTimeout)
	opts.SetWriteTimeout(s.cfg.Timeout)
	opts.SetOrderMatters(true)
	opts.SetCustomOpenConnectionFn(dialer(s.ctx, s.cfg.TLS, s.cfg.ConnectionTimeout, s.cfg.Timeout, &cs.readPublishes, func(c net.Conn) { cs.raw.Store(&c) }))
	opts.SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
		s.onMessage(cs, m)
		cs.markRouted()
	})
	opts.SetConnectionLostHandler(func(_ mqtt.Client, err error) {
		s.setLastErr(err)
		s.lose(cs)
	})
	client := mqtt.NewClient(opts)
	cs.client = client
	tok := client.Connect()
	timer := time.NewTimer(s.cfg.ConnectionTimeout + time.Second)
	defer timer.Stop()
	select {
	case <-tok.Done():
	case <-timer.C:
		cs.abortConnect(client, tok)
		return nil, fmt.Errorf("no CONNACK within %s", s.cfg.ConnectionTimeout)
	case <-s.ctx.Done():
		// Closed while connecting: the connection must be gone before
		// Close's caller hands the gateway to another process.
		cs.abortConnect(client, tok)
		return nil, ErrClosed
	}
	if err := tok.Error(); err != nil {
		return nil, explainConnectError(err)
	}
	cs.startPublishers()
	cs.startAckClock(s.cfg.Timeout)
	return cs, nil
}

// abortConnect ends a connect that is still in progress: the network
// connection is closed under paho, which then fails the connect at once.
func (cs *connection) abortConnect(client mqtt.Client, tok mqtt.Token) {
	if c := cs.raw.Load(); c != nil {
		(*c).Close()
	}
	if tok.WaitTimeout(2*time.Second) && tok.Error() == nil {
		client.Disconnect(0)
	}
}

// ErrNotAuthorized marks a connect the bridge refused for the gateway's
// credentials (CONNACK 4 or 5).
var ErrNotAuthorized = errors.New("the bridge refused the JWT")

func explainConnectError(err error) error {
	msg := err.Error()
	switch {
	case strings.Contains(msg, "ot Authorized"), strings.Contains(msg, "bad user name or password"):
		return fmt.Errorf("%w: %w (check private_key, algorithm, subscription_id, that the key is registered for the gateway, and the clock)", err, ErrNotAuthorized)
	case strings.Contains(msg, "dentifier rejected"):
		return fmt.Errorf("%w (the bridge does not know this gateway: check subscription_id, registry_id and gateway_id)", err)
	case strings.Contains(msg, "certificate is valid for"), strings.Contains(msg, "doesn't contain any IP SANs"):
		return fmt.Errorf("%w (TLS: the bridge's certificate does not name the host in servers; fix servers or set tls_server_name)", err)
	case strings.Contains(msg, "certificate"), strings.Contains(msg, "x509"):
		return fmt.Errorf("%w (TLS: the bridge's certificate is not trusted; set tls_ca to the CA file of the bridge)", err)
	}
	return err
}

// rebuild restores the per-connection state in the order the bridge needs:
// errors first (so attach failures are seen), then attachments, then
// subscriptions.
func (s *Session) rebuild(cs *connection, renewing bool) error {
	errTopic := omnicore.Topic(s.cfg.RegistryID, s.cfg.GatewayID, omnicore.KindErrors, "")
	if err := s.subscribe(cs, map[string]byte{errTopic: 0}); err != nil {
		return fmt.Errorf("subscribing %q: %w", errTopic, err)
	}
	s.mu.Lock()
	var reattach []string
	gatewaySubs := false
	for id, d := range s.devices {
		if id == s.cfg.GatewayID {
			gatewaySubs = s.wantsSubscriptionLocked(id)
			continue
		}
		// Only devices used since the previous connect, or listened to,
		// are attached again now; the others on their next message. So
		// a reconnect costs what the active devices need, not every
		// device ever seen.
		active := d.lastUsed.After(s.prevConnect) || s.wantsSubscriptionLocked(id)
		if d.wanted && active && time.Now().After(d.retryAt) {
			reattach = append(reattach, id)
		}
	}
	if s.hasAllHandlersLocked() {
		gatewaySubs = true
	}
	s.mu.Unlock()
	if gatewaySubs {
		if err := s.subscribeDevice(cs, s.cfg.GatewayID); err != nil {
			return err
		}
	}
	if len(reattach) > 0 {
		start := time.Now()
		var wg sync.WaitGroup
		var failed atomic.Int64
		work := make(chan string)
		for range min(len(reattach), s.cfg.MaxInflight) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for id := range work {
					if err := s.attachOn(s.ctx, cs, id, false); err != nil {
						failed.Add(1)
						continue
					}
					if s.wantsSubscription(id) {
						if err := s.subscribeDevice(cs, id); err != nil {
							s.warn.Warnf("subscribe_failed", "Restoring subscriptions of device %q failed: %v", id, err)
						}
					}
				}
			}()
		}
		for _, id := range reattach {
			work <- id
		}
		close(work)
		wg.Wait()
		logf := s.log.Infof
		if renewing && failed.Load() == 0 {
			logf = s.log.Debugf
		}
		logf("Re-attached %d of %d devices in %s", len(reattach)-int(failed.Load()), len(reattach), time.Since(start).Round(time.Millisecond))
	}
	return nil
}

func (s *Session) openForPublishing(cs *connection) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != cs || cs.isLost() {
		return
	}
	close(cs.ready)
	close(s.connReady)
}

// takeDown ends a connection. On a planned close (token renewal, shutdown)
// publishing stops first and in-flight messages get up to Timeout to be
// acknowledged, so a renewal loses nothing and duplicates nothing.
func (s *Session) takeDown(cs *connection, planned bool) {
	s.retire(cs)
	if planned {
		cs.draining.Store(true)
		if s.ctx.Err() == nil {
			// A token renewal; on Close the caller drained already,
			// within its own deadline.
			ctx, cancel := context.WithTimeout(context.Background(), s.cfg.Timeout)
			cs.drain(ctx)
			cancel()
		}
		cs.client.Disconnect(250)
	} else {
		cs.client.Disconnect(0)
	}
	s.lose(cs)
}

// retire makes cs no longer the current connection, so that callers of
// ready wait for the next one.
func (s *Session) retire(cs *connection) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn != cs {
		return
	}
	s.conn = nil
	select {
	case <-s.connReady:
		s.connReady = make(chan struct{})
	default:
	}
}

// lose marks cs as gone: everything waiting on it gives up and retries on
// the next connection.
func (s *Session) lose(cs *connection) {
	s.retire(cs)
	cs.close()
}

func (cs *connection) close() { cs.lostOnce.Do(func() { close(cs.lost) }) }

// markRouted records that the handler finished one inbound message.
func (cs *connection) markRouted() {
	cs.mu.Lock()
	cs.routed.Add(1)
	close(cs.routedCh)
	cs.routedCh = make(chan struct{})
	cs.mu.Unlock()
}

// waitRouted waits until the handler has processed target inbound messages
// (normally at once: the count only lags while a message is between paho's
// reader and router), the connection is lost, or timeout passes.
func (cs *connection) waitRouted(target uint64, timeout time.Duration) {
	if cs.routed.Load() >= target {
		return
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		cs.mu.Lock()
		ch := cs.routedCh
		cs.mu.Unlock()
		if cs.routed.Load() >= target {
			return
		}
		select {
		case <-ch:
		case <-cs.lost:
			return
		case <-timer.C:
			return
		}
	}
}

func (cs *connection) isLost() bool {
	select {
	case <-cs.lost:
		return true
	default:
		return false
	}
}

// ready returns the current ready connection, waiting for one.
func (s *Session) ready(ctx context.Context) (*connection, error) {
	for {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return nil, ErrClosed
		}
		cs, ch := s.conn, s.connReady
		s.mu.Unlock()
		select {
		case <-ch:
			// connReady is closed only while s.conn is ready; retire swaps
			// it before a connection stops being usable.
			if cs != nil {
				return cs, nil
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-s.ctx.Done():
			return nil, ErrClosed
		}
	}
}

func (s *Session) setLastErr(err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lastErr = err
}

// ---------------------------------------------------------------------------
// Publishing

// Publish implements Conn.
func (s *Session) Publish(ctx context.Context, msg Message) error {
	if err := s.checkMessage(msg); err != nil {
		return err
	}
	topic := omnicore.Topic(s.cfg.RegistryID, msg.Device, msg.Kind, msg.Subfolder)
	for attempt := 0; ; attempt++ {
		if attempt > 0 {
			s.c.retries.Add(1)
		}
		cs, err := s.ready(ctx)
		if err != nil {
			return err
		}
		if msg.Device != s.cfg.GatewayID {
			if err := s.attachOn(ctx, cs, msg.Device, true); err != nil {
				if errors.Is(err, ErrAttachRefused) || errors.Is(err, ErrClosed) || ctx.Err() != nil {
					return err
				}
				continue // connection lost or attach timed out: try again
			}
		}
		if msg.Kind == omnicore.KindState {
			err = s.sendState(ctx, cs, topic, msg)
		} else {
			err = s.sendKeep(ctx, cs, topic, msg.QoS, msg.Payload, msg.Device, &msg)
		}
		if err == nil {
			s.touch(msg.Device)
			return nil
		}
		if errors.Is(err, errDeviceNotFound) {
			s.markDetached(cs, msg.Device)
			continue
		}
		if ctx.Err() != nil || errors.Is(err, ErrClosed) || errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		if !errors.Is(err, errConnLost) && !errors.Is(err, errAckTimeout) {
			// paho could not even queue the message: the connection is
			// wedged, replace it rather than spin on it.
			s.log.Warnf("Publishing to %q failed: %v; reconnecting", topic, err)
			s.lose(cs)
		}
	}
}

var (
	errDeviceNotFound = errors.New("bridge: device not attached")
	errConnLost       = errors.New("connection lost before acknowledgement")
	errAckTimeout     = errors.New("no acknowledgement in time")
)

// sendState sends a state message no sooner than omnicore.StateInterval
// after the device's previous one was acknowledged (so surely after it
// arrived): the bridge detaches a device, or drops the gateway's own
// connection, for faster state. Callers wanting "latest wins" coalesce
// before publishing; this is the guarantee underneath.
func (s *Session) sendState(ctx context.Context, cs *connection, topic string, msg Message) error {
	s.mu.Lock()
	d := s.deviceLocked(msg.Device)
	if d.stateTurn == nil {
		d.stateTurn = make(chan struct{}, 1)
	}
	turn := d.stateTurn
	s.mu.Unlock()
	select {
	case turn <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-turn }()
	s.mu.Lock()
	wait := time.Until(d.nextState)
	s.mu.Unlock()
	if wait > 0 && !sleepCtx(ctx, wait) {
		return ctx.Err()
	}
	err := s.sendKeep(ctx, cs, topic, msg.QoS, msg.Payload, msg.Device, &msg)
	s.mu.Lock()
	// Attempts that failed count too: the bridge may have seen them.
	d.nextState = time.Now().Add(omnicore.StateInterval + stateMargin)
	s.mu.Unlock()
	return err
}

// stateMargin covers QoS 0, where "written" is all we know.
const stateMargin = 10 * time.Millisecond

func (s *Session) checkMessage(msg Message) error {
	if err := omnicore.ValidateID(msg.Device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	switch msg.Kind {
	case omnicore.KindEvents:
		if msg.Subfolder != "" {
			if err := omnicore.ValidateSubfolder(msg.Subfolder); err != nil {
				return fmt.Errorf("events subfolder: %w", err)
			}
		}
		if len(msg.Payload) > omnicore.MaxTelemetryBytes {
			return fmt.Errorf("%w: telemetry of %d bytes, limit %d", ErrTooLarge, len(msg.Payload), omnicore.MaxTelemetryBytes)
		}
	case omnicore.KindState:
		if msg.Subfolder != "" {
			return errors.New("state has no subfolders")
		}
		if len(msg.Payload) > omnicore.MaxStateBytes {
			return fmt.Errorf("%w: state of %d bytes, limit %d", ErrTooLarge, len(msg.Payload), omnicore.MaxStateBytes)
		}
	default:
		return fmt.Errorf("cannot publish %q messages", msg.Kind)
	}
	if msg.QoS > 1 {
		return errors.New("QoS 2 is not supported by the bridge (it closes the connection)")
	}
	return nil
}

// send publishes once on cs and waits for the outcome. It holds a slot of the
// in-flight window for the duration.
func (s *Session) send(ctx context.Context, cs *connection, topic string, qos byte, payload []byte, device string) error {
	return s.sendKeep(ctx, cs, topic, qos, payload, device, nil)
}

// sendKeep is send that, for a data message (keep not nil) acknowledged at
// QoS 1, keeps the message for ackedWindow (see handleBridgeError).
func (s *Session) sendKeep(ctx context.Context, cs *connection, topic string, qos byte, payload []byte, device string, keep *Message) error {
	select {
	case s.window <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-cs.lost:
		return errConnLost
	}
	defer func() { <-s.window }()
	if s.limiter != nil {
		if err := s.limiter.Wait(ctx); err != nil {
			// The limiter says so as soon as the wait would outlast ctx,
			// before ctx ends: a deadline, not a wedged connection.
			return fmt.Errorf("%w: waiting for max_message_rate: %v", context.DeadlineExceeded, err)
		}
	}
	cs.inflight.Add(1)
	defer cs.inflight.Add(-1)
	if cs.isLost() {
		return errConnLost
	}
	// paho's Publish blocks while its writer is stalled until its write
	// timeout, even after the connection is gone: a publisher of the
	// connection calls it, so that a lost connection or an ended context
	// frees the caller and its window slot at once.
	reply := replyChans.Get().(chan mqtt.Token)
	select {
	case cs.publishes <- publishRequest{topic: topic, qos: qos, payload: payload, reply: reply}:
	case <-cs.lost:
		replyChans.Put(reply) // never sent: still empty
		return errConnLost
	case <-ctx.Done():
		replyChans.Put(reply)
		return ctx.Err()
	}
	var tok mqtt.Token
	select {
	case tok = <-reply:
		replyChans.Put(reply)
	case <-cs.lost:
		return errConnLost
	case <-ctx.Done():
		return ctx.Err()
	}
	s.c.published.Add(1)
	var notFound chan struct{}
	if pt, ok := tok.(*mqtt.PublishToken); ok && qos > 0 && pt.MessageID() != 0 {
		notFound = make(chan struct{})
		cs.mu.Lock()
		cs.pending[pt.MessageID()] = notFound
		cs.mu.Unlock()
		defer func() {
			cs.mu.Lock()
			if cs.pending[pt.MessageID()] == notFound {
				delete(cs.pending, pt.MessageID())
			}
			cs.mu.Unlock()
		}()
	}
	sent := time.Now()
	for {
		tick := cs.ackTick()
		select {
		case <-tok.Done():
			if err := tok.Error(); err != nil {
				if cs.isLost() {
					return errConnLost
				}
				return err
			}
			if qos > 0 {
				// Let errors the bridge sent before this PUBACK reach us first.
				cs.waitRouted(cs.readPublishes.Load(), s.cfg.Timeout)
			}
			if notFound != nil {
				// The error may have been routed just before the PUBACK.
				select {
				case <-notFound:
					return errDeviceNotFound
				default:
				}
			}
			cs.lastAck.Store(time.Now().UnixNano())
			s.c.acked.Add(1)
			if keep != nil && notFound != nil {
				cs.keepAcked(tok.(*mqtt.PublishToken).MessageID(), *keep)
			}
			return nil
		case <-notFound:
			return errDeviceNotFound
		case <-cs.lost:
			return errConnLost
		case <-tick:
			if time.Since(sent) < s.cfg.Timeout {
				continue
			}
			// No PUBACK: the bridge may have dropped it (full buffer). Resend;
			// when nothing at all was acknowledged for a while the connection
			// is presumed dead and is replaced.
			if time.Since(time.Unix(0, cs.lastAck.Load())) > s.cfg.Timeout {
				s.log.Warnf("No acknowledgement from the bridge for %s; reconnecting", s.cfg.Timeout)
				s.lose(cs)
			}
			return errAckTimeout
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// ---------------------------------------------------------------------------
// Attachments

// Attach implements Conn.
func (s *Session) Attach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	if device == s.cfg.GatewayID {
		return nil
	}
	for {
		cs, err := s.ready(ctx)
		if err != nil {
			return err
		}
		err = s.attachOn(ctx, cs, device, true)
		if err == nil || errors.Is(err, ErrAttachRefused) || ctx.Err() != nil || errors.Is(err, ErrClosed) {
			return err
		}
	}
}

// attachOn makes sure device is attached on cs, joining an attempt already
// under way for it. Attaches of different devices run concurrently, bounded
// by the in-flight window, so thousands are pipelined through one connection.
// use says the attach is for a plugin's call, which makes the device
// active (lastUsed); the session's own re-attaches do not.
func (s *Session) attachOn(ctx context.Context, cs *connection, id string, use bool) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if r, ok := s.refused[id]; ok && !s.wantsSubscriptionLocked(id) {
		if wait := time.Until(r.retryAt); wait > 0 {
			s.mu.Unlock()
			return fmt.Errorf("%w (next attempt in %s)", r.err, wait.Round(time.Second))
		}
	}
	d, err := s.admitDeviceLocked(ctx, id)
	if err != nil {
		s.mu.Unlock()
		return err
	}
	if r, ok := s.refused[id]; ok {
		// Back from its back-off: the next refusal waits longer.
		d.failures = max(d.failures, r.failures)
		delete(s.refused, id)
	}
	d.wanted = true
	if use || d.lastUsed.IsZero() {
		d.lastUsed = time.Now()
	}
	if d.attachedGen == cs.gen {
		s.mu.Unlock()
		return nil
	}
	if d.attempt != nil && d.attempt.gen == cs.gen {
		a := d.attempt
		s.mu.Unlock()
		select {
		case <-a.done:
			return a.err
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if wait := time.Until(d.retryAt); wait > 0 && d.lastErr != nil {
		err := d.lastErr
		s.mu.Unlock()
		return fmt.Errorf("%w (next attempt in %s)", err, wait.Round(time.Second))
	}
	a := &attachAttempt{gen: cs.gen, done: make(chan struct{}), signal: make(chan struct{})}
	d.attempt = a
	s.mu.Unlock()

	a.err = s.doAttach(cs, id, a)

	s.mu.Lock()
	switch {
	case a.err == nil:
		d.attachedGen = cs.gen
		d.failures = 0
		d.lastErr = nil
		s.endProbationLocked(d)
		s.c.attachesOK.Add(1)
	case errors.Is(a.err, ErrAttachRefused):
		// Refused devices wait before the next attempt, so that a device
		// the bridge will not take costs little, yet heals by itself.
		d.failures++
		d.lastErr = a.err
		d.retryAt = time.Now().Add(retryBackoff(d.failures))
		s.c.attachesFailed.Add(1)
		s.warn.Warnf("attach_refused", "Attaching device %q failed: %v", id, a.err)
	case errors.Is(a.err, errAckTimeout):
		// Neither PUBACK nor error: try again at once on the next call.
		s.c.attachesFailed.Add(1)
		s.warn.Warnf("attach_timeout", "Attaching device %q: %v", id, a.err)
	}
	if d.attempt == a {
		d.attempt = nil
		if a.err != nil {
			s.settleFailedAttachLocked(id, d)
		}
	}
	subscribe := a.err == nil && s.wantsSubscriptionLocked(id)
	s.mu.Unlock()
	close(a.done)
	if subscribe {
		// Config and commands of devices attached for telemetry reach
		// SubscribeAll handlers too; not awaited, so telemetry is not held.
		go func() {
			if err := s.subscribeDevice(cs, id); err != nil && !cs.isLost() {
				s.warn.Warnf("subscribe_failed", "Subscribing config and commands of %q failed: %v", id, err)
			}
		}()
	}
	return a.err
}

func (s *Session) doAttach(cs *connection, id string, a *attachAttempt) error {
	payload, err := s.attachPayload(id)
	if err != nil {
		return fmt.Errorf("%w: device %q: %w", ErrAttachRefused, id, err)
	}
	topic := omnicore.Topic(s.cfg.RegistryID, id, omnicore.KindAttach, "")
	ctx, cancel := context.WithCancel(s.ctx)
	defer cancel()
	go func() {
		select {
		case <-a.signal:
			cancel()
		case <-ctx.Done():
		}
	}()
	err = s.send(ctx, cs, topic, 1, payload, id)
	if r := a.refused.Load(); r != nil {
		return fmt.Errorf("%w: device %q: %s", ErrAttachRefused, id, *r)
	}
	if errors.Is(err, errAckTimeout) {
		return fmt.Errorf("attach of device %q: %w", id, errAckTimeout)
	}
	return err
}

// attachPayload is {} when the bridge checks the gateway binding, or carries
// a device JWT signed with the device's own key.
func (s *Session) attachPayload(id string) ([]byte, error) {
	if s.cfg.DeviceAuth != DeviceAuthToken {
		return []byte("{}"), nil
	}
	path := filepath.Join(s.cfg.DeviceKeyDir, id+".pem")
	signer, err := omnicore.LoadSigner(path, s.cfg.DeviceAlgorithm)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("no device key %q", path)
		}
		return nil, err
	}
	tok, err := signer.Token(s.cfg.SubscriptionID, time.Now(), time.Hour)
	if err != nil {
		return nil, err
	}
	return json.Marshal(map[string]string{"authorization": tok})
}

// Detach implements Conn.
func (s *Session) Detach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	if device == s.cfg.GatewayID {
		return nil
	}
	s.mu.Lock()
	d, ok := s.devices[device]
	cs := s.conn
	attached := ok && cs != nil && d.attachedGen == cs.gen
	if ok {
		d.wanted = false
		d.attachedGen = 0
		d.subGen = 0
		if !s.wantsSubscriptionLocked(device) {
			s.forgetLocked(device, d)
		}
	}
	s.mu.Unlock()
	if !attached {
		return nil
	}
	err := s.send(ctx, cs, omnicore.Topic(s.cfg.RegistryID, device, omnicore.KindDetach, ""), 1, []byte("{}"), device)
	if err == nil {
		s.c.detaches.Add(1)
	}
	return err
}

func (s *Session) markDetached(cs *connection, id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.devices[id]; ok && d.attachedGen == cs.gen {
		d.attachedGen = 0
		d.subGen = 0
	}
}

func (s *Session) touch(id string) {
	s.mu.Lock()
	if d, ok := s.devices[id]; ok {
		d.lastUsed = time.Now()
	}
	s.mu.Unlock()
}

func (s *Session) deviceLocked(id string) *device {
	d, ok := s.devices[id]
	if !ok {
		d = &device{id: id}
		if next, ok := s.stateNext[id]; ok {
			d.nextState = next
			delete(s.stateNext, id)
		}
		s.devices[id] = d
	}
	return d
}

// admitDeviceLocked is deviceLocked for a device about to be attached. A
// device the session does not know yet takes a slot on probation. When
// max_devices are known already it waits (until ctx ends) while some of
// them are on probation, whose slots free within a round trip; when none
// are, it is refused (counted, with a warning at most once per
// warnInterval). It unlocks s.mu while it waits.
func (s *Session) admitDeviceLocked(ctx context.Context, id string) (*device, error) {
	for {
		if d, ok := s.devices[id]; ok {
			return d, nil
		}
		if s.closed {
			return nil, ErrClosed
		}
		if s.cfg.MaxDevices <= 0 || len(s.devices) < s.cfg.MaxDevices {
			d := s.deviceLocked(id)
			if !s.wantsSubscriptionLocked(id) {
				d.probation = true
				s.probation++
			}
			return d, nil
		}
		if s.probation == 0 {
			s.c.devicesRefused.Add(1)
			s.warn.Warnf("max_devices", "Refusing device %q: the gateway already handles max_devices = %d devices (%d refused so far); idle devices are forgotten after detach_idle = %s",
				id, s.cfg.MaxDevices, s.c.devicesRefused.Load(), s.cfg.DetachIdle)
			return nil, fmt.Errorf("%w: device %q: %w (%d)", ErrAttachRefused, id, ErrTooManyDevices, s.cfg.MaxDevices)
		}
		freed := s.slotFreed
		s.mu.Unlock()
		select {
		case <-freed:
		case <-ctx.Done():
		case <-s.ctx.Done():
		}
		s.mu.Lock()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}

// endProbationLocked makes d a full member of the device table.
func (s *Session) endProbationLocked(d *device) {
	if d.probation {
		d.probation = false
		s.probation--
	}
}

// settleFailedAttachLocked decides where a device goes after its attach
// failed. A device someone listens to stays in the table (healLoop retries
// it). Any other device the bridge refused leaves it for the refused
// table, where it waits out its back-off without holding a max_devices
// slot; one on probation that failed otherwise (timeout, connection lost)
// leaves it too, to be admitted again on its next message.
func (s *Session) settleFailedAttachLocked(id string, d *device) {
	if s.wantsSubscriptionLocked(id) {
		s.endProbationLocked(d)
		return
	}
	refused := d.lastErr != nil && time.Now().Before(d.retryAt)
	if refused {
		s.rememberRefusalLocked(id, &refusal{failures: d.failures, retryAt: d.retryAt, err: d.lastErr})
	}
	if refused || d.probation {
		s.forgetLocked(id, d)
	}
}

// maxRefusals bounds the refused table. Past it, entries whose back-off
// has ended go first, then any: a device forgotten early is only tried
// again sooner.
const maxRefusals = 16384

func (s *Session) rememberRefusalLocked(id string, r *refusal) {
	if len(s.refused) >= maxRefusals {
		now := time.Now()
		for k, old := range s.refused {
			if now.After(old.retryAt) {
				delete(s.refused, k)
			}
		}
		for k := range s.refused {
			if len(s.refused) < maxRefusals*3/4 {
				break
			}
			delete(s.refused, k)
		}
	}
	s.refused[id] = r
}

// forgetLocked removes a device, keeping its state pacing for later, and
// wakes the callers waiting for a slot.
func (s *Session) forgetLocked(id string, d *device) {
	if time.Now().Before(d.nextState) {
		s.stateNext[id] = d.nextState
	}
	if s.devices[id] != d {
		return
	}
	s.endProbationLocked(d)
	delete(s.devices, id)
	close(s.slotFreed)
	s.slotFreed = make(chan struct{})
}

// keepAcked records an acknowledged data message under its packet ID.
func (cs *connection) keepAcked(id uint16, msg Message) {
	now := time.Now()
	cs.mu.Lock()
	defer cs.mu.Unlock()
	for len(cs.ackedOrder) > 0 {
		old := cs.ackedOrder[0]
		m, ok := cs.acked[old]
		if ok && now.Sub(m.at) <= ackedWindow && len(cs.ackedOrder) < ackedMax {
			break
		}
		if ok && now.Sub(m.at) > ackedWindow || len(cs.ackedOrder) >= ackedMax {
			delete(cs.acked, old)
		}
		cs.ackedOrder = cs.ackedOrder[1:]
	}
	cs.acked[id] = &ackedMsg{msg: msg, at: now}
	cs.ackedOrder = append(cs.ackedOrder, id)
}

// resend publishes again a message the bridge acknowledged and then named
// in an error (the device was not attached): Publish attaches it first.
func (s *Session) resend(msg Message, errType string) {
	s.c.resentAfterError.Add(1)
	ctx, cancel := context.WithTimeout(s.ctx, 3*s.cfg.Timeout)
	defer cancel()
	if err := s.Publish(ctx, msg); err != nil {
		s.CountDrop(dropErrorAfterAck, 1)
		s.warn.Errorf(dropErrorAfterAck, "The bridge acknowledged a message of device %q and then reported %s for it; sending it again failed: %v", msg.Device, errType, err)
		return
	}
	s.log.Debugf("Sent a message of device %q again: the bridge reported %s after acknowledging it", msg.Device, errType)
}

// healInterval is how often subscribed devices that lost their attachment
// (refused earlier, detached by the bridge) are tried again.
const healInterval = time.Second

// healLoop re-attaches and re-subscribes devices someone listens to but that
// are not attached on the current connection: a device refused at start (not
// bound yet) or detached by the bridge starts delivering its config and
// commands once it can, without waiting for a reconnect or a publish.
func (s *Session) healLoop() {
	t := time.NewTicker(healInterval)
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		s.mu.Lock()
		cs := s.conn
		var ids []string
		if cs != nil && !cs.draining.Load() {
			now := time.Now()
			for id, d := range s.devices {
				if id == s.cfg.GatewayID || !d.wanted || d.attempt != nil || now.Before(d.retryAt) {
					continue
				}
				if (d.attachedGen != cs.gen || d.subGen != cs.gen) && s.wantsSubscriptionLocked(id) {
					ids = append(ids, id)
				}
			}
		}
		s.mu.Unlock()
		if len(ids) == 0 {
			continue
		}
		select {
		case <-cs.ready:
		default:
			continue // rebuild is restoring everything anyway
		}
		for _, id := range ids {
			go func() {
				ctx, cancel := context.WithTimeout(s.ctx, 3*s.cfg.Timeout)
				defer cancel()
				if err := s.attachOn(ctx, cs, id, false); err == nil {
					_ = s.subscribeDevice(cs, id)
				}
			}()
		}
	}
}

// detachIdleLoop detaches devices that published nothing for DetachIdle and
// have no subscriptions, freeing their slot of the bridge's attach limit.
func (s *Session) detachIdleLoop() {
	t := time.NewTicker(min(max(s.cfg.DetachIdle/4, 50*time.Millisecond), time.Minute))
	defer t.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		cutoff := now.Add(-s.cfg.DetachIdle)
		var idle []string
		s.mu.Lock()
		for id, d := range s.devices {
			if id == s.cfg.GatewayID || !d.lastUsed.Before(cutoff) || s.wantsSubscriptionLocked(id) || d.attempt != nil {
				continue
			}
			if d.wanted {
				idle = append(idle, id)
			} else {
				s.forgetLocked(id, d) // known but never attached: just forget
			}
		}
		for id, next := range s.stateNext {
			if now.After(next) {
				delete(s.stateNext, id)
			}
		}
		s.mu.Unlock()
		for _, id := range idle {
			ctx, cancel := context.WithTimeout(s.ctx, s.cfg.Timeout)
			if err := s.Detach(ctx, id); err != nil {
				s.log.Debugf("Detaching idle device %q: %v", id, err)
			} else {
				s.log.Debugf("Detached device %q after %s without traffic", id, s.cfg.DetachIdle)
			}
			cancel()
		}
	}
}

// ---------------------------------------------------------------------------
// Subscriptions and inbound routing

// Subscribe implements Conn.
func (s *Session) Subscribe(ctx context.Context, device string, h Handler) (Subscription, error) {
	if err := omnicore.ValidateID(device); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	entry := &handlerEntry{device: device, h: h}
	sub := s.addHandler(entry)
	for {
		cs, err := s.ready(ctx)
		if err != nil {
			sub.Unsubscribe()
			return nil, err
		}
		if device != s.cfg.GatewayID {
			if err := s.attachOn(ctx, cs, device, true); err != nil {
				if errors.Is(err, ErrAttachRefused) || ctx.Err() != nil || errors.Is(err, ErrClosed) {
					// Keep the handler: the device is retried on reconnects
					// and on later attaches.
					return sub, err
				}
				continue
			}
		}
		s.mu.Lock()
		already := s.deviceLocked(device).subGen == cs.gen
		s.mu.Unlock()
		if err := s.subscribeDevice(cs, device); err != nil {
			if cs.isLost() {
				continue // restored by rebuild on the next connection
			}
			return sub, err
		}
		if already {
			// No new SUBSCRIBE, so the bridge sends no config: hand the
			// latest one to this subscriber, as the bridge would have.
			s.replayConfig(entry, device)
		}
		return sub, nil
	}
}

// SubscribeAll implements Conn.
func (s *Session) SubscribeAll(h Handler) Subscription {
	entry := &handlerEntry{all: true, h: h}
	sub := s.addHandler(entry)
	// Subscribe what is attached already; later attaches subscribe in
	// attachOn's callers via wantsSubscription.
	go func() {
		ctx, cancel := context.WithTimeout(s.ctx, s.cfg.Timeout*3)
		defer cancel()
		cs, err := s.ready(ctx)
		if err != nil {
			return
		}
		s.mu.Lock()
		ids := []string{s.cfg.GatewayID}
		for id, d := range s.devices {
			if d.attachedGen == cs.gen {
				ids = append(ids, id)
			}
		}
		var replay []string
		for _, id := range ids {
			if s.deviceLocked(id).subGen == cs.gen {
				replay = append(replay, id)
			}
		}
		s.mu.Unlock()
		for _, id := range replay {
			s.replayConfig(entry, id)
		}
		for _, id := range ids {
			if err := s.subscribeDevice(cs, id); err != nil {
				s.warn.Warnf("subscribe_failed", "Subscribing config and commands of %q failed: %v", id, err)
			}
		}
	}()
	return sub
}

// SubscribeErrors implements Conn.
func (s *Session) SubscribeErrors(h Handler) Subscription {
	return s.addHandler(&handlerEntry{errors: true, h: h})
}

type subscription struct {
	s  *Session
	id uint64
}

func (u subscription) Unsubscribe() {
	u.s.mu.Lock()
	defer u.s.mu.Unlock()
	delete(u.s.handlers, u.id)
}

func (s *Session) addHandler(e *handlerEntry) Subscription {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextSubID++
	s.handlers[s.nextSubID] = e
	return subscription{s: s, id: s.nextSubID}
}

func (s *Session) hasAllHandlersLocked() bool {
	for _, e := range s.handlers {
		if e.all {
			return true
		}
	}
	return false
}

func (s *Session) wantsSubscriptionLocked(id string) bool {
	for _, e := range s.handlers {
		if e.all || (!e.errors && e.device == id) {
			return true
		}
	}
	return false
}

func (s *Session) wantsSubscription(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.wantsSubscriptionLocked(id)
}

// subscribeDevice subscribes device's config and commands on cs once per
// connection. The bridge answers a config subscription with the latest config.
func (s *Session) subscribeDevice(cs *connection, id string) error {
	s.mu.Lock()
	d := s.deviceLocked(id)
	if d.subGen == cs.gen {
		s.mu.Unlock()
		return nil
	}
	d.subGen = cs.gen
	s.mu.Unlock()
	err := s.subscribe(cs, map[string]byte{
		omnicore.Topic(s.cfg.RegistryID, id, omnicore.KindConfig, ""):    1,
		omnicore.Topic(s.cfg.RegistryID, id, omnicore.KindCommands, "#"): 1,
	})
	if err != nil {
		s.mu.Lock()
		if d.subGen == cs.gen {
			d.subGen = 0
		}
		s.mu.Unlock()
	}
	return err
}

func (s *Session) subscribe(cs *connection, filters map[string]byte) error {
	tok := cs.client.SubscribeMultiple(filters, nil)
	select {
	case <-tok.Done():
	case <-cs.lost:
		return errConnLost
	case <-time.After(s.cfg.Timeout):
		return fmt.Errorf("no SUBACK within %s", s.cfg.Timeout)
	}
	if err := tok.Error(); err != nil {
		return err
	}
	if st, ok := tok.(*mqtt.SubscribeToken); ok {
		for topic, code := range st.Result() {
			if code == 0x80 {
				return fmt.Errorf("bridge refused subscription to %q", topic)
			}
		}
	}
	return nil
}

// onMessage runs on paho's router goroutine: it updates session state for
// errors at once (so attach outcomes are seen quickly) and queues the message
// for the handlers.
func (s *Session) onMessage(cs *connection, m mqtt.Message) {
	p, err := omnicore.ParseTopic(m.Topic())
	if err != nil || p.Registry != s.cfg.RegistryID {
		s.CountDrop(dropInboundUnroutable, 1)
		s.warn.Warnf(dropInboundUnroutable, "Dropping a message on unexpected topic %q", m.Topic())
		return
	}
	in := Inbound{
		Device:    p.Device,
		Kind:      p.Kind,
		Subfolder: p.Subfolder,
		Topic:     m.Topic(),
		Payload:   m.Payload(),
		Received:  time.Now(),
	}
	switch p.Kind {
	case omnicore.KindErrors:
		s.handleBridgeError(cs, m.Payload())
	case omnicore.KindCommands, omnicore.KindConfig:
	default:
		s.CountDrop(dropInboundUnroutable, 1)
		s.warn.Warnf(dropInboundUnroutable, "Dropping a message on unexpected topic %q", m.Topic())
		return
	}
	if p.Kind == omnicore.KindConfig {
		s.mu.Lock()
		if d, ok := s.devices[p.Device]; ok {
			d.config = append(d.config[:0], in.Payload...)
			d.hasConfig = true
		}
		s.mu.Unlock()
	}
	s.c.received.Add(1)
	s.enqueue(queued{in: in})
}

func (s *Session) enqueue(q queued) {
	select {
	case s.inbound <- q:
	case <-s.ctx.Done():
	}
}

// replayConfig queues device's latest config for one handler.
func (s *Session) replayConfig(e *handlerEntry, device string) {
	s.mu.Lock()
	d, ok := s.devices[device]
	if !ok || !d.hasConfig {
		s.mu.Unlock()
		return
	}
	in := Inbound{
		Device:   device,
		Kind:     omnicore.KindConfig,
		Topic:    omnicore.Topic(s.cfg.RegistryID, device, omnicore.KindConfig, ""),
		Payload:  append([]byte(nil), d.config...),
		Received: time.Now(),
	}
	s.mu.Unlock()
	s.enqueue(queued{in: in, to: e})
}

// handleBridgeError reacts to the errors topic: attachment errors fail the
// device's attach attempt, not-found and detachment errors make the device
// re-attach on its next use.
func (s *Session) handleBridgeError(cs *connection, payload []byte) {
	var e omnicore.ErrorMessage
	if err := json.Unmarshal(payload, &e); err != nil || e.ErrorType == "" {
		s.countError("UNPARSEABLE")
		why := "no error_type"
		if err != nil {
			why = redact.Error(err, payload)
		}
		// The size, never the bytes (no payload in any log).
		s.warn.Warnf("errors_unparseable", "Unparseable message of %d bytes on the errors topic: %s", len(payload), why)
		return
	}
	s.countError(e.ErrorType)
	switch e.ErrorType {
	case omnicore.ErrorAttachment:
		s.mu.Lock()
		if d, ok := s.devices[e.DeviceID]; ok {
			if a := d.attempt; a != nil && a.gen == cs.gen {
				desc := e.Description
				a.refused.Store(&desc)
				a.once.Do(func() { close(a.signal) })
			} else if d.attachedGen == cs.gen {
				// The error lost the race against the attach's PUBACK.
				d.attachedGen = 0
				d.failures++
				d.lastErr = fmt.Errorf("%w: device %q: %s", ErrAttachRefused, e.DeviceID, e.Description)
				d.retryAt = time.Now().Add(retryBackoff(d.failures))
				s.c.attachesFailed.Add(1)
			}
		}
		s.mu.Unlock()
	case omnicore.ErrorDeviceNotFound, omnicore.ErrorDetachedByError:
		s.warn.Warnf("bridge_error_"+e.ErrorType, "Bridge error %s for device %q: %s", e.ErrorType, e.DeviceID, e.Description)
		s.markDetached(cs, e.DeviceID)
		if e.MessageInfo != nil && e.MessageInfo.PacketID != 0 {
			cs.mu.Lock()
			var resend *ackedMsg
			if ch, ok := cs.pending[e.MessageInfo.PacketID]; ok {
				delete(cs.pending, e.MessageInfo.PacketID)
				close(ch)
			} else if m, ok := cs.acked[e.MessageInfo.PacketID]; ok && m.msg.Device == e.DeviceID && time.Since(m.at) <= ackedWindow {
				// The error came after the PUBACK: the message was
				// acknowledged but dropped. Send it again.
				delete(cs.acked, e.MessageInfo.PacketID)
				resend = m
			}
			cs.mu.Unlock()
			if resend != nil {
				go s.resend(resend.msg, e.ErrorType)
			}
		}
		// A subscribed device the bridge detached is re-attached by
		// healLoop within healInterval; others on their next publish.
	default:
		s.warn.Warnf("bridge_error_"+e.ErrorType, "Bridge error %s for device %q: %s", e.ErrorType, e.DeviceID, e.Description)
	}
}

// dispatch hands inbound messages to the handlers, in order, off paho's
// router goroutine.
func (s *Session) dispatch() {
	for {
		var q queued
		select {
		case q = <-s.inbound:
		case <-s.ctx.Done():
			return
		}
		in := q.in
		s.mu.Lock()
		var es []*handlerEntry
		for _, e := range s.handlers {
			switch {
			case q.to != nil:
				if e == q.to {
					es = append(es, e)
				}
			case in.Kind == omnicore.KindErrors:
				if e.errors {
					es = append(es, e)
				}
			case e.all || (!e.errors && e.device == in.Device):
				es = append(es, e)
			}
		}
		s.mu.Unlock()
		for _, e := range es {
			if in.Kind == omnicore.KindConfig && !e.admitConfig(in, q.to != nil) {
				continue
			}
			e.h(in)
		}
	}
}

// admitConfig decides whether a config goes to this handler: a replay only
// when the handler has had no config of the device yet, and the bridge's
// copy of a config just replayed not a second time.
func (e *handlerEntry) admitConfig(in Inbound, replay bool) bool {
	if e.hadConfig == nil {
		e.hadConfig = make(map[string]bool)
		e.replayed = make(map[string]string)
	}
	if replay {
		if e.hadConfig[in.Device] {
			return false
		}
		e.replayed[in.Device] = string(in.Payload)
	} else if p, ok := e.replayed[in.Device]; ok {
		delete(e.replayed, in.Device)
		if p == string(in.Payload) {
			return false
		}
	}
	e.hadConfig[in.Device] = true
	return true
}

// ---------------------------------------------------------------------------
// Counters

// CountDrop implements Conn.
func (s *Session) CountDrop(reason string, n uint64) {
	s.c.mu.Lock()
	s.c.droppedByReason[reason] += n
	s.c.mu.Unlock()
}

// ReportGauges implements Conn.
func (s *Session) ReportGauges(source string, gauges map[string]int64) {
	s.c.gauges.report(source, gauges, time.Now())
}

func (s *Session) countError(t string) {
	s.c.mu.Lock()
	s.c.errorsByType[t]++
	s.c.mu.Unlock()
}

// Stats implements Conn.
func (s *Session) Stats() Stats {
	s.mu.Lock()
	cs := s.conn
	attached := 0
	known := len(s.devices)
	connected := cs != nil && !cs.isLost()
	if cs != nil {
		for _, d := range s.devices {
			if d.attachedGen == cs.gen {
				attached++
			}
		}
	}
	s.mu.Unlock()
	st := Stats{
		Connected:          connected,
		Connects:           s.c.connects.Load(),
		ConnectFailures:    s.c.connectFailures.Load(),
		ConnectionLost:     s.c.connectionLost.Load(),
		TokenRenewals:      s.c.renewals.Load(),
		AttachesOK:         s.c.attachesOK.Load(),
		AttachesFailed:     s.c.attachesFailed.Load(),
		Detaches:           s.c.detaches.Load(),
		Attached:           attached,
		Published:          s.c.published.Load(),
		Acked:              s.c.acked.Load(),
		Retries:            s.c.retries.Load(),
		Received:           s.c.received.Load(),
		DevicesRefused:     s.c.devicesRefused.Load(),
		ResentAfterError:   s.c.resentAfterError.Load(),
		DuplicateSuspected: s.c.duplicateSuspected.Load(),
		Known:              known,
		ErrorsByType:       make(map[string]uint64),
		DroppedByReason:    make(map[string]uint64),
	}
	s.c.mu.Lock()
	for k, v := range s.c.errorsByType {
		st.ErrorsByType[k] = v
	}
	for k, v := range s.c.droppedByReason {
		st.DroppedByReason[k] = v
	}
	s.c.mu.Unlock()
	st.Gauges = s.c.gauges.sum(time.Now())
	return st
}

// AttachedDevices lists the devices attached on the current connection.
func (s *Session) AttachedDevices() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return nil
	}
	var ids []string
	for id, d := range s.devices {
		if d.attachedGen == s.conn.gen {
			ids = append(ids, id)
		}
	}
	return ids
}

// ---------------------------------------------------------------------------
// helpers

// jitter spreads d over [d/2, d) so that many gateways do not reconnect in step.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2)
}

// retryBackoff is the wait before re-attaching a refused device: 1 s doubling
// to a minute, so a misconfigured device costs little but heals by itself.
func retryBackoff(failures int) time.Duration {
	d := time.Second << min(failures-1, 9)
	return jitter(min(d, maxRefusedBackoff))
}

// maxRefusedBackoff caps the wait before a refused device is tried again, so
// that a device bound just now delivers again within a minute.
const maxRefusedBackoff = time.Minute

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// drain waits until nothing is in flight on cs or ctx ends. It polls: a
// drain happens once per token renewal, so a condition variable would only
// add coupling to the hot path.
func (cs *connection) drain(ctx context.Context) {
	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for cs.inflight.Load() > 0 {
		select {
		case <-t.C:
		case <-ctx.Done():
			return
		}
	}
}

// DiscardLogger is a telegraf.Logger that drops everything: the logger of a
// Config that has none (tests, benchmarks), here and in the sharing layer.
type DiscardLogger struct{}

func (DiscardLogger) Level() telegraf.LogLevel         { return telegraf.Error }
func (DiscardLogger) AddAttribute(string, interface{}) {}
func (DiscardLogger) Errorf(string, ...interface{})    {}
func (DiscardLogger) Error(...interface{})             {}
func (DiscardLogger) Warnf(string, ...interface{})     {}
func (DiscardLogger) Warn(...interface{})              {}
func (DiscardLogger) Infof(string, ...interface{})     {}
func (DiscardLogger) Info(...interface{})              {}
func (DiscardLogger) Debugf(string, ...interface{})    {}
func (DiscardLogger) Debug(...interface{})             {}
func (DiscardLogger) Tracef(string, ...interface{})    {}
func (DiscardLogger) Trace(...interface{})             {}
