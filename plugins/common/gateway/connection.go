package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/eclipse/paho.mqtt.golang/packets"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

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
	// with its packet ID: a GATEWAY_DEVICE_NOT_FOUND naming the packet ID
	// after the PUBACK sends it again.
	acked ackedRing

	// raw is the network connection under paho, closed to abort a connect.
	raw atomic.Pointer[net.Conn]

	// publishes feeds the connection's publishers (see startPublishers).
	publishes chan publishRequest

	// tick is closed and replaced every ackTickDivisor-th of the ack
	// timeout: see ackTick.
	tick atomic.Pointer[chan struct{}]
}

func (s *Session) run() {
	defer close(s.done)
	claim, ok := s.waitForHostClaim()
	if !ok {
		return // closed while waiting
	}
	defer claim.release()
	backoff := s.cfg.MinReconnect
	var gen uint64
	// renewing: this connect follows a token renewal, which is routine
	// (every token_lifetime) and logged at debug level.
	renewing := false
	// shortLived counts the connections in a row the bridge closed soon
	// after connecting (see noteLoss).
	shortLived := 0
	// down tells the story of failed connects as one line per change of
	// state (connectOutage).
	var down connectOutage
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
			down.failed(s, err, wait)
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
		s.conn = cs
		s.mu.Unlock()
		if renewing {
			s.log.Debugf("Connected to the bridge as %q with the renewed token", s.clientID)
		}
		re, err := s.rebuild(cs)
		if err != nil {
			s.log.Warnf("Restoring gateway state after connect failed: %v; reconnecting", err)
			s.lose(cs)
		}
		s.openForPublishing(cs)
		switch {
		case s.c.connects.Load() == 1:
			// The first connect: one line once the plugins' first
			// attaches are done (reportStart).
			go s.reportStart(cs, down)
		case down.failures > 0 || down.lost != nil:
			down.ended(s, re)
		case renewing && re.failed > 0:
			s.log.Infof("Re-attached %s after the token renewal", re)
		default:
			s.log.Debugf("Re-attached %s", re)
		}
		down = connectOutage{}

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
			// Told with what follows: a reconnect at once (W!) or an
			// outage (E!, see connectOutage).
			down = connectOutage{since: time.Now(), lost: s.lossReason()}
			s.log.Debugf("Connection to the bridge lost (%v); reconnecting", down.lost)
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
	opts.SetStore(noStore{})
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
	// paho joins "network Error" and the dial's error as "%w : %w": keep
	// the dial's error under a plain prefix.
	if multi, ok := err.(interface{ Unwrap() []error }); ok && errors.Is(err, packets.ErrorNetworkError) {
		for _, e := range multi.Unwrap() {
			if e != packets.ErrorNetworkError {
				err = fmt.Errorf("network error: %w", e)
				break
			}
		}
	}
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
func (s *Session) rebuild(cs *connection) (reattached, error) {
	errTopic := omnicore.Topic(s.cfg.RegistryID, s.cfg.GatewayID, omnicore.KindErrors, "")
	if err := s.subscribe(cs, map[string]byte{errTopic: 0}); err != nil {
		return reattached{}, fmt.Errorf("subscribing %q: %w", errTopic, err)
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
			return reattached{}, err
		}
	}
	re := reattached{tried: len(reattach)}
	if len(reattach) > 0 {
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
		re.failed = int(failed.Load())
	}
	return re, nil
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

// noStore is a paho Store that keeps nothing. paho's default MemoryStore
// keeps every QoS 1 message until its PUBACK (a map and a lock per message
// each way) so that a client reconnecting with the same session can send
// them again; a connection here is never resumed (clean session, no
// automatic reconnect, a new client per connection) and the session sends
// again what a lost connection left unacknowledged, so the copies were
// never read.
type noStore struct{}

func (noStore) Open()                             {}
func (noStore) Put(string, packets.ControlPacket) {}
func (noStore) Get(string) packets.ControlPacket  { return nil }
func (noStore) All() []string                     { return nil }
func (noStore) Del(string)                        {}
func (noStore) Close()                            {}
func (noStore) Reset()                            {}
