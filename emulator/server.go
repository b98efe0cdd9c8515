// Package emulator is a local OmniCore MQTT bridge: a real MQTT 3.1.1 server
// (mochi-mqtt with hooks) that enforces the bridge's rules against an
// in-memory device registry, for tests, demos and benchmarks.
//
// Tests start it like httptest:
//
//	srv := emulator.NewServer()
//	defer srv.Close()
//
// and drive it with the registry calls (AddRegistry, AddDevice, Bind; the
// provisioning calls of KORE's REST API: CreateDevice, UpdateDevice,
// DeleteDevice, SetBindings, BlockDevice), the cloud-side calls (SetConfig,
// UpdateConfig, SendCommand, Broadcast), the inspection calls (Received,
// Connections, ErrorsSent, Stats, WaitFor) and the fault switches (KickAll,
// Stop/Restart, WithholdPubacks, SetPubackDelay, RefuseConnections, SetRules).
// HTTPHandler serves KORE's device-manager REST API, the admin API and the
// web console on the same registry. See README.md for the rules it enforces
// and the choices made where the bridge's behaviour is unknown.
package emulator

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Default names and timeouts.
const (
	DefaultSubscription = "test-sub"

	// maxPacketSize bounds what mochi reads into memory for one packet; it is
	// well above the largest legal payload (256 KB events), so a bigger packet
	// is hostile and closes the connection before it is buffered.
	maxPacketSize = 1 << 20

	defaultConnectTimeout = 10 * time.Second
	defaultWriteTimeout   = 10 * time.Second
	stopTimeout           = 5 * time.Second
	maxHistory            = 10000
	maxErrorsKept         = 10000
)

// Option configures NewServer / Start.
type Option func(*config)

type config struct {
	subscription   string
	tcpAddr        string
	tlsAddr        string
	rules          Rules
	logger         *slog.Logger
	onReceive      func(Message)
	maxReceived    int
	maxRecvBytes   int64
	caCertPEM      []byte
	caKeyPEM       []byte
	certHosts      []string
	connectTimeout time.Duration
	writeTimeout   time.Duration
	stateDir       string
}

// WithSubscription sets the subscription ID: the first part of every client
// ID and the audience of every JWT. Default "test-sub".
func WithSubscription(id string) Option { return func(c *config) { c.subscription = id } }

// WithTCPAddr sets the plain MQTT listener address (default "127.0.0.1:0";
// "" disables it).
func WithTCPAddr(addr string) Option { return func(c *config) { c.tcpAddr = addr } }

// WithTLSAddr sets the TLS MQTT listener address (default "127.0.0.1:0";
// "" disables it).
func WithTLSAddr(addr string) Option { return func(c *config) { c.tlsAddr = addr } }

// WithRules changes the rules before the server starts (see also SetRules).
func WithRules(fn func(*Rules)) Option { return func(c *config) { fn(&c.rules) } }

// WithLogger sets the logger for connection events and errors (default: none).
// Tokens and keys are never logged.
func WithLogger(l *slog.Logger) Option { return func(c *config) { c.logger = l } }

// WithOnReceive calls fn for every accepted events/state message, on the
// connection's goroutine, after it is recorded and before its PUBACK.
func WithOnReceive(fn func(Message)) Option { return func(c *config) { c.onReceive = fn } }

// WithMaxReceived bounds the accepted messages kept in memory to the latest n
// at most (default 0: keep all; when n is reached the older half is dropped
// at once). Indexes keep counting, so Received and the telemetry API stay
// consistent. Use it for long benchmarks and the command.
func WithMaxReceived(n int) Option { return func(c *config) { c.maxReceived = n } }

// WithMaxReceivedBytes bounds the payload bytes of the accepted messages kept
// in memory (default 0: no bound); it works like WithMaxReceived and
// together with it: whichever budget is reached first drops the older half.
func WithMaxReceivedBytes(n int64) Option { return func(c *config) { c.maxRecvBytes = n } }

// WithCA uses the given CA (PEM certificate and private key, e.g. from
// GenerateCA) instead of a fresh in-memory one.
func WithCA(certPEM, keyPEM []byte) Option {
	return func(c *config) { c.caCertPEM, c.caKeyPEM = certPEM, keyPEM }
}

