//go:build !(linux || darwin || freebsd)

package share

import (
	"errors"
	"io/fs"
	"net"
	"os"
)

// sharingSupported is false here: without flock and peer credentials every
// process keeps its own connection (see SHARING.md).
const sharingSupported = false

var errNoSharing = errors.New("cross-process connection sharing is not supported on this platform")

func tryLock(string) (*os.File, error) { return nil, errNoSharing }

func fileOwner(fs.FileInfo) (int, bool) { return 0, false }

func connCredentials(*net.UnixConn) (peerCred, error) { return peerCred{}, errNoSharing }
