package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
)

// PartitionSpec names the consumer of one partition, as a PartitionFactory
// receives it.
type PartitionSpec struct {
	Rule   string
	Broker string
	Stream string
	// Partition is the partition number, 0 ≤ Partition < Partitions.
	Partition, Partitions int
	// Durable is the partition's durable consumer, PartitionDurable.
	Durable string
	// Filter is its filter subject, PartitionFilter.
	Filter string
	// StripTokens is how many leading subject tokens the Partition removes
	// before it hands a message on (PartitionPrefixTokens).
	StripTokens int
}

// Partition is one partition's consumer while this replica holds the
// partition's lease (an ordered Source with the spec's durable, filter and
// StripTokens). The PartitionedSource calls Run, and Release after Run
// returned when it gives the partition up or lost the lease; State may be
// called at any time.
type Partition interface {
	// Run consumes the partition and calls h for each message, its subject
	// without the spec's StripTokens leading tokens, until ctx is
	// cancelled; then it stops fetching and returns nil. It takes the
	// consumer over in order (from the ack floor) before it hands anything
	// to h, and gives every delivery an Epoch. Deliveries handed to h stay
	// with h. An error means the partition cannot be consumed now; the
	// source calls Run again after a pause while it holds the lease.
	Run(ctx context.Context, h bridge.Handler) error
	// Release gives the partition up after Run returned: it waits (within
	// ctx) until every delivery handed to h was settled, revokes the epoch
	// of those still open when ctx ends (the pipeline publishes none of
	// them that has not started publishing), then lets the next owner start
	// at once (unpins, if the server still names this consumer's pin). With
	// a ctx that is already done it revokes at once, also while Run still
	// runs (Run is stopped, and its epoch revoked before Run returns): the
	// lease was lost. An error reports deliveries that were still open, Run
	// not returned, or a step that failed; the partition is handed over
	// anyway.
	Release(ctx context.Context) error
	// State describes the consumer for operators, e.g. "standby" or
	// "active".
	State() string
}

// PartitionFactory makes the Partition for spec, creating or updating its
// durable consumer. It is called when this replica has taken the
// partition's lease, with a ctx bounded to a few seconds.
type PartitionFactory func(ctx context.Context, spec PartitionSpec) (Partition, error)

// PartitionedConfig describes one partitioned topic rule
// (`source.partitions: N` with `key: {subjectToken: k}`).
type PartitionedConfig struct {
	// Rule, Broker, Stream and Subject are the rule's name and source.
	Rule    string
	Broker  string
	Stream  string
	Subject string
	// Group is the rule's consumer group: partition p's durable is
	// PartitionDurable(Group, Partitions, p), and the replicas of the rule
	// share leases under "<Group>.n<Partitions>." in the lease bucket.
	Group string
	// KeyToken is the rule's key.subjectToken.
	KeyToken int
	// Partitions is the rule's source.partitions (1..router.MaxPartitions).
	Partitions int
	// ReplicaID names this replica among the rule's replicas; it must be
	// unique among live replicas (letters, digits, '_' and '-', at most
	// 128). Default: the host name and a random suffix, new on every
	// start. Every key this source writes also carries a nonce of its own,
	// so a second live instance with the same id is refused its membership
	// and reported (Failing, and an error log line) instead of sharing the
	// first one's leases; an instance restarted with a fixed id waits until
	// its predecessor's keys expired (at most the lease TTL).
	ReplicaID string
	// Leases configures the lease bucket.
	Leases LeaseConfig
	// DrainTimeout bounds how long a partition that moves to another
	// replica waits for its deliveries to settle before the lease is
	// released anyway. Default 10s.
	DrainTimeout time.Duration
	// Consumer is the base configuration of every partition's ordered
	// Source (AckWait, MaxAckPending, FetchBatch, PinnedTTL, Group, ...);
	// Rule, Broker, Stream, Durable, Subject, StripTokens and Ordering are
	// set per partition. Its Backlog, when set, receives the sum of the
	// pending counts of the partitions this replica holds; its OnState
	// receives each partition's state changes.
	Consumer SourceConfig
	// NewPartition makes each partition's consumer. Default
	// OrderedPartitions over Consumer; tests may give their own.
	NewPartition PartitionFactory
	// Failing, when set, is told why this replica cannot take part in the
	// rule's partitions (it cannot announce itself in, or watch, the lease
	// bucket), and nil once it can again: for the bridge's readiness
	// (Health.SourceFailing). It is called from one goroutine, on changes
	// only, and must not block.
	Failing func(err error)
}

