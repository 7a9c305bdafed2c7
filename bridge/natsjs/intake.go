package natsjs

import (
	"sync"
	"time"
)

// intake is the ordered source's queue between the client library's
// callback and the handler. The callback pushes without blocking (a
// blocked callback would stop the pulls that keep the pin), one goroutine
// pops in arrival order, and a sweep picks the deliveries that have waited
// long enough to need an in-progress heartbeat: a delivery waiting here is
// not in the pipeline yet, so nothing else keeps the server from
// redelivering it while its first delivery still waits.
type intake struct {
	mu    sync.Mutex
	items []*delivery // items[head:] wait, oldest first
	head  int
	limit int
	wake  chan struct{} // one slot: a push since the last pop found the queue empty
}

func newIntake(limit int) *intake {
	return &intake{limit: limit, wake: make(chan struct{}, 1)}
}

// push appends d and reports false, appending nothing, when limit
// deliveries wait already.
func (q *intake) push(d *delivery) bool {
	q.mu.Lock()
	if len(q.items)-q.head >= q.limit {
		q.mu.Unlock()
		return false
	}
	q.items = append(q.items, d)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	return true
}

// pop removes and returns the oldest delivery, nil when none waits.
func (q *intake) pop() *delivery {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.head == len(q.items) {
		return nil
	}
	d := q.items[q.head]
	q.items[q.head] = nil
	q.head++
	switch {
	case q.head == len(q.items):
		q.items, q.head = q.items[:0], 0
	case q.head >= 1024 && 2*q.head >= len(q.items):
		// Reuse the front of the array instead of growing it forever.
		n := copy(q.items, q.items[q.head:])
		clear(q.items[n:])
		q.items, q.head = q.items[:n], 0
	}
	return d
}

// drop empties the queue. The deliveries stay unacknowledged on the server
// (the next reset delivers them again); each one's epoch records that it
// dropped deliveries. It returns how many were dropped.
func (q *intake) drop() int {
	q.mu.Lock()
	rest := q.items[q.head:]
	for _, d := range rest {
		d.ep.dropped.Store(true)
	}
	n := len(rest)
	clear(q.items)
	q.items, q.head = q.items[:0], 0
	q.mu.Unlock()
	return n
}

// due appends to buf the waiting deliveries that arrived, or were last
// heartbeaten, at least age before now, and records now as their last
// heartbeat (the caller sends it).
func (q *intake) due(now time.Time, age time.Duration, buf []*delivery) []*delivery {
	q.mu.Lock()
	defer q.mu.Unlock()
	t, limit := now.UnixNano(), int64(age)
	for _, d := range q.items[q.head:] {
		if t-d.beat >= limit {
			d.beat = t
			buf = append(buf, d)
		}
	}
	return buf
}
