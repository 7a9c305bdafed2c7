package natsjs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

const partRules = `
kind: CellMap
version: 1
shards: 10
cells:
  - {name: c0, shards: ["0-4"]}
  - {name: c1, shards: ["5-9"]}
---
kind: TopicRule
name: ev
source: {broker: nats, stream: EV, subject: "ev.*", group: cb-ev, partitions: 12}
key: {subjectToken: 2}
shard: {func: fnv1a}
target: {broker: nats, subject: "cell.{cell}.ev"}
dlq: {broker: nats, subject: "dlq.ev"}
`

// partTable parses partRules and provisions its streams (the source
// stream with its partition transform).
func partTable(t *testing.T, js jetstream.JetStream) *router.Table {
	t.Helper()
	table, err := router.Parse("rules.yaml", []byte(partRules))
	if err != nil {
		t.Fatal(err)
	}
	if err := EnsureStreams(testCtx(t), js, table, StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	return table
}

func partConfig(table *router.Table, id string) PartitionedConfig {
	r := table.Rule("ev")
	return PartitionedConfig{
		Rule: r.Name, Broker: r.Source.Broker, Stream: r.Source.Stream, Subject: r.Source.Subject,
		Group: r.Source.Group, KeyToken: r.Key.SubjectToken, Partitions: r.Source.Partitions,
		ReplicaID: id,
	}
}

// partReplica is one bridge replica in the test process: its own
// connection, partitioned source and, when it forwards, its own pipeline,
// sink and in-memory dedupe store.
type partReplica struct {
	t      *testing.T
	id     string
	nc     *nats.Conn
	src    *PartitionedSource
	pipe   *bridge.Pipeline
	sink   *Sink
	store  *dedupe.Memory
	cancel context.CancelFunc
	runErr chan error
	closed bool

	releases releases
}

// slowSink delays every publish of the real sink without blocking the
// pipeline, so that its replica always holds deliveries it has not
// published yet: what a replica that vanishes leaves behind.
type slowSink struct {
	bridge.Sink
	delay time.Duration
}

func (s slowSink) PublishAsync(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	time.AfterFunc(s.delay, func() { s.Sink.PublishAsync(ctx, m, done) })
}

// releases records the outcome of every graceful Release of the
// partitions of a replica.
type releases struct {
	mu   sync.Mutex
	n    int
	errs []error
}

func (r *releases) add(err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.n++
	if err != nil {
		r.errs = append(r.errs, err)
	}
}

// recordRelease tells rec the result of every graceful Release (not those
// with a ctx already done: a lost lease).
type recordRelease struct {
	Partition
	rec func(error)
}

func (r recordRelease) Release(ctx context.Context) error {
	graceful := ctx.Err() == nil
	err := r.Partition.Release(ctx)
	if graceful {
		r.rec(err)
	}
	return err
}

// runTracker checks that no two replicas consume a partition at once,
// from the states of the partitions' ordered sources (Active: consuming).
// A replica that was killed is exempt: its sources stay Active until their
// fence, while the pin covers the partition.
type runTracker struct {
	t      *testing.T
	mu     sync.Mutex
	by     map[int]string
	exempt map[string]bool
	starts int
}

func newRunTracker(t *testing.T) *runTracker {
	return &runTracker{t: t, by: map[int]string{}, exempt: map[string]bool{}}
}

// onState is a partOpts.onState for replica id.
func (rt *runTracker) onState(id string) func(int, SourceState) {
	return func(p int, st SourceState) { rt.run(p, id, st.State == StateActive) }
}

func (rt *runTracker) run(p int, id string, active bool) {
	rt.mu.Lock()
	defer rt.mu.Unlock()
	if !active {
		if rt.by[p] == id {
			delete(rt.by, p)
		}
		return
	}
	rt.starts++
	if other, ok := rt.by[p]; ok && other != id && !rt.exempt[other] {
		rt.t.Errorf("partition %d: %s started consuming while %s still did", p, id, other)
	}
	rt.by[p] = id
}

func (rt *runTracker) exemptReplica(id string) {
	rt.mu.Lock()
	rt.exempt[id] = true
	rt.mu.Unlock()
}

// partOpts tunes a replica of the partition tests.
type partOpts struct {
	// forward: messages go through a real pipeline to the cell streams,
	// else they are acked at once.
	forward bool
	// slow delays every publish of the pipeline's sink.
	slow time.Duration
	// tune edits the source's configuration.
	tune func(*PartitionedConfig)
	// onState receives each partition source's state changes.
	onState func(p int, st SourceState)
}

// testConsumer is every partition's ordered source in these tests: an
// AckWait far beyond the takeover times, so that a message that came back
// only through AckWait (no reset at takeover) would arrive late and out of
// order, which the checks see.
func testConsumer() SourceConfig {
	return SourceConfig{AckWait: 45 * time.Second, FetchBatch: 64, MaxAckPending: 2000, BacklogInterval: 500 * time.Millisecond}
}

// startPartReplica starts a replica with its own connection and partitioned
// source whose partitions are ordered sources (OrderedPartitions).
func startPartReplica(t *testing.T, srv *natstest.Server, table *router.Table, id string, o partOpts) *partReplica {
	t.Helper()
	nc, err := nats.Connect(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	r := &partReplica{t: t, id: id, nc: nc, runErr: make(chan error, 1)}
	cfg := partConfig(table, id)
	cfg.Consumer = testConsumer()
	if o.tune != nil {
		o.tune(&cfg)
	}
	base := cfg.Consumer
	cfg.NewPartition = func(ctx context.Context, spec PartitionSpec) (Partition, error) {
		c := base
		if o.onState != nil {
			c.OnState = func(st SourceState) { o.onState(spec.Partition, st) }
		}
		p, err := OrderedPartitions(js, c, quiet)(ctx, spec)
		if err != nil {
			return nil, err
		}
		return recordRelease{Partition: p, rec: r.releases.add}, nil
	}
	r.src, err = NewPartitionedSource(testCtx(t), js, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	h := bridge.Handler(func(ctx context.Context, _ *bridge.Message, ack bridge.Ack) error { return ack(ctx, nil) })
	if o.forward {
		r.sink, err = NewSink(map[string]jetstream.JetStream{"nats": js}, SinkConfig{}, quiet)
		if err != nil {
			t.Fatal(err)
		}
		r.store = dedupe.NewMemory(dedupe.MemoryConfig{})
		var sink bridge.Sink = r.sink
		if o.slow > 0 {
			sink = slowSink{Sink: r.sink, delay: o.slow}
		}
		r.pipe, err = bridge.New(bridge.Config{MaxInFlight: 256}, bridge.Deps{
			Rules: router.NewHolder(table), Dedupe: r.store, Log: quiet,
			Sinks: bridge.StaticSinks(map[string]bridge.Sink{"nats": sink}),
		})
		if err != nil {
			t.Fatal(err)
		}
		h = r.pipe.Handle
	}
	var ctx context.Context
	ctx, r.cancel = context.WithCancel(context.Background())
	go func() { r.runErr <- r.src.Run(ctx, h) }()
	t.Cleanup(r.close)
	return r
}

// stop shuts the replica down as SIGTERM does: stop fetching, drain the
// pipeline, give the partitions up, close.
func (r *partReplica) stop() {
	r.t.Helper()
	r.cancel()
	if err := <-r.runErr; err != nil {
		r.t.Errorf("%s: Run: %v", r.id, err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if r.pipe != nil {
		if err := r.pipe.Close(ctx); err != nil {
			r.t.Errorf("%s: pipeline close: %v", r.id, err)
		}
	}
	if err := r.src.Close(ctx); err != nil {
		r.t.Errorf("%s: source close: %v", r.id, err)
	}
	r.release(ctx)
}

// kill makes the replica vanish as kill -9 does for the others: its
// connection closes, so it renews, pulls and publishes nothing more.
func (r *partReplica) kill() { r.nc.Close() }

// close ends whatever the replica still runs (after kill, or at the end of
// a test) without asserting anything.
func (r *partReplica) close() {
	if r.closed {
		return
	}
	r.cancel()
	<-r.runErr
	r.runErr <- nil
	// A killed replica cannot settle anything: do not wait long for it.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if r.pipe != nil {
		_ = r.pipe.Close(ctx)
	}
	_ = r.src.Close(ctx)
	r.release(ctx)
}

func (r *partReplica) release(ctx context.Context) {
	if r.sink != nil {
		_ = r.sink.Close(ctx)
	}
	if r.store != nil {
		_ = r.store.Close(ctx)
	}
	r.nc.Close()
	r.closed = true
}

// waitBalanced waits until the live replicas hold every partition exactly
// once between them, all active (and, with consuming, every partition's
// consumer holding its pin and forwarding), with owned counts differing by
// at most one, and returns how long that took.
func waitBalanced(t *testing.T, within time.Duration, what string, n int, consuming bool, live ...*partReplica) time.Duration {
	t.Helper()
	start := time.Now()
	var last string
	eventually(t, within, what, func() bool {
		seen := make([]int, n)
		lo, hi := n, 0
		var desc []string
		for _, r := range live {
			st := r.src.Status()
			for _, o := range st.Owned {
				if o.State != "active" || consuming && o.Consumer != string(StateActive) {
					return false
				}
				seen[o.Partition]++
			}
			lo, hi = min(lo, len(st.Owned)), max(hi, len(st.Owned))
			desc = append(desc, fmt.Sprintf("%s:%d", r.id, len(st.Owned)))
		}
		last = strings.Join(desc, " ")
		for _, c := range seen {
			if c != 1 {
				return false
			}
		}
		return hi-lo <= 1
	})
	took := time.Since(start)
	t.Logf("%s: balanced after %s (%s)", what, took.Round(10*time.Millisecond), last)
	return took
}

// produce publishes about perSecond events to ev.<key> over 100 keys until
// the returned stop is called.
func produce(t *testing.T, srv *natstest.Server, perSecond int) (stop func()) {
	_, js := srv.Connect(t)
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		tick := time.NewTicker(time.Second / time.Duration(perSecond))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := js.Publish(ctx, fmt.Sprintf("ev.k%03d", i%100), []byte("x"))
			cancel()
			if err != nil {
				t.Errorf("publish: %v", err)
				return
			}
		}
	})
	var once sync.Once
	return func() { once.Do(func() { close(done); wg.Wait() }) }
}

// TestPartitionsBalance: with the default lease timings, replicas share
// 12 partitions evenly within 15s of each membership change: three start
// (contending for every lease), a fourth joins, one vanishes (its
// connection closes, so its heartbeats stop), one stops gracefully. No two
// live replicas ever consume one partition at the same time.
func TestPartitionsBalance(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	const within = 15 * time.Second
	// Events keep flowing to every partition: an ordered consumer is
	// pinned (and active) only when there is something to deliver.
	stopProducing := produce(t, srv, 200)
	defer stopProducing()
	rt := newRunTracker(t)
	start := func(id string) *partReplica {
		return startPartReplica(t, srv, table, id, partOpts{onState: rt.onState(id)})
	}
	a, b, c := start("a"), start("b"), start("c")
	waitBalanced(t, within, "three replicas start", 12, true, a, b, c)

	d := start("d")
	waitBalanced(t, within, "a fourth joins", 12, true, a, b, c, d)
	if st := a.src.Status(); !slices.Equal(st.Members, []string{"a", "b", "c", "d"}) || st.Partitions != 12 || st.Replica != "a" {
		t.Errorf("status of a = %+v", st)
	}

	before := a.src.Takeovers() + c.src.Takeovers() + d.src.Takeovers()
	held := b.src.Owned()
	rt.exemptReplica("b")
	b.kill()
	waitBalanced(t, within, "b vanishes", 12, true, a, c, d)
	if got := a.src.Takeovers() + c.src.Takeovers() + d.src.Takeovers() - before; got < uint64(held) {
		t.Errorf("%d takeovers after b vanished, want at least the %d partitions it held", got, held)
	}
	var fromB bool
	for _, r := range []*partReplica{a, c, d} {
		if lt := r.src.Status().LastTakeover; lt != nil && lt.From == "b" && lt.How == "expired" {
			fromB = true
		}
	}
	if !fromB {
		t.Error("no replica's last takeover names b's expired lease")
	}

	c.stop()
	waitBalanced(t, within, "c stops", 12, true, a, d)
	if got := a.src.Owned() + d.src.Owned(); got != 12 || a.src.Partitions() != 12 {
		t.Errorf("a and d own %d of %d partitions", got, a.src.Partitions())
	}
	stopProducing()
	a.stop()
	d.stop()
	rt.mu.Lock()
	t.Logf("partition consumers started %d times, never two at once on one partition", rt.starts)
	rt.mu.Unlock()
}

// TestPartitionsOrderAcrossHandovers forwards 6000 events of 200 keys
// through real pipelines while replicas join, stop and vanish, and reads
// the cell streams back: every event stored once, each key's events in
// their order. Replicas a and b publish slowly, so that a hands partitions
// over (when d joins, and when it stops) with publishes in flight, and b
// vanishes holding deliveries it never published, which only a takeover
// from the ack floor forwards before the newer events of their keys.
func TestPartitionsOrderAcrossHandovers(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	const keys, perKey = 200, 30
	a := startPartReplica(t, srv, table, "a", partOpts{forward: true, slow: 300 * time.Millisecond})
	b := startPartReplica(t, srv, table, "b", partOpts{forward: true, slow: 300 * time.Millisecond})
	c := startPartReplica(t, srv, table, "c", partOpts{forward: true})

	_, pjs := srv.Connect(t)
	var produced sync.WaitGroup
	produced.Go(func() {
		ctx := context.Background()
		seq := make([]int, keys)
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; i < keys*perKey; {
			<-tick.C
			for range 4 {
				k := i % keys
				seq[k]++
				if _, err := pjs.Publish(ctx, fmt.Sprintf("ev.k%03d", k), fmt.Appendf(nil, "k%03d %d", k, seq[k])); err != nil {
					t.Errorf("publish: %v", err)
					return
				}
				i++
			}
		}
	})
	time.Sleep(3 * time.Second)
	d := startPartReplica(t, srv, table, "d", partOpts{forward: true}) // partitions drain and move under load
	time.Sleep(3 * time.Second)
	a.stop() // graceful: drain, release
	time.Sleep(3 * time.Second)
	b.kill() // vanish: its leases expire
	produced.Wait()

	streams := []string{CellStream("c0"), CellStream("c1")}
	stored := func() uint64 {
		var n uint64
		for _, name := range streams {
			st, err := js.Stream(testCtx(t), name)
			if err != nil {
				t.Fatal(err)
			}
			n += st.CachedInfo().State.Msgs
		}
		return n
	}
	eventually(t, 60*time.Second, "every event forwarded", func() bool { return stored() >= keys*perKey })

	next := make(map[string]int, keys)
	total := 0
	for _, name := range streams {
		st, err := js.Stream(testCtx(t), name)
		if err != nil {
			t.Fatal(err)
		}
		last := st.CachedInfo().State.LastSeq
		for seq := uint64(1); seq <= last; seq++ {
			m, err := st.GetMsg(testCtx(t), seq)
			if err != nil {
				t.Fatalf("%s seq %d: %v", name, seq, err)
			}
			key, n, _ := strings.Cut(string(m.Data), " ")
			got, _ := strconv.Atoi(n)
			if want := next[key] + 1; got != want {
				t.Errorf("%s seq %d: %s event %d after event %d (duplicate or out of order)", name, seq, key, got, want-1)
			}
			next[key] = max(next[key], got)
			total++
		}
	}
	if total != keys*perKey {
		t.Errorf("%d events stored, want %d", total, keys*perKey)
	}
	for k := range keys {
		if key := fmt.Sprintf("k%03d", k); next[key] != perKey {
			t.Errorf("%s: last event %d of %d", key, next[key], perKey)
		}
	}
	var took uint64
	for _, r := range []*partReplica{c, d} {
		took += r.src.Takeovers()
	}
	t.Logf("%d events of %d keys read back; c and d started %d partitions", total, keys, took)
	c.stop()
	d.stop()
	// Every graceful hand-over waited for the pipeline to settle.
	var n int
	for _, r := range []*partReplica{a, c, d} {
		r.releases.mu.Lock()
		n += r.releases.n
		for _, err := range r.releases.errs {
			t.Errorf("%s released a partition unsettled: %v", r.id, err)
		}
		r.releases.mu.Unlock()
	}
	if a.releases.n == 0 {
		t.Error("a gave no partition up through Release, though d joined and a stopped")
	}
	t.Logf("%d graceful releases", n)
}

// TestPartitionedReportsFailing: a replica that cannot announce itself or
// watch (its lease bucket was deleted) says so through Failing, and takes
// its partitions again once the bucket is back.
func TestPartitionedReportsFailing(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	var mu sync.Mutex
	var reports []error
	a := startPartReplica(t, srv, table, "a", partOpts{tune: func(c *PartitionedConfig) {
		c.Leases = LeaseConfig{Bucket: "leases-f", TTL: 3 * time.Second}
		c.Failing = func(err error) {
			mu.Lock()
			reports = append(reports, err)
			mu.Unlock()
		}
	}})
	waitBalanced(t, 15*time.Second, "a alone", 12, false, a)
	ctx := testCtx(t)
	if err := js.DeleteKeyValue(ctx, "leases-f"); err != nil {
		t.Fatal(err)
	}
	last := func() (error, int) {
		mu.Lock()
		defer mu.Unlock()
		if len(reports) == 0 {
			return nil, 0
		}
		return reports[len(reports)-1], len(reports)
	}
	eventually(t, 15*time.Second, "a reports that it cannot take part", func() bool {
		err, n := last()
		return n > 0 && err != nil && strings.Contains(err.Error(), "lease bucket leases-f")
	})
	eventually(t, 15*time.Second, "a stops its partitions", func() bool { return a.src.Owned() == 0 })
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "leases-f", History: 1, TTL: 3 * time.Second, LimitMarkerTTL: 3 * time.Second}); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "a reports that it is back", func() bool { err, _ := last(); return err == nil })
	waitBalanced(t, 15*time.Second, "a takes its partitions again", 12, false, a)
	a.stop()
}

