package poll

import (
	"sync/atomic"
	"testing"
	"time"
)

func TestEventuallyReturnsOnceTrue(t *testing.T) {
	var n atomic.Int32
	go func() {
		for range 3 {
			time.Sleep(5 * time.Millisecond)
			n.Add(1)
		}
	}()
	Eventually(t, 10*time.Second, "three increments", func() bool { return n.Load() == 3 })
}

// fatalRecorder records Fatalf instead of stopping the test.
type fatalRecorder struct {
	testing.TB
	msg string
}

func (f *fatalRecorder) Helper() {}
func (f *fatalRecorder) Fatalf(format string, args ...any) {
	f.msg = format
	panic(f)
}

func TestEventuallyFailsAfterDeadline(t *testing.T) {
	rec := &fatalRecorder{TB: t}
	calls := 0
	func() {
		defer func() {
			if r := recover(); r != rec {
				t.Fatalf("recovered %v, want the recorded Fatalf", r)
			}
		}()
		Eventually(rec, 30*time.Millisecond, "never", func() bool { calls++; return false })
	}()
	if rec.msg == "" || calls < 2 {
		t.Fatalf("Fatalf %q after %d checks, want a failure after several checks", rec.msg, calls)
	}
}
