package dedupe

import (
	"context"
	"errors"
	"time"

	"github.com/cellbridge/cellbridge/internal/jspub"
)

// Taker is an optional method of a Store whose reservations live outside
// the process (the JetStream KV store): a reservation of another holder
// can be taken over instead of waited out.
//
// The bridge calls it only where waiting buys nothing: the message comes
// from an ordered source's epoch (one replica forwards the rule's keys at a
// time, so another holder's reservation is a previous owner's, left behind
// by a takeover: a replica killed, frozen or cut off before it could
// commit or release), and the target is a stream whose duplicate window,
// as looked up, is at least TakeOverWindow. If that previous owner's copy
// was stored, it was stored after its reservation was made, and the
// reservation is younger than ReserveTTL (else it would have expired): the
// new owner's copy follows it within TakeOverWindow and the target drops
// it, as it would with the memory store, which has no shared reservations
// at all. Waiting instead holds every later message of the key until the
// reservation expires, ReserveTTL (30s by default) after a crash.
type Taker interface {
	Store
	// TakeOver is Reserve, except that an unexpired reservation of another
	// holder is replaced by the caller's (a write conditional on the
	// revision read, so a write based on a stale read is refused and the
	// key read again) and Reserved returned with replaced true. A
	// committed key is Duplicate. InFlight remains possible: a reservation
	// of this store held by another of its callers, or a key that kept
	// changing under the attempts (two stores taking it from each other).
	TakeOver(ctx context.Context, key string) (o Outcome, replaced bool, err error)
	// TakeOverWindow is the shortest duplicate window of a target for
	// which TakeOver may be used: a copy published after a takeover comes
	// at most this long after a copy the previous holder stored (the
	// reservation was younger than ReserveTTL when read; the taker's write
	// and publish are each bounded by a timeout below ReserveTTL).
	TakeOverWindow() time.Duration
}

var _ Taker = (*KV)(nil)

// TakeOverWindow implements Taker: twice ReserveTTL.
func (kv *KV) TakeOverWindow() time.Duration { return 2 * kv.reserveFor }

// TakeOver implements Taker: the key is read from the bucket's leader (a
// follower may not have applied a reservation or commit yet), and another
// holder's reservation is overwritten with a write conditional on its
// revision. Every other state (absent, released, committed, this store's
// own reservation, a key this store owes a commit or release for) is
// answered as Reserve answers it.
func (kv *KV) TakeOver(ctx context.Context, key string) (Outcome, bool, error) {
	if kv.closed.Load() {
		return 0, false, kv.opErr("takeover", ErrClosed)
	}
	subj := kv.subject(key)
	if owed := kv.owed.owes(subj); owed == owedCommit || owed == owedRelease {
		// A commit on its way, or a release of this store's own
		// reservation: Reserve settles those (a lost write only leaves
		// a value of ours that the read below recognises).
		o, err := kv.Reserve(ctx, key)
		return o, false, err
	}
	for range maxReserveAttempts {
		st, rev, _, err := kv.lookupLeader(ctx, subj)
		if err != nil {
			return 0, false, kv.opErr("takeover", err)
		}
		switch st {
		case kvCommitted:
			return Duplicate, false, nil
		case kvReserved:
		default: // absent, a marker, or this store's own value
			o, err := kv.Reserve(ctx, key)
			return o, false, err
		}
		val := kv.newValue()
		_, err = kv.client.Publish(ctx, subj, kv.reserveOver(rev), val)
		switch {
		case err == nil:
			return Reserved, true, nil
		case errors.Is(err, jspub.ErrNoReply):
			// As for Reserve: this store's next Reserve or TakeOver of
			// the key finds the value, if stored, and claims it.
			kv.lostReply(subj, val)
			return 0, false, kv.opErr("takeover", err)
		case !isWrongLastSeq(err):
			return 0, false, kv.opErr("takeover", err)
		}
		// The key changed between the read and the write (committed,
		// released, taken): read again.
	}
	return InFlight, false, nil
}
