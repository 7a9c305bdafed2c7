package bridge

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

// SinkLookup returns the Sink that publishes to a broker name (as rendered
// in a router.Target). DLQ targets use the same lookup. It is called once per
// broker name; the result is cached for the pipeline's lifetime.
type SinkLookup func(broker string) (Sink, bool)

// StaticSinks is a SinkLookup over a fixed map.
func StaticSinks(m map[string]Sink) SinkLookup {
	return func(b string) (Sink, bool) {
		s, ok := m[b]
		return s, ok
	}
}

// Deps are the pipeline's collaborators. Rules, Dedupe and Sinks are
// required; the others default.
type Deps struct {
	Rules  *router.Holder // current rules table (nil table: nothing is forwarded, messages are held)
	Dedupe dedupe.Store   // idempotency-key store; the pipeline never closes it
	// DedupeCheck lets targets whose sink reports a long enough duplicate
	// window use Dedupe's check-then-commit protocol (dedupe.Checker)
	// instead of reservations; false: every target reserves.
	DedupeCheck bool
	Sinks       SinkLookup   // broker name → Sink; the pipeline never closes them
	Metrics     *Metrics     // nil: NewMetrics("")
	Health      *Health      // nil: NewHealth(Metrics, Log, Clock)
	Log         *slog.Logger // nil: slog.Default()
	Clock       Clock        // nil: SystemClock
}

var (
	errDraining = errors.New("bridge: pipeline draining")
)

// Pipeline routes messages from sources to sinks. Create it with New, give
// Handle (or Run) to sources, call Close on shutdown after the sources
// stopped fetching. All methods are safe for concurrent use.
type Pipeline struct {
	cfg    Config
	rules  *router.Holder
	store  dedupe.Store
	hstore dedupe.HandleStore // store's fast path, nil when it has none
	// checker is the store's check-then-commit protocol, nil when it has
	// none; used for the targets whose sink reports a long enough
	// duplicate window (targetState.useCheck).
	checker dedupe.Checker
	// achecker is checker when it also runs without a waiting goroutine:
	// messages then start on the goroutine that delivers them, and only
	// those that need a Reserve (a round trip that is waited for) move to
	// a worker (task.onWorker).
	achecker dedupe.AsyncChecker
	// taker is the store's TakeOver, nil when it has none (docs/guarantees.md,
	// section 8, T1): an ordered epoch takes a previous owner's
	// reservation over instead of waiting until it expires.
	taker  dedupe.Taker
	sinks  SinkLookup
	met    *Metrics
	health *Health
	log    *slog.Logger
	clock  Clock
	inline bool // dispatch on the calling goroutine (local dedupe store)

	storeFailing atomic.Bool
	// storeWaiting counts the messages whose last Reserve failed and that
	// have not reserved since nor left (task.storeWait); the last one to
	// leave clears the store's failure, as for a target (leaveSink).
	storeWaiting atomic.Int64
	// storeRetries wait for the store; its next success wakes them.
	storeRetries retryWaiters

	ctx    context.Context // Reserve and publishes; cancelled at the drain deadline
	cancel context.CancelFunc
	// settleCtx is for Commit and Release, which record what already
	// happened (a confirmed or failed publish): it outlives the drain
	// deadline and ends when Close gives up waiting for the workers.
	settleCtx    context.Context
	cancelSettle context.CancelFunc

	seed   maphash.Seed
	lanes  []lane
	budget budget
	jobs   chan *task // never closed; capacity > tasks alive, so sends never block

	heldN       atomic.Int64
	lagN        atomic.Int64 // broadcast copies holding a lagging slot
	copies      atomic.Int64 // broadcast copies not settled
	pubs        publishing   // forwards being published, by rules version (Status.PublishingVersion)
	parkMu      sync.Mutex
	rangeMu     sync.Mutex             // guards rangeSeen (updateGauges may run from the sweeper and from tests)
	rangeSeen   map[[2]string]struct{} // (rule, blocked range) series of the held range gauges
	parkedLanes map[*lane]struct{}

	ruleStates   cowMap[string, *ruleState]
	targetStates cowMap[router.Target, *targetState]
	ver          atomic.Pointer[verString]
	tl           atomic.Pointer[timeline] // the running Timeline recording, nil when none
	shardStr     []string

	closing   atomic.Bool
	closeCh   chan struct{} // closed when intake stops
	draining  atomic.Bool
	handling  atomic.Int64
	recheck   chan struct{}
	quit      chan struct{}
	wg        sync.WaitGroup
	drainOnce sync.Once
	drainErr  error
	closeOnce sync.Once
}

type verString struct {
	v int64
	s string
}

// targetState is one publish target (broker plus subject or topic): its
// sink, and the failure record that readiness reports per target, so that
// publishes confirmed by one cell's stream never hide another that keeps
// failing.
type targetState struct {
	what    string // "publishing to broker NAME subject SUBJECT", for health
	tg      router.Target
	sink    Sink
	failing atomic.Bool
	errs    interface{ Inc() }
	// proto is the dedupe protocol chosen for the target (dedupeproto.go).
	proto targetProto
	// waiting counts messages whose last attempt failed on this target
	// and that have not moved on (confirmed here, routed elsewhere,
	// settled). When it drops to zero nothing will publish here to prove
	// the target works again (a failover moved its shards), so the failure
	// is cleared instead of keeping /readyz at 503 for good.
	waiting atomic.Int64
	// retries wait for this target; its next success wakes them.
	retries retryWaiters
}

