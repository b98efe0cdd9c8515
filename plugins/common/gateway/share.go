package gateway

// Cross-process sharing of one gateway connection (SPEC decision 3).
//
// Under execd every plugin is its own process, and the bridge allows one
// connection per client ID: an output and an input configured for the same
// gateway would kick each other off forever. So processes of one user that
// run the same gateway identity (Config.Key) meet in a private rendezvous
// directory:
//
//   - The first process to take an exclusive flock on {dir}/{name}.lock owns
//     the MQTT connection: it runs the real *Session and serves it on the Unix
//     socket {dir}/{name}.sock (mode 0600, in a directory of mode 0700 owned
//     by the user; peers of another uid are refused by their kernel
//     credentials). The lock belongs to the open file, so it dies with the
//     process however the process dies: there is never a stale owner.
//   - Every other process gets a shareConn: a Conn that forwards each call
//     over the socket (requests pipelined, a publish acknowledged only after
//     the owner's Session.Publish returned nil, that is after the bridge's
//     PUBACK) and receives the inbound messages it subscribed to.
//   - When the owner goes away (socket EOF), each shareConn tries the lock;
//     the winner becomes the owner (a new Session, a new socket; a stale
//     socket file is replaced), the others reconnect to it. Every shareConn
//     replays its subscriptions and wanted attachments on the new owner and
//     retries the calls that were in flight: duplicates are possible, loss is
//     not.
//
// name is a hash of Config.Key(). The directory is $TELEGRAF_OMNICORE_RUNTIME_DIR,
// else $XDG_RUNTIME_DIR/telegraf-omnicore, else {os.TempDir()}/telegraf-omnicore-{uid}.
// TELEGRAF_OMNICORE_SHARING=off turns sharing off. See SHARING.md.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Environment variables that control sharing.
const (
	// EnvRuntimeDir overrides the rendezvous directory.
	EnvRuntimeDir = "TELEGRAF_OMNICORE_RUNTIME_DIR"
	// EnvSharing set to "off" makes every process connect on its own.
	EnvSharing = "TELEGRAF_OMNICORE_SHARING"
)

const (
	// maxSocketPath is the longest Unix socket path every supported
	// platform takes (sun_path is 104 bytes on BSDs, 108 on Linux).
	maxSocketPath = 103
	// shareRetryMin and shareRetryMax bound the pause between attempts to
	// reach or become the owner.
	shareRetryMin = 20 * time.Millisecond
	shareRetryMax = time.Second
	// shareDialTimeout bounds connecting to the owner and the handshake.
	shareDialTimeout = 5 * time.Second
	// shareWaitWarn is how long a process waits for an owner that holds
	// the lock but does not serve before it says so at warning level.
	shareWaitWarn = 10 * time.Second
	// shareKeepInterval is how often the owner refreshes its rendezvous
	// files (see owner.keep).
	shareKeepInterval = time.Hour
)

var (
	// errLocked means another open file holds the owner lock.
	errLocked = errors.New("held by another process")
	// errOwnerGone means the owner's socket connection ended or the owner is
	// shutting down: the call is retried on the next owner.
	errOwnerGone = errors.New("the process owning the gateway connection went away")
)

// peerCred is what the kernel says about the process at the other end of a
// Unix socket.
type peerCred struct {
	UID int
	PID int // -1 when the platform does not report it
}

// checkPeer accepts only peers running as uid (the effective uid of this
// process): the socket speaks for the gateway's identity, so nobody else may
// use it, even if they could reach it.
func checkPeer(c peerCred, uid int) error {
	if c.UID != uid {
		return fmt.Errorf("peer process (pid %d) runs as uid %d, not as uid %d", c.PID, c.UID, uid)
	}
	return nil
}

