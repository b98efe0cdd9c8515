package e2e

import (
	"os/exec"
	"syscall"
)

// DieWithParent makes the kernel send SIGTERM to cmd's process when the
// process that started it dies (a test binary killed by its timeout, a demo
// interrupted hard), so that no Telegraf or emulator is left behind.
func DieWithParent(cmd *exec.Cmd) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Pdeathsig = syscall.SIGTERM
}
