package gateway

import (
	"context"
	"sync"
	"time"
)

// registry is the process-wide table of gateway connections, the one piece of
// package-level mutable state in this project. It exists because the bridge
// allows one connection per client ID: two plugins of one process configured
// for the same gateway must share one connection, or they would kick each
// other off forever. Across processes the same rule is kept by the sharing
// socket (share.go): the entry then holds a shareConn instead of a Session.
var registry = struct {
	mu       sync.Mutex
	sessions map[string]*sharedSession
}{sessions: make(map[string]*sharedSession)}

type sharedSession struct {
	conn  Conn
	close func(context.Context) error
	users int
}

// closeTimeout bounds how long the last user's release waits for in-flight
// messages before the connection is closed.
const closeTimeout = 4 * time.Second

// Acquire returns the running connection for cfg's gateway identity, starting
// it on first use: within this process it is shared by every plugin; across
// processes of this user the first process to start owns the MQTT connection
// and the others reach it through a local Unix socket, taking over when the
// owner exits (see SHARING.md). Acquire does no network I/O. Call release
// exactly once when done; the last release closes the connection, or hands
// it over to the next process.
func Acquire(cfg *Config) (conn Conn, release func(), err error) {
	key := cfg.Key()
	registry.mu.Lock()
	defer registry.mu.Unlock()
	sh, ok := registry.sessions[key]
	if !ok {
		c, closeFn, err := acquireAcross(cfg, runtimeDir())
		if err != nil {
			return nil, nil, err
		}
		sh = &sharedSession{conn: c, close: closeFn}
		registry.sessions[key] = sh
	} else if cfg.Log != nil {
		cfg.Log.Debugf("Sharing the connection of gateway %q with another plugin of this process", cfg.GatewayID)
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
				ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
				defer cancel()
				_ = sh.close(ctx)
			}
		})
	}
	return sh.conn, release, nil
}
