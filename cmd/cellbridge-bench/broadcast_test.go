package main

import (
	"path/filepath"
	"testing"
)

// TestBroadcastSmoke runs both broadcast variants on a few events through
// the harness's child code: four verified copies of every event.
func TestBroadcastSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers")
	}
	rules, _ := filepath.Abs("../../bench/rules")
	for _, v := range []string{"A-bc", "B-bc"} {
		t.Run(v, func(t *testing.T) {
			res, err := runChild(childSpec{Variant: v, N: 2000, Seed: 5, Rules: rules})
			if err != nil {
				t.Fatal(err)
			}
			if !res.Verified || res.Delivered != 4*2000 || res.Unique != 2000 || res.Extra["copies"] != 4*2000 {
				t.Fatalf("%s: verified %v (%s), %d delivered, %d unique, extra %v", v, res.Verified, res.VerifyNote, res.Delivered, res.Unique, res.Extra)
			}
			if res.MsgsPerS <= 0 || res.Extra["copies_per_s"].(float64) != 4*res.MsgsPerS {
				t.Fatalf("%s: %v events/s, %v copies/s", v, res.MsgsPerS, res.Extra["copies_per_s"])
			}
		})
	}
}
