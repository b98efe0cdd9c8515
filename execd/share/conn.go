// Package share shares one gateway connection between the processes of a
// host. Under Telegraf's execd every plugin is its own
// process, and the bridge allows one connection per client ID: an output and
// an input configured for the same gateway would kick each other off
// forever. cmd/telegraf-omnicore calls Install at start, which makes
// gateway.Acquire share through this package. See SHARING.md.
//
// Processes of one user that connect as the same gateway (the same client
// ID, whatever else their options say) meet in a private rendezvous
// directory under the product's state directory:
//
//   - The first process to take an exclusive flock on {dir}/{name}.lock owns
//     the MQTT connection: it runs the real *gateway.Session and serves it
//     on the Unix socket {dir}/{name}.sock (mode 0600, in a directory of
//     mode 0700 owned by the user; peers of another uid are refused by their
//     kernel credentials). The lock belongs to the open file, so it dies with
//     the process however the process dies: there is never a stale owner.
//   - Every other process says hello with its connection options; one whose
//     options differ is refused and stops (ErrConflict), so that two plugin
//     files never disagree silently. Otherwise it forwards each call over
//     the socket (requests pipelined, a publish acknowledged only after the
//     owner's Session.Publish returned nil, that is after the bridge's
//     PUBACK) and receives the inbound messages it subscribed to.
//   - Owner and clients exchange heartbeats carrying the owner's health, so
//     a client reports an owner that cannot connect, or that hangs.
//   - When the owner goes away (socket EOF), each process tries the lock;
//     the winner becomes the owner (a new Session, a new socket; a stale
//     socket file is replaced), the others reconnect to it. Every process
//     replays its subscriptions and wanted attachments on the new owner and
//     retries the calls that were in flight: duplicates are possible, loss
//     is not.
package share

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

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Environment variables that control sharing.
const (
	// EnvRuntimeDir overrides the rendezvous directory. It gets the same
	// checks as the default one and is never re-moded.
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
	// the lock but does not serve before it says so at error level.
	shareWaitWarn = 10 * time.Second
	// shareKeepInterval is how often the owner refreshes its rendezvous
	// files (see owner.keep).
	shareKeepInterval = time.Hour
	// shareHeartbeat is how often owner and clients tell each other they
	// are alive (the owner's heartbeat carries its bridge connection's
	// health); shareSilence is how long a client hears nothing from its
	// owner before it reports it as hung, and shareClientSilence how long
	// the owner waits on a silent client before disconnecting it.
	shareHeartbeat     = 2 * time.Second
	shareSilence       = 10 * time.Second
	shareClientSilence = 30 * time.Second
	// closeTimeout bounds a hand-over that has no deadline of its own.
	closeTimeout = gateway.CloseTimeout
)

var (
	// errLocked means another open file holds the owner lock.
	errLocked = errors.New("held by another process")
	// errOwnerGone means the owner's socket connection ended or the owner is
	// shutting down: the call is retried on the next owner.
	errOwnerGone = errors.New("the process owning the gateway connection went away")
)

// stallReport is the age at which a call that makes no progress is reported
// with its reason, and reportEvery rate-limits repeated reports of a kind;
// variables so that tests can shorten them.
var (
	stallReport = 20 * time.Second
	reportEvery = time.Minute
)

// Settings configure Install.
type Settings struct {
	// PluginFile is this process's plugin file, named in the messages
	// about plugin files that disagree.
	PluginFile string
	// OnConflict is called once, after the error was logged, when this
	// process must stop because its options conflict with those of the
	// process that owns the gateway's connection (gateway.ErrConflict).
	// cmd/telegraf-omnicore stops and exits non-zero. Optional.
	OnConflict func(error)
}

// Install returns how the plugins of this process connect a gateway shared
// with the other processes of this user (set as the plugins'
// gateway.Host.Connect), through the rendezvous directory it also returns.
// With TELEGRAF_OMNICORE_SHARING=off, or on a platform without sharing, it
// returns nil and "": each process connects on its own. A directory that
// cannot be used is an error: the caller must not run unshared, since
// another process connecting as the same gateway would kick it off.
func Install(st Settings) (gateway.CrossProcess, string, error) {
	if Off() || !sharingSupported {
		return nil, "", nil
	}
	dir, err := Dir()
	if err != nil {
		return nil, "", err
	}
	sh := &sharer{dir: dir, settings: st}
	return sh.acquire, dir, nil
}

