package bridge

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/internal/poll"
)

// Messages waiting for their retry after a target failed go out as soon as
// a publish to that target succeeds (a leader election ended), not when
// their backoff ends: here the backoff is a minute, and every message
// arrives within seconds of the target's recovery.
func TestRetriesWakeWhenTargetRecovers(t *testing.T) {
	s := newTestSink()
	var down atomic.Bool
	down.Store(true)
	s.fail = func(o *Outgoing, attempt int) error {
		if down.Load() {
			return errors.New("no responders available for request")
		}
		return nil
	}
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Minute, Max: time.Minute}}, rulesDoc(1, "", 0), s, nil)
	const n = 20
	var acks []*ackRec
	for i := range n {
		m, a := msg("t", keyFor(5, i), "{}")
		if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
			t.Fatal(err)
		}
		acks = append(acks, a)
	}
	// The wake is for retries already scheduled: one that fails after
	// the success waits its backoff (Retry.Max at most).
	eventually(t, "every message waits for its retry", func() bool {
		waiting := int64(0)
		for _, ts := range e.p.targetStates.load() {
			if ts != nil {
				waiting += ts.retries.n.Load()
			}
		}
		return waiting == n
	})
	down.Store(false)
	m, a := msg("t", keyFor(5, n), "{}")
	if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
		t.Fatal(err)
	}
	acks = append(acks, a)
	poll.Eventually(t, 5*time.Second, "every message settled after the target recovered", func() bool {
		for _, a := range acks {
			if !a.isSettled() {
				return false
			}
		}
		return true
	})
	for i, a := range acks {
		if err := a.result(t); err != nil {
			t.Fatalf("message %d settled with %v", i, err)
		}
	}
	if got := len(s.published()); got != n+1 {
		t.Fatalf("%d published, want %d", got, n+1)
	}
}

// Retry delays are drawn between half of the backoff and all of it, and
// differ between keys, so that keys failed by one fault do not retry in
// lockstep.
func TestSpreadDrawsBetweenHalfAndAll(t *testing.T) {
	const d = time.Second
	seen := map[time.Duration]bool{}
	for range 1000 {
		got := spread(d)
		if got < d/2 || got > d {
			t.Fatalf("spread(%v) = %v, want within [%v, %v]", d, got, d/2, d)
		}
		seen[got] = true
	}
	if len(seen) < 100 {
		t.Fatalf("%d distinct delays of 1000: not spread", len(seen))
	}
	if got := spread(1); got != 1 {
		t.Fatalf("spread(1ns) = %v", got)
	}
}

// Entries whose task no longer waits on their timer are dropped once the
// map has grown: a target that never succeeds again (its cell marked down)
// does not keep every task that once retried on it.
func TestRetryWaitersDropStaleEntries(t *testing.T) {
	var w retryWaiters
	stop := time.NewTimer(time.Hour)
	defer stop.Stop()
	live := &task{}
	live.timer = stop
	w.add(live, stop)
	for range 2000 {
		tk := &task{} // retried, then settled: its timer is gone
		w.add(tk, stop)
	}
	w.mu.Lock()
	n := len(w.m)
	_, kept := w.m[live]
	w.mu.Unlock()
	if n >= 1024 || !kept {
		t.Fatalf("%d entries left (want fewer than 1024 after a sweep), the waiting task kept: %v", n, kept)
	}
	if got := w.n.Load(); got != int64(n) {
		t.Fatalf("count %d, map %d", got, n)
	}
}
