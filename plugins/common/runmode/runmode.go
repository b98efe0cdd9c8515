// Package runmode tells the plugins how they are run: compiled into Telegraf
// (the default) or by the execd binary, cmd/telegraf-omnicore, under
// Telegraf's outputs.execd and inputs.execd. The two differ in what the
// plugins must do themselves:
//
//   - Inside Telegraf, Telegraf's output buffer keeps what a Write did not
//     deliver (partial writes), the statistics are also exported through
//     selfstat (internal_omnicore, gathered by inputs.internal), and parsed
//     metrics go to Telegraf as they are.
//   - Under execd, the execd binary's own loop retries a failed batch (the
//     output skips what an earlier attempt settled), nothing is exported
//     through selfstat (nothing gathers it in the binary's process), and
//     parsed metrics must survive line protocol on the way to Telegraf.
//
// The input's Gather emits the omnicore_gateway statistics on both.
//
// The execd binary calls SetExecd before it loads a plugin; nothing else
// does.
package runmode

import "sync/atomic"

var execd atomic.Bool

// SetExecd marks this process as the execd binary. Call it before loading
// any plugin.
func SetExecd() { execd.Store(true) }

// Execd reports whether this process is the execd binary; false inside
// Telegraf.
func Execd() bool { return execd.Load() }