// TestPartitionedRefusesMismatch: a source on a stream without the
// partition transform does not start, and says what to apply.
func TestPartitionedRefusesMismatch(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table, err := router.Parse("rules.yaml", []byte(partRules))
	if err != nil {
		t.Fatal(err)
	}
	createStream(t, js, "EV", "ev.*")
	cfg := partConfig(table, "a")
	_, err = NewPartitionedSource(testCtx(t), js, cfg, quiet)
	if !errors.Is(err, ErrTransformMismatch) || !strings.Contains(err.Error(),
		`natsjs: partitioned source ev: natsjs: stream subject transform mismatch: stream EV has subject transform none, but needs "ev.*" → "n12.{{partition(12,1)}}.ev.{{wildcard(1)}}"; apply it with`) {
		t.Fatalf("NewPartitionedSource on a plain stream = %v", err)
	}
	for _, c := range []struct {
		edit func(*PartitionedConfig)
		want string
	}{
		{func(c *PartitionedConfig) { c.ReplicaID = "a.b" }, `replica id "a.b": letters, digits, '_' and '-' only`},
		{func(c *PartitionedConfig) { c.Group = "" }, "rule, stream, subject and group are required"},
		{func(c *PartitionedConfig) { c.Leases.TTL = time.Second }, "ttl 1s is below 2s"},
	} {
		bad := partConfig(table, "a")
		c.edit(&bad)
		if _, err := NewPartitionedSource(testCtx(t), js, bad, quiet); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("config error = %v, want %q", err, c.want)
		}
	}
}

