// Package poll waits in tests for a condition that other goroutines or
// processes make true, without sleeping a guessed time.
package poll

import (
	"testing"
	"time"
)

// Eventually calls cond until it returns true and fails the test (Fatalf,
// naming what) if that has not happened within the given time. It checks
// often at first (from 1ms, doubling to 10ms between checks), so a quick
// condition costs little, and stays cheap while a slow one is awaited.
// Like t.Fatalf it must be called from the test's goroutine.
func Eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	pause := time.Millisecond
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", within, what)
		}
		time.Sleep(pause)
		pause = min(2*pause, 10*time.Millisecond)
	}
}