func (c *PartitionedConfig) defaults() error {
	switch {
	case c.Rule == "" || c.Stream == "" || c.Subject == "" || c.Group == "":
		return errors.New("natsjs: partitioned source: rule, stream, subject and group are required")
	}
	if c.ReplicaID == "" {
		c.ReplicaID = defaultReplicaID()
	}
	if !validReplicaID(c.ReplicaID) {
		return fmt.Errorf("natsjs: partitioned source %s: replica id %q: letters, digits, '_' and '-' only, at most 128", c.Rule, c.ReplicaID)
	}
	if c.DrainTimeout <= 0 {
		c.DrainTimeout = 10 * time.Second
	}
	return c.Leases.defaults()
}

// defaultReplicaID is the host name (the pod name on Kubernetes), cleaned
// to a KV key token, and a random suffix: a restarted replica is a new
// member, never mistaken for its predecessor whose leases may still run.
func defaultReplicaID() string {
	host, _ := os.Hostname()
	host = strings.Map(func(c rune) rune {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-' {
			return c
		}
		return '_'
	}, host)
	if len(host) > 100 {
		host = host[:100]
	}
	if host == "" {
		host = "replica"
	}
	return host + "-" + strconv.FormatUint(rand.Uint64()>>24, 36)
}

// PartitionedSource consumes one partitioned rule: it runs the consumer of
// every partition whose lease this replica holds, and shares the
// partitions with the rule's other replicas through the lease bucket
// (docs/partitions.md). It implements bridge.Source: Run may be called
// again after it returned; Close releases every partition and the
// membership.
type PartitionedSource struct {
	js        jetstream.JetStream
	cfg       PartitionedConfig
	log       *slog.Logger
	b         *leaseBucket
	prefix    string // "<group>.n<N>."
	memberKey string
	val       []byte // holderValue: the value of every key it holds

	life   context.Context // ends when Close gives up waiting
	abort  context.CancelFunc
	stop   chan struct{} // closed by Close
	stopO  sync.Once
	fatal  chan struct{} // closed when the connection is closed for good
	fatalO sync.Once
	events chan ownerEvent

	startO  sync.Once
	mgrDone chan struct{} // closed when the manager returns

	mu        sync.Mutex
	sess      *session
	sessCh    chan struct{} // closed and replaced when sess changes
	running   bool
	owned     map[int]*ownerStatus
	members   []string
	takeovers atomic.Uint64
	last      *Takeover
}

var _ bridge.Source = (*PartitionedSource)(nil)

// NewPartitionedSource checks that the stream carries the subject
// transform the rule needs (CheckStreamTransform; a mismatch is refused
// with the transform to apply) and opens the lease bucket, creating it when
// missing. Nothing is taken before Run. Each request has its own short
// timeout within ctx.
func NewPartitionedSource(ctx context.Context, js jetstream.JetStream, cfg PartitionedConfig, log *slog.Logger) (*PartitionedSource, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	log = log.With("rule", cfg.Rule, "stream", cfg.Stream, "replica", cfg.ReplicaID)
	tr, err := PartitionTransform(cfg.Subject, cfg.KeyToken, cfg.Partitions)
	if err != nil {
		return nil, fmt.Errorf("natsjs: partitioned source %s: %w", cfg.Rule, err)
	}
	if err := CheckStreamTransform(ctx, js, cfg.Stream, tr); err != nil {
		return nil, fmt.Errorf("natsjs: partitioned source %s: %w", cfg.Rule, err)
	}
	b, err := openLeaseBucket(ctx, js, cfg.Leases, log)
	if err != nil {
		return nil, err
	}
	backlog := &backlogSum{report: cfg.Consumer.Backlog, parts: map[int]uint64{}}
	failing := &failingAny{report: cfg.Failing, parts: map[int]error{}}
	if cfg.Failing != nil {
		// The membership and every owned partition report on their own;
		// the rule fails while any of them does.
		cfg.Failing = failing.of(membershipPart)
	}
	if cfg.NewPartition == nil {
		base := cfg.Consumer
		base.Backlog = nil   // per partition, through backlog.of
		base.OnFailing = nil // per partition, through failing.of
		cfg.NewPartition = func(ctx context.Context, spec PartitionSpec) (Partition, error) {
			c := base
			if cfg.Consumer.Backlog != nil {
				c.Backlog = backlog.of(spec.Partition)
			}
			if failing.report != nil {
				c.OnFailing = failing.of(spec.Partition)
			}
			p, err := OrderedPartitions(js, c, log)(ctx, spec)
			if err != nil {
				return nil, err
			}
			return forgetBacklog{Partition: p, forget: func() {
				backlog.forget(spec.Partition)
				failing.forget(spec.Partition)
			}}, nil
		}
	}
	prefix := cfg.Group + ".n" + strconv.Itoa(cfg.Partitions) + "."
	s := &PartitionedSource{
		js: js, cfg: cfg, log: log, b: b,
		prefix:    prefix,
		memberKey: prefix + "m." + cfg.ReplicaID,
		val:       holderValue(cfg.ReplicaID, strconv.FormatUint(rand.Uint64(), 36)),
		stop:      make(chan struct{}),
		fatal:     make(chan struct{}),
		events:    make(chan ownerEvent, 16),
		mgrDone:   make(chan struct{}),
		sessCh:    make(chan struct{}),
		owned:     map[int]*ownerStatus{},
	}
	s.life, s.abort = context.WithCancel(context.Background())
	return s, nil
}

