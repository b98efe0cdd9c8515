package gateway

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// The package has two pieces of package-level state, both because the
// bridge allows one connection per client ID and a process must not open
// two:
//
//   - registry, the process-wide table of gateway connections: two plugins
//     of one process configured for the same gateway share one connection.
//   - crossProcess, the hook through which Acquire shares a connection with
//     other processes. It is set once, at start, by the program that runs
//     one plugin per process (cmd/telegraf-omnicore installs
//     execd/share); Telegraf built with the plugins compiled in
//     leaves it unset, and then Acquire shares only within the process and
//     creates no files.
var registry = struct {
	mu       sync.Mutex
	sessions map[string]*sharedSession
}{sessions: make(map[string]*sharedSession)}

// CrossProcess connects cfg's gateway in a way shared with the other
// processes of the host that connect as the same gateway, and returns the
// connection and the function that closes it (or hands it over). It must do
// no network I/O. An error wrapping ErrConflict means another process
// connects as this gateway with other options.
type CrossProcess func(cfg *Config) (Conn, func(context.Context) error, error)

var crossProcess struct {
	mu sync.Mutex
	fn CrossProcess
}

// SetCrossProcess installs the cross-process sharing used by every later
// Acquire (nil: none). A program calls it once, before any plugin starts;
// a later call replaces it for later Acquires only, which tests that run a
// program's main several times in one process rely on.
func SetCrossProcess(fn CrossProcess) {
	crossProcess.mu.Lock()
	defer crossProcess.mu.Unlock()
	crossProcess.fn = fn
}

func currentCrossProcess() CrossProcess {
	crossProcess.mu.Lock()
	defer crossProcess.mu.Unlock()
	return crossProcess.fn
}

type sharedSession struct {
	conn     Conn
	close    func(context.Context) error
	settings map[string]string
	users    int
}

// CloseTimeout bounds how long the last user's release waits for in-flight
// messages before the connection is closed.
const CloseTimeout = 4 * time.Second

// Acquire returns the running connection for cfg's gateway, starting it on
// first use. Within this process it is shared by every plugin with the same
// client ID; with a CrossProcess installed, it is shared with the other
// processes too (see execd/share). A plugin whose connection options
// differ from those of the plugins already sharing the gateway gets an error
// wrapping ErrConflict that names the differing options. Acquire does no
// network I/O. Call release exactly once when done; the last release closes
// the connection, or hands it over to the next process.
func Acquire(cfg *Config) (conn Conn, release func(), err error) {
	key := cfg.ClientID()
	registry.mu.Lock()
	defer registry.mu.Unlock()
	sh, ok := registry.sessions[key]
	if ok {
		if diff := DescribeDiff(cfg.Settings(), sh.settings); diff != "" {
			return nil, nil, fmt.Errorf("%w: another plugin of this process connects as %q with other options (%s); make the connection options identical in every plugin of this gateway", ErrConflict, key, diff)
		}
		if cfg.Log != nil {
			cfg.Log.Debugf("Sharing the connection of gateway %q with another plugin of this process", cfg.GatewayID)
		}
	} else {
		var c Conn
		var closeFn func(context.Context) error
		if cp := currentCrossProcess(); cp != nil {
			c, closeFn, err = cp(cfg)
		} else {
			c, closeFn, err = startPrivate(cfg)
		}
		if err != nil {
			return nil, nil, err
		}
		sh = &sharedSession{conn: c, close: closeFn, settings: cfg.Settings()}
		registry.sessions[key] = sh
	}
	sh.users++
	var once sync.Once
	release = func() {
		once.Do(func() {
			registry.mu.Lock()
			sh.users--
			last := sh.users == 0
			if last {
				delete(registry.sessions, key)
			}
			registry.mu.Unlock()
			if last {
				ctx, cancel := context.WithTimeout(context.Background(), CloseTimeout)
				defer cancel()
				_ = sh.close(ctx)
			}
		})
	}
	return sh.conn, release, nil
}

// startPrivate starts a session of this process alone.
func startPrivate(cfg *Config) (Conn, func(context.Context) error, error) {
	s, err := New(cfg)
	if err != nil {
		return nil, nil, err
	}
	s.Start()
	return s, s.Close, nil
}
