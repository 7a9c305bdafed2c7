package natsjs

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// The lease manager of a PartitionedSource: one goroutine (manage) keeps
// the membership, watches the lease bucket, computes the assignment and
// starts or stops one owner goroutine per partition; each owner takes its
// partition's lease, renews it (a keeper), runs the partition's consumer
// and gives it up. Only leases decide who should run a partition; the
// consumers' own takeover (reset to the ack floor, pinning) is what keeps
// order when two replicas briefly disagree.

// owner is the manager's handle on one owner goroutine.
type owner struct {
	p      int
	giveUp chan struct{} // closed to make the owner give its partition up
	once   sync.Once
}

func (o *owner) release() { o.once.Do(func() { close(o.giveUp) }) }

type ownerEventKind uint8

const (
	evStarted ownerEventKind = iota + 1 // the partition's consumer exists; the owner runs it
	evEnded                             // the owner goroutine ended
)

type ownerEvent struct {
	p    int
	kind ownerEventKind
	err  error // evEnded: why it could not take or keep the partition (errHeld: another holds it)
	lost bool  // evEnded: the lease was lost while held
}

func (s *PartitionedSource) send(ev ownerEvent) {
	select {
	case s.events <- ev:
	case <-s.mgrDone:
	}
}

func (s *PartitionedSource) setFatal() { s.fatalO.Do(func() { close(s.fatal) }) }