// Off reports whether the user switched sharing off.
func Off() bool { return strings.EqualFold(os.Getenv(EnvSharing), "off") }

// Dir returns the rendezvous directory, creating it when missing:
// $TELEGRAF_OMNICORE_RUNTIME_DIR when set, else the "share" subdirectory of
// the product's state directory (statedir). Either must be a real directory
// owned by this user with no access for group or others; an existing
// directory that is not is an error, never re-moded.
func Dir() (string, error) {
	var dir string
	if d := os.Getenv(EnvRuntimeDir); d != "" {
		if !filepath.IsAbs(d) {
			return "", fmt.Errorf("$%s=%q is not an absolute path", EnvRuntimeDir, d)
		}
		if err := os.Mkdir(d, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("creating the sharing directory $%s: %w", EnvRuntimeDir, err)
		}
		if err := statedir.CheckPrivate(d); err != nil {
			return "", fmt.Errorf("the sharing directory $%s: %w", EnvRuntimeDir, err)
		}
		dir = filepath.Clean(d)
	} else {
		base, err := statedir.Resolve()
		if err != nil {
			return "", err
		}
		if dir, err = statedir.Private(base, "share"); err != nil {
			return "", fmt.Errorf("the sharing directory: %w", err)
		}
	}
	if sock := filepath.Join(dir, rendezvousName("x")+".sock"); len(sock) > maxSocketPath {
		return "", fmt.Errorf("the sharing directory %q is too long for a Unix socket path (%d bytes, at most %d); set $%s to a shorter directory",
			dir, len(sock), maxSocketPath, EnvRuntimeDir)
	}
	return dir, nil
}

// sharer is what Install installs.
type sharer struct {
	dir      string
	settings Settings
}

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

// rendezvous names the files of one gateway identity.
type rendezvous struct {
	dir  string
	name string // rendezvousName of the client ID
	lock string
	sock string
}

// rendezvousName is "gw-" and 24 hex digits of the SHA-256 of the client
// ID: the identity the bridge kicks by, whatever the server strings say.
func rendezvousName(clientID string) string {
	sum := sha256.Sum256([]byte(clientID))
	return "gw-" + hex.EncodeToString(sum[:12])
}

// newRendezvous names clientID's files in dir, which Dir has checked.
func newRendezvous(dir, clientID string) (*rendezvous, error) {
	if !sharingSupported {
		return nil, errors.New("not supported on this platform")
	}
	if err := statedir.CheckPrivate(dir); err != nil {
		return nil, err
	}
	name := rendezvousName(clientID)
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
func lockOwner(rz *rendezvous, clientID, pluginFile string) (*os.File, error) {
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
			_, _ = fmt.Fprintf(f, "pid %d\nclient_id %s\nsocket %s\nplugin_file %s\n", os.Getpid(), clientID, rz.sock, pluginFile)
		}
		return f, nil
	}
}

// lockHolder reads the pid the owner wrote into the lock file, for messages.
func lockHolder(rz *rendezvous) string {
	b, err := os.ReadFile(rz.lock)
	if err != nil {
		return "unknown"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if pid, ok := strings.CutPrefix(line, "pid "); ok {
			return pid
		}
	}
	return "unknown"
}

// owner is what the process owning a gateway's connection runs: the session,
// the socket server, and the lock that makes it the owner.
type owner struct {
	session *gateway.Session
	server  *shareServer
	lock    *os.File
	rz      *rendezvous
	log     telegraf.Logger
	stop    chan struct{}
	kept    chan struct{} // closed when keep returns
}

// startOwner starts a session and serves it; on error the lock is released.
// keepEvery is the period of keep (shareKeepInterval outside tests).
func startOwner(cfg *gateway.Config, st Settings, rz *rendezvous, lock *os.File, keepEvery time.Duration, yield func(error)) (*owner, error) {
	s, err := gateway.New(cfg)
	if err != nil {
		lock.Close()
		return nil, err
	}
	srv, err := newShareServer(s, rz, cfg.Log)
	if err != nil {
		lock.Close()
		return nil, fmt.Errorf("serving the gateway connection on %q: %w", rz.sock, err)
	}
	srv.settings = cfg.Settings()
	srv.pluginFile = st.PluginFile
	srv.health = s.Health
	srv.yield = yield
	srv.start()
	s.Start()
	log := cfg.Log
	if log == nil {
		log = gateway.DiscardLogger{}
	}
	o := &owner{session: s, server: srv, lock: lock, rz: rz, log: log, stop: make(chan struct{}), kept: make(chan struct{})}
	go o.keep(keepEvery)
	return o, nil
}

