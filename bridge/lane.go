package bridge

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

const (
	phaseDispatch uint8 = iota
	phaseComplete
)

// task is one message in the pipeline, from Handle to its final ack. Tasks
// are pooled: after the final ack, once nothing refers to them any more
// (recycle), they serve the next message; the few references that may
// outlive a message (a heartbeat's snapshot) only act under mu after
// checking settled, and an ErrInProgress sent to a reused task's new message
// is harmless.
type task struct {
	taskData
	p    *Pipeline
	done func(error) // t.published, bound once per pooled task
	// checkDone and commitDone are t.checkAnswered and t.committed, bound
	// once per pooled task (dedupe.AsyncChecker callbacks).
	checkDone  func(dedupe.Outcome, error)
	commitDone func(error)
	// hdr is a header map the task lends to messages that arrive without
	// one; it is cleared and kept when the task is recycled (the source
	// and the sink are done with the message by then).
	hdr map[string][]string

	mu       sync.Mutex // guards ack, settled, lastBeat, timer; arrived and epoch are written under it
	ack      Ack        // nil once settled
	arrived  int64      // unix ns; read without mu only while the task is live
	epoch    *Epoch     // m.Epoch, for heartbeats, which must not read m
	settled  bool
	lastBeat int64
	timer    *time.Timer
}

// taskData is the per-message state, zeroed on reuse. Its fields are owned
// by whichever goroutine holds the task as an active message of its lane (one at
// a time; hand-offs go through the jobs channel or lane.mu).
type taskData struct {
	m    *Message
	rs   *ruleState
	lane *lane

	d        router.Decision
	laneKey  string     // d.Key, or SourceID when there is no key
	idKey    string     // idempotency key
	storeKey string     // key reserved in the dedupe store
	poison   string     // DLQ reason found by the bridge itself
	dlq      bool       // being dead-lettered
	x        *taskExtra // rare-path state, nil on the hot path
	hops     int
	attempt  int
	reserved bool
	checked  bool // reserved by dedupe.Checker.Check: nothing to release
	// takeOver: the next store call is dedupe.Taker.TakeOver if the
	// message still may (mayTakeOver); tookOver: the answer being handled
	// (stored) is TakeOver's.
	takeOver, tookOver bool
	onWorker           bool          // dispatched on a worker, which may wait for a Reserve
	checkSS            *targetState  // the target of a CheckAsync awaiting its answer
	handle             dedupe.Handle // of the reservation, when the store is a dedupe.HandleStore
	counted            bool          // holds an in-flight budget slot
	phase              uint8
	err                error
	ss                 *targetState
	pub                *pubGen      // counts this forward's publish until its result (publishing)
	failedOn           *targetState // target whose publish of this message failed last (targetState.waiting)
	tl                 *tlSample    // the message's Timeline record, nil unless sampled
	// storeWait: the message's last Reserve failed (Pipeline.storeWaiting)
	storeWait bool

	out      Outgoing
	hv       [6]string // backing store of the forward header values
	hdrSaved bool
	lentHdr  bool // m.Header is t.hdr

	// Broadcast copies (parent set): one task per selected cell of a
	// broadcast message, with its own lane key (key and cell), retry and
	// budget slot; the parent is the source message, in no lane.
	parent  *task
	cs      *cellState // the copy's (rule, cell)
	copyKey string     // idempotency key of the copy: idKey@cell
	// slot is which budget a copy holds (copies leave counted false): an
	// in-flight slot (slotInFlight), a lagging one (slotLagging), or none
	// once settled. It changes by compare-and-swap, because the copy's
	// owner settles it while its lane, or the sweeper, may make it lag.
	slot atomic.Int32

	prev, next *task  // ruleState arrival list, guarded by rs.mu
	inPark     bool   // parked (held); guarded by rs.mu, for the stall age
	unparked   int64  // unix ns of its last release from the park, 0 if never parked; guarded by rs.mu
	qnext      *task  // lane queue or park queue, guarded by lane.mu
	seq        uint64 // arrival order in the lane; queues are sorted by it
}

// taskExtra holds what only dead-lettered or multi-hop messages need, so
// that the pooled task stays small (fewer cache lines per message).
type taskExtra struct {
	dlqReason string
	dlqTarget router.Target
	orig      [6][]string // original values of forwardHeaders
	origHad   uint8
	bc        join // of a broadcast message: its copies
}

func (t *task) extra() *taskExtra {
	if t.x == nil {
		t.x = &taskExtra{}
	}
	return t.x
}

var taskPool sync.Pool