// ReplicaID returns this replica's id among the rule's replicas.
func (s *PartitionedSource) ReplicaID() string { return s.cfg.ReplicaID }

// session is one call of Run: the handler and the ctx every partition
// consumer started under it runs with.
type session struct {
	ctx context.Context
	h   bridge.Handler

	mu    sync.Mutex
	ended bool
	wg    sync.WaitGroup
}

// spawn runs f on a new goroutine, counted by the session, unless the
// session has ended.
func (x *session) spawn(f func()) bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.ended {
		return false
	}
	x.wg.Add(1)
	go func() {
		defer x.wg.Done()
		f()
	}()
	return true
}

// end refuses later spawns and waits for the running ones.
func (x *session) end() {
	x.mu.Lock()
	x.ended = true
	x.mu.Unlock()
	x.wg.Wait()
}

func (s *PartitionedSource) setSession(x *session) {
	s.mu.Lock()
	s.sess = x
	close(s.sessCh)
	s.sessCh = make(chan struct{})
	s.mu.Unlock()
}

func (s *PartitionedSource) session() (*session, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sess, s.sessCh
}

// Run announces this replica as a member of the rule (the first call
// starts the membership heartbeat and the lease manager, which run until
// Close), takes the partitions assigned to it and runs their consumers
// with h until ctx is cancelled. Then every partition consumer stops
// fetching, and Run returns once they have returned; the leases stay held
// (and renewed) until Close, so that the pipeline can settle what it was
// given before another replica takes over. Run returns an error only when
// it is already running or the connection is closed for good.
func (s *PartitionedSource) Run(ctx context.Context, h bridge.Handler) error {
	if ok, err := s.begin(); !ok {
		return err
	}
	defer func() {
		s.mu.Lock()
		s.running = false
		s.mu.Unlock()
	}()
	s.startO.Do(func() { go s.manage() })

	sctx, cancel := context.WithCancel(ctx)
	x := &session{ctx: sctx, h: h}
	s.setSession(x)
	var err error
	select {
	case <-ctx.Done():
	case <-s.stop:
	case <-s.fatal:
		err = fmt.Errorf("natsjs: partitioned source %s: connection closed", s.cfg.Rule)
	}
	s.setSession(nil)
	cancel()
	x.end()
	return err
}

// begin marks Run as running; false when it may not run: already running
// (with an error) or closed.
func (s *PartitionedSource) begin() (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.running:
		return false, fmt.Errorf("natsjs: partitioned source %s: Run already running", s.cfg.Rule)
	case isClosed(s.stop):
		return false, nil
	}
	s.running = true
	return true, nil
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

