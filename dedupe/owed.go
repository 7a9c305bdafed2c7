package dedupe

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// owedWrites are the writes a KV store still owes the bucket after a call
// failed (not sent because the connection was down, or sent and
// unanswered), per key subject:
//
//   - a commit (owedCommit): the message is stored downstream, its
//     reservation was not turned into a commit;
//   - a release (owedRelease): the caller gave its reservation up after a
//     failed publish, and the reservation is still there;
//   - a lost reservation (owedLost): a Reserve whose reply was lost, whose
//     write may be stored (lostWrites) although no caller holds it.
//
// Each leaves a reservation in the bucket that every replica's Reserve of
// the key meets as InFlight until it expires after ReserveTTL: a replica
// that takes the source over after a reconnect would wait that long for
// keys whose writes the old owner lost. The store writes them in the
// background as soon as the bucket answers again (KV.repayLoop), and
// meanwhile answers its own Reserve of such a key: Duplicate for an owed
// commit, without the bucket; a reservation whose release it owes is taken
// over by its Reserve (like a lost one), unless the background write claimed
// it first and is purging it. A lost reservation is left to the store's own
// Reserve of the key for a while (lostGrace: the caller's retry takes it
// over, one round trip, no purge) and released only then, if nobody took
// it. The background release reads the key from the stream's leader, which
// may not answer for a while after an outage; the store's own Reserve does
// not wait for it. A debt is given up ReserveTTL after the failure: the
// reservation has expired by then.
type owedWrites struct {
	n    atomic.Int64 // len(m), read without the lock on every Reserve
	mu   sync.Mutex
	m    map[string]*debt
	ttl  time.Duration
	wake chan struct{} // a debt was added (buffered, one)
}

// owedKind is what a key subject is owed; a larger kind covers a smaller
// one: a commit makes a release pointless, and a release removes any
// reservation of the store, a lost one too.
type owedKind uint8

const (
	owedLost owedKind = iota + 1
	owedRelease
	owedCommit
)

// debt is what one key subject is owed.
type debt struct {
	kind    owedKind
	claimed bool      // an owed release being written or taken over (claimRelease)
	after   time.Time // not written before then
	until   time.Time // given up then
	// gen changes with every failure recorded for the subject, so that a
	// write that began before it does not pay it off.
	gen uint64
	// rev is, for an owed release, the revision of the reservation the
	// failed Release read and purged at (0: unknown, its read failed and no
	// purge was sent). A purge whose reply was lost may have been stored,
	// and a new reservation of the key written after it: the debt is only
	// for the reservation at rev, never for a later one.
	rev uint64
}

func newOwedWrites(ttl time.Duration) owedWrites {
	return owedWrites{m: map[string]*debt{}, ttl: ttl, wake: make(chan struct{}, 1)}
}

// owe records that a write of subj failed and what it leaves owed, to be
// written no sooner than after; rev is an owed release's revision (see
// debt.rev), 0 for the other kinds.
func (o *owedWrites) owe(subj string, kind owedKind, after time.Duration, rev uint64) {
	now := time.Now()
	o.mu.Lock()
	d := o.m[subj]
	if d == nil {
		d = &debt{}
		o.m[subj] = d
		o.n.Store(int64(len(o.m)))
	}
	if kind > d.kind || d.after.IsZero() {
		d.after = now.Add(after)
	}
	if kind == owedRelease {
		d.rev = rev
	}
	d.kind = max(d.kind, kind)
	d.until = now.Add(o.ttl)
	d.gen++
	o.mu.Unlock()
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// owes reports what subj is owed (0: nothing).
func (o *owedWrites) owes(subj string) owedKind {
	if o.n.Load() == 0 {
		return 0
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	d := o.m[subj]
	if d == nil || time.Now().After(d.until) {
		return 0
	}
	return d.kind
}

// claimRelease marks subj's owed release as being settled, once: true for
// the background write about to purge the reservation, or for a Reserve of
// this store about to take it over or to write a new one, never for both
// (the loser sees the key InFlight and tries again). rev is the revision
// the caller read (0: none read): a release owed for another revision is
// not this reservation's, and is not claimed.
func (o *owedWrites) claimRelease(subj string, rev uint64) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	d := o.m[subj]
	if d == nil || d.kind != owedRelease || d.claimed || time.Now().After(d.until) {
		return false
	}
	if rev != 0 && d.rev != 0 && rev != d.rev {
		return false
	}
	d.claimed = true
	return true
}

// releaseFor reports whether subj's owed release is for the reservation at
// rev (or for whichever the key holds: its revision is unknown).
func (o *owedWrites) releaseFor(subj string, rev uint64) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	d := o.m[subj]
	return d != nil && (d.rev == 0 || d.rev == rev)
}