func init() {
	// Set here, not in the declaration: published refers back to the pool.
	taskPool.New = func() any {
		t := &task{}
		t.done = t.published
		t.checkDone = t.checkAnswered
		t.commitDone = t.committed
		return t
	}
}

// newTask takes a pooled task for m.
func (p *Pipeline) newTask(m *Message, ack Ack, now int64) *task {
	t := taskPool.Get().(*task)
	t.mu.Lock()
	t.m = m // taskData is zero: new, or cleared by recycle
	t.ack = ack
	t.arrived = now
	t.epoch = m.Epoch
	t.p = p
	t.settled = false
	t.lastBeat = 0
	t.timer = nil
	t.mu.Unlock()
	return t
}

// recycle returns a settled task that is in no lane, queue, timer or
// channel to the pool. taskData is cleared without the lock: a stale
// heartbeat reference reads only the fields under mu.
func (p *Pipeline) recycle(t *task) {
	p.leaveSink(t)
	p.leaveStore(t)
	if t.lentHdr {
		clear(t.hdr)
	}
	t.taskData = taskData{}
	taskPool.Put(t)
}

// finish settles the active message t, makes the next message of its key
// active, recycles t and returns that message.
func (p *Pipeline) finish(t *task, result error) *task {
	p.settle(t, result)
	n := p.next(t)
	p.recycle(t)
	return n
}

// refuse settles a message that is in no lane (held beyond MaxHeld) and
// recycles it.
func (p *Pipeline) refuse(t *task, result error) {
	p.settle(t, result)
	p.recycle(t)
}

// lane serialises the messages of each key that hashes to it: per key at
// most one message is active (between dispatch and settle); later messages of
// that key wait in the lane's queue, in arrival order. Keys that merely
// share the lane do not wait for each other (a hash collision costs a short
// scan, never a round trip). Parked (held) messages wait per (rule, key).
type lane struct {
	mu           sync.Mutex
	seq          uint64             // last arrival number given out
	active       []*task            // of pairwise different keys; usually 0 or 1
	qhead, qtail *task              // waiting messages, in seq order
	parked       map[parkKey]*parkQ // nil when nothing is parked
}

// activeKey reports whether a message of key is active.
func (l *lane) activeKey(key string) bool {
	for _, a := range l.active {
		if a.laneKey == key {
			return true
		}
	}
	return false
}

// busy reports whether a message of key is active or queued: a new message
// of key must queue behind it.
func (l *lane) busy(key string) bool {
	if l.activeKey(key) {
		return true
	}
	for q := l.qhead; q != nil; q = q.qnext {
		if q.laneKey == key {
			return true
		}
	}
	return false
}

// state reports whether a message of key is active or queued, and whether
// one of them is a lagging broadcast copy.
func (l *lane) state(key string) (busy, lagging bool) {
	for _, a := range l.active {
		if a.laneKey == key {
			busy, lagging = true, a.slot.Load() == slotLagging
		}
	}
	for q := l.qhead; q != nil; q = q.qnext {
		if q.laneKey == key {
			busy, lagging = true, lagging || q.slot.Load() == slotLagging
		}
	}
	return busy, lagging
}

func (l *lane) removeActive(t *task) {
	for i, a := range l.active {
		if a == t {
			last := len(l.active) - 1
			l.active[i] = l.active[last]
			l.active[last] = nil
			l.active = l.active[:last]
			return
		}
	}
}

type parkKey struct{ rule, key string }

type parkQ struct {
	rule, key  string
	head, tail *task
	n          int
	shard      int
	overflow   bool // a message of this key was refused (MaxHeld): refuse later ones too
}

// merge inserts the seq-ordered list starting at h into the lane queue in
// seq order: released messages go ahead of every later arrival but stay
// behind older messages of their key still queued.
func (l *lane) merge(h *task) {
	var head, tail *task
	a := l.qhead
	for a != nil || h != nil {
		var t *task
		if h == nil || (a != nil && a.seq < h.seq) {
			t, a = a, a.qnext
		} else {
			t, h = h, h.qnext
		}
		t.qnext = nil
		if tail == nil {
			head = t
		} else {
			tail.qnext = t
		}
		tail = t
	}
	l.qhead, l.qtail = head, tail
}

func (l *lane) push(t *task) {
	if l.qtail == nil {
		l.qhead = t
	} else {
		l.qtail.qnext = t
	}
	l.qtail = t
}

