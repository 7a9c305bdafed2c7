//go:build !linux

package natstest

import "syscall"

// ChildSysProcAttr is the process attribute of every child a test starts:
// only Linux can tie a child's life to its parent's; elsewhere the test's
// cleanup alone kills the children.
func ChildSysProcAttr() *syscall.SysProcAttr { return nil }
