//go:build !unix

package natstest

const haveSharedPorts = false

// withSharedPorts: no registry shared between processes here; draws are
// only kept apart within one process.
func withSharedPorts(draw func(shared map[int]bool) []int) { draw(nil) }
