package bridge

import (
	"context"
	"fmt"
	"sort"
	"time"
)

// sweeper runs the periodic work: releasing parked messages after a rules
// change (and every HeldRecheck), ErrInProgress heartbeats, the gauges that
// are cheaper to sample than to maintain per message, and readiness.
func (p *Pipeline) sweeper() {
	defer p.wg.Done()
	tick := min(100*time.Millisecond, p.cfg.AckWait/4, p.cfg.HeldRecheck)
	tk := time.NewTicker(tick)
	defer tk.Stop()
	var lastVer int64 = -1
	var lastRecheck, lastBeat, lastGauge time.Time
	beatEvery := p.cfg.AckWait / 4
	for {
		select {
		case <-p.quit:
			return
		case <-p.recheck:
			p.recheckParked()
			lastRecheck = time.Now()
		case <-tk.C:
			now := time.Now()
			if t := p.rules.Load(); t != nil && (t.Version() != lastVer || now.Sub(lastRecheck) >= p.cfg.HeldRecheck) {
				lastVer = t.Version()
				p.recheckParked()
				lastRecheck = now
			}
			if now.Sub(lastBeat) >= beatEvery {
				p.heartbeat()
				lastBeat = now
			}
			if now.Sub(lastGauge) >= 500*time.Millisecond {
				p.lagOld(p.clock.Now().UnixNano())
				p.updateGauges()
				p.health.Ready()
				lastGauge = now
			}
		}
	}
}

// heartbeat sends ErrInProgress for every unacknowledged message that has
// not been acknowledged or heartbeaten for AckWait/2, so that sources do
// not redeliver messages that are parked, retrying or queued behind one.
func (p *Pipeline) heartbeat() {
	now := p.clock.Now().UnixNano()
	limit := int64(p.cfg.AckWait / 2)
	var due []*task
	for _, rs := range p.ruleStates.load() {
		// The whole list: it is in the order messages were tracked, which
		// is their arrival order only per delivering goroutine. A message
		// that waited for an in-flight slot is tracked after younger ones
		// that did not wait (held ones, another partition's), so stopping
		// at the first young entry could leave it without a heartbeat
		// until the source redelivers it.
		rs.mu.Lock()
		for t := rs.head; t != nil; t = t.next {
			if now-t.arrived >= limit {
				due = append(due, t)
			}
		}
		rs.mu.Unlock()
	}
	for _, t := range due {
		t.mu.Lock()
		// A revoked delivery gets no heartbeat: the new owner's copy of
		// the message is the one that must not be redelivered.
		if !t.settled && !t.epoch.Revoked() && now-max(t.arrived, t.lastBeat) >= limit {
			t.lastBeat = now
			_ = t.ack(context.Background(), ErrInProgress)
		}
		t.mu.Unlock()
	}
}

// RuleStatus is the state of one topic rule in Status.
type RuleStatus struct {
	Rule                    string      `json:"rule"`
	InFlight                int         `json:"inFlight"`
	Held                    int         `json:"held"`
	HeldOldestAgeSeconds    float64     `json:"heldOldestAgeSeconds"`
	OldestUnackedAgeSeconds float64     `json:"oldestUnackedAgeSeconds"`
	Backlog                 int64       `json:"backlog"`
	HeldShards              []ShardHeld `json:"heldShards,omitempty"`
	HeldRanges              []RangeHeld `json:"heldRanges,omitempty"`
	LastProgress            time.Time   `json:"lastProgress"`
	// Source is this replica's share of the rule, as its source reports
	// it (absent for a source that does not): whether it forwards, its
	// partitions, its takeovers.
	Source *SourceStatus `json:"source,omitempty"`
	// Broadcast lists, for a broadcast rule, every cell that got or missed
	// a copy since the bridge started, by name.
	Broadcast []CellCopies `json:"broadcast,omitempty"`
	_         struct{}     `json:"-"`
}

// CellCopies is one cell of a broadcast rule in Status.
type CellCopies struct {
	Cell string `json:"cell"`
	// Pending counts copies accepted and not yet confirmed; Lagging those
	// of them that wait for a failing cell outside maxInFlight.
	Pending int64 `json:"pending"`
	Lagging int64 `json:"lagging"`
	// Missed is what the cell missed while it was down: replay it with
	// `cellbridge replay -rule R -cell C -from-time <Missed.First>`.
	Missed MissedCopies `json:"missed"`
}

// ShardHeld counts parked messages of one shard.
type ShardHeld struct {
	Shard            int     `json:"shard"`
	Held             int     `json:"held"`
	OldestAgeSeconds float64 `json:"oldestAgeSeconds"`
}