// ruleState is per topic rule: metric children, health record and the
// list of unacknowledged messages in arrival order (freshness, heartbeats,
// drain).
type ruleState struct {
	name string
	met  *ruleMetrics
	hl   *ruleHealth

	mu         sync.Mutex
	head, tail *task
	n          int
	held       atomic.Int64
	// waiting holds the rule's messages that wait in Handle for an
	// in-flight slot (not tracked yet): their wait counts in the stall age
	// and the oldest unacknowledged age, so that a rule starved by another
	// rule's failing target is seen, and an ordered source can give its
	// consumer to a replica that has slots. Under mu; made on first use.
	waiting map[*task]struct{}

	cells cowMap[string, *cellState] // broadcast rules: per cell
}

// New validates cfg (after defaults) and starts the pipeline's goroutines
// (workers and one sweeper). Close stops them.
func New(cfg Config, d Deps) (*Pipeline, error) {
	cfg = cfg.WithDefaults()
	if d.Rules == nil || d.Dedupe == nil || d.Sinks == nil {
		return nil, errors.New("bridge: New needs Deps.Rules, Deps.Dedupe and Deps.Sinks")
	}
	local := d.Dedupe.Local()
	if cfg.Workers == 0 {
		cfg.Workers = defaultWorkers(local)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if d.Log == nil {
		d.Log = slog.Default()
	}
	if d.Clock == nil {
		d.Clock = SystemClock
	}
	if d.Metrics == nil {
		d.Metrics = NewMetrics("")
	}
	if d.Health == nil {
		d.Health = NewHealth(d.Metrics, d.Log, d.Clock)
	}
	p := &Pipeline{
		cfg: cfg, rules: d.Rules, store: d.Dedupe, sinks: d.Sinks, met: d.Metrics, health: d.Health,
		log: d.Log, clock: d.Clock, inline: local,
		seed:        maphash.MakeSeed(),
		lanes:       make([]lane, cfg.Lanes),
		jobs:        make(chan *task, cfg.MaxInFlight+cfg.MaxHeld+cfg.MaxLagging+1024),
		parkedLanes: map[*lane]struct{}{},
		rangeSeen:   map[[2]string]struct{}{},
		closeCh:     make(chan struct{}),
		recheck:     make(chan struct{}, 1),
		quit:        make(chan struct{}),
	}
	p.hstore, _ = d.Dedupe.(dedupe.HandleStore)
	p.taker, _ = d.Dedupe.(dedupe.Taker)
	if d.DedupeCheck {
		p.checker, _ = d.Dedupe.(dedupe.Checker)
		p.achecker, _ = d.Dedupe.(dedupe.AsyncChecker)
	}
	p.budget.max = int64(cfg.MaxInFlight)
	p.ctx, p.cancel = context.WithCancel(context.Background())
	p.settleCtx, p.cancelSettle = context.WithCancel(context.Background())
	p.shardStr = make([]string, 10000)
	for i := range p.shardStr {
		p.shardStr[i] = strconv.Itoa(i)
	}
	p.health.progressTimeout.Store(int64(cfg.ProgressTimeout))
	p.health.stallTimeout.Store(int64(cfg.StallTimeout))
	loaded := func() (int64, bool) {
		if t := p.rules.Load(); t != nil {
			return t.Version(), true
		}
		return 0, false
	}
	p.health.rulesLoaded.Store(&loaded)
	var use atomic.Pointer[sinkUse]
	needed := func(broker string) bool {
		t := p.rules.Load()
		if t == nil {
			return true
		}
		u := use.Load()
		if u == nil || u.t != t {
			u = sinkUseOf(t)
			use.Store(u)
		}
		return u.any || u.brokers[broker]
	}
	p.health.sinkNeeded.Store(&needed)
	if t := p.rules.Load(); t != nil {
		p.met.RulesVersion.Set(float64(t.Version()))
		p.met.RulesLastReload.Set(float64(p.clock.Now().UnixNano()) / 1e9)
		for _, r := range t.Rules() {
			p.ruleState(r.Name)
		}
	}
	p.wg.Add(cfg.Workers + 1)
	for range cfg.Workers {
		go p.worker()
	}
	go p.sweeper()
	return p, nil
}

// Metrics returns the pipeline's metrics.
func (p *Pipeline) Metrics() *Metrics { return p.met }

// Health returns the pipeline's health tracker (a Reporter for adapters).
func (p *Pipeline) Health() *Health { return p.health }

// Rules returns the rules holder.
func (p *Pipeline) Rules() *router.Holder { return p.rules }

// Config returns the effective configuration (defaults applied).
func (p *Pipeline) Config() Config { return p.cfg }

var _ Handler = (*Pipeline)(nil).Handle

// Run runs src with the pipeline's Handle until ctx is cancelled, then
// returns src.Run's result. It does not close src.
func (p *Pipeline) Run(ctx context.Context, src Source) error {
	return src.Run(ctx, p.Handle)
}

// RulesReloaded records the outcome of a rules reload (the router watcher's
// callback passes its ReloadEvent's fields): it updates the metrics, logs
// one line and, after a successful load, re-resolves parked messages at
// once.
func (p *Pipeline) RulesReloaded(version, previous int64, err error, at time.Time) {
	if err != nil {
		p.met.RulesReloadFails.Inc()
		p.met.RulesFailing.Set(1)
		p.log.Error("rules reload refused; keeping the running table", "version", version, "running", previous, "err", err)
		return
	}
	p.met.RulesFailing.Set(0)
	if version == previous {
		return // the directory holds the running rules again (router.ReloadEvent.Reverted)
	}
	p.met.RulesVersion.Set(float64(version))
	if at.IsZero() {
		at = p.clock.Now()
	}
	p.met.RulesLastReload.Set(float64(at.UnixNano()) / 1e9)
	p.log.Info("rules reloaded", "version", version, "previous", previous)
	if t := p.rules.Load(); t != nil {
		for _, r := range t.Rules() {
			p.ruleState(r.Name)
		}
	}
	select {
	case p.recheck <- struct{}{}:
	default:
	}
}

// Handle is the pipeline's Handler: it takes ownership of m and settles it
// through ack exactly once (plus ErrInProgress heartbeats). It blocks while
// MaxInFlight messages are in flight and, with the in-memory dedupe store,
// while the sink applies back-pressure. It returns ctx's error (after
// negative-acknowledging m) when ctx ends while it waits, otherwise nil.
func (p *Pipeline) Handle(ctx context.Context, m *Message, ack Ack) error {
	p.handling.Add(1)
	defer p.handling.Add(-1)
	if p.closing.Load() {
		ack(context.Background(), errDraining)
		return nil
	}
	tbl := p.rules.Load()
	if tbl == nil {
		ack(context.Background(), Hold(p.cfg.HoldDelay))
		return nil
	}
	t := p.newTask(m, ack, p.clock.Now().UnixNano())
	tl := p.tl.Load()
	var tlAt int64
	if tl != nil {
		tlAt = time.Now().UnixNano()
	}
	t.rs = p.ruleState(m.Rule)
	t.hops = hopsOf(m.Header)
	switch {
	case int64(len(m.Body)) > int64(p.cfg.MaxMessageBytes):
		t.poison = DLQTooLarge
	case t.hops >= p.cfg.MaxHops:
		t.poison = DLQTooManyHops
	}
	if t.poison == "" {
		t.d = tbl.Route(m.Rule, &m.Message)
	} else {
		t.d = router.Decision{Topic: m.Rule, Shard: -1, Version: tbl.Version(), Reason: router.ReasonDLQ}
	}
	t.idKey = idKeyOf(m)
	if t.poison == "" && t.d.Reason == router.ReasonBroadcast {
		return p.broadcast(ctx, t)
	}
	if tl != nil {
		t.tl = tl.start(m.Time, tlAt)
		t.tl.mark(stageRouted)
	}
	t.laneKey = t.d.Key
	if t.laneKey == "" {
		// No key, no order to keep: spread keyless messages over all lanes.
		t.laneKey = m.SourceID
	}
	l := &p.lanes[maphash.String(p.seed, t.laneKey)%uint64(len(p.lanes))]
	t.lane = l
	held := t.poison == "" && t.d.Reason == router.ReasonHeld
	if !held {
		if err := p.acquire(ctx, t); err != nil {
			ack(context.Background(), err)
			p.recycle(t)
			if errors.Is(err, errDraining) {
				return nil
			}
			return err
		}
		t.counted = true
		t.tl.mark(stageAdmitted)
	}
	t.rs.track(t)

	l.mu.Lock()
	l.seq++
	t.seq = l.seq
	if t.poison == "" && (held || (l.parked != nil && l.parked[parkKey{m.Rule, t.laneKey}] != nil)) {
		ok := p.parkLocked(l, t)
		l.mu.Unlock()
		if !ok {
			p.refuse(t, p.overtakeHold())
		}
		return nil
	}
	if l.busy(t.laneKey) {
		l.push(t)
		l.mu.Unlock()
		return nil
	}
	p.activate(l, t)
	return nil
}

// acquire takes an in-flight slot for t (whose rs is set), waiting while
// the budget is exhausted; the wait is visible in t's rule (ruleState
// waiting) and keeps t's message alive at its source (budget.await).
func (p *Pipeline) acquire(ctx context.Context, t *task) error {
	if p.budget.try() {
		return nil
	}
	rs := t.rs
	rs.mu.Lock()
	if rs.waiting == nil {
		rs.waiting = map[*task]struct{}{}
	}
	rs.waiting[t] = struct{}{}
	rs.mu.Unlock()
	defer func() {
		rs.mu.Lock()
		delete(rs.waiting, t)
		rs.mu.Unlock()
	}()
	return p.budget.await(ctx, p.closeCh, t, p.cfg.AckWait/4)
}

// activate makes t its lane's active message, unlocks the lane (locked by
// the caller) and dispatches t: right here with a local store or one that
// checks without waiting (a Reserve moves t to a worker then), else on a
// worker.
func (p *Pipeline) activate(l *lane, t *task) {
	l.active = append(l.active, t)
	l.mu.Unlock()
	if p.inline || p.achecker != nil {
		p.run(t, false)
	} else {
		p.enqueue(t, phaseDispatch)
	}
}

func (p *Pipeline) worker() {
	defer p.wg.Done()
	for {
		select {
		case t := <-p.jobs:
			if t.phase == phaseComplete {
				t.onWorker = true
				p.run(p.complete(t), true)
			} else {
				p.run(t, true)
			}
		case <-p.quit:
			return
		}
	}
}

func (p *Pipeline) enqueue(t *task, phase uint8) {
	t.phase = phase
	p.jobs <- t
}

// run dispatches t and, while dispatch finishes messages synchronously
// (duplicates, parking, drain), the lane's following messages. onWorker
// says whether this goroutine is a worker, which may wait for the store.
func (p *Pipeline) run(t *task, onWorker bool) {
	for t != nil {
		t.onWorker = onWorker
		t = p.dispatch(t)
	}
}

// dispatch moves the active message t one step: route again if the
// rules changed, then park, dead-letter or forward it. It returns the lane's
// next message when t is finished, nil while t is pending (publish or retry).
func (p *Pipeline) dispatch(t *task) *task {
	if p.draining.Load() {
		return p.finish(t, errDraining)
	}
	if t.m.Epoch.Revoked() {
		return p.revoked(t)
	}
	if t.parent != nil && !t.dlq {
		return p.dispatchCopy(t)
	}
	if t.poison == "" && !t.dlq {
		if tbl := p.rules.Load(); tbl != nil && tbl.Version() != t.d.Version {
			t.d = tbl.Route(t.m.Rule, &t.m.Message)
		}
		switch t.d.Reason {
		case router.ReasonHeld:
			return p.parkActive(t)
		case router.ReasonBroadcast:
			// The rule broadcasts now: the redelivery is broadcast from
			// intake.
			return p.finish(t, Hold(p.cfg.HoldDelay))
		}
	}
	if t.dlq || t.poison != "" || t.d.Reason == router.ReasonDLQ {
		return p.toDLQ(t)
	}
	ss := p.target(t.d.Target)
	if ss == nil {
		t.poison = DLQNoRoute
		return p.toDLQ(t)
	}
	t.storeKey = t.idKey
	if t.storeKey == "" {
		p.log.Error("message without idempotency key; the source adapter must set SourceID; holding it", "rule", t.m.Rule)
		return p.finish(t, p.overtakeHold())
	}
	return p.reserveAndPublish(t, ss)
}

func (p *Pipeline) toDLQ(t *task) *task {
	if !t.dlq {
		t.dlq = true
		t.extra()
		t.x.dlqReason = t.poison
		if t.x.dlqReason == "" {
			t.x.dlqReason = dlqReasonOf(t.d)
		}
		t.x.dlqTarget = t.d.Target
		if t.poison != "" || t.d.Reason != router.ReasonDLQ || t.x.dlqTarget.Broker == "" {
			t.x.dlqTarget = router.Target{}
			if tbl := p.rules.Load(); tbl != nil {
				if r := tbl.Rule(t.m.Rule); r != nil && r.DLQ != nil {
					t.x.dlqTarget = *r.DLQ
				}
			}
		}
		t.storeKey = ""
		switch {
		case t.parent != nil:
			t.storeKey = t.copyKey + "\x00dlq"
		case t.idKey != "":
			t.storeKey = t.idKey + "\x00dlq"
		}
	}
	ss := p.target(t.x.dlqTarget)
	if ss == nil {
		p.log.Error("poison message but no usable DLQ target; holding it",
			"rule", t.m.Rule, "reason", t.x.dlqReason, "source_id", t.m.SourceID, "dlq_broker", t.x.dlqTarget.Broker)
		return p.finish(t, p.overtakeHold())
	}
	return p.reserveAndPublish(t, ss)
}

func (p *Pipeline) reserveAndPublish(t *task, ss *targetState) *task {
	if t.tl != nil {
		t.tl.mark(stageDispatched)
		t.tl.attempts++
	}
	if t.storeKey != "" && !t.reserved {
		var o dedupe.Outcome
		var err error
		t.checked = false
		// A takeover decided when the key was found reserved is decided
		// again here: the message may have been routed elsewhere since
		// (a rules reload, the DLQ), and it needs a worker (round trips).
		take := t.takeOver
		t.takeOver = false
		if take {
			if !t.onWorker {
				t.takeOver = true
				p.enqueue(t, phaseDispatch)
				return nil
			}
			take = p.mayTakeOver(t, ss)
		}
		if p.checker != nil && !take {
			var later bool
			t.checked, later = p.useCheck(ss, p.achecker == nil || t.onWorker)
			if later {
				p.enqueue(t, phaseDispatch)
				return nil
			}
		}
		switch {
		case take:
			t.tookOver = true // for stored: this answer is TakeOver's
			var replaced bool
			o, replaced, err = p.taker.TakeOver(p.ctx, t.storeKey)
			if replaced {
				t.rs.met.takeovers.Inc()
			}
		case t.checked && p.achecker != nil:
			// The target drops a concurrent copy itself: read, no
			// reservation (docs/guarantees.md); the answer continues
			// the message on the store's goroutine (checkDone).
			t.checkSS = ss
			p.achecker.CheckAsync(p.ctx, t.storeKey, t.checkDone)
			return nil
		case t.checked:
			o, err = p.checker.Check(p.ctx, t.storeKey)
		case !p.inline && !t.onWorker:
			// A Reserve is waited for: not on the goroutine that
			// delivers messages or answers for the store.
			p.enqueue(t, phaseDispatch)
			return nil
		case p.hstore != nil:
			// The handle lets the commit skip a lookup of a key that
			// thousands of others went through since (a cold map bucket).
			o, t.handle, err = p.hstore.ReserveHandle(p.ctx, t.storeKey)
		default:
			o, err = p.store.Reserve(p.ctx, t.storeKey)
		}
		if n, done := p.stored(t, ss, o, err); done {
			return n
		}
	}
	return p.publish(t, ss)
}

// checkAnswered is CheckAsync's answer for the active message t (bound
// once per pooled task as task.checkDone): it goes on as reserveAndPublish would
// have, on the store's goroutine, which waits for nothing (a Reserve of a
// later dispatch moves to a worker).
func (t *task) checkAnswered(o dedupe.Outcome, err error) {
	p := t.p
	ss := t.checkSS
	t.checkSS = nil
	t.onWorker = false
	n, done := p.stored(t, ss, o, err)
	if !done {
		n = p.publish(t, ss)
	}
	p.run(n, false)
}

// stored handles the store's answer for the active message t: done with
// the lane's next message (or nil) when t does not publish now (duplicate,
// in flight, an error: retry), not done when t holds the key.
func (p *Pipeline) stored(t *task, ss *targetState, o dedupe.Outcome, err error) (*task, bool) {
	tookOver := t.tookOver
	t.tookOver = false
	if err != nil {
		op := "reserve"
		switch {
		case t.checked:
			op = "check" // the read of check-then-commit, not a reservation
		case tookOver:
			op = "takeover"
		}
		p.met.DedupeErrors.WithLabelValues(op).Inc()
		if !t.storeWait {
			// Count first, as for a target (markFailed).
			t.storeWait = true
			p.storeWaiting.Add(1)
		}
		markFailed(p.health, &p.storeFailing, "dedupe store", err)
		return p.retry(t), true
	}
	markRecovered(p.health, &p.storeFailing, "dedupe store")
	p.storeRetries.wake()
	p.leaveStore(t)
	switch o {
	case dedupe.Duplicate:
		if t.parent != nil {
			t.parent.x.bc.dups.Add(1)
		} else {
			t.rs.met.duplicate.Inc()
		}
		t.rs.hl.lastProgress.Store(p.clock.Now().UnixNano())
		return p.finish(t, nil), true
	case dedupe.InFlight:
		if !tookOver && p.mayTakeOver(t, ss) {
			// A previous owner's reservation: take it over on a
			// worker instead of waiting until it expires. A TakeOver
			// that answers InFlight itself (this replica's own
			// reservation, held by another of its messages) waits a
			// retry's backoff before the next Reserve.
			t.takeOver = true
			p.enqueue(t, phaseDispatch)
			return nil, true
		}
		return p.retry(t), true
	}
	t.reserved = true
	return nil, false
}

// mayTakeOver reports whether the active message t, whose key is reserved
// by another holder (InFlight), takes that reservation over
// (dedupe.Taker) instead of retrying until it is committed, released or
// expired: t belongs to an ordered source's epoch that is still current
// (this replica alone forwards its keys, so the holder is a previous
// owner), and its target drops repeats for at least the store's
// TakeOverWindow (a WindowSink's window as last looked up: on a worker,
// the lookup is made when due; elsewhere a due lookup answers yes and the
// worker the message goes to decides). docs/guarantees.md, section 8, T1.
func (p *Pipeline) mayTakeOver(t *task, ss *targetState) bool {
	if p.taker == nil || t.m.Epoch == nil || t.m.Epoch.Revoked() || ss == nil {
		return false
	}
	if _, ok := ss.sink.(WindowSink); !ok {
		return false
	}
	if p.lookupDue(ss, t.onWorker) {
		return true
	}
	return ss.proto.window.Load() >= int64(p.taker.TakeOverWindow())
}

// publish publishes the active message t, which holds its key (or has
// none), to ss.
func (p *Pipeline) publish(t *task, ss *targetState) *task {
	t.tl.mark(stageReserved)
	// A remote store's round trip is long enough for a rules reload to
	// land in between: a message decided under the old table must not be
	// published after the new one (a shard that was just blocked, or
	// moved). Give the reservation back and decide again. The publish is
	// counted under its version first, so that a reload this look misses
	// finds it counted (Status.PublishingVersion).
	if !t.dlq && t.poison == "" {
		t.pub = p.pubs.begin(t.d.Version)
		if tbl := p.rules.Load(); tbl != nil && tbl.Version() != t.d.Version {
			p.unpublish(t)
			return p.dispatch(t)
		}
	}
	if t.m.Epoch.Revoked() {
		// Revoked during a remote store's round trip: the new owner
		// forwards the message; keep the key free for it.
		p.unpublish(t)
		return p.revoked(t)
	}
	if t.failedOn != nil && t.failedOn != ss {
		p.leaveSink(t)
	}
	t.ss = ss
	switch {
	case t.dlq:
		p.prepareDLQ(t)
	case t.parent != nil:
		p.prepareCopy(t)
	default:
		p.prepareForward(t)
	}
	t.tl.mark(stagePublished)
	ss.sink.PublishAsync(p.ctx, &t.out, t.done)
	return nil
}

// published is the sink's done callback; it must not block. With a local
// dedupe store a confirmation is completed right here (commit, ack: neither
// waits), saving a goroutine hand-off per message; the key's next message
// and every failure go to the workers, because dispatching may block.
func (t *task) published(err error) {
	p := t.p
	t.tl.mark(stageConfirmed)
	if (p.inline || t.checked && p.achecker != nil) && err == nil {
		if n := p.complete(t); n != nil {
			p.enqueue(n, phaseDispatch)
		}
		return
	}
	t.err = err
	p.enqueue(t, phaseComplete)
}

// complete handles a publish result on a worker goroutine.
func (p *Pipeline) complete(t *task) *task {
	t.endPublish()
	err := t.err
	t.err = nil
	ss := t.ss
	if err == nil || errors.Is(err, ErrDuplicate) {
		markRecovered(p.health, &ss.failing, ss.what)
		ss.retries.wake()
		if t.reserved {
			t.reserved = false
			var cerr error
			switch {
			case t.checked && p.achecker != nil:
				// Settled when the commit is (committed).
				p.achecker.CommitAsync(p.settleCtx, t.storeKey, t.commitDone)
				return nil
			case p.hstore != nil:
				cerr = p.hstore.CommitHandle(p.settleCtx, t.storeKey, t.handle)
			default:
				cerr = p.store.Commit(p.settleCtx, t.storeKey)
			}
			p.commitFailed(t, cerr)
		}
		return p.forwarded(t)
	}
	return p.publishFailed(t, ss, err)
}

// committed is CommitAsync's result for t (bound once per pooled task as
// task.commitDone): t is forwarded; the lane's next message goes to the
// workers, as after any confirmation completed off the workers.
func (t *task) committed(err error) {
	p := t.p
	p.commitFailed(t, err)
	if n := p.forwarded(t); n != nil {
		p.enqueue(n, phaseDispatch)
	}
}

// commitFailed counts and logs a failed commit (err nil: nothing to do).
func (p *Pipeline) commitFailed(t *task, err error) {
	if err != nil {
		// The sink has the message. The JetStream store writes the
		// commit again (its own Reserve and Check of the key answer
		// Duplicate meanwhile); a copy published again after the
		// reservation expired is dropped by the sink's window.
		p.met.DedupeErrors.WithLabelValues("commit").Inc()
		p.log.Debug("dedupe commit failed", "rule", t.m.Rule, "err", err)
	}
}

// forwarded counts the confirmed (and committed) message t and settles it;
// it returns the lane's next message.
func (p *Pipeline) forwarded(t *task) *task {
	now := p.clock.Now()
	rm := t.rs.met
	if t.dlq {
		rm.dlqOut.Inc()
		rm.dlqReason(t.x.dlqReason).Inc()
		p.log.Warn("message dead-lettered", "rule", t.m.Rule, "reason", t.x.dlqReason, "explain", t.explain(),
			"source_id", t.m.SourceID, "dlq_broker", t.x.dlqTarget.Broker, "dlq", t.x.dlqTarget.Subject+t.x.dlqTarget.Topic)
	} else {
		if t.parent == nil {
			rm.forwarded.Inc() // a broadcast message counts when its last copy settles
		}
		cm := rm.cell(t.d.Cell)
		cm.forwarded.Inc()
		from := t.m.Time
		if from.IsZero() {
			from = time.Unix(0, t.arrived)
		}
		cm.latency.Observe(now.Sub(from).Seconds())
	}
	t.rs.hl.lastProgress.Store(now.UnixNano())
	return p.finish(t, nil)
}

// publishFailed handles a failed publish of t to ss: the key is given
// back and t retried.
func (p *Pipeline) publishFailed(t *task, ss *targetState, err error) *task {
	ss.errs.Inc()
	if t.failedOn != ss {
		p.leaveSink(t)
		// Count first: a message leaving the broker meanwhile must not see
		// zero and clear the failure recorded next.
		ss.waiting.Add(1)
		t.failedOn = ss
	}
	markFailed(p.health, &ss.failing, ss.what, err)
	if t.parent != nil {
		p.lag(t)
	}
	if t.reserved {
		t.reserved = false
		// Check wrote nothing: nothing to release.
		if !t.checked {
			if rerr := p.release(t); rerr != nil {
				// The store releases it later (the JetStream store writes a
				// failed release again), else it expires after ReserveTTL.
				p.met.DedupeErrors.WithLabelValues("release").Inc()
			}
		}
	}
	return p.retry(t)
}

// markFailed records a failure of what in h, then sets flag, the fast-path
// hint that markRecovered has something to clear. In this order a success
// that takes the flag meanwhile cannot clear the record before it is
// written: the flag is set again after it, and the next success clears it
// (flag first, a concurrent success could clear first and leave the record
// for good, keeping /readyz at 503 while publishes flow).
func markFailed(h *Health, flag *atomic.Bool, what string, err error) {
	h.failed(what, err)
	flag.Store(true)
}

// markRecovered clears what's failure after a success, once per failure
// streak (the flag keeps the hot path to one atomic load).
func markRecovered(h *Health, flag *atomic.Bool, what string) {
	if flag.Load() && flag.CompareAndSwap(true, false) {
		h.recovered(what)
	}
}

// leaveSink records that t no longer waits for the broker its last attempt
// failed on; the last message to leave clears the broker's failure.
func (p *Pipeline) leaveSink(t *task) {
	ss := t.failedOn
	if ss == nil {
		return
	}
	t.failedOn = nil
	if ss.waiting.Add(-1) == 0 {
		markRecovered(p.health, &ss.failing, ss.what)
	}
}

// leaveStore records that t no longer waits for the dedupe store (it
// reserved, or it leaves the pipeline: settled, revoked); the last message
// to leave clears the store's failure. A replica whose source went to
// another replica while the store failed has no message left to succeed
// with, and would otherwise report the store failing until it forwards
// again.
func (p *Pipeline) leaveStore(t *task) {
	if !t.storeWait {
		return
	}
	t.storeWait = false
	if p.storeWaiting.Add(-1) == 0 {
		markRecovered(p.health, &p.storeFailing, "dedupe store")
	}
}

// revoked settles the active message t, whose source epoch ended before it
// was published: another replica re-reads and forwards it.
func (p *Pipeline) revoked(t *task) *task {
	p.leaveSink(t)
	if t.parent == nil {
		t.rs.met.revoked.Inc() // a broadcast message counts when its last copy settles
	}
	return p.finish(t, ErrRevoked)
}

// retry schedules another attempt of the active message t after a
// capped exponential backoff; later messages of its key wait meanwhile (order).
func (p *Pipeline) retry(t *task) *task {
	if p.draining.Load() {
		return p.finish(t, errDraining)
	}
	t.rs.met.retried.Inc()
	d := p.cfg.Retry.Initial << min(t.attempt, 30)
	if d > p.cfg.Retry.Max || d <= 0 {
		d = p.cfg.Retry.Max
	}
	d = spread(d)
	t.attempt++
	// Read before the timer starts: once it runs, t belongs to it.
	var w *retryWaiters
	switch {
	case t.failedOn != nil:
		w = &t.failedOn.retries
	case t.storeWait:
		w = &p.storeRetries
	}
	var tm *time.Timer
	t.mu.Lock()
	if !t.settled {
		tm = time.AfterFunc(d, t.retryNow)
		t.timer = tm
	}
	t.mu.Unlock()
	if w != nil && tm != nil {
		w.add(t, tm)
	}
	return nil
}

func (t *task) retryNow() {
	t.mu.Lock()
	t.timer = nil
	t.mu.Unlock()
	t.p.enqueue(t, phaseDispatch)
}

// next makes the following message of t's key active after t finished
// (settled) and returns it, or nil when none waits.
func (p *Pipeline) next(t *task) *task {
	l := t.lane
	l.mu.Lock()
	l.removeActive(t)
	n, over := p.nextOfKeyLocked(l, t.laneKey)
	l.mu.Unlock()
	for _, o := range over {
		p.refuse(o, p.overtakeHold())
	}
	return n
}

// overtakeHold is the Hold of a message that later messages of its key
// may overtake (HoldError.Overtake): one that did not fit among the parked
// messages, or one that is not bound for a cell.
func (p *Pipeline) overtakeHold() error { return &HoldError{Delay: p.cfg.HoldDelay, Overtake: true} }

// settle gives t its final result exactly once and releases what it holds.
func (p *Pipeline) settle(t *task, result error) {
	t.mu.Lock()
	if t.settled {
		t.mu.Unlock()
		return
	}
	t.settled = true
	if t.timer != nil {
		t.timer.Stop()
		t.timer = nil
	}
	if t.parent == nil {
		if err := t.ack(context.Background(), result); err != nil {
			p.log.Debug("source ack failed; the message will be redelivered and deduplicated", "rule", t.m.Rule, "err", err)
		}
	}
	t.ack = nil // drop the source's closure (and its message) before the task is pooled
	t.mu.Unlock()
	if t.tl != nil {
		t.tl.end()
		t.tl = nil
	}
	if t.counted {
		t.counted = false
		p.budget.release(1)
	}
	if t.parent != nil {
		p.copySettled(t, result)
		return
	}
	t.rs.untrack(t)
}

func (p *Pipeline) ruleState(name string) *ruleState {
	return p.ruleStates.get(name, func() *ruleState {
		return &ruleState{name: name, met: p.met.rule(name), hl: p.health.rule(name)}
	})
}

// target returns the cached state of a publish target; nil when no sink
// serves its broker.
func (p *Pipeline) target(tg router.Target) *targetState {
	if tg.Broker == "" {
		return nil
	}
	return p.targetStates.get(tg, func() *targetState {
		s, ok := p.sinks(tg.Broker)
		if !ok || s == nil {
			p.log.Error("no sink for broker; its messages go to the DLQ (no_route)", "broker", tg.Broker)
			return nil
		}
		what := "publishing to broker " + tg.Broker + " subject " + tg.Subject
		if tg.Subject == "" {
			what = "publishing to broker " + tg.Broker + " topic " + tg.Topic
		}
		p.health.target(what, tg.Broker, tg.Subject+tg.Topic)
		return &targetState{what: what, tg: tg, sink: s, errs: p.met.SinkPublishErrors.WithLabelValues(tg.Broker)}
	})
}

func (p *Pipeline) versionString(v int64) string {
	if c := p.ver.Load(); c != nil && c.v == v {
		return c.s
	}
	c := &verString{v: v, s: strconv.FormatInt(v, 10)}
	p.ver.Store(c)
	return c.s
}

func (p *Pipeline) shardString(s int) string {
	if s >= 0 && s < len(p.shardStr) {
		return p.shardStr[s]
	}
	return strconv.Itoa(s)
}

// hopsOf parses Cell-Hops without allocating: absent or not a decimal
// number counts 0; a huge number is capped (and is over any hop limit).
func hopsOf(h map[string][]string) int {
	const limit = 1 << 20
	v := headerValue(h, HeaderHops)
	n := 0
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c < '0' || c > '9' {
			return 0
		}
		if n < limit {
			n = n*10 + int(c-'0')
		}
	}
	return min(n, limit)
}

