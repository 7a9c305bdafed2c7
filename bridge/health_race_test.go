package bridge

import (
	"errors"
	"io"
	"log/slog"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

// A failure reported concurrently with a success must not leave the broker
// marked failing after later successes: /readyz would stay 503 for good
// while publishes flow. The test holds the Health lock (as Ready does while
// it builds its answer) so that the failure waits for it, lets the success
// through, and releases the lock the moment the success took the flag.
func TestReadinessRecoversAfterConcurrentFailureAndSuccess(t *testing.T) {
	if runtime.GOMAXPROCS(0) < 2 {
		t.Skip("needs two threads to interleave")
	}
	h := NewHealth(nil, slog.New(slog.NewTextHandler(io.Discard, nil)), nil)
	const what = "publishing to broker x"
	boom := errors.New("boom")
	for i := range 20000 {
		var flag atomic.Bool
		var wg sync.WaitGroup
		var aStarted atomic.Bool
		h.mu.Lock()
		wg.Add(2)
		go func() { defer wg.Done(); aStarted.Store(true); markFailed(h, &flag, what, boom) }()
		for !aStarted.Load() {
			runtime.Gosched()
		}
		for range 100 {
			if flag.Load() {
				break
			}
			runtime.Gosched()
		}
		go func() { defer wg.Done(); markRecovered(h, &flag, what) }()
		for range 1000 {
			if !flag.Load() {
				break
			}
			runtime.Gosched()
		}
		h.mu.Unlock()
		wg.Wait()
		// A later success: the broker works again.
		markRecovered(h, &flag, what)
		h.mu.Lock()
		r := h.failing[what]
		failing := r != nil && !r.ok
		delete(h.failing, what)
		h.mu.Unlock()
		if failing {
			t.Fatalf("iteration %d: broker still failing after a later success", i)
		}
	}
}