// own takes partition o.p's lease, runs its consumer while Run's sessions
// last, and gives it up when the manager asks (drain, then release), when
// the lease is lost (stop at once) or when Close gives up waiting.
func (s *PartitionedSource) own(o *owner) {
	ev := ownerEvent{p: o.p, kind: evEnded}
	defer func() {
		s.dropOwnerState(o.p)
		s.send(ev)
	}()
	log := s.log.With("partition", o.p)
	s.setOwnerState(o.p, ownerAcquiring, nil)
	key := s.leaseKey(o.p)
	rev, sent, err := s.b.create(s.life, key, s.val)
	if err != nil {
		if !errors.Is(err, errHeld) {
			log.Warn("cannot take partition lease", "err", err)
		}
		ev.err = err
		return
	}
	k := s.b.keep(key, s.val, rev, sent)
	release := func() {
		if err := s.b.release(s.life, key, s.val, k.Stop()); err != nil {
			log.Warn("partition lease not released; it expires after the TTL", "err", err)
		}
	}
	select {
	case <-o.giveUp: // the assignment moved while the lease was taken
		release()
		return
	default:
	}
	s.setOwnerState(o.p, "starting", nil)
	spec := PartitionSpec{
		Rule: s.cfg.Rule, Broker: s.cfg.Broker, Stream: s.cfg.Stream,
		Partition: o.p, Partitions: s.cfg.Partitions,
		Durable:     PartitionDurable(s.cfg.Group, s.cfg.Partitions, o.p),
		Filter:      PartitionFilter(s.cfg.Partitions, o.p),
		StripTokens: PartitionPrefixTokens,
	}
	fctx, cancel := context.WithTimeout(s.life, 2*streamCallTimeout)
	part, err := s.cfg.NewPartition(fctx, spec)
	cancel()
	if err != nil {
		log.Warn("cannot create partition consumer; lease released", "durable", spec.Durable, "err", err)
		release()
		ev.err = err
		return
	}
	s.send(ownerEvent{p: o.p, kind: evStarted})
	log.Info("partition taken", "durable", spec.Durable)

	var (
		runDone  chan error
		runStop  context.CancelFunc
		runSess  *session
		retry    <-chan time.Time
		retryT   *time.Timer
		backoff  = time.Second
		stopping = func() {
			if runDone != nil {
				runStop()
				<-runDone
				runDone = nil
			}
		}
	)
	defer func() {
		if retryT != nil {
			retryT.Stop()
		}
	}()
	for {
		sess, changed := s.session()
		if runDone == nil && retry == nil && sess != nil {
			rctx, rcancel := context.WithCancel(sess.ctx)
			done := make(chan error, 1)
			h := sess.h
			if sess.spawn(func() { done <- part.Run(rctx, h) }) {
				runDone, runStop, runSess = done, rcancel, sess
			} else {
				rcancel()
			}
		}
		switch {
		case runDone != nil:
			s.setOwnerState(o.p, "active", part)
		case retry == nil:
			s.setOwnerState(o.p, "paused", part)
		}
		select {
		case <-changed:
		case <-o.giveUp:
			// Stop pulling, let the pipeline settle what it was given,
			// unpin, then delete the lease: the next owner can only start
			// after that, or after the lease's expiry. The drain ends at
			// DrainTimeout, and at once when the lease is lost meanwhile
			// (another replica may take the partition from then on: what
			// is still open is revoked, as in the lost-lease case below).
			s.setOwnerState(o.p, "draining", part)
			dctx, cancel := context.WithTimeout(s.life, s.cfg.DrainTimeout)
			go func() {
				select {
				case <-k.Lost():
					cancel()
				case <-dctx.Done():
				}
			}()
			if runDone != nil {
				runStop()
				select {
				case <-runDone:
				case <-dctx.Done():
					revoke(part)
					<-runDone
				}
				runDone = nil
			}
			if err := part.Release(dctx); err != nil {
				log.Warn("partition handed over before its deliveries settled", "err", err)
			}
			cancel()
			select {
			case <-k.Lost():
				k.Stop()
				log.Warn("partition lease lost while draining; what was still open was revoked")
				ev.lost = true
				return
			default:
			}
			s.setOwnerState(o.p, "releasing", part)
			release()
			log.Info("partition released")
			return
		case <-k.Lost():
			// Another replica may take the partition from now on: publish
			// nothing more of it (revoked at once, while the handler may
			// still be blocked), then stop.
			revoke(part)
			stopping()
			revoke(part)
			k.Stop()
			log.Warn("partition lease lost; stopped consuming it")
			ev.lost = true
			return
		case <-s.life.Done():
			revoke(part)
			stopping()
			revoke(part)
			k.Stop()
			return
		case err := <-runDone:
			runDone = nil
			runStop()
			if s.js.Conn().IsClosed() {
				s.setFatal()
			}
			if cur, _ := s.session(); cur != runSess || runSess.ctx.Err() != nil {
				continue // the session ended: wait for the next one
			}
			log.Warn("partition consumer stopped; restarting", "err", err, "retry_in", backoff)
			retryT = time.NewTimer(backoff)
			retry = retryT.C
			backoff = min(2*backoff, reconnectMax)
		case <-retry:
			retry, retryT = nil, nil
		}
	}
}

// revoke ends part's epoch at once: Release with a ctx that is already
// done stops Run and revokes its running epoch without waiting for it, or,
// once Run returned, revokes the epoch it left.
func revoke(part Partition) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = part.Release(ctx)
}

// viewEntry is one key of the lease bucket as this replica last saw it.
type viewEntry struct {
	holder string    // the key's value (holderValue)
	seen   time.Time // when the watch delivered it (local clock)
}

// gone remembers how a partition's previous holder let go.
type gone struct {
	holder, how string
}

// leaseView is the lease bucket's content under the rule's prefix, as the
// watch delivered it: live members and partition holders.
type leaseView struct {
	prefix  string
	n       int
	members map[string]time.Time
	holders map[int]viewEntry
	prev    map[int]gone
}

func newLeaseView(prefix string, n int) *leaseView {
	return &leaseView{prefix: prefix, n: n, members: map[string]time.Time{}, holders: map[int]viewEntry{}, prev: map[int]gone{}}
}