// runtimeDir is the rendezvous directory, "" when sharing is off.
func runtimeDir() string {
	if strings.EqualFold(os.Getenv(EnvSharing), "off") {
		return ""
	}
	if d := os.Getenv(EnvRuntimeDir); d != "" {
		return d
	}
	if x := os.Getenv("XDG_RUNTIME_DIR"); x != "" && filepath.IsAbs(x) {
		return filepath.Join(x, "telegraf-omnicore")
	}
	return filepath.Join(os.TempDir(), fmt.Sprintf("telegraf-omnicore-%d", os.Geteuid()))
}

// rendezvous names the files of one gateway identity.
type rendezvous struct {
	dir  string
	name string // hash of Config.Key()
	lock string
	sock string
}

func newRendezvous(dir, key string) (*rendezvous, error) {
	if !sharingSupported {
		return nil, errors.New("not supported on this platform")
	}
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := prepareDir(dir); err != nil {
		return nil, err
	}
	sum := sha256.Sum256([]byte(key))
	name := "gw-" + hex.EncodeToString(sum[:12])
	rz := &rendezvous{
		dir:  dir,
		name: name,
		lock: filepath.Join(dir, name+".lock"),
		sock: filepath.Join(dir, name+".sock"),
	}
	if len(rz.sock) > maxSocketPath {
		return nil, fmt.Errorf("socket path %q is longer than %d bytes; set %s to a shorter directory", rz.sock, maxSocketPath, EnvRuntimeDir)
	}
	return rz, nil
}

// prepareDir creates dir with mode 0700 and makes sure that it is a real
// directory owned by this user with no access for anyone else.
func prepareDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%q is not a directory (a symbolic link is not accepted)", dir)
	}
	if err := checkOwned(dir, fi); err != nil {
		return err
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("making %q private (mode 0700): %w", dir, err)
		}
	}
	return nil
}

func checkOwned(path string, fi fs.FileInfo) error {
	uid, ok := fileOwner(fi)
	if !ok {
		return fmt.Errorf("cannot tell who owns %q", path)
	}
	if uid != os.Geteuid() {
		return fmt.Errorf("%q is owned by uid %d, not by this user (uid %d)", path, uid, os.Geteuid())
	}
	return nil
}

// lockOwner takes the owner lock of rz and records this process in the lock
// file for people troubleshooting. errLocked means another process owns the
// gateway. An owner removes its lock file before it unlocks it (so nothing
// is left behind); a process that locked a file just removed that way finds
// the path no longer names it, and tries again with the path's new file.
func lockOwner(rz *rendezvous, clientID string) (*os.File, error) {
	for attempt := 0; ; attempt++ {
		f, err := tryLock(rz.lock)
		if err != nil {
			return nil, err
		}
		held, err := f.Stat()
		if err == nil {
			err = checkOwned(rz.lock, held)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
		if named, err := os.Lstat(rz.lock); err != nil || !os.SameFile(held, named) {
			f.Close()
			if attempt < 10 {
				continue
			}
			return nil, errLocked
		}
		if err := f.Truncate(0); err == nil {
			_, _ = fmt.Fprintf(f, "pid %d\nclient_id %s\nsocket %s\n", os.Getpid(), clientID, rz.sock)
		}
		return f, nil
	}
}

// optionsFingerprint summarises the options that shape a session, so that a
// process can tell when the owner runs the gateway with other settings.
func optionsFingerprint(cfg *Config) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "%v|%v|%v|%v|%v|%v|%v|%v|%q|%q|%q|%v",
		cfg.TokenLifetime, cfg.KeepAlive, cfg.ConnectionTimeout, cfg.Timeout, cfg.MinReconnect, cfg.MaxReconnect,
		cfg.MaxInflight, cfg.MaxMessageRate, cfg.DeviceAuth, cfg.DeviceKeyDir, cfg.DeviceAlgorithm, cfg.DetachIdle))
	return hex.EncodeToString(sum[:8])
}

