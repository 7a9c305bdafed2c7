package natsjs

import (
	"context"
	"errors"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
)

// idleness tells whether a source knows that nothing waits to be delivered,
// so that a failure to reach its consumer (an idle consumer whose leader is
// being elected after the cluster lost its quorum) does not make the
// replica unready (bridge.ErrNothingPending). It is known when the answers
// to the monitor's consumer info showed nothing pending and nothing
// unacknowledged for idleWindow in a row, this replica was delivered
// nothing since the first of them, and the stream was not seen to store a
// message for the rule past the consumer's last delivered one since.
// Only answers count: while the consumer does not answer, the last known
// state stands, so a consumer with work never turns idle by going quiet.
// The monitor writes it; any goroutine reads it.
type idleness struct {
	window time.Duration
	// zeroSince is when (UnixNano) the current run of answers that showed
	// nothing pending began (0: the last answer showed something, or
	// none came yet); lastZero is the latest answer of that run.
	zeroSince, lastZero atomic.Int64
	// delivered is the consumer's last delivered stream sequence, from the
	// latest answer.
	delivered atomic.Uint64
	// deliveries counts the messages delivered to this replica; seen is
	// its value at the latest answer.
	deliveries, seen atomic.Uint64
	// stored is set when the stream was seen to hold a message for the
	// rule past delivered (checkStored); the next answer clears it.
	stored atomic.Bool
}

// idleWindowAnswers is how many consumer info intervals of answers that
// showed nothing pending make a consumer idle: one answer may catch a busy
// consumer between two messages, three in a row over two intervals do not.
const idleWindowAnswers = 2

// answered records a consumer info answer received at at.
func (i *idleness) answered(at time.Time, info *jetstream.ConsumerInfo) {
	n := i.deliveries.Load()
	busy := info.NumPending > 0 || info.NumAckPending > 0 || n != i.seen.Load()
	i.seen.Store(n)
	i.delivered.Store(info.Delivered.Stream)
	i.stored.Store(false)
	switch {
	case busy:
		i.zeroSince.Store(0)
	case i.zeroSince.Load() == 0:
		i.zeroSince.Store(at.UnixNano())
		i.lastZero.Store(at.UnixNano())
	default:
		i.lastZero.Store(at.UnixNano())
	}
}

// delivery records that a message was delivered to this replica.
func (i *idleness) delivery() { i.deliveries.Add(1) }

// idle reports whether nothing is known to wait to be delivered.
func (i *idleness) idle() bool {
	zs := i.zeroSince.Load()
	return zs != 0 && time.Duration(i.lastZero.Load()-zs) >= i.window &&
		i.deliveries.Load() == i.seen.Load() && !i.stored.Load()
}

// nothingPending wraps a source failure of an idle source.
type nothingPending struct{ err error }

func (e *nothingPending) Error() string {
	return e.err.Error() + " (" + bridge.ErrNothingPending.Error() + ": its consumer showed nothing pending and nothing was stored for it since)"
}

func (e *nothingPending) Unwrap() []error { return []error{e.err, bridge.ErrNothingPending} }

// checkStored runs while the source fails and is idle, after its consumer
// info went unanswered: it asks the stream (its leader answers, which may
// be back before the consumer's) whether a message for the rule was stored
// past the consumer's last delivered one. If so, the failure holds
// readiness again (failState.recheck). A stream that does not answer
// cannot store either; that leaves the source idle.
func (s *Source) checkStored(ctx context.Context) {
	sctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	st, err := s.js.Stream(sctx, s.cfg.Stream)
	if err != nil {
		return
	}
	delivered := s.idle.delivered.Load()
	if st.CachedInfo().State.LastSeq <= delivered {
		return
	}
	if s.cfg.Subject != "" {
		// The stream may hold other subjects: the rule's last message
		// tells.
		m, err := st.GetLastMsgForSubject(sctx, s.cfg.Subject)
		switch {
		case errors.Is(err, jetstream.ErrMsgNotFound):
			return
		case err == nil && m.Sequence <= delivered:
			return
		}
	}
	s.idle.stored.Store(true)
	s.failing.recheck()
	s.log.Debug("nats stream stored messages past the consumer's last delivery while the consumer fails",
		"delivered", delivered, "last_seq", st.CachedInfo().State.LastSeq)
}
