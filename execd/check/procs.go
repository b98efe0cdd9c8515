package check

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
)

// runningWith returns the pid of a running Telegraf or telegraf-omnicore
// of this host whose command line names file (as given or absolute), 0
// when there is none or the platform has no /proc.
//
// Why: Telegraf with the plugins built in holds a gateway's connection
// without the sharing rendezvous that execd/share.Holder reads, and the
// execd program with TELEGRAF_OMNICORE_SHARING=off neither; connecting as
// the gateway would take their connection over. A process started with the
// checked file is the one that may hold it.
func runningWith(file string) int {
	abs, err := filepath.Abs(file)
	if err != nil {
		abs = file
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	self := os.Getpid()
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue
		}
		args := bytes.Split(bytes.TrimRight(raw, "\x00"), []byte{0})
		isTelegraf, names := false, false
		for _, a := range args {
			switch filepath.Base(string(a)) {
			case "telegraf", "telegraf-omnicore":
				isTelegraf = true
			}
			if s := string(a); s == file || s == abs || bytes.HasSuffix(a, []byte("="+abs)) || bytes.HasSuffix(a, []byte("="+file)) {
				names = true
			}
		}
		if isTelegraf && names {
			return pid
		}
	}
	return 0
}
