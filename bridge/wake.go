package bridge

import (
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// retryWaiters are the messages whose retry timer runs after a failure of
// one target (or of the dedupe store). The first success there wakes them
// all: their retries go out at once instead of up to Retry.Max later, so
// that the keys held up by a leader election follow the first message
// that got through within milliseconds, not spread over the next second.
// Waking only brings the retry of a key's active message forward; the
// order of the key is untouched. The hot path (a success while nothing
// waits) is one atomic load.
type retryWaiters struct {
	n  atomic.Int64
	mu sync.Mutex
	// m maps a task to the retry timer it waits on. A task is pooled: the
	// timer tells whether the entry is still its current wait (a task
	// that moved on, or was reused, has another timer or none). It holds
	// at most one entry per task; entries no longer current are dropped
	// when the map has doubled since the last sweep (a target that never
	// succeeds again, its cell marked down, would otherwise keep every
	// task that once retried on it).
	m       map[*task]*time.Timer
	sweepAt int
}

// add records that t waits on tm. Called without t.mu held.
func (w *retryWaiters) add(t *task, tm *time.Timer) {
	w.mu.Lock()
	if w.m == nil {
		w.m = map[*task]*time.Timer{}
	}
	w.m[t] = tm
	if len(w.m) >= max(w.sweepAt, 1024) {
		for o, otm := range w.m {
			o.mu.Lock()
			if o.timer != otm {
				delete(w.m, o)
			}
			o.mu.Unlock()
		}
		w.sweepAt = 2 * len(w.m)
	}
	w.n.Store(int64(len(w.m)))
	w.mu.Unlock()
}

// wake fires, at once, every recorded retry timer that is still its task's
// current one.
func (w *retryWaiters) wake() {
	if w.n.Load() == 0 {
		return
	}
	w.mu.Lock()
	m := w.m
	w.m = nil
	w.n.Store(0)
	w.mu.Unlock()
	for t, tm := range m {
		t.mu.Lock()
		if t.timer == tm && tm.Stop() {
			tm.Reset(0)
		}
		t.mu.Unlock()
	}
}

// spread draws a retry delay between half of d and d. The keys a fault
// holds up fail together (a leader election answers every publish with no
// responders at once) and would otherwise retry in lockstep, one wave per
// Retry.Max: the first retry after the election would then come up to
// Retry.Max late. Spread, some key retries soon after any moment, and its
// success wakes the others (retryWaiters).
func spread(d time.Duration) time.Duration {
	if d < 2 {
		return d
	}
	return d/2 + rand.N(d/2+1)
}
