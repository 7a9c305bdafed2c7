package natstest

import "testing"

// TestFreePortsNeverRepeats: ports handed out one at a time and released
// at once (as a test does that starts its server later) are never handed
// out again in the same process. 600 draws from the 10,000-port range
// would repeat one with near certainty if each draw were independent.
func TestFreePortsNeverRepeats(t *testing.T) {
	seen := map[int]int{}
	for i := range 600 {
		p := FreePorts(t, 1)[0]
		if j, ok := seen[p]; ok {
			t.Fatalf("port %d handed out by draw %d and again by draw %d", p, j, i)
		}
		seen[p] = i
	}
}
