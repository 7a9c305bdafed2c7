package natstest

import "syscall"

// ChildSysProcAttr is the process attribute of every child a test starts
// (servers, bridges): the kernel kills the child when the test binary dies
// (even by SIGKILL, when no cleanup runs), so that no process outlives its
// test.
//
// The signal follows the death of the thread that started the child; the
// Go runtime does not end its threads while the program runs (only those
// of goroutines that exit while locked to theirs, which these are not).
func ChildSysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
