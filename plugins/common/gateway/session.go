package gateway

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/influxdata/telegraf"
	"golang.org/x/time/rate"

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
	// pacer keeps state messages at one per device per StateInterval.
	pacer *statePacer
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
	// attachCalls counts the Attach calls in progress, for the line of the
	// first connect (reportStart).
	attachCalls atomic.Int64
	// hostClaim names this gateway's claim on the host (hostclaim.go);
	// tests of two hosts give their sessions different names.
	hostClaim string

	c counters
}

// warnInterval is how often one kind of per-device warning is logged, as
// the README promises; the others go to debug level and are counted.
const warnInterval = 10 * time.Second

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
		connReady: make(chan struct{}),
		devices:   make(map[string]*device),
		handlers:  make(map[uint64]*handlerEntry),
		refused:   make(map[string]*refusal),
		slotFreed: make(chan struct{}),
		warn:      ratelog.New(log, warnInterval),
		dupLog:    ratelog.New(log, duplicateLogInterval),
	}
	s.hostClaim = claimName(s.clientID, cfg.Servers)
	s.pacer = newStatePacer(s)
	s.c.errorsByType = make(map[string]uint64)
	s.c.droppedByReason = make(map[string]uint64)
	if cfg.MaxMessageRate > 0 {
		burst := max(1, int(cfg.MaxMessageRate/10))
		s.limiter = rate.NewLimiter(rate.Limit(cfg.MaxMessageRate), burst)
	}
	return s, nil
}

// Start launches the connection owner and the device loops. It returns
// at once; use WaitReady to wait for the first connection.
func (s *Session) Start() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started {
		return
	}
	s.started = true
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
	connected := s.conn != nil && !s.conn.isLost()
	s.mu.Unlock()
	// States kept for their turn go first when connected: each is due
	// within a StateInterval.
	flushCtx, cancel := context.WithTimeout(ctx, omnicore.StateInterval+s.cfg.Timeout)
	if !connected {
		cancel()
	}
	kept := s.pacer.flush(flushCtx)
	cancel()
	if kept > 0 {
		s.CountDrop(dropStateUnsent, uint64(kept))
		s.log.Warnf("Closing with the states of %d devices kept for their turn and not sent", kept)
	}
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

// jitter spreads d over [d/2, d) so that many gateways do not reconnect in step.
func jitter(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d/2)
}

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