// TestPartitionedRunAgain: after Run returns the partitions stay held
// (paused) until Close; a new Run resumes them; Close releases every lease
// and the membership.
func TestPartitionedRunAgain(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	cfg := partConfig(table, "a")
	cfg.Consumer = testConsumer()
	src, err := NewPartitionedSource(testCtx(t), js, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	ack := func(ctx context.Context, _ *bridge.Message, ack bridge.Ack) error { return ack(ctx, nil) }
	states := func(want string) func() bool {
		return func() bool {
			st := src.Status()
			if len(st.Owned) != 12 {
				return false
			}
			for _, o := range st.Owned {
				if o.State != want {
					return false
				}
			}
			return true
		}
	}
	for round := range 2 {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- src.Run(ctx, ack) }()
		eventually(t, 15*time.Second, fmt.Sprintf("round %d: 12 partitions active", round), states("active"))
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		eventually(t, 5*time.Second, fmt.Sprintf("round %d: 12 partitions paused", round), states("paused"))
	}
	if err := src.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if n := src.Owned(); n != 0 {
		t.Errorf("%d partitions owned after Close", n)
	}
	kv, err := js.KeyValue(testCtx(t), DefaultLeaseBucket)
	if err != nil {
		t.Fatal(err)
	}
	if keys, err := kv.Keys(testCtx(t)); !errors.Is(err, jetstream.ErrNoKeysFound) {
		t.Errorf("keys left in the lease bucket after Close: %v, %v", keys, err)
	}
	if err := src.Run(context.Background(), ack); err != nil {
		t.Errorf("Run after Close = %v, want nil at once", err)
	}
}

