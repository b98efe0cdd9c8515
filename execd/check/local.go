package check

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"time"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/hostconf"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/spool"
	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
	"github.com/telegraf-omnicore/telegraf-omnicore/plugins/common/omnicore"
)

// checkKey checks the gateway's private key file: it exists, nobody but its
// owner may read it, and it is a private key of the algorithm's type
// (omnicore.LoadSigner says which when it is not).
// usable is false when the key cannot sign a token at all (a key file that
// is only too open still can).
func (r *runner) checkKey(g *gatewayCheck) (usable bool) {
	path, alg := g.opts.PrivateKey, g.opts.Algorithm
	name := fmt.Sprintf("key file %s (gateway %s)", path, g.opts.GatewayID)
	if path == "" {
		r.fail(name, "private_key is not set", "set private_key to the path of the gateway's PEM private key")
		return false
	}
	fi, err := os.Stat(path)
	if err != nil {
		r.fail(name, fmt.Sprintf("cannot read it: %v", errors.Unwrap(err)),
			"put the gateway's private key there, or point private_key at it")
		return false
	}
	if _, err := omnicore.LoadSigner(path, alg); err != nil {
		r.fail(name, err.Error(), "use the gateway's private key in PEM, of the type algorithm names")
		return false
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		r.fail(name, fmt.Sprintf("mode %04o: group or others may read the key", perm),
			fmt.Sprintf("chmod 600 %s (owned by the user Telegraf runs as)", path))
		return true
	}
	r.pass(name, "private %s key, mode %04o", alg, fi.Mode().Perm())
	return true
}

// checkStateDir checks the state directory as the spool and the sharing
// rendezvous need it (statedir says what is wrong and the fix).
func (r *runner) checkStateDir() {
	name := "state directory"
	dir, err := statedir.Resolve()
	r.stateDirBad = err != nil
	if err != nil {
		r.fail(name, err.Error(), "run the check as the user Telegraf runs as (sudo -u telegraf ...); otherwise see the message ($STATE_DIRECTORY chooses another directory)")
		return
	}
	name += " " + dir
	fi, err := os.Lstat(dir)
	if err != nil {
		r.fail(name, err.Error(), "create it, owned by the user Telegraf runs as")
		return
	}
	owner := "?"
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		owner = fmt.Sprintf("uid %d", st.Uid)
	}
	r.pass(name, "exists, owner %s, mode %04o", owner, fi.Mode().Perm())
}

// checkSpool reports an output's spool: its size and oldest record, read
// without opening it (a running output holds its lock; see spool.Inspect).
func (r *runner) checkSpool(p *plugin) {
	if p.output == nil || p.initErr != nil || !p.host.Spool {
		return
	}
	name := "spool of " + p.name()
	if p.host.SpoolDir == "" && r.stateDirBad {
		r.skip(name, "it is in the state directory, which fails its check above")
		return
	}
	dir := p.host.SpoolDir
	var err error
	if dir == "" {
		gatewayID, clientID := p.output.GatewayIdentity()
		dir, err = hostconf.SpoolPath(gatewayID, clientID, p.alias)
	}
	if err != nil {
		r.fail(name, err.Error(), "set spool_dir to a private directory of the user Telegraf runs as")
		return
	}
	name = "spool " + dir
	if err := statedir.CheckPrivate(dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		r.fail(name, err.Error(), "run the check as the user Telegraf runs as; otherwise see the message")
		return
	}
	limit := int64(p.host.SpoolMaxSize)
	sum, err := spool.Inspect(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		r.pass(name, "empty (not created yet)")
	case err != nil:
		r.fail(name, err.Error(), "run the check as the user Telegraf runs as")
	case sum.Oldest.IsZero():
		r.pass(name, "%d bytes in %d segment files, no record waiting (limit %d bytes)", sum.Bytes, sum.Segments, limit)
	default:
		r.pass(name, "%d bytes in %d segment files (limit %d bytes), oldest record waiting since %s (%s ago)",
			sum.Bytes, sum.Segments, limit, sum.Oldest.UTC().Format(time.RFC3339), r.env.now().Sub(sum.Oldest).Round(time.Second))
	}
}