// RangeHeld sums parked messages over a run of consecutive shards that all
// hold some ("40-44"), the unit a switch blocks.
type RangeHeld struct {
	Shards           string  `json:"shards"`
	From             int     `json:"from"`
	To               int     `json:"to"`
	Held             int     `json:"held"`
	OldestAgeSeconds float64 `json:"oldestAgeSeconds"`
}

// heldRanges merges per-shard counts (sorted by shard) into runs.
func heldRanges(shards []ShardHeld) []RangeHeld {
	var out []RangeHeld
	for _, sh := range shards {
		if n := len(out); n > 0 && out[n-1].To == sh.Shard-1 {
			r := &out[n-1]
			r.To = sh.Shard
			r.Held += sh.Held
			r.OldestAgeSeconds = max(r.OldestAgeSeconds, sh.OldestAgeSeconds)
			continue
		}
		out = append(out, RangeHeld{From: sh.Shard, To: sh.Shard, Held: sh.Held, OldestAgeSeconds: sh.OldestAgeSeconds})
	}
	for i := range out {
		out[i].Shards = itoa(out[i].From)
		if out[i].To != out[i].From {
			out[i].Shards += "-" + itoa(out[i].To)
		}
	}
	return out
}

// Status is a snapshot of the pipeline for /status.
type Status struct {
	RulesVersion int64  `json:"rulesVersion"`
	RulesLoaded  bool   `json:"rulesLoaded"`
	Ready        bool   `json:"ready"`
	NotReady     string `json:"notReady,omitempty"`
	InFlight     int    `json:"inFlight"`
	MaxInFlight  int    `json:"maxInFlight"`
	Held         int64  `json:"held"`
	MaxHeld      int    `json:"maxHeld"`
	Lagging      int64  `json:"lagging"`
	MaxLagging   int    `json:"maxLagging"`
	// PublishingVersion is the lowest rules version under which a copy is
	// being published right now (sent to its target, result not yet
	// handled); 0 when none is. Once it is 0 or at least the running
	// version, no copy decided under an older table can still land: a
	// cell switch waits for that on every replica before the blocked rules
	// count as in force.
	PublishingVersion int64 `json:"publishingVersion,omitempty"`
	// Blocked lists the blocked shard ranges of the running rules ("22-32").
	Blocked []string     `json:"blocked,omitempty"`
	Rules   []RuleStatus `json:"rules"`
	// DedupeProtocols names, per target the bridge published to
	// ("publishing to broker NAME subject SUBJECT"), the dedupe protocol
	// in use and why: "check (duplicate window 2m0s)" (one write per
	// message, the target drops a concurrent copy) or "reserve (...)";
	// absent when the store has one protocol only.
	DedupeProtocols map[string]string `json:"dedupeProtocols,omitempty"`
}

type heldStats struct {
	n      int
	oldest int64
	shards map[int]*ShardHeld
}

// collectHeld walks the park queues (only lanes with parked messages).
func (p *Pipeline) collectHeld(now int64, perShard bool) map[string]*heldStats {
	out := map[string]*heldStats{}
	for _, l := range p.parkedLaneList() {
		l.mu.Lock()
		for _, q := range l.parked {
			if q.n == 0 {
				continue
			}
			hs := out[q.rule]
			if hs == nil {
				hs = &heldStats{oldest: now}
				out[q.rule] = hs
			}
			hs.n += q.n
			hs.oldest = min(hs.oldest, q.head.arrived)
			if perShard {
				if hs.shards == nil {
					hs.shards = map[int]*ShardHeld{}
				}
				sh := hs.shards[q.shard]
				if sh == nil {
					sh = &ShardHeld{Shard: q.shard}
					hs.shards[q.shard] = sh
				}
				sh.Held += q.n
				sh.OldestAgeSeconds = max(sh.OldestAgeSeconds, time.Duration(now-q.head.arrived).Seconds())
			}
		}
		l.mu.Unlock()
	}
	return out
}

func (rs *ruleState) snapshot(now int64) (n int, oldest float64) {
	rs.mu.Lock()
	defer rs.mu.Unlock()
	// The whole list, as stallAge: tracking order is arrival order only
	// per delivering goroutine (RocketMQ queues, partitions).
	from := int64(0)
	oldest1 := func(t *task) {
		at := t.arrived
		if !t.m.Time.IsZero() {
			at = min(at, t.m.Time.UnixNano())
		}
		if from == 0 || at < from {
			from = at
		}
	}
	for t := rs.head; t != nil; t = t.next {
		oldest1(t)
	}
	for t := range rs.waiting {
		oldest1(t)
	}
	if from != 0 {
		oldest = time.Duration(now - from).Seconds()
	}
	return rs.n, oldest
}

