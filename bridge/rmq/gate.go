package rmq

import (
	"context"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
)

// Order gates keep a key's next copy invisible while an earlier copy of the
// same key may still be made visible by a check-back. A transactional half
// message becomes visible when the broker processes its end-transaction
// commit; one whose commit never arrived (the bridge died after deciding
// it, or could not record its decision) is committed only by the broker's
// check-back, up to a check interval plus the transaction timeout later —
// after any copy sent meanwhile, in its queue.
//
// The sink learns of such a half message when a claim finds its slot
// decided (an earlier attempt of the message it is sending decided it and
// may have died before the end-transaction went out) or when its own
// decision write fails. It then gates the message's order key in the
// target topic (the shard: the sink does not see the key itself, and
// every message of a key has its shard): sends of that order key wait
// until a check-back of the half message was answered (here, or by
// another replica: the answer is recorded in the dedupe store and polled
// every second), plus checkBackGrace for the answer's end-transaction to
// go out, or until BrokerConfig.CheckBackWait ran out (the half message
// had been ended after all, and no check-back will come). Other order keys
// are not held up.

const (
	// checkBackGrace is how long a gate stays closed after the check-back
	// it waited for was answered: the client writes the end-transaction
	// right after the answer.
	checkBackGrace = 250 * time.Millisecond
	gateTick       = 100 * time.Millisecond
	gatePollEvery  = time.Second
)

// gateKey is the order key of a routed copy in its topic; "" for copies
// without a shard (global routes) and DLQ copies, which are never gated.
func gateKey(out *bridge.Outgoing) string {
	_, shard := orderKey(out.Header, out.MsgID)
	if shard < 0 {
		return ""
	}
	return out.Target.Topic + "\x00" + strconv.Itoa(shard)
}

// txGate is one gated order key.
type txGate struct {
	pending map[slotRef]time.Time // half messages waited for → until when
	waiting []*job                // sends of the order key, in arrival order
}

// txGates holds the gates of one transactional target broker.
type txGates struct {
	wait    time.Duration
	l       *txListener
	log     *slog.Logger
	release func(*job)        // hands a job back to the send workers
	fail    func(*job, error) // resolves a job that will not be sent

	mu     sync.Mutex
	gates  map[string]*txGate
	closed bool
	quit   chan struct{}
	done   chan struct{}
}

func newTxGates(wait time.Duration, l *txListener, log *slog.Logger, release func(*job), fail func(*job, error)) *txGates {
	g := &txGates{wait: wait, l: l, log: log, release: release, fail: fail,
		gates: map[string]*txGate{}, quit: make(chan struct{}), done: make(chan struct{})}
	go g.loop()
	return g
}

// enter parks j when its order key is gated and reports whether it did.
func (g *txGates) enter(j *job) bool {
	gk := gateKey(j.m)
	if gk == "" {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	gt := g.gates[gk]
	if gt == nil || g.closed {
		return false
	}
	gt.waiting = append(gt.waiting, j)
	return true
}

// hold gates order key gk until ref's check-back was answered or the wait
// ran out.
func (g *txGates) hold(gk string, ref slotRef) {
	until := time.Now().Add(g.wait)
	g.mu.Lock()
	gt := g.gates[gk]
	if gt == nil {
		gt = &txGate{pending: map[slotRef]time.Time{}}
		g.gates[gk] = gt
	}
	if until.After(gt.pending[ref]) {
		gt.pending[ref] = until
	}
	g.mu.Unlock()
	topic, shard := splitGateKey(gk)
	g.log.Info("order key gated until the check-back of an earlier half message of it",
		"topic", topic, "shard", shard, "slot", ref.slot, "at_most", g.wait)
}

// resolved ends the wait for ref after checkBackGrace.
func (g *txGates) resolved(ref slotRef) {
	until := time.Now().Add(checkBackGrace)
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, gt := range g.gates {
		if d, ok := gt.pending[ref]; ok && until.Before(d) {
			gt.pending[ref] = until
		}
	}
}

// close stops the gates and returns the parked jobs (the caller resolves
// them).
func (g *txGates) close() []*job {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		<-g.done
		return nil
	}
	g.closed = true
	var out []*job
	for gk, gt := range g.gates {
		out = append(out, gt.waiting...)
		delete(g.gates, gk)
	}
	g.mu.Unlock()
	close(g.quit)
	<-g.done
	return out
}

func (g *txGates) loop() {
	defer close(g.done)
	t := time.NewTicker(gateTick)
	defer t.Stop()
	lastPoll := time.Now()
	for {
		select {
		case <-g.quit:
			return
		case <-t.C:
		}
		now := time.Now()
		var poll []slotRef
		if now.Sub(lastPoll) >= gatePollEvery {
			lastPoll = now
			poll = g.unresolved(now)
		}
		for _, ref := range poll {
			ctx, cancel := context.WithTimeout(context.Background(), g.l.timeout)
			if g.l.wasResolved(ctx, ref) {
				g.resolved(ref)
			}
			cancel()
		}
		g.sweep(now)
	}
}

// unresolved lists the half messages waited for that no answer was seen
// for yet.
func (g *txGates) unresolved(now time.Time) []slotRef {
	g.mu.Lock()
	defer g.mu.Unlock()
	var out []slotRef
	for _, gt := range g.gates {
		for ref, d := range gt.pending {
			if d.Sub(now) > checkBackGrace {
				out = append(out, ref)
			}
		}
	}
	return out
}

// sweep drops the waits that are over, opens the gates with none left
// (their jobs go back to the workers in arrival order) and resolves
// parked jobs whose context ended.
func (g *txGates) sweep(now time.Time) {
	var release, failed []*job
	g.mu.Lock()
	for gk, gt := range g.gates {
		for ref, d := range gt.pending {
			if !now.Before(d) {
				delete(gt.pending, ref)
			}
		}
		kept := gt.waiting[:0]
		for _, j := range gt.waiting {
			if j.ctx.Err() != nil {
				failed = append(failed, j)
			} else {
				kept = append(kept, j)
			}
		}
		clear(gt.waiting[len(kept):])
		gt.waiting = kept
		if len(gt.pending) == 0 {
			release = append(release, gt.waiting...)
			delete(g.gates, gk)
			topic, shard := splitGateKey(gk)
			g.log.Info("order key released", "topic", topic, "shard", shard, "waiting", len(gt.waiting))
		}
	}
	g.mu.Unlock()
	for _, j := range failed {
		g.fail(j, j.ctx.Err())
	}
	for _, j := range release {
		g.release(j)
	}
}

func splitGateKey(gk string) (topic, shard string) {
	for i := len(gk) - 1; i >= 0; i-- {
		if gk[i] == 0 {
			return gk[:i], gk[i+1:]
		}
	}
	return gk, ""
}
