package gateway

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/influxdata/telegraf"
	"github.com/influxdata/telegraf/config"
	common_tls "github.com/influxdata/telegraf/plugins/common/tls"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// Options are the connection options both plugins share, with the TOML names
// of the public contract (they keep their names) and outputs.mqtt's habits for the
// rest. Plugins embed it.
type Options struct {
	Servers              []string        `toml:"servers"`
	SubscriptionID       string          `toml:"subscription_id"`
	RegistryID           string          `toml:"registry_id"`
	GatewayID            string          `toml:"gateway_id"`
	PrivateKey           string          `toml:"private_key"`
	Algorithm            string          `toml:"algorithm"`
	TokenLifetime        config.Duration `toml:"token_lifetime"`
	KeepAlive            config.Duration `toml:"keep_alive"`
	ConnectionTimeout    config.Duration `toml:"connection_timeout"`
	Timeout              config.Duration `toml:"timeout"`
	MaxReconnectInterval config.Duration `toml:"max_reconnect_interval"`
	MaxInflight          int             `toml:"max_inflight"`
	MaxMessageRate       float64         `toml:"max_message_rate"`
	DeviceAuth           string          `toml:"device_auth"`
	DeviceKeyDir         string          `toml:"device_key_dir"`
	DeviceAlgorithm      string          `toml:"device_algorithm"`
	DetachIdle           config.Duration `toml:"detach_idle"`
	MaxDevices           int             `toml:"max_devices"`
	common_tls.ClientConfig
}

// Device authentication modes for attach (device_auth).
const (
	DeviceAuthAssociation = "association" // attach payload {}; the bridge checks the binding
	DeviceAuthToken       = "token"       // attach payload carries a device JWT
)

// DefaultOptions are the defaults the plugin factories start from; sample.conf
// shows the same values.
func DefaultOptions() Options {
	return Options{
		Algorithm:            omnicore.RS256,
		TokenLifetime:        config.Duration(time.Hour),
		KeepAlive:            config.Duration(60 * time.Second),
		ConnectionTimeout:    config.Duration(30 * time.Second),
		Timeout:              config.Duration(10 * time.Second),
		MaxReconnectInterval: config.Duration(30 * time.Second),
		MaxInflight:          100,
		DeviceAuth:           DeviceAuthAssociation,
		DetachIdle:           config.Duration(DefaultDetachIdle),
		MaxDevices:           omnicore.MaxAttachedDevices,
	}
}

// DefaultDetachIdle is detach_idle's default: a device that sent nothing for
// an hour is detached and forgotten, so the session's memory and the
// re-attach work after a reconnect follow the devices active in the last
// hour, not every device ever seen. It is attached again on its next metric.
const DefaultDetachIdle = time.Hour

// Bounds of the options the bridge's own rules constrain.
const (
	// MinKeepAlive and MaxKeepAlive bound keep_alive: the bridge closes a
	// connection silent for omnicore.IdleTimeout (20 min), so a keep-alive
	// must leave a minute for the PINGREQ; below 10 s it is only overhead.
	MinKeepAlive = 10 * time.Second
	MaxKeepAlive = omnicore.IdleTimeout - time.Minute
	// MinDetachIdle is the shortest detach_idle other than 0: shorter would
	// detach and re-attach devices between two metrics of one batch.
	MinDetachIdle = time.Second
	// maxMaxDevices bounds max_devices.
	maxMaxDevices = 1_000_000
)

// Config is a validated Options plus what was loaded from files: it is what a
// Session runs on.
type Config struct {
	Servers        []string
	SubscriptionID string
	RegistryID     string
	GatewayID      string
	Signer         *omnicore.Signer
	TLS            *tls.Config
	TokenLifetime  time.Duration
	// RenewBefore is how long before the token's exp the session reconnects
	// with a fresh one.
	RenewBefore       time.Duration
	KeepAlive         time.Duration
	ConnectionTimeout time.Duration
	Timeout           time.Duration
	MinReconnect      time.Duration
	MaxReconnect      time.Duration
	MaxInflight       int
	MaxMessageRate    float64
	DeviceAuth        string
	DeviceKeyDir      string
	DeviceAlgorithm   string
	DetachIdle        time.Duration
	MaxDevices        int
	Log               telegraf.Logger
	// Route is how the plugins run (RouteExecd or RouteBuiltIn, the
	// default), set by Host.Acquire: the outage lines say where the
	// metrics not acknowledged wait, which depends on it.
	Route string

	// settings are the connection options by TOML name, as Settings
	// returns them.
	settings map[string]string
}

// ClientID is the gateway's identity on the bridge: the bridge kicks the
// older of two connections with the same client ID, whatever server string
// or options each used, so two configs with the same client ID must share
// one connection.
func (c *Config) ClientID() string {
	return omnicore.ClientID(c.SubscriptionID, c.RegistryID, c.GatewayID)
}