// headerValue looks a header up exactly, then case-insensitively (as the
// router does); the first value counts.
func headerValue(h map[string][]string, name string) string {
	if len(h) == 0 {
		return ""
	}
	if vs, ok := h[name]; ok {
		if len(vs) > 0 {
			return vs[0]
		}
		return ""
	}
	for k, vs := range h {
		if len(k) == len(name) && len(vs) > 0 && strings.EqualFold(k, name) {
			return vs[0]
		}
	}
	return ""
}

// idKeyOf is the idempotency key: an incoming Cell-Msg-Id, else SourceID.
func idKeyOf(m *Message) string {
	if v := headerValue(m.Header, HeaderMsgID); v != "" {
		return v
	}
	return m.SourceID
}

// forwardHeaders are the headers the bridge sets, in task.hv order.
var forwardHeaders = [6]string{HeaderMsgID, HeaderCell, HeaderShard, HeaderRulesVersion, HeaderSource, HeaderHops}

// saveHeaders remembers the original values of the headers the bridge
// overwrites, so that a DLQ copy carries the original headers.
func (t *task) saveHeaders() {
	if t.hdrSaved {
		return
	}
	t.hdrSaved = true
	if t.m.Header == nil {
		if t.hdr == nil {
			t.hdr = make(map[string][]string, 8)
		}
		t.m.Header, t.lentHdr = t.hdr, true
		return
	}
	for i, name := range forwardHeaders {
		if v, ok := t.m.Header[name]; ok {
			x := t.extra()
			x.orig[i] = v
			x.origHad |= 1 << i
		}
	}
}