// WithCertHosts adds DNS names or IP addresses to the server certificate,
// which always covers 127.0.0.1, ::1 and localhost.
func WithCertHosts(hosts ...string) Option {
	return func(c *config) { c.certHosts = append(c.certHosts, hosts...) }
}

// WithTimeouts sets how long a client may take from TCP connect to CONNECT
// (TLS handshake included) and how long one write to a client may block.
// Defaults 10 s and 10 s.
func WithTimeouts(connect, write time.Duration) Option {
	return func(c *config) { c.connectTimeout, c.writeTimeout = connect, write }
}

// Server is a running emulator.
type Server struct {
	// URL is the plain listener, "tcp://127.0.0.1:PORT" ("" when disabled).
	URL string
	// TLSURL is the TLS listener, "tls://127.0.0.1:PORT" ("" when disabled).
	TLSURL string

	subscription string
	log          *slog.Logger
	onReceive    func(Message)
	maxReceived  int
	// maxReceivedBytes bounds the payload bytes in received (0: none).
	maxReceivedBytes int64
	ca               *certAuthority
	broker           *mqtt.Server
	listeners        []*listener

	rulesMu     sync.Mutex // serialises SetRules
	rules       atomic.Pointer[Rules]
	pubackDelay atomic.Int64 // nanoseconds
	pubacks     atomic.Int64 // PUBACKs written for events/state/attach/detach

	// live maps a mochi client to its connection for the per-packet hooks
	// without taking mu; conns (under mu) is the same set for iteration.
	live sync.Map // *mqtt.Client -> *conn

	// stateDir holds the saved provisioning ("": not saved); see persist.go.
	stateDir string
	saveMu   sync.Mutex // serialises writes of the state file
	savedGen uint64     // generation on disk; guarded by saveMu

	mu            sync.Mutex
	registries    map[string]*registry
	nextNumID     int64                  // last numId given to a device
	saveGen       uint64                 // generation of the provisioning, bumped by each save
	pending       map[*mqtt.Client]*conn // admitted at CONNECT, not live yet
	conns         map[*mqtt.Client]*conn // live
	byNet         map[net.Conn]*conn     // pending and live, by the socket mochi was given
	byClientID    map[string]*conn
	history       []*ConnectionRecord
	nextConnID    int
	received      []Message
	recvTotal     int   // messages ever accepted; received holds the last len(received)
	receivedBytes int64 // payload bytes in received
	errorsSent    []SentError
	stats         Stats
	withhold      int
	refuseCount   int
	refuseUntil   time.Time
	changed       chan struct{} // closed and dropped on every state change
	closed        bool
}

// NewServer starts an emulator on loopback and panics if it cannot, as
// httptest.NewServer does. Use Start to get the error instead.
func NewServer(opts ...Option) *Server {
	s, err := Start(opts...)
	if err != nil {
		panic("emulator: " + err.Error())
	}
	return s
}

