//go:build !linux

package e2e

import "os/exec"

// DieWithParent is a no-op where the kernel has no parent-death signal.
func DieWithParent(*exec.Cmd) {}
