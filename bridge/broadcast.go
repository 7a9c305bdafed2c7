package bridge

import (
	"context"
	"errors"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cellbridge/cellbridge/router"
)

// Broadcast messages (docs/guarantees.md section 9). A message whose rule
// broadcasts (router.ReasonBroadcast) is the *parent*: it is tracked for
// heartbeats, freshness and drain like any message, but sits in no lane and
// holds no in-flight slot. Each selected cell gets a *copy*: a task of its
// own with the lane key "<key>\x00<cell>", its own reservation
// (<idKey>@<cell>), publish, retry and in-flight slot. The parent is acked
// when its last copy settled, with the first error any copy settled with.

// Budget slots of a copy (task.slot).
const (
	slotNone     int32 = iota // settled, or not a copy
	slotInFlight              // one of MaxInFlight
	slotLagging               // one of MaxLagging
)

// join is a broadcast message's account of its copies.
type join struct {
	// pending counts the copies not settled yet, plus one that Handle holds
	// while it creates them, so that copies finishing at once cannot settle
	// the message before the last one exists.
	pending atomic.Int32
	// dups counts copies the dedupe store already knew (a redelivery);
	// skips those skipped when decided again (their cell marked down or
	// removed while they waited).
	dups, skips atomic.Int32
	copies      int32

	mu  sync.Mutex
	err error // first non-nil result of a copy
}

// cellState is one (rule, cell) of broadcast rules: its metric children,
// the copies on their way, and what a down cell missed.
type cellState struct {
	cell    string
	pending atomic.Int64 // copies accepted, not settled
	lagging atomic.Int64 // of them, holding a lagging slot

	skipDown, skipOrigin, skipRemoved prometheus.Counter
	pendingG, laggingG                prometheus.Gauge

	mu     sync.Mutex
	missed MissedCopies
	// open: the latest streak of misses goes on (no copy decided under a
	// newer rules version than its skips went to the cell since). Written
	// under mu; read without it on the copies' path.
	open atomic.Bool
	// skipVer is the newest rules version a skip of the open streak was
	// decided under; closeVer the version of the copy that ended the last
	// streak (both under mu).
	skipVer, closeVer int64
}

// MissedCopies is what a cell missed while it was down, as /status shows it:
// the range to replay (`cellbridge replay -cell C -from-time FIRST`). Times
// are the source broker's store times of the messages.
type MissedCopies struct {
	// Count is every copy missed since the bridge started.
	Count int64 `json:"count"`
	// First and Last are the first and the latest message missed in the
	// latest streak of misses (one that no copy to the cell ended yet, when
	// Ongoing).
	First         time.Time `json:"first"`
	FirstSourceID string    `json:"firstSourceId"`
	Last          time.Time `json:"last"`
	LastSourceID  string    `json:"lastSourceId"`
	Ongoing       bool      `json:"ongoing"`
}

// cellState returns the state of (rs's rule, cell), creating it once.
func (p *Pipeline) cellState(rs *ruleState, cell string) *cellState {
	return rs.cells.get(cell, func() *cellState {
		m := p.met
		return &cellState{cell: cell,
			skipDown:    m.BroadcastSkipped.WithLabelValues(rs.name, cell, router.SkipDown),
			skipOrigin:  m.BroadcastSkipped.WithLabelValues(rs.name, cell, router.SkipOrigin),
			skipRemoved: m.BroadcastSkipped.WithLabelValues(rs.name, cell, SkipRemoved),
			pendingG:    m.BroadcastPending.WithLabelValues(rs.name, cell),
			laggingG:    m.BroadcastLagging.WithLabelValues(rs.name, cell),
		}
	})
}