// apply records one watch entry.
func (v *leaseView) apply(e jetstream.KeyValueEntry, now time.Time) {
	rest, ok := strings.CutPrefix(e.Key(), v.prefix)
	if !ok {
		return
	}
	del := e.Operation() != jetstream.KeyValuePut
	if id, ok := strings.CutPrefix(rest, "m."); ok {
		if del {
			delete(v.members, id)
		} else {
			v.members[id] = now
		}
		return
	}
	ps, ok := strings.CutPrefix(rest, "p.")
	if !ok {
		return
	}
	p, err := strconv.Atoi(ps)
	if err != nil || p < 0 || p >= v.n {
		return
	}
	if !del {
		v.holders[p] = viewEntry{holder: string(e.Value()), seen: now}
		return
	}
	if h, ok := v.holders[p]; ok {
		how := "released"
		if e.Operation() == jetstream.KeyValuePurge {
			how = "expired"
		}
		v.prev[p] = gone{holder: h.holder, how: how}
		delete(v.holders, p)
	}
}

// expire drops what has not been renewed since before: a watch whose
// consumer was recreated after a reconnect can miss an expiry marker, and
// every live key is renewed each heartbeat.
func (v *leaseView) expire(before time.Time) {
	for id, seen := range v.members {
		if seen.Before(before) {
			delete(v.members, id)
		}
	}
	for p, h := range v.holders {
		if h.seen.Before(before) {
			v.prev[p] = gone{holder: h.holder, how: "expired"}
			delete(v.holders, p)
		}
	}
}

func (v *leaseView) memberList() []string { return slices.Sorted(maps.Keys(v.members)) }

// manager is the state of the manage goroutine; nothing else touches it.
type manager struct {
	s         *PartitionedSource
	view      *leaseView
	pending   *leaseView // filled by a new watch until its initial values are in
	synced    bool
	watch     jetstream.KeyWatcher
	wcancel   context.CancelFunc
	updates   <-chan jetstream.KeyValueEntry
	heard     time.Time // the watch's last delivery (or start)
	member    *keeper
	owners    map[int]*owner
	notBefore map[int]time.Time
	settled   bool   // the start-up pause is over
	closing   bool   // Close was called: leave, give everything up, take nothing
	failing   string // the problem last reported to Failing ("" none)
	memberErr error  // why the last announcement failed
	heldRev   uint64 // the revision of this id's membership key held by another instance, at the last attempt
	dupID     bool   // that key was renewed between two attempts: a live replica uses this id
	watchErr  error  // why the last watch failed
}

// manage runs until Close: it keeps the membership, the watch and the
// owners, and on Close gives every partition up and leaves.
func (s *PartitionedSource) manage() {
	defer close(s.mgrDone)
	m := &manager{s: s, view: newLeaseView(s.prefix, s.cfg.Partitions), owners: map[int]*owner{}, notBefore: map[int]time.Time{}}
	defer m.stopWatch()
	defer func() {
		if m.member != nil { // Close gave up waiting: the membership expires
			m.member.Stop()
		}
	}()
	tick := time.NewTicker(s.b.beat)
	defer tick.Stop()
	// Replicas started together see each other before taking anything,
	// instead of one taking every partition and handing most back.
	settle := time.NewTimer(s.b.beat)
	defer settle.Stop()
	m.ensureMember()
	m.ensureWatch()
	stop, abort := s.stop, s.life.Done()
	for {
		_, changed := s.session()
		var lost <-chan struct{}
		if m.member != nil {
			lost = m.member.Lost()
		}
		select {
		case <-changed:
		case <-settle.C:
			m.settled = true
		case <-stop:
			stop, m.closing = nil, true
			m.leave()
		case <-abort:
			abort, m.closing = nil, true
			if stop != nil { // Close's stop not seen yet: leave first
				stop = nil
				m.leave()
			}
		case e, ok := <-m.updates:
			m.applyWatch(e, ok)
		case ev := <-s.events:
			m.event(ev)
		case <-tick.C:
			m.tick()
		case <-lost:
			m.member.Stop()
			m.member = nil
			if !m.closing {
				s.log.Warn("membership lost (heartbeats failed); announcing again")
				m.ensureMember()
			}
		}
		if m.closing {
			for _, o := range m.owners {
				o.release()
			}
			if len(m.owners) == 0 {
				return
			}
			continue
		}
		m.reconcile()
	}
}

