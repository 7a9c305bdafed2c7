package dedupe

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// owedWrites are the writes a KV store still owes the bucket after a Commit
// or a Release failed (not sent because the connection was down, or sent
// and unanswered): per key subject, a commit (the message is stored
// downstream, its reservation was not turned into a commit) or a release
// (the caller gave its reservation up after a failed publish, the
// reservation is still there). Either leaves a reservation in the bucket
// that every replica's Reserve of the key meets as InFlight until it
// expires after ReserveTTL; the store writes them in the background as soon
// as the bucket answers again (KV.repayLoop), and meanwhile answers its own
// Reserve of such a key without the bucket: Duplicate for an owed commit,
// InFlight for an owed release (until it is written). A debt is given up
// ReserveTTL after the failure: the reservation has expired by then.
type owedWrites struct {
	n    atomic.Int64 // len(m), read without the lock on every Reserve
	mu   sync.Mutex
	m    map[string]*debt
	ttl  time.Duration
	wake chan struct{} // a debt was added (buffered, one)
}

// debt is what one key subject is owed.
type debt struct {
	commit bool      // a commit is owed; else a release
	until  time.Time // given up then
	// gen changes with every failure recorded for the subject, so that a
	// write that began before it does not pay it off.
	gen uint64
}

func newOwedWrites(ttl time.Duration) owedWrites {
	return owedWrites{m: map[string]*debt{}, ttl: ttl, wake: make(chan struct{}, 1)}
}

// owe records that the write of subj failed: a commit (commit true) or a
// release. A commit owed stays a commit: a release of a committed key does
// nothing.
func (o *owedWrites) owe(subj string, commit bool) {
	o.mu.Lock()
	d := o.m[subj]
	if d == nil {
		d = &debt{}
		o.m[subj] = d
		o.n.Store(int64(len(o.m)))
	}
	d.commit = d.commit || commit
	d.until = time.Now().Add(o.ttl)
	d.gen++
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// owes reports what subj is owed: (true, commit) while a debt is live.
func (o *owedWrites) owes(subj string) (owed, commit bool) {
	if o.n.Load() == 0 {
		return false, false
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	d := o.m[subj]
	if d == nil || time.Now().After(d.until) {
		return false, false
	}
	return true, d.commit
}

// paid forgets subj's debt if it is still the one of generation gen (0:
// whatever it is: a Commit or a Release of the key succeeded meanwhile).
func (o *owedWrites) paid(subj string, gen uint64) {
	if o.n.Load() == 0 {
		return
	}
	o.mu.Lock()
	if d := o.m[subj]; d != nil && (gen == 0 || d.gen == gen) {
		delete(o.m, subj)
		o.n.Store(int64(len(o.m)))
	}
	o.mu.Unlock()
}

// owedWrite is one debt as due for a write.
type owedWrite struct {
	subj   string
	commit bool
	gen    uint64
}

// due returns the live debts and forgets the expired ones.
func (o *owedWrites) due() []owedWrite {
	if o.n.Load() == 0 {
		return nil
	}
	now := time.Now()
	o.mu.Lock()
	defer o.mu.Unlock()
	out := make([]owedWrite, 0, len(o.m))
	for subj, d := range o.m {
		if now.After(d.until) {
			delete(o.m, subj)
			continue
		}
		out = append(out, owedWrite{subj: subj, commit: d.commit, gen: d.gen})
	}
	o.n.Store(int64(len(o.m)))
	return out
}

// Backoff of the background writes while the bucket does not answer.
const (
	repayMin = 50 * time.Millisecond
	repayMax = time.Second
	// repayParallel bounds the owed writes in flight at once (they are
	// pipelined on the store's connection like every other request).
	repayParallel = 64
)

// repayLoop writes the owed commits and releases (owedWrites) until stop is
// closed: at once when one is added, and again with backoff while some are
// left.
func (kv *KV) repayLoop() {
	defer close(kv.repayDone)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-kv.stop:
			cancel() // ends the writes in flight: Close makes its own attempt
		case <-ctx.Done():
		}
	}()
	t := time.NewTimer(time.Hour)
	t.Stop()
	defer t.Stop()
	delay := repayMin
	for {
		select {
		case <-kv.stop:
			return
		case <-kv.owed.wake:
		case <-t.C:
		}
		if kv.repay(ctx) {
			delay = repayMin
			continue
		}
		t.Reset(delay)
		delay = min(2*delay, repayMax)
	}
}

// repay makes one attempt at every owed write (none while the connection
// is down: it would fail at once) and reports whether none is left.
func (kv *KV) repay(ctx context.Context) bool {
	due := kv.owed.due()
	if len(due) == 0 {
		return true
	}
	if !kv.nc.IsConnected() {
		return false
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, repayParallel)
	for _, w := range due {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if kv.repayOne(ctx, w) == nil {
				kv.owed.paid(w.subj, w.gen)
			}
		})
	}
	wg.Wait()
	return kv.owed.n.Load() == 0
}

// repayOne writes one owed commit or release. The commit is the
// unconditional "c" Commit writes; the release is Release's conditional
// purge marker, written only while the key still holds a reservation of
// this store.
func (kv *KV) repayOne(ctx context.Context, w owedWrite) error {
	if w.commit {
		_, err := kv.client.Publish(ctx, w.subj, nil, committedVal)
		return err
	}
	return kv.release(ctx, w.subj)
}