// skip counts a copy of m that cell does not get, decided under rules
// version ver, and records a miss. The streak's range covers every miss:
// copies decided again later (a lagging copy skipped once its cell is
// marked down) can be older than the streak's first, so First only moves
// back and Last only forward. A miss decided under an older version than
// the copy that ended the last streak (a message that loaded its table
// before the cell came back) belongs to that streak, which goes on.
func (cs *cellState) skip(reason string, m *Message, ver int64) {
	switch reason {
	case router.SkipDown:
		cs.skipDown.Inc()
		at := m.Time
		cs.mu.Lock()
		mc := &cs.missed
		switch {
		case cs.open.Load():
		case ver < cs.closeVer && mc.Count > 0:
			cs.open.Store(true)
		default:
			cs.open.Store(true)
			mc.First, mc.FirstSourceID = at, m.SourceID
			mc.Last, mc.LastSourceID = at, m.SourceID
			cs.skipVer = ver
		}
		if at.Before(mc.First) {
			mc.First, mc.FirstSourceID = at, m.SourceID
		}
		if !at.Before(mc.Last) {
			mc.Last, mc.LastSourceID = at, m.SourceID
		}
		cs.skipVer = max(cs.skipVer, ver)
		mc.Count++
		cs.mu.Unlock()
	case router.SkipOrigin:
		cs.skipOrigin.Inc()
	default:
		cs.skipRemoved.Inc()
	}
}

// sent records a copy for the cell decided under rules version ver. It
// ends the streak of misses only when ver is newer than every skip of it:
// then the cell is not down in the running rules. A copy decided under an
// older table (it waited for a slot, or in its lane, across the reload that
// marked the cell down) says nothing about the cell now, and is decided
// again before it is published (dispatchCopy).
func (cs *cellState) sent(ver int64) {
	if !cs.open.Load() {
		return
	}
	cs.mu.Lock()
	if cs.open.Load() && ver > cs.skipVer {
		cs.open.Store(false)
		cs.closeVer = ver
	}
	cs.mu.Unlock()
}

// broadcast takes the broadcast message t from Handle: it counts the cells
// that get no copy, takes one in-flight slot per copy (waiting like any
// message), and hands each copy to its lane.
func (p *Pipeline) broadcast(ctx context.Context, t *task) error {
	if t.idKey == "" {
		// Every copy key would be "@<cell>": never guess an identity.
		p.log.Error("message without idempotency key; the source adapter must set SourceID; holding it", "rule", t.m.Rule)
		t.ack(context.Background(), p.overtakeHold())
		p.recycle(t)
		return nil
	}
	n := 0
	for i := range t.d.Cells {
		if c := &t.d.Cells[i]; c.Skip == "" && c.Cell != t.d.Origin {
			n++
		}
	}
	// One slot per copy. The message waits for its first slot like any
	// message and takes the others at once (over-committing the budget by
	// at most the cells less one): a broadcast that waited for its later
	// slots one at a time while holding the earlier ones could wait for
	// ever on other broadcasts doing the same, with no copy started that
	// would give a slot back.
	if n > 0 {
		if err := p.acquire(ctx, t); err != nil {
			t.ack(context.Background(), err)
			p.recycle(t)
			if errors.Is(err, errDraining) {
				return nil
			}
			return err
		}
		p.budget.force(n - 1)
	}
	rs := t.rs
	rs.track(t)
	for i := range t.d.Cells {
		c := &t.d.Cells[i]
		switch {
		case c.Skip != "":
			p.cellState(rs, c.Cell).skip(c.Skip, t.m, t.d.Version)
		case c.Cell == t.d.Origin:
			p.cellState(rs, c.Cell).skip(router.SkipOrigin, t.m, t.d.Version)
		}
	}
	if n == 0 {
		rs.met.skipped.Inc()
		rs.hl.lastProgress.Store(p.clock.Now().UnixNano())
		p.settle(t, nil)
		p.recycle(t)
		return nil
	}
	x := t.extra()
	x.bc.copies = int32(n)
	x.bc.pending.Store(int32(n) + 1)
	// The copies' lane keys add the cell to the key: each cell has its own
	// order per key, and a cell's copies never wait for another cell's.
	key := t.d.Key
	if key == "" {
		key = t.m.SourceID
	}
	for i := range t.d.Cells {
		bc := &t.d.Cells[i]
		if bc.Skip != "" || bc.Cell == t.d.Origin {
			continue
		}
		c := p.newTask(t.m, nil, t.arrived)
		c.parent = t
		c.rs = rs
		c.hops = t.hops
		c.idKey = t.idKey
		c.copyKey = t.idKey + "@" + bc.Cell
		c.d = router.Decision{Topic: t.d.Topic, Key: t.d.Key, Shard: -1, Cell: bc.Cell, Target: bc.Target,
			Version: t.d.Version, Reason: router.ReasonBroadcast}
		c.laneKey = key + "\x00" + bc.Cell
		c.slot.Store(slotInFlight)
		c.cs = p.cellState(rs, bc.Cell)
		c.cs.pending.Add(1)
		p.copies.Add(1)
		c.cs.sent(c.d.Version)
		p.enterLane(c)
	}
	p.copyDone(t, nil)
	return nil
}