// Settings returns the connection options that shape the shared connection,
// by TOML option name, for comparing the plugin files of one gateway: every
// plugin sharing a connection must agree on all of them. No secret appears
// in clear: the private key is named by its public key's hash (so the same
// key in two files or encodings compares equal) and tls_key_pwd by a hash.
func (c *Config) Settings() map[string]string {
	out := make(map[string]string, len(c.settings))
	for k, v := range c.settings {
		out[k] = v
	}
	return out
}

// DiffSettings returns the names of the options whose values differ between
// two Settings maps, sorted.
func DiffSettings(a, b map[string]string) []string {
	var diff []string
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			diff = append(diff, k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			diff = append(diff, k)
		}
	}
	slices.Sort(diff)
	return diff
}

// DescribeDiff renders the options that differ between two Settings maps as
// `name: "mine" here, "theirs" there`, one clause per option, for an error
// message (the values are those of Settings, so no secret is in it).
func DescribeDiff(mine, theirs map[string]string) string {
	var parts []string
	for _, k := range DiffSettings(mine, theirs) {
		parts = append(parts, fmt.Sprintf("%s = %q here, %q there", k, mine[k], theirs[k]))
	}
	return strings.Join(parts, "; ")
}

// settingsOf computes Settings for Validate.
func settingsOf(o *Options, signer *omnicore.Signer, devAlg string) map[string]string {
	secret := func(v string) string {
		if v == "" {
			return ""
		}
		sum := sha256.Sum256([]byte(v))
		return "sha256:" + hex.EncodeToString(sum[:8])
	}
	return map[string]string{
		"servers":                  strings.Join(o.Servers, ","),
		"private_key":              "public key sha256:" + signer.PublicKeyID(),
		"algorithm":                signer.Algorithm(),
		"token_lifetime":           time.Duration(o.TokenLifetime).String(),
		"keep_alive":               time.Duration(o.KeepAlive).String(),
		"connection_timeout":       time.Duration(o.ConnectionTimeout).String(),
		"timeout":                  time.Duration(o.Timeout).String(),
		"max_reconnect_interval":   time.Duration(o.MaxReconnectInterval).String(),
		"max_inflight":             strconv.Itoa(o.MaxInflight),
		"max_message_rate":         strconv.FormatFloat(o.MaxMessageRate, 'g', -1, 64),
		"device_auth":              o.DeviceAuth,
		"device_key_dir":           o.DeviceKeyDir,
		"device_algorithm":         devAlg,
		"detach_idle":              time.Duration(o.DetachIdle).String(),
		"max_devices":              strconv.Itoa(o.MaxDevices),
		"tls_ca":                   o.TLSCA,
		"tls_cert":                 o.TLSCert,
		"tls_key":                  o.TLSKey,
		"tls_key_pwd":              secret(o.TLSKeyPwd),
		"tls_min_version":          o.TLSMinVersion,
		"tls_cipher_suites":        strings.Join(o.TLSCipherSuites, ","),
		"tls_server_name":          o.ServerName,
		"tls_renegotiation_method": o.RenegotiationMethod,
		"insecure_skip_verify":     strconv.FormatBool(o.InsecureSkipVerify),
	}
}

