package gateway

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"
	"time"
)

// A host claim tells the other processes of this host that this process
// connects as a gateway, so that a second process of the same gateway (a
// `telegraf --test` beside the Telegraf service, two Telegraf builds, an
// execd and a built-in setup) waits instead of connecting: the bridge allows
// one connection per client ID and kicks the older one, and two processes
// reconnecting in turn kick each other for ever.
//
// The claim is an abstract Unix socket (Linux) named after the client ID
// and the bridge's address as servers spells it (so that test bridges on
// other ports of one host do not wait for each other; two spellings of one
// bridge are left to the bridge-side detection of a duplicate client ID):
// it needs no file or directory (Telegraf built with the plugins has no
// state directory), every user of the host sees it (a root `telegraf
// --test` and the telegraf service), and the kernel releases it when the
// process ends, even on SIGKILL. Elsewhere there is no claim (claimHost
// always succeeds) and the bridge-side detection of a duplicate client ID
// is what remains.

// ClaimHolder describes the process that holds a gateway's host claim.
type ClaimHolder struct {
	PID int
	UID int
}

func (h ClaimHolder) String() string {
	return fmt.Sprintf("process %d (uid %d)", h.PID, h.UID)
}

// claimName is the abstract socket's name for a client ID at servers: a
// hash, so the name says nothing of the gateway and has a fixed length.
func claimName(clientID string, servers []string) string {
	sorted := slices.Clone(servers)
	slices.Sort(sorted)
	sum := sha256.Sum256([]byte(clientID + "\x00" + strings.Join(sorted, ",")))
	return "@telegraf-omnicore/gateway/" + hex.EncodeToString(sum[:16])
}

// HostClaimHolder reports the process of this host that holds the claim of
// clientID at servers, if any (for `telegraf-omnicore check`): ok is false
// when no process holds it or claims are not supported here.
func HostClaimHolder(clientID string, servers []string) (holder ClaimHolder, ok bool) {
	return claimHolder(claimName(clientID, servers))
}

const (
	// claimPoll is how often a session waiting for its host claim tries
	// again: a process handing the gateway over (execd's takeover, a
	// restart) releases it within a few seconds.
	claimPoll = 250 * time.Millisecond
	// claimGrace is how long a session waits for the claim before saying
	// why it does not connect.
	claimGrace = 3 * time.Second
)

// waitForHostClaim takes the gateway's host claim before the first connect,
// waiting while a trusted process of this host holds it; ok is false when
// the session closed meanwhile. A nil claim (claims unsupported, failing, or
// held by a process not trusted) lets the session connect without one: the
// bridge-side detection of a duplicate client ID (noteLoss) still reports a
// kick war.
func (s *Session) waitForHostClaim() (claim *hostClaim, ok bool) {
	if s.hostClaim == "" {
		return nil, true
	}
	var waitingSince time.Time
	reported := false
	for {
		c, holder, ignored, err := claimHost(s.hostClaim)
		switch {
		case err != nil:
			s.log.Warnf("Cannot claim gateway %q on this host (%v): connecting without a claim, so a second process of this gateway here would not be stopped from kicking this one", s.cfg.GatewayID, err)
			return nil, true
		case ignored:
			s.log.Warnf("%s, not of this user nor root, holds the host claim of gateway %q: ignored, connecting (a process of another user must not keep this gateway off the bridge)", holder, s.cfg.GatewayID)
			return nil, true
		case c != nil:
			if reported {
				s.log.Infof("No other process of this host connects as gateway %q any more: connecting", s.cfg.GatewayID)
			}
			return c, true
		}
		if waitingSince.IsZero() {
			waitingSince = time.Now()
		}
		if !reported && holder.PID != 0 && time.Since(waitingSince) >= claimGrace {
			err := fmt.Errorf("%s on this host connects as gateway %q", holder, s.cfg.GatewayID)
			s.setLastErr(err)
			s.log.Errorf("Not connecting as %q: %v, and a second connection would kick it off the bridge (one connection per client ID); waiting until it stops. Stop the other process (another Telegraf, or a telegraf --test beside the service) or give one of them another gateway_id", s.clientID, err)
			reported = true
		}
		if !sleepCtx(s.ctx, claimPoll) {
			return nil, false
		}
	}
}