// owner is what the process owning a gateway's connection runs: the session,
// the socket server, and the lock that makes it the owner.
type owner struct {
	session *Session
	server  *shareServer
	lock    *os.File
	rz      *rendezvous
	log     telegraf.Logger
	stop    chan struct{}
	kept    chan struct{} // closed when keep returns
}

// startOwner starts a session and serves it; on error the lock is released.
// keepEvery is the period of keep (shareKeepInterval outside tests).
func startOwner(cfg *Config, rz *rendezvous, lock *os.File, keepEvery time.Duration) (*owner, error) {
	s, err := New(cfg)
	if err != nil {
		lock.Close()
		return nil, err
	}
	srv, err := newShareServer(s, rz, cfg.Log)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("serving the gateway connection on %q: %w", rz.sock, err)
	}
	srv.fingerprint = optionsFingerprint(cfg)
	srv.start()
	s.Start()
	log := cfg.Log
	if log == nil {
		log = discardLogger{}
	}
	o := &owner{session: s, server: srv, lock: lock, rz: rz, log: log, stop: make(chan struct{}), kept: make(chan struct{})}
	go o.keep(keepEvery)
	return o, nil
}

// keep looks after the rendezvous files while this process owns them.
// Cleaners of temporary directories (systemd-tmpfiles ages /tmp entries
// after 10 days) go by timestamps, and an idle socket's never change: the
// owner refreshes them, and serves a new socket file if the old one was
// removed anyway.
func (o *owner) keep(every time.Duration) {
	defer close(o.kept)
	t := time.NewTicker(every)
	defer t.Stop()
	lockLost := false
	for {
		select {
		case <-o.stop:
			return
		case <-t.C:
		}
		now := time.Now()
		for _, p := range []string{o.rz.dir, o.rz.lock, o.rz.sock} {
			_ = os.Chtimes(p, now, now)
		}
		if _, err := os.Lstat(o.rz.sock); errors.Is(err, fs.ErrNotExist) {
			if err := o.server.relisten(); err != nil {
				o.log.Errorf("The socket %q of gateway %q was removed and cannot be served again: %v", o.rz.sock, o.session.GatewayID(), err)
			} else {
				o.log.Warnf("The socket %q of gateway %q was removed by something else; serving it again", o.rz.sock, o.session.GatewayID())
			}
		}
		if !lockLost && !o.holdsLockPath() {
			lockLost = true
			o.log.Errorf("The lock file %q of gateway %q was removed or replaced by something else: another process may now connect as the same gateway and the two would kick each other off; restart the plugins of this gateway", o.rz.lock, o.session.GatewayID())
		}
	}
}

// holdsLockPath reports whether the lock path still names the locked file.
func (o *owner) holdsLockPath() bool {
	held, err := o.lock.Stat()
	if err != nil {
		return false
	}
	named, err := os.Lstat(o.rz.lock)
	return err == nil && os.SameFile(held, named)
}

// close hands the gateway over: no new processes are accepted, in-flight
// messages (those of other processes too) get until ctx ends, the MQTT
// connection is closed, then the other processes are disconnected and the
// lock is released, so the next owner connects only after this one is gone.
func (o *owner) close(ctx context.Context) error {
	close(o.stop)
	<-o.kept
	o.server.stopAccepting()
	err := o.session.Close(ctx)
	o.server.closeClients()
	if o.holdsLockPath() {
		os.Remove(o.rz.lock)
	}
	o.lock.Close()
	return err
}