func (p *Pipeline) updateGauges() {
	p.health.updateNeeded()
	now := p.clock.Now().UnixNano()
	held := p.collectHeld(now, true)
	p.updateRangeGauges(held)
	for name, rs := range p.ruleStates.load() {
		n, oldest := rs.snapshot(now)
		h := int(rs.held.Load())
		rs.met.inFlight.Set(float64(n - h))
		rs.met.oldest.Set(oldest)
		rs.hl.unacked.Store(int64(oldest * float64(time.Second)))
		stall, slot := rs.stallAge(now)
		rs.hl.stallSlot.Store(slot)
		rs.hl.stall.Store(stall)
		rs.met.stall.Set(time.Duration(stall).Seconds())
		rs.met.heldN.Set(float64(h))
		for _, cs := range rs.cells.load() {
			cs.pendingG.Set(float64(cs.pending.Load()))
			cs.laggingG.Set(float64(cs.lagging.Load()))
		}
		if hs := held[name]; hs != nil {
			rs.met.heldOldest.Set(time.Duration(now - hs.oldest).Seconds())
		} else {
			rs.met.heldOldest.Set(0)
		}
	}
}

// updateRangeGauges sets the held gauges per rule and blocked range of the
// running table. The label values are the table's own blocked: entries, so
// there are few and they stay put for the length of a switch; ranges no
// longer blocked disappear.
func (p *Pipeline) updateRangeGauges(held map[string]*heldStats) {
	type agg struct {
		n      int
		oldest float64
	}
	got := map[[2]string]*agg{}
	if tbl := p.rules.Load(); tbl != nil {
		blocked := tbl.Blocked()
		for rule, hs := range held {
			for shard, sh := range hs.shards {
				for _, r := range blocked {
					if shard < r.From || shard > r.To {
						continue
					}
					k := [2]string{rule, r.String()}
					a := got[k]
					if a == nil {
						a = &agg{}
						got[k] = a
					}
					a.n += sh.Held
					a.oldest = max(a.oldest, sh.OldestAgeSeconds)
					break
				}
			}
		}
	}
	p.rangeMu.Lock()
	defer p.rangeMu.Unlock()
	for k := range p.rangeSeen {
		if got[k] == nil {
			p.met.HeldRange.DeleteLabelValues(k[0], k[1])
			p.met.HeldRangeOldest.DeleteLabelValues(k[0], k[1])
			delete(p.rangeSeen, k)
		}
	}
	for k, a := range got {
		p.met.HeldRange.WithLabelValues(k[0], k[1]).Set(float64(a.n))
		p.met.HeldRangeOldest.WithLabelValues(k[0], k[1]).Set(a.oldest)
		p.rangeSeen[k] = struct{}{}
	}
}

// Status returns a snapshot: rules version, and per rule the messages in
// flight, parked (with their age, per shard) and the source backlog.
func (p *Pipeline) Status() Status {
	now := p.clock.Now().UnixNano()
	st := Status{MaxInFlight: p.cfg.MaxInFlight, MaxHeld: p.cfg.MaxHeld, Held: p.heldN.Load(), InFlight: p.budget.used(),
		Lagging: p.lagN.Load(), MaxLagging: p.cfg.MaxLagging}
	// The version first: a publish counted after this look is decided
	// under it or a later one.
	if t := p.rules.Load(); t != nil {
		st.RulesVersion, st.RulesLoaded = t.Version(), true
		for _, r := range t.Blocked() {
			st.Blocked = append(st.Blocked, r.String())
		}
	}
	st.PublishingVersion = p.pubs.oldest()
	st.DedupeProtocols = p.dedupeProtocols()
	st.Ready, st.NotReady = p.health.Ready()
	if st.Ready {
		st.NotReady = ""
	}
	held := p.collectHeld(now, true)
	for name, rs := range p.ruleStates.load() {
		n, oldest := rs.snapshot(now)
		h := int(rs.held.Load())
		r := RuleStatus{Rule: name, InFlight: n - h, Held: h, OldestUnackedAgeSeconds: oldest,
			Backlog: rs.hl.backlog.Load(), LastProgress: time.Unix(0, rs.hl.lastProgress.Load()).UTC()}
		if hs := held[name]; hs != nil {
			r.HeldOldestAgeSeconds = time.Duration(now - hs.oldest).Seconds()
			for _, sh := range hs.shards {
				r.HeldShards = append(r.HeldShards, *sh)
			}
			sort.Slice(r.HeldShards, func(i, j int) bool { return r.HeldShards[i].Shard < r.HeldShards[j].Shard })
			r.HeldRanges = heldRanges(r.HeldShards)
		}
		for _, cs := range rs.cells.load() {
			cs.mu.Lock()
			missed := cs.missed
			missed.Ongoing = cs.open.Load()
			cs.mu.Unlock()
			r.Broadcast = append(r.Broadcast, CellCopies{Cell: cs.cell, Pending: cs.pending.Load(), Lagging: cs.lagging.Load(), Missed: missed})
		}
		sort.Slice(r.Broadcast, func(i, j int) bool { return r.Broadcast[i].Cell < r.Broadcast[j].Cell })
		st.Rules = append(st.Rules, r)
	}
	st.Rules = withSources(st.Rules, p.met.sourceStatuses())
	return st
}