// TestPartitionedCloseGivesUp: when the pipeline does not settle its
// deliveries before Close's deadline, Close stops waiting, leaves the
// remaining leases to expire and says so; nothing keeps running.
func TestPartitionedCloseGivesUp(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	stopProducing := produce(t, srv, 200)
	defer stopProducing()
	cfg := partConfig(table, "a")
	cfg.Consumer = testConsumer()
	src, err := NewPartitionedSource(testCtx(t), js, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	var held sync.Map
	hold := func(_ context.Context, m *bridge.Message, ack bridge.Ack) error {
		held.Store(m.SourceID, ack) // never settled
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, hold) }()
	eventually(t, 15*time.Second, "every partition consuming", func() bool {
		st := src.Status()
		if len(st.Owned) != 12 {
			return false
		}
		for _, o := range st.Owned {
			if o.Consumer != string(StateActive) {
				return false
			}
		}
		return true
	})
	stopProducing()
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
	defer ccancel()
	start := time.Now()
	err = src.Close(cctx)
	if err == nil || !strings.Contains(err.Error(), "leases left to expire") {
		t.Fatalf("Close with unsettled deliveries = %v, want it to give up", err)
	}
	took := time.Since(start)
	if took > 10*time.Second {
		t.Errorf("Close took %s after its 1s deadline", took)
	}
	t.Logf("Close gave up after %s", took.Round(time.Millisecond))
	kv, err := js.KeyValue(testCtx(t), DefaultLeaseBucket)
	if err != nil {
		t.Fatal(err)
	}
	keys, err := kv.Keys(testCtx(t))
	if err != nil || !slices.ContainsFunc(keys, func(k string) bool { return strings.HasPrefix(k, "cb-ev.n12.p.") }) {
		t.Errorf("lease keys after Close gave up: %v, %v; want them left to expire", keys, err)
	}
	if slices.Contains(keys, "cb-ev.n12.m.a") {
		t.Error("the membership is still announced after Close")
	}
}

