package share

// OwnsConnection implements gateway.ConnectionOwner: true while this
// process owns the gateway's bridge connection (and so publishes its
// health state), false while it uses another process's.
func (sc *shareConn) OwnsConnection() bool { return sc.owns() }
