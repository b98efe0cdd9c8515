//go:build linux || darwin || freebsd

package share

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/telegraf-omnicore/telegraf-omnicore/execd/statedir"
)

// Holder tells whether a running process of this host holds the connection
// of the gateway with client ID clientID through the sharing rendezvous,
// and that process's pid. It only reads: it takes no lock and creates no
// directory, so `telegraf-omnicore check` can ask it beside a running
// Telegraf without stealing or handing over anything.
//
// An owner writes its pid into the lock file and removes the file before it
// unlocks it, so a lock file naming a live process means that process holds
// the gateway; a crashed owner leaves a file naming a dead pid, which is not
// held. A reused pid can only make Holder say "held" wrongly, the safe side
// for a caller that then leaves the gateway alone.
func Holder(clientID string) (pid int, held bool, err error) {
	dir := os.Getenv(EnvRuntimeDir)
	if dir == "" {
		base, err := statedir.Resolve()
		if err != nil {
			return 0, false, err
		}
		dir = filepath.Join(base, "share")
	}
	rz := &rendezvous{lock: filepath.Join(dir, rendezvousName(clientID)+".lock")}
	if _, err := os.Lstat(rz.lock); errors.Is(err, fs.ErrNotExist) {
		return 0, false, nil
	} else if err != nil {
		return 0, false, err
	}
	pid, err = strconv.Atoi(lockHolder(rz))
	if err != nil || pid <= 0 {
		// An owner that just took the lock and is writing its pid.
		return 0, true, nil
	}
	if err := syscall.Kill(pid, 0); err == nil || errors.Is(err, syscall.EPERM) {
		return pid, true, nil
	}
	return pid, false, nil
}
