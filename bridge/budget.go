package bridge

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// budget bounds the messages in flight. Taking and returning a slot is one
// atomic add while the budget is not exhausted; only waiters use the mutex.
// Unlike a channel semaphore it may be over-committed (force): released
// parked messages re-enter the in-flight set from goroutines that must not
// block.
type budget struct {
	n       atomic.Int64
	max     int64
	waiters atomic.Int64
	mu      sync.Mutex
	wait    chan struct{} // closed when slots were returned; nil when nobody waits
}

// try takes one slot if the budget has one.
func (b *budget) try() bool {
	if b.n.Add(1) <= b.max {
		return true
	}
	b.n.Add(-1)
	return false
}

// await takes one slot, waiting while the budget is exhausted (try failed a
// moment ago). It returns ctx's error, or errDraining when stop is closed
// first.
//
// While it waits, t's message (not yet tracked, so the pipeline's heartbeat
// does not see it) is sent ErrInProgress every beat, so that its source does
// not redeliver it while it only waits for a slot (a target that fails for
// longer than AckWait fills the budget). No beat for a revoked delivery, as
// in Pipeline.heartbeat. beat <= 0 sends none.
func (b *budget) await(ctx context.Context, stop <-chan struct{}, t *task, beat time.Duration) error {
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		if b.n.Add(1) <= b.max {
			return nil
		}
		b.n.Add(-1)
		b.mu.Lock()
		b.waiters.Add(1)
		if b.wait == nil {
			b.wait = make(chan struct{})
		}
		w := b.wait
		// Check again after announcing the wait: a release either saw the
		// waiter count or freed the slot before this load.
		free := b.n.Load() < b.max
		b.mu.Unlock()
		if !free && timer == nil && beat > 0 {
			timer = time.NewTimer(beat)
		}
		for !free {
			var tick <-chan time.Time
			if timer != nil {
				tick = timer.C
			}
			select {
			case <-w:
				free = true
			case <-tick:
				if !t.epoch.Revoked() {
					_ = t.ack(context.Background(), ErrInProgress)
				}
				timer.Reset(beat)
			case <-ctx.Done():
				b.waiters.Add(-1)
				return ctx.Err()
			case <-stop:
				b.waiters.Add(-1)
				return errDraining
			}
		}
		b.waiters.Add(-1)
	}
}

// release returns k slots.
func (b *budget) release(k int) {
	b.n.Add(-int64(k))
	if b.waiters.Load() > 0 {
		b.mu.Lock()
		if b.wait != nil {
			close(b.wait)
			b.wait = nil
		}
		b.mu.Unlock()
	}
}

// force takes k slots without waiting.
func (b *budget) force(k int) { b.n.Add(int64(k)) }

func (b *budget) used() int { return int(b.n.Load()) }