// Close gives every held partition up (stop, settle, release the lease)
// and removes this replica's membership, then stops the heartbeats; it
// must be called after Run returned and the pipeline drained, so that the
// partitions hand over with nothing unsettled. If ctx ends first, the
// remaining leases are left to expire and Close returns an error.
func (s *PartitionedSource) Close(ctx context.Context) error {
	s.stopO.Do(func() { close(s.stop) })
	started := true
	s.startO.Do(func() { started = false; close(s.mgrDone) })
	if !started {
		s.abort()
		return nil
	}
	select {
	case <-s.mgrDone:
		s.abort()
		return nil
	case <-ctx.Done():
	}
	s.abort()
	<-s.mgrDone
	return fmt.Errorf("natsjs: partitioned source %s close: %w (leases left to expire)", s.cfg.Rule, ctx.Err())
}

// Takeover records this replica starting a partition.
type Takeover struct {
	Partition int       `json:"partition"`
	At        time.Time `json:"at"`
	// From is the replica that held the partition before, as far as this
	// replica saw it ("" when unknown).
	From string `json:"from,omitempty"`
	// How the previous holder let go: "released", "expired" or "" when
	// unknown.
	How string `json:"how,omitempty"`
}

// OwnedPartition is one partition this replica holds.
type OwnedPartition struct {
	Partition int `json:"partition"`
	// State is the lease's state here: "acquiring", "starting", "active",
	// "paused" (Run stopped, lease kept until Close), "draining" or
	// "releasing".
	State string `json:"state"`
	// Consumer is the partition consumer's own State ("" before it
	// exists).
	Consumer string    `json:"consumer,omitempty"`
	Since    time.Time `json:"since"`
	// PinID and EpochStart are the consumer's pin and the start of its
	// current (or last) epoch, when the consumer is an ordered Source.
	PinID      string    `json:"pinId,omitempty"`
	EpochStart time.Time `json:"epochStart,omitzero"`
}

// ownerAcquiring is the state of a partition whose lease this replica is
// taking but does not hold yet.
const ownerAcquiring = "acquiring"

// PartitionedStatus is what /status shows for a partitioned rule on this
// replica.
type PartitionedStatus struct {
	Rule       string `json:"rule"`
	Replica    string `json:"replica"`
	Partitions int    `json:"partitions"`
	// Members are the rule's live replicas as this replica sees them.
	Members []string `json:"members"`
	// Owned lists the partitions this replica holds, by number.
	Owned        []OwnedPartition `json:"owned"`
	Takeovers    uint64           `json:"takeovers"`
	LastTakeover *Takeover        `json:"lastTakeover,omitempty"`
}

// Status returns a snapshot for operators. It is safe to call at any time.
func (s *PartitionedSource) Status() PartitionedStatus {
	s.mu.Lock()
	st := PartitionedStatus{
		Rule: s.cfg.Rule, Replica: s.cfg.ReplicaID, Partitions: s.cfg.Partitions,
		Members: slices.Clone(s.members), Takeovers: s.takeovers.Load(),
	}
	if s.last != nil {
		t := *s.last
		st.LastTakeover = &t
	}
	parts := make([]Partition, 0, len(s.owned))
	for p, o := range s.owned {
		st.Owned = append(st.Owned, OwnedPartition{Partition: p, State: o.state, Since: o.since})
		parts = append(parts, o.part)
	}
	s.mu.Unlock()
	// State is the consumer's own and may take its lock: call it outside
	// ours.
	for i := range st.Owned {
		if parts[i] != nil {
			st.Owned[i].Consumer = parts[i].State()
			consumerDetail(&st.Owned[i], parts[i])
		}
	}
	slices.SortFunc(st.Owned, func(a, b OwnedPartition) int { return a.Partition - b.Partition })
	return st
}

// Owned is the number of partitions this replica holds a lease for (the
// cellbridge_partitions_owned gauge); a partition whose lease it is still
// taking does not count.
func (s *PartitionedSource) Owned() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, o := range s.owned {
		if o.state != ownerAcquiring {
			n++
		}
	}
	return n
}

// Partitions is the rule's partition count (the cellbridge_partitions
// gauge).
func (s *PartitionedSource) Partitions() int { return s.cfg.Partitions }

// Takeovers counts the partitions this replica started consuming since it
// was created (the cellbridge_takeovers_total counter).
func (s *PartitionedSource) Takeovers() uint64 { return s.takeovers.Load() }

// ownerStatus is an owner's state for Status, guarded by the source's mu.
type ownerStatus struct {
	state string
	since time.Time
	part  Partition
}

