package gateway

import (
	"context"
	"sync"
	"time"
)

// registry is the process-wide table of gateway sessions, the one piece of
// package-level mutable state in this project. It exists because the bridge
// allows one connection per client ID: two plugins of one process configured
// for the same gateway must share one Session, or they would kick each other
// off forever.
var registry = struct {
	mu       sync.Mutex
	sessions map[string]*sharedSession
}{sessions: make(map[string]*sharedSession)}

type sharedSession struct {
	session *Session
	users   int
}

// closeTimeout bounds how long the last user's release waits for in-flight
// messages before the connection is closed.
const closeTimeout = 4 * time.Second

// Acquire returns the running session for cfg's gateway identity, starting it
// on first use. Call release exactly once when done; the last release closes
// the connection.
func Acquire(cfg *Config) (conn Conn, release func(), err error) {
	key := cfg.Key()
	registry.mu.Lock()
	defer registry.mu.Unlock()
	sh, ok := registry.sessions[key]
	if !ok {
		s, err := New(cfg)
		if err != nil {
			return nil, nil, err
		}
		s.Start()
		sh = &sharedSession{session: s}
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
				sh.session.Close(ctx)
			}
		})
	}
	return sh.session, release, nil
}
