package dedupe

import (
	"context"
	"errors"
	"strconv"

	"github.com/nats-io/nats.go"

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
// commit or release), and the target is a stream with a duplicate window
// (a NATS target; the preflight requires MinDuplicateWindow, longer than
// ReserveTTL, of each). If that previous owner's copy was stored, it was
// stored after its reservation was made, and the reservation is younger
// than ReserveTTL (else it would have expired): the new owner's copy
// follows it within the window and the target drops it, as it would with
// the memory store, which has no shared reservations at all. Waiting
// instead holds every later message of the key until the reservation
// expires, ReserveTTL (30s by default) after a crash.
type Taker interface {
	Store
	// TakeOver is Reserve, except that an unexpired reservation of another
	// holder is replaced by the caller's (conditional on the key's
	// revision: of two callers only one takes it) and Reserved returned.
	// A committed key is Duplicate. InFlight remains possible: a
	// reservation of this store held by another of its callers, or a key
	// that kept changing under the attempts.
	TakeOver(ctx context.Context, key string) (Outcome, error)
}

var _ Taker = (*KV)(nil)

// TakeOver implements Taker: the key is read from the bucket's leader (a
// follower may not have applied a reservation or commit yet), and another
// holder's reservation is overwritten with a write conditional on its
// revision. Every other state (absent, released, committed, this store's
// own reservation, or a key this store owes a write for) is answered as
// Reserve answers it.
func (kv *KV) TakeOver(ctx context.Context, key string) (Outcome, error) {
	if kv.closed.Load() {
		return 0, kv.opErr("takeover", ErrClosed)
	}
	subj := kv.subject(key)
	if kv.owed.owes(subj) != 0 || kv.lost.has(subj) {
		// This store's own debts on the key (a commit on its way, a
		// release or a lost reservation) are Reserve's to settle.
		return kv.Reserve(ctx, key)
	}
	for range maxReserveAttempts {
		st, rev, _, err := kv.lookupLeader(ctx, subj)
		if err != nil {
			return 0, kv.opErr("takeover", err)
		}
		switch st {
		case kvCommitted:
			return Duplicate, nil
		case kvReserved:
		default:
			return kv.Reserve(ctx, key)
		}
		val := strconv.AppendUint(append(make([]byte, 0, len(kv.ours)+13), kv.ours...), kv.attempts.Add(1), 36)
		hdr := nats.Header{hdrExpectLastSubjSeq: {strconv.FormatUint(rev, 10)}, hdrTTL: {kv.reserveTTL}}
		_, err = kv.client.Publish(ctx, subj, hdr, val)
		switch {
		case err == nil:
			kv.tookOver.Add(1)
			return Reserved, nil
		case errors.Is(err, jspub.ErrNoReply):
			// As for Reserve: the write may be stored; a later Reserve
			// of this store finds it and takes it over.
			kv.lost.remember(subj, val)
			kv.owed.owe(subj, owedLost, kv.lostGrace)
			return 0, kv.opErr("takeover", err)
		case !isWrongLastSeq(err):
			return 0, kv.opErr("takeover", err)
		}
		// The key changed between the read and the write (committed,
		// released, taken): read again.
	}
	return InFlight, nil
}

// TakenOver is the number of reservations of other holders TakeOver
// replaced since the store was opened.
func (kv *KV) TakenOver() uint64 { return kv.tookOver.Load() }
