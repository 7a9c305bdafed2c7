//go:build unix

package natsjs

import (
	"syscall"
	"time"
)

// processCPU is the CPU time (user + system) this process has used. With
// the server in another process it is the client side's cost alone, which
// a busy machine distorts far less than wall-clock rates.
func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