// enterLane queues copy c behind the copies of its key and cell, or makes
// it active and dispatches it. Behind a lagging copy it lags too: its cell
// is the failing one.
func (p *Pipeline) enterLane(c *task) {
	l := &p.lanes[maphash.String(p.seed, c.laneKey)%uint64(len(p.lanes))]
	c.lane = l
	l.mu.Lock()
	l.seq++
	c.seq = l.seq
	if busy, lagging := l.state(c.laneKey); busy {
		if lagging {
			p.lagLocked(c)
		}
		l.push(c)
		l.mu.Unlock()
		return
	}
	p.activate(l, c)
}

// lagLocked moves copy c from the in-flight budget to the lagging set when
// that has room (MaxLagging); otherwise c keeps its slot. The caller holds
// c's lane lock (c is queued there or active: its owner may settle it
// meanwhile, which the compare-and-swap on its slot decides).
func (p *Pipeline) lagLocked(c *task) {
	if c.slot.Load() != slotInFlight {
		return
	}
	for {
		n := p.lagN.Load()
		if n >= int64(p.cfg.MaxLagging) {
			return
		}
		if p.lagN.CompareAndSwap(n, n+1) {
			break
		}
	}
	if !c.slot.CompareAndSwap(slotInFlight, slotLagging) {
		p.lagN.Add(-1) // settled meanwhile
		return
	}
	c.cs.lagging.Add(1)
	p.budget.release(1)
}

// lagOld makes lag every copy whose message arrived more than StallTimeout
// ago and that is still not confirmed: its cell is slow, or its target
// hangs (a publish without an answer fails only at the sink's ack timeout),
// and its copies must not hold the in-flight slots the other cells need
// meanwhile. The sweeper calls it; it walks the lanes only while copies
// exist.
func (p *Pipeline) lagOld(now int64) {
	if p.copies.Load() == 0 {
		return
	}
	limit := now - int64(p.cfg.StallTimeout)
	for i := range p.lanes {
		l := &p.lanes[i]
		l.mu.Lock()
		for _, a := range l.active {
			if a.parent != nil && a.arrived < limit {
				p.lagLocked(a)
			}
		}
		for q := l.qhead; q != nil; q = q.qnext {
			if q.parent != nil && q.arrived < limit {
				p.lagLocked(q)
			}
		}
		l.mu.Unlock()
	}
}

// lag is called when an attempt of the active copy c failed: c and every
// copy queued behind it for its key and cell wait for a failing cell, so
// they give their in-flight slots to the other cells.
func (p *Pipeline) lag(c *task) {
	l := c.lane
	l.mu.Lock()
	p.lagLocked(c)
	for q := l.qhead; q != nil; q = q.qnext {
		if q.laneKey == c.laneKey {
			p.lagLocked(q)
		}
	}
	l.mu.Unlock()
}

// dispatchCopy is dispatch for copy c: decide again under a newer table
// (the cell may be down or gone now, or the rule may no longer broadcast
// the event), then reserve and publish.
func (p *Pipeline) dispatchCopy(c *task) *task {
	if tbl := p.rules.Load(); tbl != nil && tbl.Version() != c.d.Version {
		switch skip := p.rerouteCopy(c, tbl); skip {
		case "":
			c.cs.sent(c.d.Version)
		case errHoldSkip:
			// The rule no longer broadcasts this event (its kind or key
			// changed): the redelivery is decided from scratch at intake.
			// Copies already confirmed are duplicates then.
			return p.finish(c, Hold(p.cfg.HoldDelay))
		default:
			c.cs.skip(skip, c.m, tbl.Version())
			c.parent.x.bc.skips.Add(1)
			return p.finish(c, nil)
		}
	}
	ss := p.target(c.d.Target)
	if ss == nil {
		c.poison = DLQNoRoute
		return p.toDLQ(c)
	}
	c.storeKey = c.copyKey
	return p.reserveAndPublish(c, ss)
}