// acquireAcross returns the process's Conn for cfg's gateway: the real
// session when this process owns the connection, or a shareConn when another
// process does. dir is the rendezvous directory, "" to connect privately.
// It does no network I/O.
func acquireAcross(cfg *Config, dir string) (Conn, func(context.Context) error, error) {
	log := cfg.Log
	if log == nil {
		log = discardLogger{}
	}
	private := func() (Conn, func(context.Context) error, error) {
		s, err := New(cfg)
		if err != nil {
			return nil, nil, err
		}
		s.Start()
		return s, s.Close, nil
	}
	if dir == "" {
		return private()
	}
	rz, err := newRendezvous(dir, cfg.Key())
	if err != nil {
		log.Warnf("Cannot share the connection of gateway %q with other processes (%v): this process connects on its own, and another process connecting as the same gateway would kick it off", cfg.GatewayID, err)
		return private()
	}
	clientID := omnicore.ClientID(cfg.SubscriptionID, cfg.RegistryID, cfg.GatewayID)
	lock, err := lockOwner(rz, clientID)
	switch {
	case err == nil:
		o, err := startOwner(cfg, rz, lock, shareKeepInterval)
		if err != nil {
			return nil, nil, err
		}
		log.Debugf("This process owns the connection of gateway %q; other processes share it through %q", cfg.GatewayID, rz.sock)
		return o.session, o.close, nil
	case errors.Is(err, errLocked):
		sc := newShareConn(cfg, rz, log)
		log.Infof("Gateway %q is connected by another process: sharing its connection through %q", cfg.GatewayID, rz.sock)
		go sc.run()
		return sc, sc.Close, nil
	default:
		log.Warnf("Cannot share the connection of gateway %q with other processes (%v): this process connects on its own, and another process connecting as the same gateway would kick it off", cfg.GatewayID, err)
		return private()
	}
}

// ---------------------------------------------------------------------------
// shareConn

// shareConn is the Conn of a process that does not own the gateway's
// connection. Its backend is a remoteConn to the owner, or the process's own
// Session after it took over. It remembers what the plugins asked for
// (subscriptions, explicit attaches) and replays it on every new backend;
// calls that lose their backend are retried on the next one.
type shareConn struct {
	cfg *Config
	log telegraf.Logger
	rz  *rendezvous

	ctx      context.Context
	cancel   context.CancelFunc
	done     chan struct{} // closed when run returns
	inflight sync.WaitGroup

	mu        sync.Mutex
	be        Conn          // nil while no owner is reachable
	gen       uint64        // incremented on every install
	beReady   chan struct{} // closed while be != nil
	subs      map[uint64]*localSub
	nextSub   uint64
	wanted    map[string]struct{} // explicit attaches, replayed
	drops     map[string]uint64   // counted while no owner was reachable
	lastStats Stats
	closed    bool
	closeBy   time.Time // deadline of the context Close was called with
	owning    bool      // took over: be is the process's own Session
}

type subKind int

const (
	subDevice subKind = iota
	subAll
	subErrors
)

// localSub is one subscription a plugin of this process holds.
type localSub struct {
	sc     *shareConn
	id     uint64
	kind   subKind
	device string
	h      Handler
	bsub   Subscription // its registration on the backend of generation gen
	gen    uint64
	busy   bool // a goroutine is registering it; install leaves it alone
	gone   bool
}

func newShareConn(cfg *Config, rz *rendezvous, log telegraf.Logger) *shareConn {
	ctx, cancel := context.WithCancel(context.Background())
	return &shareConn{
		cfg:     cfg,
		log:     log,
		rz:      rz,
		ctx:     ctx,
		cancel:  cancel,
		done:    make(chan struct{}),
		beReady: make(chan struct{}),
		subs:    make(map[uint64]*localSub),
		wanted:  make(map[string]struct{}),
		drops:   make(map[string]uint64),
	}
}

