//go:build unix

package main

import (
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// takeForeground makes the process the leader of its own process group and
// that group the terminal's foreground group, when stdin is a terminal whose
// foreground group is the process's own. Ctrl-C then reaches this process
// only, not the programs that started it: `make run` and `go run` would
// otherwise take the same SIGINT as an interruption of their own and exit
// with an error (go run: status 1; make: killed by the signal), although
// the bridge stopped cleanly. The returned function gives the terminal back
// to the original group; it is a no-op when nothing was changed, as when a
// shell with job control already started the process as a group leader.
func takeForeground() (restore func()) {
	restore = func() {}
	fd := int(os.Stdin.Fd())
	fg, err := unix.IoctlGetInt(fd, unix.TIOCGPGRP)
	own := syscall.Getpgrp()
	if err != nil || fg != own || own == os.Getpid() {
		return restore
	}
	// A background group changing the foreground group gets SIGTTOU,
	// which would stop the process; so would giving the terminal back.
	signal.Ignore(syscall.SIGTTOU)
	if syscall.Setpgid(0, 0) != nil {
		return restore
	}
	if unix.IoctlSetPointerInt(fd, unix.TIOCSPGRP, os.Getpid()) != nil {
		_ = syscall.Setpgid(0, own)
		return restore
	}
	return func() { _ = unix.IoctlSetPointerInt(fd, unix.TIOCSPGRP, own) }
}