// nextOfKeyLocked activates the oldest queued message of key, after the
// key's active message finished or was parked. Queued messages of the key
// whose (rule, key) is parked join their park queue on the way (order).
// Messages refused for lack of park space are returned for a Hold ack
// outside the lock. Messages of other keys are not affected: they wait only
// for their own key.
func (p *Pipeline) nextOfKeyLocked(l *lane, key string) (*task, []*task) {
	var over []*task
	if l.activeKey(key) {
		return nil, nil
	}
	var next *task
	unlinkWhile(&l.qhead, &l.qtail, func(t *task) (unlink, goOn bool) {
		if t.laneKey != key {
			return false, true
		}
		return true, false
	}, func(t *task) bool {
		if l.parked != nil && t.poison == "" && !t.dlq {
			if q := l.parked[parkKey{t.m.Rule, t.laneKey}]; q != nil {
				if !p.parkLocked(l, t) {
					over = append(over, t)
				}
				return true
			}
		}
		next = t
		return false
	})
	if next != nil {
		l.active = append(l.active, next)
	}
	return next, over
}

// unlinkWhile walks the singly linked list head..tail (linked by qnext).
// match tells for each message whether to unlink it; each unlinked one is
// passed to took, and the walk goes on while took returns true.
func unlinkWhile(head, tail **task, match func(*task) (unlink, goOn bool), took func(*task) bool) {
	var prev *task
	for t := *head; t != nil; {
		nx := t.qnext
		unlink, goOn := match(t)
		if !unlink {
			if !goOn {
				return
			}
			prev, t = t, nx
			continue
		}
		if prev == nil {
			*head = nx
		} else {
			prev.qnext = nx
		}
		if *tail == t {
			*tail = prev
		}
		t.qnext = nil
		if !took(t) {
			return
		}
		t = nx
	}
}

// parkLocked parks t behind the other parked messages of its key. It returns
// false (and parks nothing) when MaxHeld is reached; the caller then settles
// t with Hold(HoldDelay).
func (p *Pipeline) parkLocked(l *lane, t *task) bool {
	k := parkKey{t.m.Rule, t.laneKey}
	q := l.parked[k]
	if q == nil {
		q = &parkQ{rule: k.rule, key: k.key, shard: t.d.Shard}
		if l.parked == nil {
			l.parked = make(map[parkKey]*parkQ)
			p.parkMu.Lock()
			p.parkedLanes[l] = struct{}{}
			p.parkMu.Unlock()
		}
		l.parked[k] = q
	}
	if t.counted {
		t.counted = false
		p.budget.release(1)
	}
	t.rs.met.held.Inc()
	if q.overflow || p.heldN.Load() >= int64(p.cfg.MaxHeld) {
		q.overflow = true
		t.rs.met.heldOverflow.Inc()
		return false
	}
	// Keep the park queue in arrival order: an older message of the key
	// (queued in the lane, or active and re-routed after a retry) can be
	// parked after a younger one that was parked on arrival.
	switch {
	case q.tail == nil:
		q.head, q.tail = t, t
	case q.tail.seq < t.seq:
		q.tail.qnext = t
		q.tail = t
	case t.seq < q.head.seq:
		t.qnext = q.head
		q.head = t
	default:
		prev := q.head
		for prev.qnext.seq < t.seq {
			prev = prev.qnext
		}
		t.qnext = prev.qnext
		prev.qnext = t
	}
	q.n++
	p.heldN.Add(1)
	t.rs.held.Add(1)
	t.rs.setParked(t, true)
	// Parking is progress for readiness: a rule whose traffic is all held
	// during a switch is not stuck.
	t.rs.hl.lastProgress.Store(p.clock.Now().UnixNano())
	return true
}

// parkActive parks the active message t (its route became held) and
// returns the next message of its key to dispatch.
func (p *Pipeline) parkActive(t *task) *task {
	l := t.lane
	l.mu.Lock()
	l.removeActive(t)
	ok := p.parkLocked(l, t)
	n, over := p.nextOfKeyLocked(l, t.laneKey)
	l.mu.Unlock()
	if !ok {
		p.refuse(t, p.overtakeHold())
	}
	for _, o := range over {
		p.refuse(o, p.overtakeHold())
	}
	return n
}

