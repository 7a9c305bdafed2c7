package rmq

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
)

// A decided half message may still be waiting for its commit: the bridge
// that decided it died before its end-transaction reached the broker, and
// only the broker's check-back, up to a check interval plus the transaction
// timeout later, makes it visible — after any copy sent meanwhile, in its
// queue. The sink learns of one when a claim for a message finds the
// message's own earlier attempt decided (its source redelivered it: the
// dead bridge never acknowledged it). It does not report that message as
// a duplicate at once, which would let the pipeline acknowledge it and
// send the key's next message: it parks the send until the half message's
// check-back was answered and settled (txn.go: a second after the answer,
// so that the answer's end-transaction went out) — here, or by another
// replica (recorded in the dedupe store, polled every second) — or until
// BrokerConfig.CheckBackWait ran out (the end-transaction had arrived
// after all, and no check-back will come). Meanwhile the message stays
// unacknowledged, so a crash hands the same wait to the next bridge, and
// the pipeline holds the key's later messages behind it (one message per
// key between publish and confirm); other keys go on.

const (
	waitTick      = 100 * time.Millisecond
	waitPollEvery = time.Second
)

// errPending reports a claim that found ref decided and not known to be
// committed yet; the worker parks the job.
type errPending struct{ ref slotRef }

func (e *errPending) Error() string {
	return fmt.Sprintf("transactional attempt %d was decided; waiting for its check-back", e.ref.slot)
}

// txWait is the wait for one half message.
type txWait struct {
	until time.Time
	jobs  []*job
}

// txWaits holds the parked sends of one transactional target broker.
type txWaits struct {
	wait time.Duration
	l    *txListener
	log  *slog.Logger
	done func(*job, error) // resolves a job

	mu     sync.Mutex
	waits  map[slotRef]*txWait
	closed bool
	quit   chan struct{}
	exited chan struct{}
}

func newTxWaits(wait time.Duration, l *txListener, log *slog.Logger, done func(*job, error)) *txWaits {
	w := &txWaits{wait: wait, l: l, log: log, done: done,
		waits: map[slotRef]*txWait{}, quit: make(chan struct{}), exited: make(chan struct{})}
	go w.loop()
	return w
}

// park holds j until ref's check-back was answered or the wait ran out,
// then resolves it as a duplicate. It returns false when the sink is
// closing (the caller resolves j).
func (w *txWaits) park(ref slotRef, j *job) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return false
	}
	wt := w.waits[ref]
	if wt == nil {
		wt = &txWait{until: time.Now().Add(w.wait)}
		w.waits[ref] = wt
		w.log.Info("message held until the check-back of its decided half message",
			"topic", j.m.Target.Topic, "slot", ref.slot, "at_most", w.wait)
	}
	wt.jobs = append(wt.jobs, j)
	return true
}

// resolved ends the wait for ref (at the next sweep); a later park of ref
// finds the answer in the store.
func (w *txWaits) resolved(ref slotRef) {
	until := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	if wt := w.waits[ref]; wt != nil && until.Before(wt.until) {
		wt.until = until
	}
}

// close stops the waits and returns the parked jobs (the caller resolves
// them).
func (w *txWaits) close() []*job {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		<-w.exited
		return nil
	}
	w.closed = true
	var out []*job
	for ref, wt := range w.waits {
		out = append(out, wt.jobs...)
		delete(w.waits, ref)
	}
	w.mu.Unlock()
	close(w.quit)
	<-w.exited
	return out
}

func (w *txWaits) loop() {
	defer close(w.exited)
	t := time.NewTicker(waitTick)
	defer t.Stop()
	lastPoll := time.Now()
	for {
		select {
		case <-w.quit:
			return
		case <-t.C:
		}
		now := time.Now()
		if now.Sub(lastPoll) >= waitPollEvery {
			lastPoll = now
			for _, ref := range w.unresolved(now) {
				ctx, cancel := context.WithTimeout(context.Background(), w.l.timeout)
				if w.l.wasResolved(ctx, ref) {
					w.resolved(ref)
				}
				cancel()
			}
		}
		w.sweep(now)
	}
}

// unresolved lists the half messages waited for that no answer was seen
// for yet.
func (w *txWaits) unresolved(now time.Time) []slotRef {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []slotRef
	for ref, wt := range w.waits {
		if wt.until.After(now) {
			out = append(out, ref)
		}
	}
	return out
}

// sweep resolves the jobs whose wait is over as duplicates (unless the
// half message was rolled back after all: then with errRolledBack, and the
// pipeline sends the message again), and those whose context ended with
// its error.
func (w *txWaits) sweep(now time.Time) {
	type result struct {
		j   *job
		err error
		ref *slotRef // over: the half message whose wait ended
	}
	var out []result
	w.mu.Lock()
	for ref, wt := range w.waits {
		over := !now.Before(wt.until)
		kept := wt.jobs[:0]
		for _, j := range wt.jobs {
			switch {
			case over:
				out = append(out, result{j, fmt.Errorf("transactional attempt %d decided and committed: %w", ref.slot, bridge.ErrDuplicate), &ref})
			case j.ctx.Err() != nil:
				out = append(out, result{j, j.ctx.Err(), nil})
			default:
				kept = append(kept, j)
			}
		}
		clear(wt.jobs[len(kept):])
		wt.jobs = kept
		if over {
			delete(w.waits, ref)
		}
	}
	w.mu.Unlock()
	rolledBack := map[slotRef]error{}
	for _, r := range out {
		if r.ref != nil {
			err, seen := rolledBack[*r.ref]
			if !seen {
				err = w.rolledBack(*r.ref)
				rolledBack[*r.ref] = err
			}
			if err != nil {
				r.err = err
			}
		}
		w.done(r.j, r.err)
	}
}

// rolledBack is txListener.rolledBack under the listener's timeout.
func (w *txWaits) rolledBack(ref slotRef) error {
	ctx, cancel := context.WithTimeout(context.Background(), w.l.timeout)
	defer cancel()
	return w.l.rolledBack(ctx, ref)
}
