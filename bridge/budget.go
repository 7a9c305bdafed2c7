package bridge

import (
	"context"
	"sync"
)

// budget bounds the messages in flight. Unlike a channel semaphore it may be
// over-committed (force): released parked messages re-enter the in-flight set
// from goroutines that must not block.
type budget struct {
	mu   sync.Mutex
	n    int
	max  int
	wait chan struct{} // closed when n drops below max; nil when no waiter
}

// acquire takes one slot, waiting while the budget is exhausted. It returns
// ctx's error, or errDraining when stop is closed first.
func (b *budget) acquire(ctx context.Context, stop <-chan struct{}) error {
	for {
		b.mu.Lock()
		if b.n < b.max {
			b.n++
			b.mu.Unlock()
			return nil
		}
		if b.wait == nil {
			b.wait = make(chan struct{})
		}
		w := b.wait
		b.mu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			return ctx.Err()
		case <-stop:
			return errDraining
		}
	}
}

// release returns k slots.
func (b *budget) release(k int) {
	b.mu.Lock()
	b.n -= k
	if b.wait != nil && b.n < b.max {
		close(b.wait)
		b.wait = nil
	}
	b.mu.Unlock()
}

// force takes k slots without waiting.
func (b *budget) force(k int) {
	b.mu.Lock()
	b.n += k
	b.mu.Unlock()
}

func (b *budget) used() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n
}