// run finds the owner, or becomes it, again every time the owner goes away.
func (sc *shareConn) run() {
	defer close(sc.done)
	clientID := omnicore.ClientID(sc.cfg.SubscriptionID, sc.cfg.RegistryID, sc.cfg.GatewayID)
	backoff := shareRetryMin
	var waitingSince time.Time
	warned := false
	pause := func() bool {
		ok := sleepCtx(sc.ctx, jitter(backoff))
		backoff = min(backoff*2, shareRetryMax)
		return ok
	}
	for sc.ctx.Err() == nil {
		lock, err := lockOwner(sc.rz, clientID)
		if err == nil {
			o, err := startOwner(sc.cfg, sc.rz, lock, shareKeepInterval)
			if err != nil {
				sc.log.Errorf("Taking over the connection of gateway %q failed: %v", sc.cfg.GatewayID, err)
				if !pause() {
					return
				}
				continue
			}
			sc.log.Infof("Took over the connection of gateway %q: this process now owns it and serves other processes through %q", sc.cfg.GatewayID, sc.rz.sock)
			sc.runOwner(o)
			return
		}
		var rc *remoteConn
		if errors.Is(err, errLocked) {
			rc, err = dialOwner(sc.ctx, sc.rz, sc.log)
		}
		if err != nil {
			if sc.ctx.Err() != nil {
				return
			}
			if waitingSince.IsZero() {
				waitingSince = time.Now()
			}
			if !warned && time.Since(waitingSince) > shareWaitWarn {
				warned = true
				sc.log.Warnf("Still waiting to reach the process that owns gateway %q (lock %q, socket %q): %v", sc.cfg.GatewayID, sc.rz.lock, sc.rz.sock, err)
			} else {
				sc.log.Debugf("Reaching the owner of gateway %q: %v", sc.cfg.GatewayID, err)
			}
			if !pause() {
				return
			}
			continue
		}
		backoff, waitingSince, warned = shareRetryMin, time.Time{}, false
		sc.log.Debugf("Sharing the connection of gateway %q owned by process %d", sc.cfg.GatewayID, rc.ownerPID)
		if mine := optionsFingerprint(sc.cfg); rc.ownerOptions != "" && rc.ownerOptions != mine {
			sc.log.Warnf("Process %d owns the connection of gateway %q with other connection options than this plugin's (e.g. timeout, max_inflight, device_auth): its options apply to the shared connection; configure them identically in every plugin of this gateway", rc.ownerPID, sc.cfg.GatewayID)
		}
		sc.install(rc)
		select {
		case <-rc.dead:
		case <-sc.ctx.Done():
		}
		sc.uninstall(rc)
		rc.fail(ErrClosed)
		if sc.ctx.Err() != nil {
			return
		}
		sc.log.Infof("The process that owned the connection of gateway %q went away (%v): taking over or reconnecting", sc.cfg.GatewayID, rc.cause())
	}
}

// runOwner serves as the owner until Close.
func (sc *shareConn) runOwner(o *owner) {
	sc.mu.Lock()
	sc.owning = true
	sc.mu.Unlock()
	sc.install(o.session)
	<-sc.ctx.Done()
	sc.uninstall(o.session)
	sc.mu.Lock()
	deadline := sc.closeBy // the hand-over shares Close's deadline
	sc.mu.Unlock()
	if deadline.IsZero() {
		deadline = time.Now().Add(closeTimeout)
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	_ = o.close(ctx)
}

// install makes be the backend and replays the plugins' state on it:
// errors and all-devices subscriptions at once (so they are in place before
// any later call), device subscriptions and wanted attaches concurrently.
func (sc *shareConn) install(be Conn) {
	sc.mu.Lock()
	sc.gen++
	gen := sc.gen
	sc.be = be
	drops := sc.drops
	sc.drops = make(map[string]uint64)
	var devSubs []*localSub
	ids := make([]uint64, 0, len(sc.subs))
	for id := range sc.subs {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		ls := sc.subs[id]
		if ls.busy {
			continue // its registering goroutine moves it to this backend
		}
		switch ls.kind {
		case subAll:
			ls.bsub, ls.gen = be.SubscribeAll(sc.relay(ls)), gen
		case subErrors:
			ls.bsub, ls.gen = be.SubscribeErrors(sc.relay(ls)), gen
		default:
			ls.busy = true
			devSubs = append(devSubs, ls)
		}
	}
	wanted := make([]string, 0, len(sc.wanted))
	for d := range sc.wanted {
		wanted = append(wanted, d)
	}
	close(sc.beReady)
	sc.mu.Unlock()

	for reason, n := range drops {
		sc.countDropOn(be, reason, n)
	}
	for _, ls := range devSubs {
		go func() {
			if _, err := sc.register(sc.ctx, ls); err != nil && !errors.Is(err, ErrClosed) {
				sc.log.Warnf("Restoring the subscription of device %q on the new owner failed: %v", ls.device, err)
			}
		}()
	}
	if len(wanted) > 0 {
		go sc.reattach(be, gen, wanted)
	}
}

// reattach replays the explicit attaches on a new backend, pipelined.
func (sc *shareConn) reattach(be Conn, gen uint64, devices []string) {
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(len(devices), max(sc.cfg.MaxInflight, 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range work {
				err := be.Attach(sc.ctx, d)
				switch {
				case err == nil, errors.Is(err, ErrClosed), sc.ctx.Err() != nil:
				case errors.Is(err, errOwnerGone):
					sc.backendLost(be, gen)
				default:
					sc.log.Warnf("Re-attaching device %q on the new owner failed: %v", d, err)
				}
			}
		}()
	}
	for _, d := range devices {
		if !sc.stillWanted(d, gen) {
			continue
		}
		work <- d
	}
	close(work)
	wg.Wait()
}

func (sc *shareConn) stillWanted(d string, gen uint64) bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	_, ok := sc.wanted[d]
	return ok && sc.gen == gen && sc.be != nil
}