// ensureMember announces this replica (a membership key it renews) when it
// is not announced. The key's value carries this instance's nonce, so a
// membership under this replica id written by another instance is refused
// (create). If that key keeps being renewed (its revision moves between two
// attempts), a live replica uses the same id: that is an error (logged,
// and reported through Failing until it is gone), and this replica takes
// no partition meanwhile. A key that stays put is an earlier instance's
// that expires within the lease TTL (a restart with a fixed replica id).
func (m *manager) ensureMember() {
	s := m.s
	if m.member != nil {
		return
	}
	rev, sent, err := s.b.create(s.life, s.memberKey, s.val)
	if err != nil {
		var held *heldError
		if errors.As(err, &held) {
			if m.heldRev != 0 && held.rev != 0 && held.rev != m.heldRev {
				m.dupID = true
			}
			m.heldRev = held.rev
		}
		switch {
		case m.dupID:
			err = fmt.Errorf("replica id %s is used by another replica (another instance renews its membership %s): %w",
				s.cfg.ReplicaID, s.memberKey, err)
		case held != nil:
			err = fmt.Errorf("replica id %s: membership %s held by another instance (an earlier one of this replica expires within %s): %w",
				s.cfg.ReplicaID, s.memberKey, s.b.ttl, err)
		}
		err = fmt.Errorf("natsjs: rule %s: cannot announce this replica in lease bucket %s: %w", s.cfg.Rule, s.cfg.Leases.Bucket, err)
		if m.memberErr == nil || m.memberErr.Error() != err.Error() {
			switch {
			case m.dupID:
				s.log.Error("another live replica uses this replica id; give every replica a unique one (partitions.replicaID)",
					"key", s.memberKey, "err", err)
			case held != nil:
				s.log.Info("membership of this replica id held by another instance; waiting for it to expire", "key", s.memberKey, "err", err)
			default:
				s.log.Warn("cannot announce membership; retrying", "err", err)
			}
		}
		m.memberErr = err
		m.report()
		return
	}
	m.heldRev, m.dupID = 0, false
	m.member, m.memberErr = s.b.keep(s.memberKey, s.val, rev, sent), nil
	m.report()
}

// report tells Failing about a change of this replica's ability to take
// part: it cannot while it is not announced or not watching.
func (m *manager) report() {
	err := m.memberErr
	if err == nil {
		err = m.watchErr
	}
	msg := ""
	if err != nil {
		msg = err.Error()
	}
	if msg == m.failing || m.s.cfg.Failing == nil {
		return
	}
	m.failing = msg
	m.s.cfg.Failing(err)
}

// leave removes the membership so that the other replicas rebalance at
// once.
func (m *manager) leave() {
	if m.member == nil {
		return
	}
	s := m.s
	if err := s.b.release(s.life, s.memberKey, s.val, m.member.Stop()); err != nil {
		s.log.Warn("membership not removed; it expires after the TTL", "err", err)
	}
	m.member = nil
}

// ensureWatch (re)starts the watch of the rule's keys when it is not
// running. Its consumer lives until Close; only its creation is bounded.
func (m *manager) ensureWatch() {
	s := m.s
	if m.updates != nil || !s.b.nc.IsConnected() {
		return
	}
	ctx, cancel := context.WithCancel(s.life)
	t := time.AfterFunc(3*s.b.call, cancel)
	w, err := s.b.kv.Watch(ctx, s.prefix+">")
	if !t.Stop() || err != nil {
		cancel()
		if err == nil {
			err = context.DeadlineExceeded
		}
		s.log.Warn("cannot watch the lease bucket; retrying", "err", err)
		m.watchErr = fmt.Errorf("natsjs: rule %s: cannot watch lease bucket %s: %w", s.cfg.Rule, s.cfg.Leases.Bucket, err)
		m.report()
		return
	}
	m.watch, m.wcancel, m.updates, m.heard = w, cancel, w.Updates(), time.Now()
	m.pending, m.synced = newLeaseView(s.prefix, s.cfg.Partitions), false
	m.watchErr = nil
	m.report()
}