func (p *Pipeline) prepareForward(t *task) {
	t.saveHeaders()
	h := t.m.Header
	t.hv = [6]string{t.idKey, t.d.Cell, p.shardString(t.d.Shard), p.versionString(t.d.Version), t.m.Source, itoa(t.hops + 1)}
	for i, name := range forwardHeaders {
		h[name] = t.hv[i : i+1 : i+1]
	}
	t.out = Outgoing{Target: t.d.Target, MsgID: t.idKey, Header: h, Body: t.m.Body}
}

func (p *Pipeline) prepareDLQ(t *task) {
	var h map[string][]string
	id := t.idKey
	if t.parent != nil {
		// A broadcast copy: the message's map is shared with the other
		// copies; the copy's own holds the original headers.
		h = t.ownHeader()
	} else {
		t.saveHeaders()
		h = t.m.Header
		for i, name := range forwardHeaders {
			if t.x.origHad&(1<<i) != 0 {
				h[name] = t.x.orig[i]
			} else {
				delete(h, name)
			}
		}
	}
	h[HeaderError] = []string{t.x.dlqReason + ": " + t.explain()}
	if id == "" {
		id = t.m.SourceID
	}
	// The event's idempotency key travels on the DLQ copy too, so an
	// operator can trace it and a replay keeps its identity.
	if _, ok := h[HeaderMsgID]; !ok && id != "" {
		h[HeaderMsgID] = []string{id}
	}
	msgID := id
	if t.parent != nil {
		msgID = t.copyKey // one dead letter per cell's copy
	}
	t.out = Outgoing{Target: t.x.dlqTarget, MsgID: msgID, Header: h, Body: t.m.Body}
}