func (sc *shareConn) uninstall(be Conn) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.be != be {
		return
	}
	sc.be = nil
	sc.beReady = make(chan struct{})
}

// backendLost is called by a caller that saw errOwnerGone from be: it stops
// handing be out, so callers wait for the next owner instead of spinning.
func (sc *shareConn) backendLost(be Conn, gen uint64) {
	sc.mu.Lock()
	if sc.be == be && sc.gen == gen {
		sc.be = nil
		sc.beReady = make(chan struct{})
	}
	sc.mu.Unlock()
	if rc, ok := be.(*remoteConn); ok {
		rc.fail(errors.New("the owner is shutting down"))
	}
}

// backend returns the current backend, waiting for one.
func (sc *shareConn) backend(ctx context.Context) (Conn, uint64, error) {
	for {
		sc.mu.Lock()
		if sc.closed && sc.ctx.Err() != nil {
			sc.mu.Unlock()
			return nil, 0, ErrClosed
		}
		be, gen, ch := sc.be, sc.gen, sc.beReady
		sc.mu.Unlock()
		if be != nil {
			return be, gen, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-sc.ctx.Done():
			return nil, 0, ErrClosed
		}
	}
}

// enter registers a call for Close to wait for.
func (sc *shareConn) enter() bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.closed {
		return false
	}
	sc.inflight.Add(1)
	return true
}

// retry runs op on the current backend until it returns anything but
// errOwnerGone.
func (sc *shareConn) retry(ctx context.Context, op func(Conn) error) error {
	for {
		be, gen, err := sc.backend(ctx)
		if err != nil {
			return err
		}
		err = op(be)
		if !errors.Is(err, errOwnerGone) {
			return err
		}
		sc.backendLost(be, gen)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// GatewayID implements Conn.
func (sc *shareConn) GatewayID() string { return sc.cfg.GatewayID }

// Publish implements Conn: it returns nil only once the owner's session
// returned nil (at QoS 1: the bridge acknowledged the message), retrying on
// the next owner when the owner goes away, until ctx ends.
func (sc *shareConn) Publish(ctx context.Context, msg Message) error {
	if !sc.enter() {
		return ErrClosed
	}
	defer sc.inflight.Done()
	return sc.retry(ctx, func(be Conn) error { return be.Publish(ctx, msg) })
}

// Attach implements Conn. The device stays wanted and is attached again on
// every new owner until Detach.
func (sc *shareConn) Attach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	if device == sc.cfg.GatewayID {
		return nil
	}
	if !sc.enter() {
		return ErrClosed
	}
	defer sc.inflight.Done()
	sc.mu.Lock()
	sc.wanted[device] = struct{}{}
	sc.mu.Unlock()
	return sc.retry(ctx, func(be Conn) error { return be.Attach(ctx, device) })
}

// Detach implements Conn. When the owner goes away meanwhile there is
// nothing left to detach: attachments die with the owner's connection.
func (sc *shareConn) Detach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	if !sc.enter() {
		return ErrClosed
	}
	defer sc.inflight.Done()
	sc.mu.Lock()
	delete(sc.wanted, device)
	be, gen := sc.be, sc.gen
	sc.mu.Unlock()
	if be == nil {
		return nil
	}
	err := be.Detach(ctx, device)
	if errors.Is(err, errOwnerGone) {
		sc.backendLost(be, gen)
		return nil
	}
	return err
}

