package gateway

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
)

// A host claim tells the other processes of this host that this process
// connects as a gateway, so that a second process of the same gateway (a
// `telegraf --test` beside the Telegraf service, two Telegraf builds, an
// execd and a built-in setup) waits instead of connecting: the bridge allows
// one connection per client ID and kicks the older one, and two processes
// reconnecting in turn kick each other for ever.
//
// The claim is an abstract Unix socket (Linux) named after the client ID:
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

// claimName is the abstract socket's name for a client ID: a hash, so the
// name says nothing of the gateway and has a fixed length.
func claimName(clientID string) string {
	sum := sha256.Sum256([]byte(clientID))
	return "@telegraf-omnicore/gateway/" + hex.EncodeToString(sum[:16])
}

// HostClaimHolder reports the process of this host that holds clientID's
// claim, if any (for `telegraf-omnicore check`): ok is false when no process
// holds it or claims are not supported here.
func HostClaimHolder(clientID string) (holder ClaimHolder, ok bool) {
	return claimHolder(claimName(clientID))
}