// keep looks after the rendezvous files while this process owns them.
// Cleaners of temporary directories go by timestamps, and an idle socket's
// never change: the owner refreshes them, and serves a new socket file if
// the old one was removed anyway.
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

// handOverLimit bounds how long close waits, after ctx ended, for the MQTT
// connection to be gone before it releases the lock anyway: the session
// aborts a connect in progress, so this is only reached by a wedged one.
const handOverLimit = 10 * time.Second

// handOverGrace is how long an owner that closed its connection waits
// before it lets the next owner connect (see close).
const handOverGrace = 250 * time.Millisecond

// close hands the gateway over: no new processes are accepted, in-flight
// messages (those of other processes too) get until ctx ends, the MQTT
// connection is closed (a connect in progress aborted) and only once it is
// gone are the other processes disconnected and the lock released, so the
// next owner connects only after this one left the bridge.
func (o *owner) close(ctx context.Context) error {
	close(o.stop)
	<-o.kept
	o.server.stopAccepting()
	err := o.session.Close(ctx)
	select {
	case <-o.session.Done():
	case <-time.After(handOverLimit):
		o.log.Errorf("The connection of gateway %q did not close within %s; handing the gateway over anyway", o.session.GatewayID(), handOverLimit)
	}
	// Our side of the connection is closed, but the bridge handles the
	// close of one connection and the CONNECT of the next independently: a
	// CONNECT it reads first kicks the old connection as a duplicate. The
	// pause gives the bridge time to see the old one go.
	time.Sleep(handOverGrace)
	o.server.closeClients()
	if o.holdsLockPath() {
		os.Remove(o.rz.lock)
	}
	o.lock.Close()
	return err
}

// acquire is the gateway.CrossProcess hook: cfg's gateway shared with the
// other processes of this user. The returned Conn is a shareConn, which
// becomes the owner or a client of the owner in the background: Acquire
// does no network I/O.
func (sh *sharer) acquire(cfg *gateway.Config) (gateway.Conn, func(context.Context) error, error) {
	log := cfg.Log
	if log == nil {
		log = gateway.DiscardLogger{}
	}
	rz, err := newRendezvous(sh.dir, cfg.ClientID())
	if err != nil {
		return nil, nil, fmt.Errorf("cannot share the connection of gateway %q with other processes (%w); fix the directory, or set %s=off if no other process connects as this gateway", cfg.GatewayID, err, EnvSharing)
	}
	sc := newShareConn(cfg, sh.settings, rz, log)
	// The first attempt at the lock is made here, so that of two plugins
	// acquiring one after the other the first owns the connection.
	lock, err := lockOwner(rz, cfg.ClientID(), sh.settings.PluginFile)
	if err != nil && !errors.Is(err, errLocked) {
		return nil, nil, fmt.Errorf("cannot share the connection of gateway %q with other processes (%w); fix the directory, or set %s=off if no other process connects as this gateway", cfg.GatewayID, err, EnvSharing)
	}
	go sc.run(lock)
	go sc.watch()
	return sc, sc.Close, nil
}

// ---------------------------------------------------------------------------
// shareConn

// shareConn is the Conn a plugin gets. Its backend is a remoteConn to the
// owning process, or the process's own Session while this process owns the
// connection. It remembers what the plugins asked for (subscriptions,
// explicit attaches) and replays it on every new backend; calls that lose
// their backend are retried on the next one.
type shareConn struct {
	cfg      *gateway.Config
	settings Settings
	log      telegraf.Logger
	rz       *rendezvous

	ctx      context.Context
	cancel   context.CancelFunc
	done     chan struct{} // closed when run returns
	yieldCh  chan error    // the owner hands over to a process the bridge may accept
	inflight sync.WaitGroup

	mu        sync.Mutex
	be        gateway.Conn  // nil while no owner is reachable
	gen       uint64        // incremented on every install
	beReady   chan struct{} // closed while be != nil or after a conflict
	subs      map[uint64]*localSub
	nextSub   uint64
	wanted    map[string]struct{} // explicit attaches, replayed
	drops     map[string]uint64   // counted while no owner was reachable
	lastStats gateway.Stats
	closed    bool
	closeBy   time.Time // deadline of the context Close was called with
	owning    bool      // be is the process's own gateway.Session
	conflict  error     // wraps gateway.ErrConflict: this process must stop
	// calls in flight (Publish, Attach, Detach) by start time, for the
	// report of calls that make no progress.
	calls    map[uint64]time.Time
	nextCall uint64
	dialErr  error // the last failure to reach an owner
	// ownerSilent counts the times the owner went silent for shareSilence.
	ownerSilent uint64
	// times of the last reports, for rate limiting
	lastStallLog, lastOwnerErrLog time.Time
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
	h      gateway.Handler
	bsub   gateway.Subscription // its registration on the backend of generation gen
	gen    uint64
	busy   bool // a goroutine is registering it; install leaves it alone
	gone   bool
}