// Validate checks the options without any network I/O, reads the private key
// and builds the TLS configuration. It is what plugins call from Init.
func (o *Options) Validate(log telegraf.Logger) (*Config, error) {
	if err := o.missingRequired(); err != nil {
		return nil, err
	}
	for _, s := range o.Servers {
		u, err := checkServer(s)
		if err != nil {
			return nil, err
		}
		switch u.Scheme {
		case "tls", "ssl", "mqtts":
		case "tcp", "mqtt":
			if log != nil {
				log.Warnf("Server %q is plain TCP: the OmniCore bridge requires TLS; use tcp:// only with a local emulator", s)
			}
		default:
			return nil, fmt.Errorf("server %q: scheme must be tls:// (or tcp:// for local testing)", s)
		}
	}
	if strings.ContainsFunc(o.SubscriptionID, func(r rune) bool { return r == '/' || r == '+' || r == '#' || unicode.IsSpace(r) }) {
		return nil, fmt.Errorf("subscription_id %q must not contain '/', '+', '#' or spaces", o.SubscriptionID)
	}
	if err := omnicore.ValidateID(o.RegistryID); err != nil {
		return nil, fmt.Errorf("registry_id: %w", err)
	}
	if err := omnicore.ValidateID(o.GatewayID); err != nil {
		return nil, fmt.Errorf("gateway_id: %w", err)
	}
	if strings.Contains(o.PrivateKey, "-----BEGIN") || strings.ContainsAny(o.PrivateKey, "\n\r") || len(o.PrivateKey) > 4096 {
		// Never quote it: this is key material, not a path.
		return nil, errors.New("private_key must be the path of the PEM file, not the key itself")
	}
	warnLoosePermissions(log, "private_key", o.PrivateKey)
	signer, err := omnicore.LoadSigner(o.PrivateKey, o.Algorithm)
	if err != nil {
		return nil, fmt.Errorf("private_key %q: %w", o.PrivateKey, err)
	}
	lifetime := time.Duration(o.TokenLifetime)
	if lifetime < 10*time.Second || lifetime > omnicore.MaxTokenLifetime {
		return nil, fmt.Errorf("token_lifetime %s must be between 10s and 24h", lifetime)
	}
	if o.MaxInflight < 1 || o.MaxInflight > 65000 {
		return nil, fmt.Errorf("max_inflight %d must be between 1 and 65000", o.MaxInflight)
	}
	if o.MaxMessageRate < 0 {
		return nil, fmt.Errorf("max_message_rate %v must not be negative", o.MaxMessageRate)
	}
	if time.Duration(o.Timeout) <= 0 || time.Duration(o.ConnectionTimeout) <= 0 {
		return nil, errors.New("timeout and connection_timeout must be positive")
	}
	if ka := time.Duration(o.KeepAlive); ka < MinKeepAlive || ka > MaxKeepAlive {
		return nil, fmt.Errorf("keep_alive %s must be between %s and %s: the bridge closes a connection silent for %s",
			ka, MinKeepAlive, MaxKeepAlive, omnicore.IdleTimeout)
	}
	if di := time.Duration(o.DetachIdle); di != 0 && di < MinDetachIdle {
		return nil, fmt.Errorf("detach_idle %s must be 0 (never detach idle devices) or at least %s", di, MinDetachIdle)
	}
	if o.MaxDevices < 1 || o.MaxDevices > maxMaxDevices {
		return nil, fmt.Errorf("max_devices %d must be between 1 and %d (the bridge attaches at most %d devices per gateway)", o.MaxDevices, maxMaxDevices, omnicore.MaxAttachedDevices)
	}
	switch o.DeviceAuth {
	case DeviceAuthAssociation:
	case DeviceAuthToken:
		if o.DeviceKeyDir == "" {
			return nil, fmt.Errorf("device_auth = %q needs device_key_dir (one {device_id}.pem per device)", DeviceAuthToken)
		}
		if st, err := os.Stat(o.DeviceKeyDir); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("device_key_dir %q is not a readable directory", o.DeviceKeyDir)
		}
		keys, _ := filepath.Glob(filepath.Join(o.DeviceKeyDir, "*.pem"))
		for _, k := range keys {
			warnLoosePermissions(log, "device key", k)
		}
	default:
		return nil, fmt.Errorf("device_auth %q must be %q or %q", o.DeviceAuth, DeviceAuthAssociation, DeviceAuthToken)
	}
	devAlg := o.DeviceAlgorithm
	if devAlg == "" {
		devAlg = o.Algorithm
	}
	if devAlg != omnicore.RS256 && devAlg != omnicore.ES256 {
		return nil, fmt.Errorf("device_algorithm %q must be %q or %q", devAlg, omnicore.RS256, omnicore.ES256)
	}
	tlsCfg, err := o.ClientConfig.TLSConfig()
	if err != nil {
		return nil, fmt.Errorf("TLS options: %w", err)
	}
	if o.InsecureSkipVerify && log != nil {
		log.Warn("insecure_skip_verify = true: the bridge's certificate is NOT verified; anyone on the path can read the gateway's token and data")
	}
	// Renew early enough for in-flight messages to drain (up to timeout)
	// before exp, but never in the first half of a token's life.
	renew := min(max(lifetime/10, time.Duration(o.Timeout)+time.Second), 5*time.Minute, lifetime/2)
	return &Config{
		Servers:           o.Servers,
		SubscriptionID:    o.SubscriptionID,
		RegistryID:        o.RegistryID,
		GatewayID:         o.GatewayID,
		Signer:            signer,
		TLS:               tlsCfg,
		TokenLifetime:     lifetime,
		RenewBefore:       renew,
		KeepAlive:         time.Duration(o.KeepAlive),
		ConnectionTimeout: time.Duration(o.ConnectionTimeout),
		Timeout:           time.Duration(o.Timeout),
		MinReconnect:      500 * time.Millisecond,
		MaxReconnect:      max(time.Duration(o.MaxReconnectInterval), time.Second),
		MaxInflight:       o.MaxInflight,
		MaxMessageRate:    o.MaxMessageRate,
		DeviceAuth:        o.DeviceAuth,
		DeviceKeyDir:      o.DeviceKeyDir,
		DeviceAlgorithm:   devAlg,
		DetachIdle:        time.Duration(o.DetachIdle),
		MaxDevices:        o.MaxDevices,
		Log:               log,
		settings:          settingsOf(o, signer, devAlg),
	}, nil
}

// warnLoosePermissions warns when a private key file can be read by others.
func warnLoosePermissions(log telegraf.Logger, option, path string) {
	if log == nil {
		return
	}
	st, err := os.Stat(path)
	if err != nil {
		return
	}
	if st.Mode().Perm()&0o077 != 0 {
		log.Warnf("%s %q is readable by group or others (mode %04o); it should be 0600", option, filepath.Clean(path), st.Mode().Perm())
	}
}

// snake turns an error type or reason into a snake_case field suffix.
func snake(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('_')
		}
	}
	return b.String()
}