func (t *task) explain() string {
	switch t.x.dlqReason {
	case DLQTooLarge:
		return fmt.Sprintf("body is %d bytes, over the limit of %d", len(t.m.Body), t.p.cfg.MaxMessageBytes)
	case DLQTooManyHops:
		return fmt.Sprintf("%s is %d, at or over the limit of %d", HeaderHops, t.hops, t.p.cfg.MaxHops)
	case DLQNoRoute:
		if t.parent != nil {
			return "no sink for target broker " + strconv.Quote(t.d.Target.Broker) + " of cell " + t.d.Cell + " (broadcast copy)"
		}
		if t.d.Explain == "" {
			return "no sink for target broker " + strconv.Quote(t.d.Target.Broker)
		}
	}
	if t.d.Explain != "" {
		return t.d.Explain
	}
	return "no route"
}

// dlqReasonOf is the cellbridge_dlq_total reason of a router DLQ decision:
// the router's Cause (missing_key, bad_key, bad_body, no_route).
func dlqReasonOf(d router.Decision) string {
	if d.Cause != "" {
		return d.Cause
	}
	return DLQNoRoute
}

// unpublish undoes what a task did to start publishing when it stops short
// of the sink: its publishing version is uncounted and its reservation
// released (a failed release is written again by the JetStream store, else
// it expires after ReserveTTL).
func (p *Pipeline) unpublish(t *task) {
	t.endPublish()
	if t.reserved {
		t.reserved = false
		if t.checked {
			return // Check wrote nothing: nothing to release
		}
		if err := p.release(t); err != nil {
			p.met.DedupeErrors.WithLabelValues("release").Inc()
		}
	}
}