func newShareConn(cfg *gateway.Config, st Settings, rz *rendezvous, log telegraf.Logger) *shareConn {
	ctx, cancel := context.WithCancel(context.Background())
	return &shareConn{
		cfg:      cfg,
		settings: st,
		log:      log,
		rz:       rz,
		ctx:      ctx,
		cancel:   cancel,
		done:     make(chan struct{}),
		yieldCh:  make(chan error, 1),
		beReady:  make(chan struct{}),
		subs:     make(map[uint64]*localSub),
		wanted:   make(map[string]struct{}),
		drops:    make(map[string]uint64),
		calls:    make(map[uint64]time.Time),
	}
}

// run finds the owner, or becomes it, again every time the owner goes away,
// until Close or a conflict.
// lock, when not nil, is the owner lock acquire took already.
func (sc *shareConn) run(lock *os.File) {
	defer close(sc.done)
	clientID := sc.cfg.ClientID()
	backoff := shareRetryMin
	var waitingSince time.Time
	reported := false
	pause := func() bool {
		ok := sleepCtx(sc.ctx, jitter(backoff))
		backoff = min(backoff*2, shareRetryMax)
		return ok
	}
	first := true
	for sc.ctx.Err() == nil {
		var err error
		if lock == nil {
			lock, err = lockOwner(sc.rz, clientID, sc.settings.PluginFile)
		}
		if err == nil {
			o, err := startOwner(sc.cfg, sc.settings, sc.rz, lock, shareKeepInterval, sc.yield)
			lock = nil
			if err != nil {
				sc.log.Errorf("Taking over the connection of gateway %q failed: %v", sc.cfg.GatewayID, err)
				if !pause() {
					return
				}
				continue
			}
			if first {
				sc.log.Debugf("This process owns the connection of gateway %q; other processes share it through %q", sc.cfg.GatewayID, sc.rz.sock)
			} else {
				sc.log.Debugf("Took over the connection of gateway %q: this process now owns it and serves other processes through %q", sc.cfg.GatewayID, sc.rz.sock)
			}
			sc.runOwner(o)
			return
		}
		var rc *remoteConn
		if errors.Is(err, errLocked) {
			rc, err = dialOwner(sc.ctx, sc.rz, sc.log, sc.cfg.Settings(), sc.settings.PluginFile)
		}
		var ce *conflictError
		if errors.As(err, &ce) {
			sc.setConflict(ce.describe(sc.cfg, sc.settings.PluginFile))
			return
		}
		if err != nil {
			if sc.ctx.Err() != nil {
				return
			}
			sc.mu.Lock()
			sc.dialErr = err
			sc.mu.Unlock()
			if waitingSince.IsZero() {
				waitingSince = time.Now()
			}
			if !reported && time.Since(waitingSince) > shareWaitWarn {
				reported = true
				sc.log.Errorf("Cannot reach the process that owns gateway %q (pid %s in lock %q, socket %q) for %s: %v; it may be stopped or hung, and messages wait for it",
					sc.cfg.GatewayID, lockHolder(sc.rz), sc.rz.lock, sc.rz.sock, shareWaitWarn, err)
			} else {
				sc.log.Debugf("Reaching the owner of gateway %q: %v", sc.cfg.GatewayID, err)
			}
			if !pause() {
				return
			}
			continue
		}
		if first {
			sc.log.Debugf("Gateway %q is connected by another process: sharing its connection through %q", sc.cfg.GatewayID, sc.rz.sock)
		}
		first = false
		backoff, waitingSince, reported = shareRetryMin, time.Time{}, false
		sc.log.Debugf("Sharing the connection of gateway %q owned by process %d", sc.cfg.GatewayID, rc.ownerPID)
		sc.install(rc)
		select {
		case <-rc.dead:
		case <-sc.ctx.Done():
		}
		sc.uninstall(rc)
		rc.fail(gateway.ErrClosed)
		if sc.ctx.Err() != nil {
			return
		}
		sc.log.Debugf("The process that owned the connection of gateway %q went away (%v): taking over or reconnecting", sc.cfg.GatewayID, rc.cause())
	}
}