// TestPartitionLeaseLostWhileDraining: a partition moving to a new replica
// drains (its deliveries wait in a slow sink) when its lease is lost (the
// key deleted by hand; a renewal that cannot reach the bucket's leader ends
// the same way). From then on the new owner may take it, so the old one
// stops at once, revoking what is still open, instead of draining on for
// the slow sink's delay: no two replicas forward a partition for longer
// than a heartbeat.
func TestPartitionLeaseLostWhileDraining(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	const slow = 6 * time.Second
	a := startPartReplica(t, srv, table, "a", partOpts{forward: true, slow: slow,
		// A short heartbeat: the loss is seen at the next renewal, and
		// the bound below (half the slow sink's delay) then has several
		// heartbeats of room on a loaded machine.
		tune: func(c *PartitionedConfig) { c.DrainTimeout, c.Leases.Heartbeat = 30*time.Second, 500*time.Millisecond }})
	waitBalanced(t, 20*time.Second, "a alone", 12, false, a)
	stop := produce(t, srv, 200)
	defer stop()
	time.Sleep(time.Second) // a holds deliveries of every partition in its slow sink
	b := startPartReplica(t, srv, table, "b", partOpts{forward: true})
	var draining []int
	eventually(t, 20*time.Second, "a draining partitions for b", func() bool {
		draining = draining[:0]
		for _, o := range a.src.Status().Owned {
			if o.State == "draining" {
				draining = append(draining, o.Partition)
			}
		}
		return len(draining) > 0
	})
	kv, err := js.KeyValue(testCtx(t), DefaultLeaseBucket)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	for _, p := range draining {
		if err := kv.Delete(testCtx(t), a.src.leaseKey(p)); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 20*time.Second, "a gave up the partitions whose leases it lost", func() bool {
		for _, o := range a.src.Status().Owned {
			if slices.Contains(draining, o.Partition) {
				return false
			}
		}
		return true
	})
	took := time.Since(t0)
	t.Logf("partitions %v: lease deleted while draining, given up %v later (heartbeat %v, slow sink %v)",
		draining, took.Round(time.Millisecond), a.src.b.beat, slow)
	if took > slow/2 {
		t.Errorf("a drained partitions %v for %v after their leases were lost, want about a heartbeat (%v)", draining, took, a.src.b.beat)
	}
	stop()
	waitBalanced(t, 30*time.Second, "after the loss", 12, false, a, b)
	a.stop()
	b.stop()
}