// Subscribe implements Conn.
func (sc *shareConn) Subscribe(ctx context.Context, device string, h Handler) (Subscription, error) {
	if err := omnicore.ValidateID(device); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidDevice, err)
	}
	ls, ok := sc.addSub(subDevice, device, h, true)
	if !ok {
		return nil, ErrClosed
	}
	kept, err := sc.register(ctx, ls)
	if !kept {
		sc.removeSub(ls)
		return nil, err
	}
	return ls, err
}

// register puts ls on the current backend, and again on a newer one if the
// backend changed meanwhile. ls.busy is set by the caller and cleared here.
func (sc *shareConn) register(ctx context.Context, ls *localSub) (kept bool, err error) {
	for {
		be, gen, err := sc.backend(ctx)
		if err != nil {
			sc.mu.Lock()
			ls.busy = false
			sc.mu.Unlock()
			return false, err
		}
		bsub, err := be.Subscribe(ctx, ls.device, sc.relay(ls))
		sc.mu.Lock()
		switch {
		case ls.gone:
			ls.busy = false
			sc.mu.Unlock()
			if bsub != nil {
				bsub.Unsubscribe()
			}
			return false, ErrClosed
		case errors.Is(err, errOwnerGone) || gen != sc.gen:
			sc.mu.Unlock()
			if bsub != nil {
				bsub.Unsubscribe()
			}
			if errors.Is(err, errOwnerGone) {
				sc.backendLost(be, gen)
			}
			continue
		}
		ls.bsub, ls.gen, ls.busy = bsub, gen, false
		sc.mu.Unlock()
		return bsub != nil, err
	}
}

// SubscribeAll implements Conn.
func (sc *shareConn) SubscribeAll(h Handler) Subscription {
	ls, _ := sc.addSub(subAll, "", h, false)
	return ls
}

// SubscribeErrors implements Conn.
func (sc *shareConn) SubscribeErrors(h Handler) Subscription {
	ls, _ := sc.addSub(subErrors, "", h, false)
	return ls
}

// addSub records a subscription. All-devices and errors subscriptions are
// put on the current backend at once; device ones are marked busy for the
// caller to register.
func (sc *shareConn) addSub(kind subKind, device string, h Handler, busy bool) (*localSub, bool) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	sc.nextSub++
	ls := &localSub{sc: sc, id: sc.nextSub, kind: kind, device: device, h: h, busy: busy}
	if sc.closed {
		ls.gone = true
		return ls, false
	}
	sc.subs[ls.id] = ls
	if be := sc.be; be != nil && kind != subDevice {
		if kind == subAll {
			ls.bsub = be.SubscribeAll(sc.relay(ls))
		} else {
			ls.bsub = be.SubscribeErrors(sc.relay(ls))
		}
		ls.gen = sc.gen
	}
	return ls, true
}

