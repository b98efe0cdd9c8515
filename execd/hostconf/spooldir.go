package hostconf

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"time"

	"github.com/influxdata/telegraf"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/runner"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

// identityFile, in a spool directory, names the gateway and output it is the
// spool of. Directories without one are from versions whose directory name
// hashed the connection options too.
const identityFile = "identity"

// SpoolDir returns {state directory}/spool/{gateway_id}-{hash}, the
// hash covering the gateway's client ID and the output's alias: the spool's
// identity is the gateway and the output, not how the bridge is reached,
// so that editing servers (127.0.0.1 to localhost) keeps the spool. The
// directory is created private (0700) or checked, and its identity file
// written.
func SpoolDir(gatewayID, clientID, alias string) (string, error) {
	base, err := statedir.Resolve()
	if err != nil {
		return "", fmt.Errorf("spool: %w (or set spool_dir in [%s])", err, Table)
	}
	name := spoolName(gatewayID, clientID, alias)
	dir, err := statedir.Private(base, "spool", name)
	if err != nil {
		if runner.IsDiskError(err) {
			// A disk full or read-only is the runner's to ride out: it
			// starts with memory and creates the spool when it can.
			return filepath.Join(base, "spool", name), nil
		}
		return "", fmt.Errorf("spool: %w", err)
	}
	id := "client_id " + clientID + "\nalias " + alias + "\n"
	if b, err := os.ReadFile(filepath.Join(dir, identityFile)); err != nil || string(b) != id {
		// Best effort: a disk that cannot take it is the runner's to
		// report, and without it the directory is only taken for an
		// earlier identity's (which it is not: it has this name).
		_ = os.WriteFile(filepath.Join(dir, identityFile), []byte(id), 0o600)
	}
	return dir, nil
}

// spoolName is the default spool directory's name under {state}/spool.
func spoolName(gatewayID, clientID, alias string) string {
	sum := sha256.Sum256([]byte(clientID + "\x00" + alias))
	return gatewayID + "-" + hex.EncodeToString(sum[:8])
}

// SpoolPath is the directory SpoolDir returns, without creating or writing
// anything (telegraf-omnicore check reads a spool that may belong to another
// user's process).
func SpoolPath(gatewayID, clientID, alias string) (string, error) {
	base, err := statedir.Resolve()
	if err != nil {
		return "", fmt.Errorf("spool: %w (or set spool_dir in [%s])", err, Table)
	}
	return filepath.Join(base, "spool", spoolName(gatewayID, clientID, alias)), nil
}

// AdoptEarlierSpools moves into the spool dir what the spools of earlier
// identities of the same gateway hold: the directories
// {gateway_id}-{16 hex digits} next to dir without an identity file, left
// by versions whose directory name hashed the servers too (an edit of
// servers orphaned them). One still locked by a running process is left
// alone; one that cannot be read is reported at E! with its directory and
// size.
func AdoptEarlierSpools(dir, gatewayID string, opts spool.Options, log telegraf.Logger) {
	parent := filepath.Dir(dir)
	entries, err := os.ReadDir(parent)
	if err != nil {
		return
	}
	pattern := regexp.MustCompile(`^` + regexp.QuoteMeta(gatewayID) + `-[0-9a-f]{16}$`)
	var into *spool.Spool
	defer func() {
		if into != nil {
			if err := into.Close(); err != nil {
				log.Errorf("Closing the spool after adopting earlier spools: %v", err)
			}
		}
	}()
	for _, e := range entries {
		old := filepath.Join(parent, e.Name())
		if !e.IsDir() || old == dir || !pattern.MatchString(e.Name()) {
			continue
		}
		if _, err := os.Stat(filepath.Join(old, identityFile)); err == nil || !errors.Is(err, fs.ErrNotExist) {
			continue // another output's spool of this version
		}
		if into == nil {
			// Bounded: stdin is not read yet, and a spool locked by a
			// process still stopping is adopted at the next start.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			o := opts
			o.Dir, o.Log = dir, log
			into, err = spool.Open(ctx, o)
			cancel()
			if err != nil {
				log.Errorf("Not adopting the spool %s of an earlier configuration of gateway %s (%d bytes) now: opening %s: %v",
					old, gatewayID, dirSize(old), dir, err)
				into = nil
				return
			}
		}
		adoptSpool(into, old, gatewayID, opts, log)
	}
}

// adoptSpool appends what the spool in old holds to into and removes old
// once it is empty.
func adoptSpool(into *spool.Spool, old, gatewayID string, opts spool.Options, log telegraf.Logger) {
	size := dirSize(old)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	o := opts
	o.Dir, o.Log = old, log
	from, err := spool.Open(ctx, o)
	if err != nil {
		if ctx.Err() != nil {
			log.Debugf("Not adopting the spool %s: another process holds it", old)
			return
		}
		log.Errorf("The spool %s of an earlier configuration of gateway %s (%d bytes) cannot be opened, its metrics are not sent: %v", old, gatewayID, size, err)
		return
	}
	adopted, left := 0, false
	for {
		recs, err := from.Read(1000)
		if err != nil || len(recs) == 0 {
			break
		}
		for _, rec := range recs {
			if err := into.Append(rec.Payload); err != nil {
				if errors.Is(err, spool.ErrTooLarge) {
					continue
				}
				left = true
				break
			}
			adopted++
			_ = from.Release(rec.End)
		}
		if left {
			break
		}
	}
	if err := into.Commit(); err != nil {
		left = true
	}
	stats := from.Stats()
	_ = from.Close()
	if left || stats.Records > 0 {
		log.Errorf("Adopted %d metrics of the spool %s, left by an earlier configuration of gateway %s; %d metrics (%d bytes) stay there, not sent: the spool is full or its disk failed",
			adopted, old, gatewayID, stats.Records, dirSize(old))
		return
	}
	if err := os.RemoveAll(old); err != nil {
		log.Warnf("Removing the adopted spool %s: %v", old, err)
	}
	if adopted > 0 {
		log.Infof("Adopted %d metrics (%d bytes) from the spool %s, left by an earlier configuration of gateway %s: they are sent from this one", adopted, size, old, gatewayID)
	}
}

// dirSize is the bytes of the files in dir (0 when it cannot be read).
func dirSize(dir string) int64 {
	var n int64
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if info, err := e.Info(); err == nil && info.Mode().IsRegular() {
			n += info.Size()
		}
	}
	return n
}
