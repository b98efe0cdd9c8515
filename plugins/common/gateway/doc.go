// Package gateway is the OmniCore gateway session: one MQTT connection to the
// bridge that speaks for many devices. It owns the connection (JWT minting and
// renewal, reconnects with back-off), the attachments (pipelined QoS 1
// attaches, re-attached after every connect), publishing with acknowledgement,
// and routing of inbound config, commands and errors. Both plugins use it
// through the Conn interface and never see paho.
//
// One file per job of the Session:
//
//   - api.go: the Conn interface, messages, errors and Stats the plugins see.
//   - session.go: the Session type, its life cycle (New, Start, Close).
//   - connection.go: the connection owner: connects with a fresh JWT,
//     renews it, rebuilds per-connection state, reconnects with back-off and
//     reports a probable duplicate client ID.
//   - devices.go: the device table: attaches (pipelined, joined, refused
//     with back-off), detaches, max_devices and detach_idle.
//   - publish.go: publishing: the in-flight window, the publishers that
//     hand messages to paho, the acknowledgement clock, resends after a late
//     bridge error, and state pacing.
//   - inbound.go: subscriptions and the inbound router: config, commands and
//     errors from the bridge to the handlers.
//   - stats.go: the counters behind Stats.
//   - netconn.go, coalesce.go, quickack_*.go: the network connection under
//     paho.
//   - options.go, optioncheck.go, registry.go, attach.go: the plugins'
//     options, their validation, the in-process session registry, and
//     AttachAll.
package gateway