func (p *Pipeline) unacked() int {
	n := 0
	for _, rs := range p.ruleStates.load() {
		rs.mu.Lock()
		n += rs.n
		rs.mu.Unlock()
	}
	return n
}

// Drain stops intake and finishes what is in flight: new Handle calls
// negative-ack at once; parked messages, messages queued behind others and
// messages waiting for a retry are negative-acked (redelivered later, to
// this or another replica); messages whose publish has started are acked
// when the sink confirms. When ctx ends first (or, without a ctx deadline,
// after Config.DrainTimeout) the remaining messages are negative-acked and
// Drain returns an error saying how many. Nothing is acknowledged that was
// not confirmed by a sink. Drain is idempotent; call it after the sources
// stopped fetching.
func (p *Pipeline) Drain(ctx context.Context) error {
	p.drainOnce.Do(func() { p.drainErr = p.drain(ctx) })
	return p.drainErr
}

func (p *Pipeline) drain(ctx context.Context) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, p.cfg.DrainTimeout)
		defer cancel()
	}
	p.closing.Store(true)
	close(p.closeCh)
	poll := time.NewTicker(2 * time.Millisecond)
	defer poll.Stop()
	// Handle calls still running finish their intake step (the budget wait
	// returns at once; a blocked PublishAsync returns when the sink frees up
	// or at the deadline).
	for p.handling.Load() > 0 && ctx.Err() == nil {
		select {
		case <-poll.C:
		case <-ctx.Done():
		}
	}
	p.draining.Store(true)
	var nack []*task
	for i := range p.lanes {
		l := &p.lanes[i]
		l.mu.Lock()
		for t := l.qhead; t != nil; {
			nx := t.qnext
			t.qnext = nil
			nack = append(nack, t)
			t = nx
		}
		l.qhead, l.qtail = nil, nil
		for k, q := range l.parked {
			for t := q.head; t != nil; {
				nx := t.qnext
				t.qnext = nil
				nack = append(nack, t)
				t.rs.held.Add(-1)
				p.heldN.Add(-1)
				t = nx
			}
			delete(l.parked, k)
		}
		l.parked = nil
		for i := 0; i < len(l.active); {
			a := l.active[i]
			a.mu.Lock()
			stopped := a.timer != nil && a.timer.Stop()
			if stopped {
				// The retry will not fire: nobody else owns a now.
				a.timer = nil
			}
			a.mu.Unlock()
			if stopped {
				l.removeActive(a)
				nack = append(nack, a)
				continue
			}
			i++
		}
		l.mu.Unlock()
	}
	p.parkMu.Lock()
	clear(p.parkedLanes)
	p.parkMu.Unlock()
	for _, t := range nack {
		p.settle(t, errDraining)
	}
	for p.unacked() > 0 && ctx.Err() == nil {
		select {
		case <-poll.C:
		case <-ctx.Done():
		}
	}
	if ctx.Err() == nil {
		return nil
	}
	// Deadline: negative-ack what is still unconfirmed. A confirmation that
	// arrives later still commits its key, so the redelivery is a duplicate.
	var left []*task
	for _, rs := range p.ruleStates.load() {
		rs.mu.Lock()
		for t := rs.head; t != nil; t = t.next {
			left = append(left, t)
		}
		rs.mu.Unlock()
	}
	for _, t := range left {
		p.settle(t, errDraining)
	}
	p.cancel()
	if len(left) == 0 {
		return nil
	}
	return fmt.Errorf("bridge: drain: %d messages unconfirmed at the deadline were negatively acknowledged: %w", len(left), ctx.Err())
}

// Close drains (see Drain) and then stops the pipeline's goroutines. It
// does not close the sources, sinks or the dedupe store: the caller closes
// sinks and the store after Close returned. Idempotent.
func (p *Pipeline) Close(ctx context.Context) error {
	err := p.Drain(ctx)
	p.closeOnce.Do(func() {
		close(p.quit)
		stopped := make(chan struct{})
		go func() {
			p.wg.Wait()
			close(stopped)
		}()
		select {
		case <-stopped:
		case <-ctx.Done():
			// A worker is stuck in a store call: end it.
			p.cancelSettle()
			<-stopped
		}
		p.cancel()
		p.cancelSettle()
	})
	return err
}
