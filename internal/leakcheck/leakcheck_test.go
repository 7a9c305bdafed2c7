package leakcheck

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { Main(m, nil) }

// TestFindWaitsForGoroutinesToEnd: a goroutine that ends within the grace
// period is not a leak; one that outlives it is reported.
func TestFindWaitsForGoroutinesToEnd(t *testing.T) {
	base := goleak.IgnoreCurrent()
	done := make(chan struct{})
	go func() {
		time.Sleep(time.Second) // longer than goleak.Find's own retries
		close(done)
	}()
	if err := Find(5*time.Second, base); err != nil {
		t.Errorf("a goroutine that ended after 1s reported as a leak: %v", err)
	}
	<-done

	stop := make(chan struct{})
	go func() { <-stop }()
	err := Find(300*time.Millisecond, base)
	close(stop)
	if err == nil || !strings.Contains(err.Error(), "TestFindWaitsForGoroutinesToEnd") {
		t.Errorf("a goroutine still running: %v, want it reported", err)
	}
}
