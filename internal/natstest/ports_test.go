package natstest

import "testing"

// TestFreePortsNeverRepeats: ports handed out one at a time and released
// at once (as a test does that starts its server later) are never handed
// out again in the same process. 400 draws from the 10,000-port range
// would repeat one with near certainty if each draw were independent.
func TestFreePortsNeverRepeats(t *testing.T) {
	privateRegistry(t) // 400 reservations would crowd the machine's registry
	seen := map[int]int{}
	for i := range 400 {
		p := FreePorts(t, 1)[0]
		if j, ok := seen[p]; ok {
			t.Fatalf("port %d handed out by draw %d and again by draw %d", p, j, i)
		}
		seen[p] = i
	}
}

// TestFreePortsSharedRegistry: the ports a process hands out are in the
// registry every test process on the machine reads before drawing, so
// another package's test binary does not draw them while this one has not
// bound them yet.
func TestFreePortsSharedRegistry(t *testing.T) {
	if !haveSharedPorts {
		t.Skip("no shared registry on this platform")
	}
	privateRegistry(t)
	ports := FreePorts(t, 3)
	var seen map[int]bool
	withSharedPorts(func(shared map[int]bool) []int {
		seen = shared
		return nil
	})
	for _, p := range ports {
		if !seen[p] {
			t.Errorf("port %d is not in the shared registry %s", p, sharedPortsFile())
		}
	}
}

// privateRegistry points the shared registry at a file of the test's own
// for its duration.
func privateRegistry(t *testing.T) {
	dir := t.TempDir()
	old := sharedPortsFile
	sharedPortsFile = func() string { return dir + "/ports" }
	t.Cleanup(func() { sharedPortsFile = old })
}