func (s *PartitionedSource) setOwnerState(p int, state string, part Partition) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o := s.owned[p]
	if o == nil {
		o = &ownerStatus{}
		s.owned[p] = o
	}
	if o.state != state {
		o.state, o.since = state, time.Now()
	}
	if part != nil {
		o.part = part
	}
}

func (s *PartitionedSource) dropOwnerState(p int) {
	s.mu.Lock()
	delete(s.owned, p)
	s.mu.Unlock()
}

func (s *PartitionedSource) leaseKey(p int) string { return s.prefix + "p." + strconv.Itoa(p) }

// OrderedPartitions is the PartitionFactory of ordered Sources: partition
// p's consumer is an ordered Source (a pinned priority group, taken over
// from the ack floor; see Source) configured as base with the spec's rule,
// broker, stream, durable, filter and StripTokens, and without StallAge.
func OrderedPartitions(js jetstream.JetStream, base SourceConfig, log *slog.Logger) PartitionFactory {
	return func(ctx context.Context, spec PartitionSpec) (Partition, error) {
		cfg := base
		cfg.Rule, cfg.Broker, cfg.Stream = spec.Rule, spec.Broker, spec.Stream
		cfg.Durable, cfg.Subject, cfg.StripTokens, cfg.Ordering = spec.Durable, spec.Filter, spec.StripTokens, Ordered
		// The lease decides who runs a partition: a stalled holder that
		// gave the pin up would only win it back (see SourceConfig.StallAge).
		cfg.StallAge = nil
		src, err := NewSource(ctx, js, cfg, log)
		if err != nil {
			return nil, err
		}
		return orderedPartition{src: src}, nil
	}
}

// orderedPartition is an ordered Source as a Partition.
type orderedPartition struct{ src *Source }

func (p orderedPartition) Run(ctx context.Context, h bridge.Handler) error { return p.src.Run(ctx, h) }
func (p orderedPartition) Release(ctx context.Context) error               { return p.src.Release(ctx) }
func (p orderedPartition) State() string                                   { return string(p.src.State().State) }

// backlogSum adds up the pending counts of the partitions this replica
// holds, for the rule's Backlog, which it calls one at a time (under mu).
type backlogSum struct {
	report func(uint64)
	mu     sync.Mutex
	parts  map[int]uint64
}

func (b *backlogSum) of(p int) func(uint64) {
	return func(n uint64) {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.parts[p] = n
		b.reportLocked()
	}
}

func (b *backlogSum) forget(p int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.parts[p]; ok {
		delete(b.parts, p)
		b.reportLocked()
	}
}

func (b *backlogSum) reportLocked() {
	var sum uint64
	for _, v := range b.parts {
		sum += v
	}
	b.report(sum)
}

// forgetBacklog drops its partition's pending count from the sum once the
// partition is given up.
type forgetBacklog struct {
	Partition
	forget func()
}

func (f forgetBacklog) Release(ctx context.Context) error {
	defer f.forget()
	return f.Partition.Release(ctx)
}

// membershipPart is failingAny's key of the replica's membership.
const membershipPart = -1

// failingAny merges the failures of a partitioned source's parts (its
// membership and each owned partition's consumer) into the rule's one
// report: failing while any part fails, with the lowest part's error that
// holds readiness (does not wrap bridge.ErrNothingPending), or the lowest
// part's when none does.
type failingAny struct {
	report func(error)
	mu     sync.Mutex
	parts  map[int]error
	last   error
}

func (f *failingAny) of(p int) func(error) {
	return func(err error) {
		f.mu.Lock()
		defer f.mu.Unlock()
		if err == nil {
			delete(f.parts, p)
		} else {
			f.parts[p] = err
		}
		f.reportLocked()
	}
}

func (f *failingAny) forget(p int) {
	if f.report != nil {
		f.of(p)(nil)
	}
}

func (f *failingAny) reportLocked() {
	var err error
	low, lowIdle := 0, false
	for p, e := range f.parts {
		idle := errors.Is(e, bridge.ErrNothingPending)
		if err == nil || (lowIdle && !idle) || (idle == lowIdle && p < low) {
			err, low, lowIdle = e, p, idle
		}
	}
	if err == f.last {
		return
	}
	f.last = err
	f.report(err)
}
