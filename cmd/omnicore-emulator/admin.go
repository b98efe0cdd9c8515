package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/influxdata/telegraf/config"

	"github.com/telegraf-omnicore/telegraf-omnicore/emulator"
)

// minTokenLength keeps guessable tokens out: 16 characters, e.g. the output
// of `openssl rand -hex 16` is 32.
const minTokenLength = 16

// listenAdmin binds the admin listener and returns the guard options for
// it. An admin API reachable from other machines needs a token: without one
// it is refused, so that nobody on the network can push configs and
// commands into a developer's Telegraf.
func listenAdmin(addr, token string) (net.Listener, []emulator.AdminOption, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, nil, fmt.Errorf("admin listener: %w", err)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, nil, fmt.Errorf("admin listener: %w", err)
	}
	// The bound address, not the name: "localhost" could resolve anywhere.
	if tcp, ok := ln.Addr().(*net.TCPAddr); !ok || !tcp.IP.IsLoopback() {
		if token == "" {
			ln.Close()
			return nil, nil, fmt.Errorf("admin listener %s is not on loopback: give it a token with -admin-token-file, or listen on 127.0.0.1", ln.Addr())
		}
	}
	var opts []emulator.AdminOption
	if ip := net.ParseIP(strings.Trim(host, "[]")); host != "" && (ip == nil || !ip.IsUnspecified()) {
		opts = append(opts, emulator.AdminHost(host))
	}
	if token != "" {
		opts = append(opts, emulator.AdminToken(token))
	}
	return ln, opts, nil
}

// readTokenFile reads the admin token: the file's content without the
// trailing newline. A file, not a flag value, so that the token does not show
// in ps; private (no group or other access), like a key.
func readTokenFile(path string) (string, error) {
	st, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("-admin-token-file: %w", err)
	}
	if perm := st.Mode().Perm(); perm&0o077 != 0 {
		return "", fmt.Errorf("-admin-token-file %s is readable by group or others (mode %04o): chmod 600 it", path, perm)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("-admin-token-file: %w", err)
	}
	token := strings.TrimRight(string(b), "\r\n")
	switch {
	case len(token) < minTokenLength:
		return "", fmt.Errorf("-admin-token-file %s: the token must be at least %d characters", path, minTokenLength)
	case strings.ContainsAny(token, " \t\r\n"):
		return "", errors.New("-admin-token-file " + path + ": the token must be one line without spaces")
	}
	return token, nil
}

// sizeFlag is a flag.Value for byte sizes ("256MiB", "1000000"), parsed by
// Telegraf's config.Size as in Telegraf's own configuration.
type sizeFlag struct{ v *config.Size }

func (f sizeFlag) String() string {
	if f.v == nil {
		return ""
	}
	return fmt.Sprint(int64(*f.v))
}

func (f sizeFlag) Set(s string) error {
	if s == "" {
		return errors.New("empty size")
	}
	return f.v.UnmarshalText([]byte(s))
}
