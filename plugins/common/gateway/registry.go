package gateway

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// registry is the package's one piece of package-level state: the
// process-wide table of gateway connections, because the bridge allows one
// connection per client ID and a process must not open two. Two plugins of
// one process configured for the same gateway share one connection.
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

// Host is what a program that runs the plugins outside Telegraf tells them
// (the execd binary, which runs one plugin per process, sets it on each
// plugin it loads); the zero Host is Telegraf's own.
type Host struct {
	// Connect starts the connection of a gateway that no plugin of this
	// process uses yet; nil starts a session of this process alone. The
	// execd binary shares it with its other processes (execd/share).
	Connect CrossProcess
	// Route names the way the plugins run, for the health state: RouteExecd
	// or RouteBuiltIn (the default).
	Route string
}

// RouteName is h.Route, RouteBuiltIn when unset.
func (h Host) RouteName() string {
	if h.Route == "" {
		return RouteBuiltIn
	}
	return h.Route
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

// Acquire is Host{}.Acquire: Telegraf's way, one connection per gateway in
// this process.
func Acquire(cfg *Config) (conn Conn, release func(), err error) {
	return Host{}.Acquire(cfg)
}

// Acquire returns the running connection for cfg's gateway, starting it on
// first use with h.Connect. Within this process it is shared by every plugin
// with the same client ID; h.Connect may share it with other processes too
// (see execd/share). A plugin whose connection options
// differ from those of the plugins already sharing the gateway gets an error
// wrapping ErrConflict that names the differing options. Acquire does no
// network I/O. Call release exactly once when done; the last release closes
// the connection, or hands it over to the next process.
func (h Host) Acquire(cfg *Config) (conn Conn, release func(), err error) {
	key := cfg.ClientID()
	if cfg.Route == "" {
		cfg.Route = h.RouteName()
	}
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
		if h.Connect != nil {
			c, closeFn, err = h.Connect(cfg)
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
