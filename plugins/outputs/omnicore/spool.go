package omnicore

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

// SpoolSettings are the spool options as the execd program needs them.
// Compiled into Telegraf the plugin ignores them: Telegraf's own output
// buffer (buffer_strategy = "disk") does the store and forward there.
type SpoolSettings struct {
	Enabled      bool
	Dir          string // resolved: spool_dir, or the default under the state directory
	MaxSize      int64
	SyncInterval time.Duration
	Full         spool.FullPolicy
}

// checkSpoolOptions validates the spool options (from Init, so that a bad
// value is an error at start in every mode).
func (o *OmniCore) checkSpoolOptions() error {
	switch spool.FullPolicy(o.SpoolFull) {
	case spool.Backpressure, spool.DropOldest:
	default:
		return fmt.Errorf("spool_full %q must be %q or %q", o.SpoolFull, spool.Backpressure, spool.DropOldest)
	}
	if int64(o.SpoolMaxSize) < spool.MinMaxSize {
		return fmt.Errorf("spool_max_size %d bytes is below the minimum of %d (16KiB)", int64(o.SpoolMaxSize), spool.MinMaxSize)
	}
	if o.SpoolSyncInterval < 0 {
		return fmt.Errorf("spool_sync_interval %s must not be negative", time.Duration(o.SpoolSyncInterval))
	}
	return nil
}

// SpoolSettings returns the spool settings of the output named output (its
// alias, or "" for none), after Init. The default directory is
// {state directory}/spool/{gateway_id}-{hash}, the hash covering the
// gateway's client ID, its servers and output, so that each gateway output
// has its own spool; it is created private (0700) or checked.
func (o *OmniCore) SpoolSettings(output string) (SpoolSettings, error) {
	st := SpoolSettings{
		Enabled:      o.Spool,
		Dir:          o.SpoolDir,
		MaxSize:      int64(o.SpoolMaxSize),
		SyncInterval: time.Duration(o.SpoolSyncInterval),
		Full:         spool.FullPolicy(o.SpoolFull),
	}
	if !st.Enabled || st.Dir != "" {
		return st, nil
	}
	base, err := statedir.Resolve()
	if err != nil {
		return st, fmt.Errorf("spool: %w (or set spool_dir)", err)
	}
	dir, err := statedir.Private(base, "spool", o.spoolName(output))
	if err != nil {
		return st, fmt.Errorf("spool: %w", err)
	}
	st.Dir = dir
	return st, nil
}

// SpoolPath is the directory SpoolSettings returns, without creating it
// (telegraf-omnicore check reads a spool that may belong to another user's
// process); "" when the spool is off.
func (o *OmniCore) SpoolPath(output string) (string, error) {
	if !o.Spool || o.SpoolDir != "" {
		return o.SpoolDir, nil
	}
	base, err := statedir.Resolve()
	if err != nil {
		return "", fmt.Errorf("spool: %w (or set spool_dir)", err)
	}
	return filepath.Join(base, "spool", o.spoolName(output)), nil
}

// spoolName is the default spool directory's name under {state}/spool.
func (o *OmniCore) spoolName(output string) string {
	identity := o.cfg.ClientID() + "@" + strings.Join(o.cfg.Servers, ",")
	sum := sha256.Sum256([]byte(identity + "\x00" + output))
	return o.cfg.GatewayID + "-" + hex.EncodeToString(sum[:8])
}

// GatewayConn is the gateway connection after Connect (nil before): the
// execd program reports the spool's gauges through it.
func (o *OmniCore) GatewayConn() gateway.Conn {
	return o.conn
}
