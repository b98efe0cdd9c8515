package share

import (
	"fmt"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/gateway"
)

// errOwnerSilent is the error type (field errors_share_owner_silent) that
// counts the times a process heard nothing from its owner for shareSilence.
const errOwnerSilent = "share_owner_silent"

// watch reports, at error level, what keeps this process from delivering:
// an owner that has not been heard from (stopped or hung: its lock cannot
// be taken from it) and calls that made no progress for stallReport (with
// the reason, at most once a minute); an owner that cannot connect to the
// bridge (with the owner's reason, at most once a minute) at debug level.
func (sc *shareConn) watch() {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-sc.ctx.Done():
			return
		case now := <-t.C:
			sc.checkOwner(now)
			sc.checkStalls(now)
		}
	}
}

func (sc *shareConn) checkOwner(now time.Time) {
	sc.mu.Lock()
	rc, _ := sc.be.(*remoteConn)
	sc.mu.Unlock()
	if rc == nil {
		return
	}
	silent := now.Sub(rc.heard())
	switch {
	case silent >= shareSilence && !rc.silentReported:
		rc.silentReported = true
		sc.mu.Lock()
		sc.ownerSilent++
		sc.mu.Unlock()
		sc.log.Errorf("Process %d, which owns the connection of gateway %q, has not been heard from for %s: it is stopped or hung. Messages of this process wait for it, and its lock %q cannot be taken from it while it lives",
			rc.ownerPID, sc.cfg.GatewayID, silent.Round(time.Second), sc.rz.lock)
	case silent < shareSilence && rc.silentReported:
		rc.silentReported = false
		sc.log.Infof("Process %d, which owns the connection of gateway %q, answers again", rc.ownerPID, sc.cfg.GatewayID)
	}
	connected, ownerErr := rc.ownerHealth()
	if connected || ownerErr == "" {
		return
	}
	sc.mu.Lock()
	due := now.Sub(sc.lastOwnerErrLog) >= reportEvery
	if due {
		sc.lastOwnerErrLog = now
	}
	sc.mu.Unlock()
	if due {
		// Debug: the owner's session tells the outage (E! when it begins,
		// W! a minute, I! when it ends) in its own log, which under execd
		// is the same Telegraf's; one outage is one story.
		sc.log.Debugf("Process %d, which owns the connection of gateway %q, cannot connect to the bridge: %s", rc.ownerPID, sc.cfg.GatewayID, ownerErr)
	}
}

func (sc *shareConn) checkStalls(now time.Time) {
	sc.mu.Lock()
	var oldest time.Time
	for _, at := range sc.calls {
		if oldest.IsZero() || at.Before(oldest) {
			oldest = at
		}
	}
	n := len(sc.calls)
	due := !oldest.IsZero() && now.Sub(oldest) >= stallReport && now.Sub(sc.lastStallLog) >= reportEvery
	if due {
		sc.lastStallLog = now
	}
	sc.mu.Unlock()
	if due {
		sc.log.Errorf("%d messages or attaches of gateway %q are waiting, the oldest for %s: %s",
			n, sc.cfg.GatewayID, now.Sub(oldest).Round(time.Second), sc.stallReason(now))
	}
}

// stallReason says why calls make no progress, as far as this process can
// tell.
func (sc *shareConn) stallReason(now time.Time) string {
	sc.mu.Lock()
	be, conflict, dialErr := sc.be, sc.conflict, sc.dialErr
	sc.mu.Unlock()
	switch b := be.(type) {
	case nil:
		if conflict != nil {
			return conflict.Error()
		}
		return fmt.Sprintf("no process serving the connection can be reached (the lock %q is held by pid %s): %v", sc.rz.lock, lockHolder(sc.rz), dialErr)
	case *remoteConn:
		if silent := now.Sub(b.heard()); silent >= shareSilence {
			return fmt.Sprintf("process %d, which owns the connection, has not been heard from for %s (stopped or hung)", b.ownerPID, silent.Round(time.Second))
		}
		if connected, ownerErr := b.ownerHealth(); !connected {
			if ownerErr == "" {
				ownerErr = "connecting"
			}
			return fmt.Sprintf("process %d, which owns the connection, cannot connect to the bridge: %s", b.ownerPID, ownerErr)
		}
		return fmt.Sprintf("process %d owns the connection and is connected, but the bridge has not acknowledged them (see max_message_rate, max_inflight, and that process's log)", b.ownerPID)
	case *gateway.Session:
		connected, err := b.Health()
		if !connected {
			if err == nil {
				return "connecting to the bridge"
			}
			return fmt.Sprintf("cannot connect to the bridge: %v", err)
		}
		return "connected, but the bridge has not acknowledged them (see max_message_rate and max_inflight)"
	}
	return "unknown"
}
