package rmq

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/retry"
)

// The source's health: the client retries failed pulls by itself and only
// logs them, so nothing would reach the pipeline and nothing would say why.
// A probe asks the brokers about the consumer's queues every ProbeInterval;
// what it finds feeds OnFailing, OnConnection and Backlog.

// Defaults of SourceConfig.ProbeInterval and ProbeTimeout.
const (
	DefaultProbeInterval = 2 * time.Second
	DefaultProbeTimeout  = 2 * time.Second
)

// probeFuture is a far-future time for the probe's offset lookup: the
// broker answers with the offset at the end of the queue (the last
// stored message's offset on a 4.x/5.x broker, the max offset on
// internal/rmqtest), a lower bound of what is stored.
const probeFuture = 24 * time.Hour

// idleWindowProbes is how many ProbeIntervals of answers that showed
// nothing pending make a source idle (as the NATS source's consumer info
// answers): one answer may catch a busy queue between two messages.
const idleWindowProbes = 2

// Source states, as SourceStatus reports them.
const (
	stateStarting = "starting" // the consumer is not started yet
	stateActive   = "active"   // started; its brokers answer
	stateFailing  = "failing"  // started; a probe failed or none answered yet
	stateStopped  = "stopped"  // Run returned
)

// failState is what the source reports through OnFailing: changes only,
// one at a time; a failure of an idle source wraps bridge.ErrNothingPending.
type failState struct {
	report func(error) // nil: report nothing
	idle   func() bool
	mu     sync.Mutex
	on     bool
	err    error  // the reason set last
	why    string // the text reported last
}

func (f *failState) set(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
	f.reportLocked()
}

// recheck reports the failure again when idleness changed its text.
func (f *failState) recheck() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.on {
		f.reportLocked()
	}
}

func (f *failState) reportLocked() {
	err := f.err
	if f.idle != nil && f.idle() {
		err = &nothingPending{err: err}
	}
	if f.on && f.why == err.Error() {
		return
	}
	f.on, f.why = true, err.Error()
	if f.report != nil {
		f.report(err)
	}
}

func (f *failState) clear() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.on {
		return
	}
	f.on, f.why, f.err = false, "", nil
	if f.report != nil {
		f.report(nil)
	}
}

// reason is the failure reported now ("" when none).
func (f *failState) reason() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.why
}

// nothingPending wraps the failure of an idle source.
type nothingPending struct{ err error }

func (e *nothingPending) Error() string {
	return e.err.Error() + " (" + bridge.ErrNothingPending.Error() +
		": its queues showed nothing pending and nothing was delivered or seen stored since)"
}

func (e *nothingPending) Unwrap() []error { return []error{e.err, bridge.ErrNothingPending} }

// idleness tells whether nothing is known to wait to be delivered: the
// probes of the last idleWindowProbes intervals all answered and showed
// nothing pending in the assigned queues, nothing was delivered since, and
// no later answer (a partial one, while the source fails) showed a
// message waiting. A broker that does not answer cannot store either.
type idleness struct {
	window time.Duration
	mu     sync.Mutex
	// zeroSince is when the current run of answers that showed nothing
	// pending began (zero: the last showed something, or none came yet);
	// lastZero is the latest of them.
	zeroSince, lastZero time.Time
	deliveries, seen    uint64
	stored              bool
}

func (i *idleness) delivery() {
	i.mu.Lock()
	i.deliveries++
	i.mu.Unlock()
}

// answered records a probe round at at in which every queue answered;
// pending is what the assigned queues hold beyond the consumer's offsets.
func (i *idleness) answered(at time.Time, pending int64) {
	i.mu.Lock()
	defer i.mu.Unlock()
	busy := pending > 0 || i.deliveries != i.seen
	i.seen, i.stored = i.deliveries, false
	switch {
	case busy:
		i.zeroSince = time.Time{}
	case i.zeroSince.IsZero():
		i.zeroSince, i.lastZero = at, at
	default:
		i.lastZero = at
	}
}

// sawPending records that a partial answer showed a message waiting.
func (i *idleness) sawPending() {
	i.mu.Lock()
	i.stored = true
	i.mu.Unlock()
}

func (i *idleness) idle() bool {
	i.mu.Lock()
	defer i.mu.Unlock()
	return !i.zeroSince.IsZero() && i.lastZero.Sub(i.zeroSince) >= i.window &&
		i.deliveries == i.seen && !i.stored
}

// queueSet is the consumer's view of its queues, read from the client
// without a request: the queues assigned to it now, each with the
// consumer's offset (moved past acknowledged messages and, with a tag
// filter, past the messages the broker skipped), and the topic's queues
// from its cached route.
type queueSet interface {
	assigned() map[primitive.MessageQueue]int64
	route() []*primitive.MessageQueue
}

// clientQueues is the queueSet of a started client.
type clientQueues struct {
	assignedFn func() map[primitive.MessageQueue]int64
	routeFn    func() []*primitive.MessageQueue
}