// conflictError is the owner's refusal of a process whose connection
// options differ from its own.
type conflictError struct {
	pid      int
	file     string
	settings map[string]string
}

func (e *conflictError) Error() string {
	return fmt.Sprintf("process %d owns the connection with other connection options", e.pid)
}

// describe is the message this process logs and stops with.
func (e *conflictError) describe(cfg *gateway.Config, myFile string) error {
	return fmt.Errorf("%w: process %d (plugin file %s) owns the connection of gateway %q with other connection options than this process (plugin file %s): %s. Two connections as one gateway kick each other off, so this process does not connect; make the connection options identical in both plugin files",
		gateway.ErrConflict, e.pid, fileName(e.file), cfg.ClientID(), fileName(myFile), gateway.DescribeDiff(cfg.Settings(), e.settings))
}

func fileName(f string) string {
	if f == "" {
		return "unknown"
	}
	return fmt.Sprintf("%q", f)
}

// setConflict makes every call fail with err from now on, logs it, and
// tells the program (Settings.OnConflict).
func (sc *shareConn) setConflict(err error) {
	sc.mu.Lock()
	if sc.conflict != nil {
		sc.mu.Unlock()
		return
	}
	sc.conflict = err
	select {
	case <-sc.beReady:
	default:
		close(sc.beReady) // wakes the callers waiting for a backend
	}
	sc.mu.Unlock()
	sc.log.Errorf("%v", err)
	if fn := sc.settings.OnConflict; fn != nil {
		go fn(err)
	}
}

// yield is called by the owner's server when a process with other options
// asks to share while the bridge refuses this process's credentials: this
// process hands the connection over to it and stops.
func (sc *shareConn) yield(err error) {
	select {
	case sc.yieldCh <- err:
	default:
	}
}

// runOwner serves as the owner until Close, or until it yields.
func (sc *shareConn) runOwner(o *owner) {
	sc.mu.Lock()
	sc.owning = true
	sc.mu.Unlock()
	sc.install(o.session)
	var yielded error
	select {
	case <-sc.ctx.Done():
	case yielded = <-sc.yieldCh:
	}
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
	if yielded != nil {
		sc.setConflict(yielded)
	}
}

// install makes be the backend and replays the plugins' state on it:
// errors and all-devices subscriptions at once (so they are in place before
// any later call), device subscriptions and wanted attaches concurrently.
func (sc *shareConn) install(be gateway.Conn) {
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
			if _, err := sc.register(sc.ctx, ls); err != nil && !errors.Is(err, gateway.ErrClosed) {
				sc.log.Warnf("Restoring the subscription of device %q on the new owner failed: %v", ls.device, err)
			}
		}()
	}
	if len(wanted) > 0 {
		go sc.reattach(be, gen, wanted)
	}
}

