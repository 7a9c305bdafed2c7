//go:build unix

package natsjs

import (
	"os"
	"syscall"
)

// pauseSignals pause and resume a replica process.
var pauseSignals = [2]os.Signal{syscall.SIGSTOP, syscall.SIGCONT}