// recheckParked re-resolves every park queue's key against the current table
// and releases the queues that are no longer held: their messages are merged
// into their lane's queue by arrival order, ahead of anything that arrived
// later.
func (p *Pipeline) recheckParked() {
	if p.rules.Load() == nil {
		return
	}
	for _, l := range p.parkedLaneList() {
		var start, over, revoked []*task
		l.mu.Lock()
		// Load the table under the lane lock: every message parked in this
		// lane was parked under this table or an older one, so a release
		// never acts on a table older than the decision that parked.
		tbl := p.rules.Load()
		for k, q := range l.parked {
			revoked = p.dropRevokedLocked(q, revoked)
			var d router.Decision
			if q.head != nil {
				// Route the oldest message itself: its key is what the
				// current table extracts, even if the rule's key changed.
				d = tbl.Route(q.head.m.Rule, &q.head.m.Message)
			} else {
				d = tbl.Resolve(q.rule, q.key)
			}
			if d.Reason == router.ReasonHeld {
				continue
			}
			delete(l.parked, k)
			if q.n == 0 {
				continue
			}
			for t := q.head; t != nil; t = t.qnext {
				t.d.Version = -1 // route again at dispatch
				t.counted = true
				t.rs.held.Add(-1)
				t.rs.setParked(t, false)
			}
			p.heldN.Add(-int64(q.n))
			p.budget.force(q.n)
			l.merge(q.head)
			n, ov := p.nextOfKeyLocked(l, q.key)
			if n != nil {
				start = append(start, n)
			}
			over = append(over, ov...)
		}
		if len(l.parked) == 0 {
			l.parked = nil
			p.parkMu.Lock()
			delete(p.parkedLanes, l)
			p.parkMu.Unlock()
		}
		l.mu.Unlock()
		for _, o := range over {
			p.refuse(o, p.overtakeHold())
		}
		for _, r := range revoked {
			r.rs.met.revoked.Inc()
			p.refuse(r, ErrRevoked)
		}
		for _, n := range start {
			p.enqueue(n, phaseDispatch)
		}
	}
}

// parkedLaneList returns the lanes that have park queues now.
func (p *Pipeline) parkedLaneList() []*lane {
	p.parkMu.Lock()
	defer p.parkMu.Unlock()
	lanes := make([]*lane, 0, len(p.parkedLanes))
	for l := range p.parkedLanes {
		lanes = append(lanes, l)
	}
	return lanes
}

// dropRevokedLocked unlinks the parked messages of q whose source epoch was
// revoked (the new owner parks its own copies) and appends them to out, to
// be settled outside the lane lock. They would otherwise hold MaxHeld room
// until their shard is released.
func (p *Pipeline) dropRevokedLocked(q *parkQ, out []*task) []*task {
	unlinkWhile(&q.head, &q.tail, func(t *task) (bool, bool) { return t.m.Epoch.Revoked(), true }, func(t *task) bool {
		q.n--
		p.heldN.Add(-1)
		t.rs.held.Add(-1)
		out = append(out, t)
		return true
	})
	return out
}

// track adds t to the rule's arrival-ordered list of unacknowledged messages.
func (rs *ruleState) track(t *task) {
	rs.mu.Lock()
	t.prev = rs.tail
	if rs.tail == nil {
		rs.head = t
	} else {
		rs.tail.next = t
	}
	rs.tail = t
	rs.n++
	rs.mu.Unlock()
}

// setParked marks t as parked or not, for stallAge; a release from the
// park is timed.
func (rs *ruleState) setParked(t *task, parked bool) {
	rs.mu.Lock()
	t.inPark = parked
	if !parked {
		t.unparked = t.p.clock.Now().UnixNano() // the clock of arrived
	}
	rs.mu.Unlock()
}

// stallAge returns how long (ns before now) the bridge has been holding the
// oldest unsettled message that is not parked: since it arrived, or since
// its last release from the park; 0 when there is none. Parked messages
// wait for an operator's switch, not for the bridge, so neither their time
// in the park nor the time before it counts: a switch's released messages
// are not "stalled" the moment they are released.
//
// slot reports that the oldest such message waits in Handle for an
// in-flight slot (ruleState.waiting), not in a lane.
func (rs *ruleState) stallAge(now int64) (age int64, slot bool) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	// The whole list: tracking order is arrival order only per delivering
	// goroutine (see Pipeline.heartbeat).
	since := int64(0)
	for t := rs.head; t != nil; t = t.next {
		if !t.inPark && (since == 0 || max(t.arrived, t.unparked) < since) {
			since = max(t.arrived, t.unparked)
		}
	}
	for t := range rs.waiting {
		if since == 0 || t.arrived < since {
			since, slot = t.arrived, true
		}
	}
	if since == 0 {
		return 0, false
	}
	return max(0, now-since), slot
}

func (rs *ruleState) untrack(t *task) {
	rs.mu.Lock()
	if t.prev == nil {
		if rs.head == t {
			rs.head = t.next
		}
	} else {
		t.prev.next = t.next
	}
	if t.next == nil {
		if rs.tail == t {
			rs.tail = t.prev
		}
	} else {
		t.next.prev = t.prev
	}
	t.prev, t.next = nil, nil
	rs.n--
	rs.mu.Unlock()
}