// errHoldSkip is rerouteCopy's answer when the event is no longer a
// broadcast of its rule.
const errHoldSkip = "\x00hold"

// rerouteCopy decides copy c again under tbl. It returns "" when c still
// goes to its cell (its target and version updated), a skip reason when its
// cell gets no copy any more, or errHoldSkip.
func (p *Pipeline) rerouteCopy(c *task, tbl *router.Table) string {
	d := tbl.Route(c.m.Rule, &c.m.Message)
	c.d.Version = d.Version
	if d.Reason != router.ReasonBroadcast {
		return errHoldSkip
	}
	if d.Origin == c.d.Cell {
		return router.SkipOrigin
	}
	for _, bc := range d.Cells {
		if bc.Cell == c.d.Cell {
			if bc.Skip != "" {
				return bc.Skip
			}
			c.d.Target = bc.Target
			return ""
		}
	}
	return SkipRemoved
}

// prepareCopy builds copy c's Outgoing: the event's headers in a map of
// the copy's own (copies of one message publish at once, so none writes the
// message's map) plus the Cell-* headers for its cell, Cell-Shard -1.
func (p *Pipeline) prepareCopy(c *task) {
	h := c.ownHeader()
	c.hv = [6]string{c.idKey, c.d.Cell, "-1", p.versionString(c.d.Version), c.m.Source, itoa(c.hops + 1)}
	for i, name := range forwardHeaders {
		h[name] = c.hv[i : i+1 : i+1]
	}
	c.out = Outgoing{Target: c.d.Target, MsgID: c.copyKey, Header: h, Body: c.m.Body}
}

// ownHeader returns the copy's header map, refilled with the message's
// headers (values shared: nobody modifies them).
func (c *task) ownHeader() map[string][]string {
	if c.hdr == nil {
		c.hdr = make(map[string][]string, len(c.m.Header)+8)
	}
	h := c.hdr
	clear(h)
	for k, v := range c.m.Header {
		h[k] = v
	}
	c.lentHdr = true // cleared again on recycle
	return h
}

// copySettled accounts for copy c's final result in its message.
func (p *Pipeline) copySettled(c *task, result error) {
	switch c.slot.Swap(slotNone) {
	case slotInFlight:
		p.budget.release(1)
	case slotLagging:
		p.lagN.Add(-1)
		c.cs.lagging.Add(-1)
	}
	p.copies.Add(-1)
	c.cs.pending.Add(-1)
	p.copyDone(c.parent, result)
}

// copyDone counts one copy of t (or Handle's own hold on it) as settled;
// the last one settles t: acked when every copy was confirmed or skipped,
// else with the first error a copy settled with (a nack: the redelivery
// publishes what is missing, and what was confirmed is a duplicate).
func (p *Pipeline) copyDone(t *task, result error) {
	bc := &t.x.bc
	if result != nil {
		bc.mu.Lock()
		if bc.err == nil {
			bc.err = result
		}
		bc.mu.Unlock()
	}
	if bc.pending.Add(-1) > 0 {
		return
	}
	bc.mu.Lock()
	err := bc.err
	bc.mu.Unlock()
	rm := t.rs.met
	dups, skips := bc.dups.Load(), bc.skips.Load()
	switch {
	case err == nil && skips == bc.copies:
		rm.skipped.Inc() // as when every cell is skipped at intake
	case err == nil && dups+skips == bc.copies:
		rm.duplicate.Inc() // nothing new was published
	case err == nil:
		rm.forwarded.Inc()
	case errors.Is(err, ErrRevoked):
		rm.revoked.Inc()
	}
	if err == nil {
		t.rs.hl.lastProgress.Store(p.clock.Now().UnixNano())
	}
	p.settle(t, err)
	p.recycle(t)
}
