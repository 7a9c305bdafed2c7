//go:build !unix

package main

// takeForeground does nothing where there are no process groups.
func takeForeground() (restore func()) { return func() {} }