func (c clientQueues) assigned() map[primitive.MessageQueue]int64 { return c.assignedFn() }
func (c clientQueues) route() []*primitive.MessageQueue           { return c.routeFn() }

// probeResult is one queue's answer.
type probeResult struct {
	mq  primitive.MessageQueue
	off int64
	err error
}

// prober runs the probes of one Run.
type prober struct {
	s  *Source
	pc pullConsumer
	qs queueSet
	// known is the highest offset seen stored per assigned queue (from
	// probes and pulled messages); pruned to the assigned queues.
	known map[primitive.MessageQueue]int64
	// failed counts consecutive failed rounds, for logging.
	failed int
	// reqFails counts failed probe requests per broker, for OnRequestError.
	reqFails map[string]int
	// out is set while a queue's lookup is out.
	out map[primitive.MessageQueue]*atomic.Bool
}

// probeLoop probes now and then every ProbeInterval until ctx ends.
func (s *Source) probeLoop(ctx context.Context, p *prober) {
	t := time.NewTicker(s.cfg.ProbeInterval)
	defer t.Stop()
	for {
		p.round(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// round asks every assigned queue's broker for the queue's end (or, with
// no queue assigned, one queue of each broker of the topic, to learn that
// they answer), each request bounded by ProbeTimeout, and reports what it
// found.
func (p *prober) round(ctx context.Context) {
	s := p.s
	asked := time.Now()
	assigned := p.qs.assigned()
	var targets []primitive.MessageQueue
	for mq := range assigned {
		targets = append(targets, mq)
	}
	if len(targets) == 0 {
		seen := map[string]bool{}
		for _, mq := range p.qs.route() {
			if mq != nil && !seen[mq.BrokerName] {
				seen[mq.BrokerName] = true
				targets = append(targets, *mq)
			}
		}
	}
	slices.SortFunc(targets, cmpQueue)
	answers := make(chan probeResult, len(targets))
	at := time.Now().Add(probeFuture).UnixMilli()
	got := map[primitive.MessageQueue]probeResult{}
	for _, mq := range targets {
		// A lookup of an earlier round that is still out (the client
		// bounds it by its own 3 s) is not repeated: a broker that does
		// not answer has at most one per queue.
		if p.out[mq] != nil && p.out[mq].Load() {
			got[mq] = probeResult{mq: mq, err: errors.New("the previous lookup is still unanswered")}
			continue
		}
		out := &atomic.Bool{}
		out.Store(true)
		p.out[mq] = out
		s.probes.Add(1)
		go func() {
			defer s.probes.Done()
			defer out.Store(false)
			off, err := p.pc.OffsetForTimestamp(&mq, at)
			switch {
			case errors.Is(err, strconv.ErrSyntax):
				// The client reads the offset without looking at the
				// answer's code: a refusal has none.
				err = errors.New("the broker answered without an offset (refused, or not serving the queue)")
			case err == nil && off < 0:
				err = fmt.Errorf("the broker answered offset %d", off)
			}
			answers <- probeResult{mq: mq, off: off, err: err}
		}()
	}
	timer := time.NewTimer(s.cfg.ProbeTimeout)
	defer timer.Stop()
wait:
	for len(got) < len(targets) {
		select {
		case r := <-answers:
			got[r.mq] = r
		case <-timer.C:
			break wait
		case <-ctx.Done():
			return
		}
	}
	// Queues no longer assigned leave the backlog.
	for mq := range p.known {
		if _, ok := assigned[mq]; !ok {
			delete(p.known, mq)
		}
	}
	p.mergePulled(assigned)
	var failures []string
	failedBrokers := map[string]error{}
	for _, mq := range targets {
		r, ok := got[mq]
		switch {
		case !ok:
			err := fmt.Errorf("no answer within %s", s.cfg.ProbeTimeout)
			failures = append(failures, queueName(mq)+": "+err.Error())
			failedBrokers[mq.BrokerName] = err
		case r.err != nil:
			failures = append(failures, queueName(mq)+": "+r.err.Error())
			failedBrokers[mq.BrokerName] = r.err
		default:
			if _, isAssigned := assigned[mq]; isAssigned {
				// r.off is a lower bound of the queue's end (see probeFuture).
				p.known[mq] = max(p.known[mq], r.off)
			}
		}
	}
	var pending int64
	for mq, consumed := range assigned {
		if end, ok := p.known[mq]; ok && consumed >= 0 {
			pending += max(0, end-consumed)
		}
	}
	if s.cfg.Backlog != nil {
		s.cfg.Backlog(pending)
	}
	s.setQueues(targets, assigned)
	if len(failures) == 0 && len(targets) > 0 {
		s.idle.answered(asked, pending)
		if p.failed > 0 {
			s.log.Info("rocketmq source brokers answer again", "broker", s.bc.Name, "failed_rounds", p.failed)
		}
		p.failed = 0
		clear(p.reqFails)
		s.setState(stateActive)
		s.fail.clear()
		s.connection(true)
		return
	}
	if pending > 0 {
		s.idle.sawPending()
	}
	err := errors.New("no queue of the topic known (no route)")
	if len(failures) > 0 {
		brokers := make([]string, 0, len(failedBrokers))
		for b := range failedBrokers {
			brokers = append(brokers, b)
		}
		slices.Sort(brokers)
		err = fmt.Errorf("broker %s does not answer queue offset lookups (%d of %d queues): %s",
			strings.Join(brokers, ", "), len(failures), len(targets), strings.Join(failures, "; "))
	}
	p.failed++
	if p.failed == 1 {
		s.log.Warn("rocketmq source probe failed; the source cannot deliver", "broker", s.bc.Name, "err", err)
	} else {
		s.log.Debug("rocketmq source probe failed", "broker", s.bc.Name, "err", err, "failed_rounds", p.failed)
	}
	if s.cfg.OnRequestError != nil {
		for b, e := range failedBrokers {
			p.reqFails[b]++
			s.cfg.OnRequestError(&retry.AttemptError{Broker: s.bc.Name, URL: b, Op: retry.OpConsumerInfo,
				On: s.cfg.Topic + "/" + s.cfg.Group, Attempt: p.reqFails[b], Err: e, RetryIn: s.cfg.ProbeInterval})
		}
	}
	s.setState(stateFailing)
	s.fail.set(err)
	s.connection(false)
}

// connection reports the probe's view of the brokers on changes.
func (s *Source) connection(up bool) {
	if s.cfg.OnConnection == nil {
		return
	}
	var v int32 = 2
	if up {
		v = 1
	}
	if s.connUp.Swap(v) != v {
		s.cfg.OnConnection(up)
	}
}

// pulled records a pulled batch (Run's goroutine): its queue's end as the
// broker told it, for the next probe round, and a delivery for idleness.
func (s *Source) pulled(mq *primitive.MessageQueue, msgs []*primitive.MessageExt) {
	if mq == nil || len(msgs) == 0 {
		return
	}
	s.idle.delivery()
	end, err := strconv.ParseInt(msgs[len(msgs)-1].GetProperty(primitive.PropertyMaxOffset), 10, 64)
	if err != nil {
		return
	}
	s.pulledMu.Lock()
	s.pulledEnd[*mq] = max(s.pulledEnd[*mq], end)
	s.pulledMu.Unlock()
}

// mergePulled folds the queue ends seen in pulls into known.
func (p *prober) mergePulled(assigned map[primitive.MessageQueue]int64) {
	p.s.pulledMu.Lock()
	defer p.s.pulledMu.Unlock()
	for mq, end := range p.s.pulledEnd {
		if _, ok := assigned[mq]; ok {
			p.known[mq] = max(p.known[mq], end)
		}
		delete(p.s.pulledEnd, mq)
	}
}

func cmpQueue(a, b primitive.MessageQueue) int {
	if c := strings.Compare(a.BrokerName, b.BrokerName); c != 0 {
		return c
	}
	return a.QueueId - b.QueueId
}

func queueName(mq primitive.MessageQueue) string {
	return mq.BrokerName + "/" + strconv.Itoa(mq.QueueId)
}

// QueueState is one queue the source probed, as SourceStatus shows it.
type QueueState struct {
	Broker   string
	Queue    int
	Assigned bool
	// Offset is the consumer's offset (assigned queues).
	Offset int64
}

// setQueues records the queues of the last probe round.
func (s *Source) setQueues(targets []primitive.MessageQueue, assigned map[primitive.MessageQueue]int64) {
	qs := make([]QueueState, 0, len(targets))
	for _, mq := range targets {
		off, ok := assigned[mq]
		qs = append(qs, QueueState{Broker: mq.BrokerName, Queue: mq.QueueId, Assigned: ok, Offset: off})
	}
	s.stMu.Lock()
	s.queues = qs
	s.stMu.Unlock()
}

func (s *Source) setState(st string) {
	s.stMu.Lock()
	defer s.stMu.Unlock()
	if s.state != st {
		s.state, s.since = st, time.Now()
	}
}

// Queues returns the queues the last probe asked about: the assigned ones
// with the consumer's offsets, or, with none assigned, one queue per broker
// of the topic (Assigned false).
func (s *Source) Queues() []QueueState {
	s.stMu.Lock()
	defer s.stMu.Unlock()
	return slices.Clone(s.queues)
}

// SourceStatus implements bridge.StatusReporter: the source's state
// ("starting", "active", "failing", "stopped") and since when. The assigned
// queues are in Queues (and the log).
func (s *Source) SourceStatus() bridge.SourceStatus {
	s.stMu.Lock()
	defer s.stMu.Unlock()
	return bridge.SourceStatus{Rule: s.cfg.Rule, State: s.state, Since: s.since}
}

var _ bridge.StatusReporter = (*Source)(nil)