// stopWatch stops the watch. The view it fed no longer learns of renewals,
// and expiring it would soon show every member gone (and make reconcile
// give every partition up): until a new watch has delivered its initial
// values, the view counts as not synced, and owners keep what they hold
// (their leases guard it).
func (m *manager) stopWatch() {
	if m.watch != nil {
		_ = m.watch.Stop()
		m.wcancel()
		m.watch, m.updates = nil, nil
	}
	m.synced = false
}

// applyWatch takes one watch delivery; nil marks the end of the initial
// values, a closed channel a watch that must be started again.
func (m *manager) applyWatch(e jetstream.KeyValueEntry, ok bool) {
	m.heard = time.Now()
	switch {
	case !ok:
		m.stopWatch()
	case e == nil:
		if m.pending != nil {
			m.view, m.pending, m.synced = m.pending, nil, true
			m.publishMembers()
		}
	case m.pending != nil:
		m.pending.apply(e, time.Now())
	default:
		m.view.apply(e, time.Now())
		m.publishMembers()
	}
}

func (m *manager) publishMembers() {
	members := m.view.memberList()
	m.s.mu.Lock()
	m.s.members = members
	m.s.mu.Unlock()
}

func (m *manager) tick() {
	s := m.s
	if s.js.Conn().IsClosed() {
		s.setFatal()
		return
	}
	if !m.closing {
		m.ensureMember()
	}
	if m.watch != nil && m.member != nil && time.Since(m.heard) > s.b.ttl {
		// This replica's own renewals alone reach the watch every
		// heartbeat: a silent watch is stuck (its stream was deleted and
		// recreated, say) and starts again.
		s.log.Warn("lease bucket watch silent; starting it again", "silent", time.Since(m.heard).Round(time.Millisecond))
		m.stopWatch()
	}
	m.ensureWatch()
	m.view.expire(time.Now().Add(-(s.b.ttl + s.b.beat)))
	m.publishMembers()
}

func (m *manager) event(ev ownerEvent) {
	s := m.s
	switch ev.kind {
	case evStarted:
		t := &Takeover{Partition: ev.p, At: time.Now()}
		if g, ok := m.view.prev[ev.p]; ok && g.holder != string(s.val) {
			t.From, t.How = holderID(g.holder), g.how
		}
		s.takeovers.Add(1)
		s.mu.Lock()
		s.last = t
		s.mu.Unlock()
	case evEnded:
		delete(m.owners, ev.p)
		switch {
		case errors.Is(ev.err, errHeld):
			// Wait for the watch to show the holder; retry soon in case
			// the view is behind.
			m.notBefore[ev.p] = time.Now().Add(s.b.beat / 2)
		case ev.err != nil || ev.lost:
			m.notBefore[ev.p] = time.Now().Add(s.b.beat)
		}
	}
}

// reconcile starts owners for the partitions assigned to this replica that
// look free, and makes owners of partitions assigned elsewhere give them up.
func (m *manager) reconcile() {
	s := m.s
	sess, _ := s.session()
	if sess == nil || !m.synced || !m.settled {
		return
	}
	me := s.cfg.ReplicaID
	members := m.view.memberList()
	want := Assign(members, s.cfg.Partitions)
	for p, o := range m.owners {
		if want == nil || want[p] != me {
			o.release()
		}
	}
	if m.member == nil || !slices.Contains(members, me) {
		return
	}
	now := time.Now()
	for p, w := range want {
		if w != me || m.owners[p] != nil || now.Before(m.notBefore[p]) {
			continue
		}
		if h, ok := m.view.holders[p]; ok && h.holder != string(s.val) {
			continue
		}
		o := &owner{p: p, giveUp: make(chan struct{})}
		m.owners[p] = o
		go s.own(o)
	}
}