// reattach replays the explicit attaches on a new backend, pipelined.
func (sc *shareConn) reattach(be gateway.Conn, gen uint64, devices []string) {
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(len(devices), max(sc.cfg.MaxInflight, 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for d := range work {
				err := be.Attach(sc.ctx, d)
				switch {
				case err == nil, errors.Is(err, gateway.ErrClosed), sc.ctx.Err() != nil:
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

func (sc *shareConn) uninstall(be gateway.Conn) {
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
func (sc *shareConn) backendLost(be gateway.Conn, gen uint64) {
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
func (sc *shareConn) backend(ctx context.Context) (gateway.Conn, uint64, error) {
	for {
		sc.mu.Lock()
		if sc.closed && sc.ctx.Err() != nil {
			sc.mu.Unlock()
			return nil, 0, gateway.ErrClosed
		}
		be, gen, ch, conflict := sc.be, sc.gen, sc.beReady, sc.conflict
		sc.mu.Unlock()
		if conflict != nil {
			return nil, 0, conflict
		}
		if be != nil {
			return be, gen, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, 0, ctx.Err()
		case <-sc.ctx.Done():
			return nil, 0, gateway.ErrClosed
		}
	}
}

// enter registers a call for Close to wait for and for watch to report
// when it makes no progress; leave ends it.
func (sc *shareConn) enter() (uint64, bool) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.closed {
		return 0, false
	}
	sc.inflight.Add(1)
	sc.nextCall++
	sc.calls[sc.nextCall] = time.Now()
	return sc.nextCall, true
}

func (sc *shareConn) leave(id uint64) {
	sc.mu.Lock()
	delete(sc.calls, id)
	sc.mu.Unlock()
	sc.inflight.Done()
}

// retry runs op on the current backend until it returns anything but
// errOwnerGone.
func (sc *shareConn) retry(ctx context.Context, op func(gateway.Conn) error) error {
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
func (sc *shareConn) Publish(ctx context.Context, msg gateway.Message) error {
	call, ok := sc.enter()
	if !ok {
		return gateway.ErrClosed
	}
	defer sc.leave(call)
	return sc.retry(ctx, func(be gateway.Conn) error { return be.Publish(ctx, msg) })
}

// Attach implements Conn. The device stays wanted and is attached again on
// every new owner until Detach.
func (sc *shareConn) Attach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	if device == sc.cfg.GatewayID {
		return nil
	}
	call, ok := sc.enter()
	if !ok {
		return gateway.ErrClosed
	}
	defer sc.leave(call)
	sc.mu.Lock()
	sc.wanted[device] = struct{}{}
	sc.mu.Unlock()
	return sc.retry(ctx, func(be gateway.Conn) error { return be.Attach(ctx, device) })
}

// Detach implements Conn. When the owner goes away meanwhile there is
// nothing left to detach: attachments die with the owner's connection.
func (sc *shareConn) Detach(ctx context.Context, device string) error {
	if err := omnicore.ValidateID(device); err != nil {
		return fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	call, ok := sc.enter()
	if !ok {
		return gateway.ErrClosed
	}
	defer sc.leave(call)
	sc.mu.Lock()
	delete(sc.wanted, device)
	be, gen, conflict := sc.be, sc.gen, sc.conflict
	sc.mu.Unlock()
	if conflict != nil {
		return conflict
	}
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
func (sc *shareConn) Subscribe(ctx context.Context, device string, h gateway.Handler) (gateway.Subscription, error) {
	if err := omnicore.ValidateID(device); err != nil {
		return nil, fmt.Errorf("%w: %w", gateway.ErrInvalidDevice, err)
	}
	ls, ok := sc.addSub(subDevice, device, h, true)
	if !ok {
		return nil, gateway.ErrClosed
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
			return false, gateway.ErrClosed
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
func (sc *shareConn) SubscribeAll(h gateway.Handler) gateway.Subscription {
	ls, _ := sc.addSub(subAll, "", h, false)
	return ls
}

// SubscribeErrors implements Conn.
func (sc *shareConn) SubscribeErrors(h gateway.Handler) gateway.Subscription {
	ls, _ := sc.addSub(subErrors, "", h, false)
	return ls
}

// addSub records a subscription. All-devices and errors subscriptions are
// put on the current backend at once; device ones are marked busy for the
// caller to register.
func (sc *shareConn) addSub(kind subKind, device string, h gateway.Handler, busy bool) (*localSub, bool) {
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
func (sc *shareConn) relay(ls *localSub) gateway.Handler {
	return func(in gateway.Inbound) {
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

func (sc *shareConn) countDropOn(be gateway.Conn, reason string, n uint64) {
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
func (sc *shareConn) Stats() gateway.Stats {
	sc.mu.Lock()
	be := sc.be
	sc.mu.Unlock()
	var st gateway.Stats
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
		if sc.ownerSilent > 0 {
			st.ErrorsByType = copyCounts(st.ErrorsByType)
			st.ErrorsByType[errOwnerSilent] += sc.ownerSilent
		}
		return st
	}
	st = sc.lastStats
	st.Connected = false
	st.ErrorsByType = copyCounts(st.ErrorsByType)
	if sc.ownerSilent > 0 {
		st.ErrorsByType[errOwnerSilent] += sc.ownerSilent
	}
	st.Attached = 0
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