func (sc *shareConn) removeSub(ls *localSub) {
	sc.mu.Lock()
	ls.gone = true
	delete(sc.subs, ls.id)
	bsub := ls.bsub
	ls.bsub = nil
	sc.mu.Unlock()
	if bsub != nil {
		bsub.Unsubscribe()
	}
}

// Unsubscribe implements Subscription.
func (ls *localSub) Unsubscribe() { ls.sc.removeSub(ls) }

// relay is the handler registered on a backend for ls.
func (sc *shareConn) relay(ls *localSub) Handler {
	return func(in Inbound) {
		sc.mu.Lock()
		gone := ls.gone
		sc.mu.Unlock()
		if !gone {
			ls.h(in)
		}
	}
}

// CountDrop implements Conn. Drops counted while no owner is reachable are
// handed to the next one.
func (sc *shareConn) CountDrop(reason string, n uint64) {
	sc.mu.Lock()
	be := sc.be
	if be == nil {
		sc.drops[reason] += n
		sc.mu.Unlock()
		return
	}
	sc.mu.Unlock()
	sc.countDropOn(be, reason, n)
}

func (sc *shareConn) countDropOn(be Conn, reason string, n uint64) {
	if rc, ok := be.(*remoteConn); ok {
		if !rc.countDrop(reason, n) {
			sc.mu.Lock()
			sc.drops[reason] += n
			sc.mu.Unlock()
		}
		return
	}
	be.CountDrop(reason, n)
}

// ReportGauges implements Conn. While no owner is reachable the report is
// dropped: the reporter sends a fresh one at least every GaugeTTL/4.
func (sc *shareConn) ReportGauges(source string, gauges map[string]int64) {
	sc.mu.Lock()
	be := sc.be
	sc.mu.Unlock()
	if be != nil {
		be.ReportGauges(source, gauges)
	}
}

// Stats implements Conn: the owner's session counters. While no owner is
// reachable it returns the last snapshot, not connected.
func (sc *shareConn) Stats() Stats {
	sc.mu.Lock()
	be := sc.be
	sc.mu.Unlock()
	var st Stats
	ok := false
	if rc, isRemote := be.(*remoteConn); isRemote {
		ctx, cancel := context.WithTimeout(sc.ctx, sc.cfg.Timeout)
		var err error
		st, err = rc.stats(ctx)
		cancel()
		ok = err == nil
	} else if be != nil {
		st, ok = be.Stats(), true
	}
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if ok {
		sc.lastStats = st
		return st
	}
	st = sc.lastStats
	st.Connected = false
	st.Attached = 0
	st.ErrorsByType = copyCounts(st.ErrorsByType)
	st.DroppedByReason = copyCounts(st.DroppedByReason)
	for k, v := range sc.drops {
		st.DroppedByReason[k] += v
	}
	return st
}

func copyCounts(m map[string]uint64) map[string]uint64 {
	c := make(map[string]uint64, len(m))
	for k, v := range m {
		c[k] = v
	}
	return c
}

// Close waits for calls in flight until ctx ends, then leaves the owner (or,
// when this process took over, hands the gateway over to the next process).
func (sc *shareConn) Close(ctx context.Context) error {
	sc.mu.Lock()
	if sc.closed {
		sc.mu.Unlock()
		return nil
	}
	sc.closed = true
	sc.mu.Unlock()
	waitShareGroup(ctx, &sc.inflight)
	sc.mu.Lock()
	for _, ls := range sc.subs {
		ls.gone = true // no handler runs after Close
	}
	sc.closeBy, _ = ctx.Deadline()
	sc.mu.Unlock()
	sc.cancel()
	select {
	case <-sc.done:
	case <-ctx.Done():
	}
	return nil
}

// owns reports whether this shareConn took over the connection.
func (sc *shareConn) owns() bool {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	return sc.owning
}

// waitShareGroup waits for wg until ctx ends.
func waitShareGroup(ctx context.Context, wg *sync.WaitGroup) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}