// unclaimRelease undoes claimRelease after a purge that failed.
func (o *owedWrites) unclaimRelease(subj string) {
	o.mu.Lock()
	if d := o.m[subj]; d != nil {
		d.claimed = false
	}
	o.mu.Unlock()
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
	subj string
	kind owedKind
	gen  uint64
	rev  uint64
}

// due returns the live debts whose time has come and forgets the expired
// ones.
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
		if now.Before(d.after) {
			continue
		}
		out = append(out, owedWrite{subj: subj, kind: d.kind, gen: d.gen, rev: d.rev})
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
		return kv.owed.n.Load() == 0
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
// this store; a lost reservation is purged the same way, only while the key
// holds one of its lost values, which it takes from lostWrites first so
// that no Reserve takes the reservation over meanwhile (one that comes
// then sees it as InFlight and tries again).
func (kv *KV) repayOne(ctx context.Context, w owedWrite) error {
	if w.kind == owedCommit {
		_, err := kv.client.Publish(ctx, w.subj, nil, committedVal)
		return err
	}
	if w.kind == owedRelease && w.rev != 0 {
		// The purge the failed Release sent, again: conditional on the
		// reservation it was for, so that it cannot remove a later one
		// (written after that purge, whose reply was lost, was stored).
		if !kv.owed.claimRelease(w.subj, w.rev) {
			return nil // taken over by a Reserve meanwhile
		}
		if err := kv.purge(ctx, w.subj, w.rev); err != nil {
			kv.owed.unclaimRelease(w.subj)
			return err
		}
		if !kv.lost.has(w.subj) {
			return nil
		}
		// A lost reservation of the key is owed as well (a Reserve's
		// write over the purge's marker whose reply was lost: the debt
		// kept the larger kind, a release), and is released as one.
		if err := kv.repayLost(ctx, w.subj); err != nil {
			kv.owed.unclaimRelease(w.subj)
			return err
		}
		return nil
	}
	if w.kind == owedLost {
		return kv.repayLost(ctx, w.subj)
	}
	// The read first, then the claim: while the read waits (the leader's
	// message get may go unanswered for a while after an outage), a
	// Reserve of this store can still take the reservation over.
	st, rev, _, err := kv.lookupLeader(ctx, w.subj)
	if err != nil || st != kvOurs {
		return err // nothing of this store's left to release
	}
	if !kv.owed.claimRelease(w.subj, rev) {
		return nil // taken over by a Reserve meanwhile
	}
	if err := kv.purge(ctx, w.subj, rev); err != nil {
		kv.owed.unclaimRelease(w.subj)
		return err
	}
	return nil
}

// repayLost purges subj's reservation if it holds one of this store's lost
// values, taken from lostWrites first (see repayOne).
func (kv *KV) repayLost(ctx context.Context, subj string) error {
	st, rev, cur, err := kv.lookupLeader(ctx, subj)
	if err != nil || st != kvOurs {
		return err // nothing of this store's left to release
	}
	if !kv.lost.claim(subj, cur) {
		return nil // not a lost value, or taken over meanwhile
	}
	if err := kv.purge(ctx, subj, rev); err != nil {
		kv.lost.remember(subj, cur) // nobody holds it: claimable again
		return err
	}
	return nil
}