// release drops t's reservation, through its handle where the store has
// one: a reservation of the same key taken by another attempt after t's
// expired is not t's to drop.
func (p *Pipeline) release(t *task) error {
	if p.hstore != nil {
		return p.hstore.ReleaseHandle(p.settleCtx, t.storeKey, t.handle)
	}
	return p.store.Release(p.settleCtx, t.storeKey)
}

// sinkUse is the set of brokers a rules table publishes to.
type sinkUse struct {
	t       *router.Table
	brokers map[string]bool
	any     bool // a broker name depends on the shard: every broker counts
}

// sinkUseOf collects the brokers t publishes to: each rule's target in
// every cell not marked down (a down cell's shards and pins go to its
// failover cell, its broadcast copies are skipped), and each DLQ.
func sinkUseOf(t *router.Table) *sinkUse {
	u := &sinkUse{t: t, brokers: map[string]bool{}}
	cells := t.Cells()
	for _, r := range t.Rules() {
		if r.DLQ != nil {
			u.brokers[r.DLQ.Broker] = true
		}
		if strings.Contains(r.Target.Broker, "{shard}") {
			u.any = true
		}
		for _, c := range cells {
			if c.State != router.StateDown {
				u.brokers[r.Render(c.Name, -1).Broker] = true
			}
		}
	}
	return u
}