// Start starts an emulator: the listeners are bound and serving when it returns.
func Start(opts ...Option) (*Server, error) {
	cfg := config{
		subscription:   DefaultSubscription,
		tcpAddr:        "127.0.0.1:0",
		tlsAddr:        "127.0.0.1:0",
		rules:          DefaultRules(),
		connectTimeout: defaultConnectTimeout,
		writeTimeout:   defaultWriteTimeout,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if cfg.logger == nil {
		cfg.logger = slog.New(slog.DiscardHandler)
	}
	if cfg.connectTimeout <= 0 {
		cfg.connectTimeout = defaultConnectTimeout
	}
	if cfg.writeTimeout <= 0 {
		cfg.writeTimeout = defaultWriteTimeout
	}

	s := &Server{
		subscription:     cfg.subscription,
		log:              cfg.logger,
		onReceive:        cfg.onReceive,
		maxReceived:      cfg.maxReceived,
		maxReceivedBytes: cfg.maxRecvBytes,
		registries:       map[string]*registry{},
		pending:          map[*mqtt.Client]*conn{},
		conns:            map[*mqtt.Client]*conn{},
		byNet:            map[net.Conn]*conn{},
		byClientID:       map[string]*conn{},
	}
	rules := cfg.rules
	s.rules.Store(&rules)
	if cfg.stateDir != "" {
		s.stateDir = cfg.stateDir
		if err := s.load(); err != nil {
			return nil, err
		}
	}

	var err error
	if cfg.caCertPEM != nil {
		s.ca, err = parseCA(cfg.caCertPEM, cfg.caKeyPEM)
	} else {
		var certPEM, keyPEM []byte
		if certPEM, keyPEM, err = GenerateCA(); err == nil {
			s.ca, err = parseCA(certPEM, keyPEM)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("CA: %w", err)
	}

	caps := mqtt.NewDefaultServerCapabilities()
	caps.MaximumPacketSize = maxPacketSize
	caps.MinimumProtocolVersion = 4
	caps.RetainAvailable = 0             // the bridge keeps no retained messages
	caps.SharedSubAvailable = 0          // nor shared subscriptions
	caps.MaximumClientWritesPending = 16 // mochi's queue is unused: the emulator writes directly
	s.broker = mqtt.New(&mqtt.Options{
		Capabilities: caps,
		// mochi logs packets (CONNECT passwords included) at debug and warn
		// level, so it only gets to say errors, and without packet fields.
		Logger:                 slog.New(redactingHandler{next: cfg.logger.Handler()}),
		SysTopicResendInterval: math.MaxInt32, // nobody may subscribe to $SYS; skip the ReadMemStats every second
	})
	if err := s.broker.AddHook(&hook{s: s}, nil); err != nil {
		return nil, err
	}

	if cfg.tcpAddr != "" {
		l, err := newListener("tcp", cfg.tcpAddr, nil, cfg.connectTimeout, cfg.writeTimeout, cfg.logger, s.connEnded, s.notify)
		if err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("MQTT listener: %w", err)
		}
		s.listeners = append(s.listeners, l)
		s.URL = "tcp://" + l.Address()
	}
	if cfg.tlsAddr != "" {
		hosts := append([]string{"127.0.0.1", "::1", "localhost"}, cfg.certHosts...)
		if h, _, err := net.SplitHostPort(cfg.tlsAddr); err == nil && h != "" {
			if ip := net.ParseIP(h); ip == nil || !ip.IsUnspecified() {
				hosts = append(hosts, h)
			}
		}
		cert, err := s.ca.serverCert(hosts)
		if err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("server certificate: %w", err)
		}
		tlsConfig := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
		l, err := newListener("tls", cfg.tlsAddr, tlsConfig, cfg.connectTimeout, cfg.writeTimeout, cfg.logger, s.connEnded, s.notify)
		if err != nil {
			s.closeListeners()
			return nil, fmt.Errorf("MQTTS listener: %w", err)
		}
		s.listeners = append(s.listeners, l)
		s.TLSURL = "tls://" + l.Address()
	}
	for _, l := range s.listeners {
		if err := s.broker.AddListener(l); err != nil {
			s.closeListeners()
			return nil, err
		}
	}
	if err := s.broker.Serve(); err != nil {
		s.closeListeners()
		return nil, err
	}
	s.log.Info("emulator started", "mqtt", s.URL, "mqtts", s.TLSURL, "subscription", s.subscription)
	return s, nil
}

func (s *Server) closeListeners() {
	for _, l := range s.listeners {
		l.Close(func(string) {})
	}
}

// Subscription is the subscription ID (JWT audience, client ID prefix).
func (s *Server) Subscription() string { return s.subscription }

// ClientID is the client ID of a device of this subscription.
func (s *Server) ClientID(registryID, deviceID string) string {
	return omnicore.ClientID(s.subscription, registryID, deviceID)
}

// Close drops every connection and stops the server. It is safe to call twice.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()
	s.dropConnections(ReasonServerStop)
	_ = s.broker.Close() // closes our listeners and waits for every client goroutine
	s.log.Info("emulator stopped")
}

// Stop closes the listeners (new connections are refused at TCP level) and
// drops every connection, as a bridge restart does. It returns once every
// connection is gone. Registry, configs and received messages are kept.
func (s *Server) Stop() {
	for _, l := range s.listeners {
		l.pause()
	}
	s.dropConnections(ReasonServerStop)
}

// Restart binds the listeners again on the same ports after Stop.
// Attachments do not survive: clients must reconnect and re-attach.
func (s *Server) Restart() error {
	for _, l := range s.listeners {
		if err := l.resume(); err != nil {
			return fmt.Errorf("listener %s on %s: %w", l.id, l.addr, err)
		}
	}
	s.notify()
	s.log.Info("emulator restarted", "mqtt", s.URL, "mqtts", s.TLSURL)
	return nil
}

