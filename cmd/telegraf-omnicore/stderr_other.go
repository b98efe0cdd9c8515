//go:build !linux

package main

import (
	"os"
	"time"
)

// waitStderrRead is a no-op where FIONREAD on a pipe is not available; see
// the Linux version.
func waitStderrRead(*os.File, time.Duration) bool { return true }