// KickAll closes every client connection now (reason ReasonKicked), as a
// bridge that resets connections does. The listeners stay open.
func (s *Server) KickAll() {
	s.dropConnections(ReasonKicked)
}

// Kick closes the live connection of one client ID; false if there is none.
func (s *Server) Kick(clientID string) bool {
	s.mu.Lock()
	c := s.byClientID[clientID]
	s.mu.Unlock()
	if c == nil {
		return false
	}
	c.close(ReasonKicked, "")
	s.waitGone(func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		_, ok := s.conns[c.cl]
		return !ok
	})
	return true
}

// dropConnections closes established connections with reason, then every
// other accepted socket, and waits (bounded) until the hooks have seen them go.
func (s *Server) dropConnections(reason string) {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns)+len(s.pending))
	for _, c := range s.conns {
		conns = append(conns, c)
	}
	for _, c := range s.pending {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close(reason, "")
	}
	for _, l := range s.listeners {
		l.dropAll()
	}
	s.waitGone(func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.conns) == 0
	})
}

func (s *Server) waitGone(done func() bool) {
	ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	if err := s.WaitFor(ctx, done); err != nil {
		s.log.Warn("connections still open after drop", "timeout", stopTimeout)
	}
}

// SetRules changes the rules. New values apply to the next packet; timers
// already running (token expiry, idle) keep the values they started with.
func (s *Server) SetRules(fn func(*Rules)) {
	s.rulesMu.Lock()
	defer s.rulesMu.Unlock()
	r := *s.rules.Load()
	fn(&r)
	s.rules.Store(&r)
}

// Rules returns a copy of the current rules.
func (s *Server) Rules() Rules { return *s.rules.Load() }

// SetPubackDelay delays every PUBACK the emulator sends (events, state,
// attach, detach) by d, keeping their order; the connection keeps reading, so
// a client with a window of in-flight messages sees latency, not a stall.
func (s *Server) SetPubackDelay(d time.Duration) { s.pubackDelay.Store(int64(d)) }

// WithholdPubacks drops the next n QoS 1 events/state messages that would
// otherwise be accepted, without a PUBACK, as the bridge does when its buffer
// is full. They are NOT recorded in Received (the client must resend them);
// Stats.Withheld counts them. n <= 0 cancels.
func (s *Server) WithholdPubacks(n int) {
	s.mu.Lock()
	s.withhold = max(n, 0)
	s.mu.Unlock()
}

// RefuseConnections answers the next n CONNECTs with CONNACK 3 (server
// unavailable).
func (s *Server) RefuseConnections(n int) {
	s.mu.Lock()
	s.refuseCount = max(n, 0)
	s.mu.Unlock()
}

// RefuseFor answers every CONNECT during the next d with CONNACK 3.
func (s *Server) RefuseFor(d time.Duration) {
	s.mu.Lock()
	s.refuseUntil = time.Now().Add(d)
	s.mu.Unlock()
}

func (s *Server) notify() {
	s.mu.Lock()
	s.notifyLocked()
	s.mu.Unlock()
}

// notifyLocked wakes every WaitFor. Called with mu held after any change.
func (s *Server) notifyLocked() {
	if s.changed != nil {
		close(s.changed)
		s.changed = nil
	}
}

// redactingHandler passes mochi's error-level records on without the packet
// attributes, which may hold a CONNECT password (a JWT).
type redactingHandler struct{ next slog.Handler }

func (h redactingHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelError && h.next.Enabled(ctx, l)
}

func (h redactingHandler) Handle(ctx context.Context, r slog.Record) error {
	out := slog.NewRecord(r.Time, r.Level, "mochi: "+r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		switch a.Key {
		case "pk", "packet", "will":
		default:
			out.AddAttrs(a)
		}
		return true
	})
	return h.next.Handle(ctx, out)
}

func (h redactingHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return redactingHandler{next: h.next.WithAttrs(attrs)}
}

func (h redactingHandler) WithGroup(name string) slog.Handler {
	return redactingHandler{next: h.next.WithGroup(name)}
}
