package natsjs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

// TestPartitionedDuplicateReplicaID: a second live replica started with a
// replica id that another one uses is refused: every key a replica writes
// carries its instance's nonce, so the second one neither adopts the first
// one's membership nor any of its partition leases, and since the
// membership it finds keeps being renewed it reports the duplicate id
// through Failing ("used by another replica"). The partitions stay with
// the first replica alone.
func TestPartitionedDuplicateReplicaID(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	var mu sync.Mutex
	var reports []string
	failing := func(c *PartitionedConfig) {
		c.Failing = func(err error) {
			if err == nil {
				return
			}
			mu.Lock()
			reports = append(reports, err.Error())
			mu.Unlock()
		}
	}
	a := startPartReplica(t, srv, table, "same", partOpts{tune: failing})
	waitBalanced(t, 15*time.Second, "the first replica alone", 12, false, a)
	b := startPartReplica(t, srv, table, "same", partOpts{tune: failing})

	// Give the second replica a few lease heartbeats (default TTL 6s,
	// heartbeat 2s) to announce itself and reconcile. Its first report may
	// be that the membership is held by another instance (as an earlier
	// instance's after a restart would be, until it expires); the
	// membership being renewed meanwhile is what shows a live duplicate.
	dup := func() bool {
		for _, r := range reports {
			if strings.Contains(r, "used by another replica") {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(8 * time.Second)
	both := 0
	for time.Now().Before(deadline) {
		both = max(both, a.src.Owned()+b.src.Owned()-12)
		mu.Lock()
		found := dup()
		mu.Unlock()
		if found {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if !dup() {
		t.Errorf("two live replicas share replica id %q and neither reported it (Failing reports: %q)", "same", reports)
	}
	if both > 0 {
		t.Errorf("%d partitions were held by both replicas of id %q at once (leases adopted, not refused)", both, "same")
	}
}

// gateSink passes publishes to the real sink, but holds back the
// confirmation of those whose body starts with hold until release is
// called: a publish that keeps its budget slot for as long as the test
// wants.
type gateSink struct {
	bridge.Sink
	hold string

	mu      sync.Mutex
	stored  chan struct{} // closed when the held publish was confirmed by the broker
	confirm func()        // passes the held confirmation on
}

func newGateSink(s bridge.Sink, hold string) *gateSink {
	return &gateSink{Sink: s, hold: hold, stored: make(chan struct{})}
}

func (g *gateSink) PublishAsync(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	if !strings.HasPrefix(string(m.Body), g.hold) {
		g.Sink.PublishAsync(ctx, m, done)
		return
	}
	g.Sink.PublishAsync(ctx, m, func(err error) {
		g.mu.Lock()
		g.confirm = func() { done(err) }
		g.mu.Unlock()
		close(g.stored)
	})
}

// release passes the held confirmation on (once).
func (g *gateSink) release() {
	g.mu.Lock()
	c := g.confirm
	g.confirm = nil
	g.mu.Unlock()
	if c != nil {
		c()
	}
}

// TestOrderedNackStopsLaterOfKey: when an ordered Source's Run ends
// (SIGTERM, a partition moving to another replica) while the pipeline's
// in-flight budget is exhausted, the delivery waiting for a budget slot in
// Pipeline.Handle is negatively acknowledged with ctx's error. Nothing
// later of its key may then be forwarded by the epoch: the negative ack
// revokes the epoch before the next delivery is looked at, and the intake
// hands nothing over once Run's ctx ended. Otherwise the next message of
// the key, given a slot freed meanwhile, would be stored first, and the
// next owner's reset would forward the earlier one after it.
//
// The interleaving is made likely rather than forced: one budget slot, held
// by a publish of another key and released from inside the negative ack.
// Each round uses a fresh stream; the test fails on the first round whose
// later message was forwarded while its predecessor was negatively
// acknowledged, and shows the resulting order in OUT.
func TestOrderedNackStopsLaterOfKey(t *testing.T) {
	table, err := router.Parse("rules.yaml", []byte(pipelineRules))
	if err != nil {
		t.Fatal(err)
	}
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "OUT", "out.>")
	for round := range 20 {
		reordered, nacked := nackRound(t, srv, js, table, round)
		if reordered {
			return
		}
		if !nacked {
			// The situation under test did not arise: the test would pass
			// without showing anything.
			t.Fatalf("round %d: the first event of the key was not negatively acknowledged when Run ended", round)
		}
	}
}

// nackRound runs one round and reports whether a later message of the key
// was forwarded after the negative ack (the test has then failed), and
// whether the key's first message was negatively acknowledged at all.
func nackRound(t *testing.T, srv *natstest.Server, js jetstream.JetStream, table *router.Table, round int) (reordered, nacked bool) {
	t.Helper()
	stream := fmt.Sprintf("ORDERS%d", round)
	if round > 0 {
		if err := js.DeleteStream(testCtx(t), fmt.Sprintf("ORDERS%d", round-1)); err != nil {
			t.Fatal(err)
		}
	}
	createStream(t, js, stream, "orders.>")
	a, k := fmt.Sprintf("a%d", round), fmt.Sprintf("k%d", round)
	publish(t, js, "orders."+a, a+":0", nil)
	publish(t, js, "orders."+k, k+":1", nil)
	publish(t, js, "orders."+k, k+":2", nil)

	nc, rjs := srv.Connect(t)
	defer nc.Close()
	real, err := NewSink(map[string]jetstream.JetStream{"nats": rjs}, SinkConfig{AckTimeout: 5 * time.Second}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	gate := newGateSink(real, a+":")
	store := dedupe.NewMemory(dedupe.MemoryConfig{})
	met := bridge.NewMetrics("test")
	p, err := bridge.New(bridge.Config{AckWait: testAckWait, MaxInFlight: 1},
		bridge.Deps{Rules: router.NewHolder(table), Dedupe: store, Sinks: bridge.StaticSinks(map[string]bridge.Sink{"nats": gate}),
			Metrics: met, Health: bridge.NewHealth(met, quiet, nil), Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Close(ctx)
		_ = real.Close(ctx)
		_ = store.Close(ctx)
	}()
	cfg := orderedConfig()
	cfg.Stream, cfg.Durable = stream, "cellbridge-"+stream
	src := newSource(t, rjs, cfg)
	defer func() { _ = src.Close(testCtx(t)) }()

	// outcome per body: "ack", or the error the pipeline settled it with.
	var mu sync.Mutex
	outcome := map[string]string{}
	handed := map[string]bool{}
	waiting := make(chan struct{}) // closed when k:1 entered Handle
	var once sync.Once
	h := func(ctx context.Context, m *bridge.Message, ack bridge.Ack) error {
		body := string(m.Body)
		mu.Lock()
		handed[body] = true
		mu.Unlock()
		if body == k+":1" {
			once.Do(func() { close(waiting) })
		}
		return p.Handle(ctx, m, func(actx context.Context, err error) error {
			if errors.Is(err, bridge.ErrInProgress) {
				return ack(actx, err)
			}
			if err != nil && body == k+":1" {
				// The slot frees while the negative ack is on its way:
				// a confirmation of another key arriving just then.
				gate.release()
			}
			mu.Lock()
			if err == nil {
				outcome[body] = "ack"
			} else {
				outcome[body] = err.Error()
			}
			mu.Unlock()
			return ack(actx, err)
		})
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- src.Run(ctx, h) }()
	select {
	case <-gate.stored:
	case <-time.After(20 * time.Second):
		t.Fatal("the first event was not published")
	}
	select {
	case <-waiting:
	case <-time.After(20 * time.Second):
		t.Fatal("the second event did not reach the pipeline")
	}
	// k:2 is in the intake queue once the consumer delivered all three.
	eventually(t, 10*time.Second, "three deliveries pending", func() bool {
		info, err := src.consumer().Info(testCtx(t))
		return err == nil && info.NumAckPending == 3
	})
	cancel()
	err = <-errc
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	gate.release()
	eventually(t, 10*time.Second, "k:1 settled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return outcome[k+":1"] != ""
	})
	// Run returned, so the intake has stopped handing deliveries over.
	mu.Lock()
	o1, h2 := outcome[k+":1"], handed[k+":2"]
	mu.Unlock()
	if o1 == "ack" || !h2 {
		return false, o1 != "ack"
	}
	eventually(t, 10*time.Second, "k:2 settled", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return outcome[k+":2"] == "ack"
	})
	// The next owner (this replica again) re-reads from the ack floor.
	ctx2, cancel2 := context.WithCancel(context.Background())
	errc2 := make(chan error, 1)
	go func() { errc2 <- src.Run(ctx2, h) }()
	defer func() { cancel2(); <-errc2 }()
	var order []string
	eventually(t, 20*time.Second, "both events of "+k+" in OUT", func() bool {
		order = outOrder(t, js, k)
		return len(order) >= 2
	})
	t.Errorf("round %d: %s was negatively acknowledged (%s) when Run ended, %s was forwarded after it; the cell stream holds %s's events in the order %v",
		round, k+":1", o1, k+":2", k, order)
	return true, true
}

// outOrder returns the bodies of key's events in OUT, in stored order.
func outOrder(t *testing.T, js jetstream.JetStream, key string) []string {
	t.Helper()
	st, err := js.Stream(testCtx(t), "OUT")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for seq := uint64(1); seq <= st.CachedInfo().State.LastSeq; seq++ {
		m, err := st.GetMsg(testCtx(t), seq)
		if err != nil {
			continue
		}
		if b := string(m.Data); strings.HasPrefix(b, key+":") {
			out = append(out, b)
		}
	}
	return out
}

// TestPartitionLostLeaseRevokesAtOnce: a replica whose partition lease
// went to another holder revokes the partition's epoch at the conflict,
// without waiting for the partition's Run to return, so that nothing it
// still holds unpublished is published after another replica may have
// taken the partition. Run returns only once the handler returned, and
// Pipeline.Handle can block in PublishAsync while the sink is at its
// pending limit (up to the sink's AckTimeout): the handler here blocks on
// its second message the same way, and the first one stays open.
func TestPartitionLostLeaseRevokesAtOnce(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	table := partTable(t, js)
	cfg := partConfig(table, "a")
	cfg.Consumer = testConsumer()
	cfg.Leases = LeaseConfig{Bucket: "leases-r", TTL: 3 * time.Second}
	src, err := NewPartitionedSource(testCtx(t), js, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var first *bridge.Epoch
	var acks []bridge.Ack
	unblock := make(chan struct{})
	blocked := make(chan struct{})
	h := func(ctx context.Context, m *bridge.Message, ack bridge.Ack) error {
		mu.Lock()
		acks = append(acks, ack)
		n := len(acks)
		if n == 1 {
			first = m.Epoch
		}
		mu.Unlock()
		if n == 2 {
			close(blocked)
			<-unblock // a PublishAsync waiting for sink capacity
		}
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, h) }()
	released := false
	release := func() {
		if !released {
			released = true
			close(unblock)
		}
	}
	defer func() {
		release()
		cancel()
		<-done
		mu.Lock()
		for _, a := range acks {
			_ = a(context.Background(), nil)
		}
		mu.Unlock()
		cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer ccancel()
		_ = src.Close(cctx)
	}()
	waitBalanced(t, 15*time.Second, "a alone", 12, false, &partReplica{id: "a", src: src})
	publish(t, js, "ev.k1", "one", nil)
	publish(t, js, "ev.k1", "two", nil)
	select {
	case <-blocked:
	case <-time.After(20 * time.Second):
		t.Fatal("the second message did not reach the handler")
	}
	// Another replica takes every lease over: they are deleted (as an
	// expiry would) and created with another holder.
	kv, err := js.KeyValue(testCtx(t), "leases-r")
	if err != nil {
		t.Fatal(err)
	}
	for p := range 12 {
		key := fmt.Sprintf("cb-ev.n12.p.%d", p)
		if err := kv.Delete(testCtx(t), key); err != nil {
			t.Fatal(err)
		}
		if _, err := kv.Create(testCtx(t), key, []byte("b")); err != nil {
			t.Fatal(err)
		}
	}
	// The keeper renews every TTL/3 and finds the conflict at its next
	// renewal (about a second here). What this test is about is that the
	// epoch is revoked while the handler is still blocked, so the bound is
	// loose: a renewal that fails for another reason is retried, and the
	// keeper gives the lease up anyway once no renewal succeeded for
	// TTL - TTL/6; a loaded machine (-race, other packages' clusters) can
	// add seconds on top of that.
	written := time.Now()
	eventually(t, cfg.Leases.TTL+5*time.Second, "the epoch of the first delivery revoked after its lease went to another holder "+
		"(until the handler returns, this replica can still publish the partition's queued messages)", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return first.Revoked()
	})
	t.Logf("revoked %s after the last lease was taken, the handler still blocked", time.Since(written).Round(time.Millisecond))
	select {
	case err := <-done:
		done <- err // for the deferred clean-up
		t.Fatalf("Run returned (%v) while its handler was blocked", err)
	default:
	}
}

// TestOrderedTakeoverAtMaxAckPending: the owner dies, or releases the
// consumer gracefully, while its consumer sits at MaxAckPending with more
// messages waiting in the stream (a slow sink: the intake queue takes
// deliveries until the server stops at MaxAckPending). The server then has
// nothing deliverable: new messages wait for acks, and the old owner's
// deliveries (never acked; revoked on a graceful release) would come back
// only after AckWait, while a standby's probe is answered only with a
// message. A standby takes over within PinnedTTL and a few seconds all the
// same: once the pin is free, a standby kicks the consumer (a reset) when it
// sits at MaxAckPending, and a releasing owner resets the consumer before
// it unpins when deliveries of its epoch stay unacknowledged.
func TestOrderedTakeoverAtMaxAckPending(t *testing.T) {
	for _, how := range []string{"vanish", "release"} {
		t.Run(how, func(t *testing.T) { takeoverAtMaxAckPending(t, how) })
	}
}

func takeoverAtMaxAckPending(t *testing.T, how string) {
	srv, js := takeoverSetup(t)
	cfg := orderedConfig()
	cfg.MaxAckPending = 5
	nc, jsA := srv.Connect(t)
	a := newSource(t, jsA, cfg)
	var mu sync.Mutex
	var held []bridge.Ack
	hold := func(_ context.Context, _ *bridge.Message, ack bridge.Ack) error {
		mu.Lock()
		held = append(held, ack) // a sink that does not confirm
		mu.Unlock()
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- a.Run(ctx, hold) }()
	stopped := false
	defer func() {
		if !stopped {
			cancel()
			<-errc
		}
		_ = a.Close(testCtx(t))
	}()
	fd := newFeed(20, 4)
	for i := range fd.n {
		fd.publish(t, js, i)
	}
	eventually(t, 20*time.Second, "A at MaxAckPending with a backlog", func() bool {
		info, err := a.consumer().Info(testCtx(t))
		return err == nil && info.NumAckPending == 5 && info.NumPending == 15 && a.State().State == StateActive
	})
	b := startReplica(t, srv, cfg)
	eventually(t, 20*time.Second, "B in standby", func() bool { return b.state() == StateStandby })
	gone := time.Now()
	if how == "vanish" {
		nc.Close()
	} else {
		// Graceful: stop fetching, wait for the deliveries to settle
		// within the caller's drain deadline (shorter than PinnedTTL here,
		// so the pin is still A's), revoke them, reset, unpin.
		cancel()
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
		stopped = true
		gone = time.Now()
		rctx, rcancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		var open *OpenDeliveriesError
		if err := a.Release(rctx); !errors.As(err, &open) || open.Open != 5 {
			t.Errorf("Release = %v, want the 5 open deliveries revoked", err)
		}
		rcancel()
		released := time.Now()
		// Given back, not lapsed: B's waiting probe wins the pin at once.
		eventually(t, testPinnedTTL, "B active within PinnedTTL after the release (the pin given back, not lapsed)",
			func() bool { return b.state() == StateActive })
		t.Logf("B took over %s after the release returned", time.Since(released).Round(time.Millisecond))
	}
	eventually(t, testPinnedTTL+8*time.Second, fmt.Sprintf("B active within PinnedTTL (%s) plus a few seconds after A went (%s; AckWait is %s)", testPinnedTTL, how, testAckWait),
		func() bool { return b.state() == StateActive })
	t.Logf("B took over %s after A went (%s)", time.Since(gone).Round(time.Millisecond), how)
	// Everything comes through B in order once A's hold is gone.
	mu.Lock()
	for _, ack := range held {
		_ = ack(context.Background(), bridge.ErrRevoked)
	}
	held = nil
	mu.Unlock()
	checkOut(t, js, fd)
}

// TestOrderedIntakeQueueHeartbeats: deliveries that wait in the ordered
// source's intake queue (the handler is busy: a slow sink, the pipeline's
// in-flight budget exhausted) are not in the pipeline yet, so the source
// itself sends them in-progress heartbeats: the server does not redeliver a
// message whose first delivery still waits, the handler gets each message
// once, and the queue does not overflow (which would fence the epoch). A
// handler settles one message every 100ms (10/s) with MaxAckPending 20 and
// AckWait 1s, so messages wait in the queue about twice AckWait (a
// pipeline at 500/s with the defaults, 15120 and 30s, is in the same
// position).
func TestOrderedIntakeQueueHeartbeats(t *testing.T) {
	_, js := takeoverSetup(t)
	cfg := orderedConfig()
	cfg.MaxAckPending, cfg.AckWait, cfg.FetchBatch = 20, time.Second, 8
	s := newSource(t, js, cfg)
	var mu sync.Mutex
	seen := map[string]int{}
	again := 0
	slow := func(ctx context.Context, m *bridge.Message, ack bridge.Ack) error {
		mu.Lock()
		seen[m.SourceID]++
		if seen[m.SourceID] > 1 {
			again++
		}
		mu.Unlock()
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
		return ack(ctx, nil)
	}
	stop := run(t, s, slow)
	defer stop()
	for i := range 60 {
		publish(t, js, fmt.Sprintf("orders.k%d", i%4), fmt.Sprintf("k%d:%d", i%4, i), nil)
	}
	eventually(t, 30*time.Second, "every message handled once", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) == 60
	})
	mu.Lock()
	defer mu.Unlock()
	st := s.State()
	if again > 0 || st.Fences > 0 {
		t.Errorf("60 messages at 10/s: the handler was given %d repeated deliveries (redelivered while queued), the epoch was fenced %d times (last: %q)",
			again, st.Fences, st.LastFence)
	}
}

// failingSink fails every publish at once: a replica whose target is
// unreachable from where it runs.
type failingSink struct{}

func (failingSink) PublishAsync(_ context.Context, _ *bridge.Outgoing, done func(error)) {
	done(errors.New("target unreachable from this replica"))
}
func (failingSink) Close(context.Context) error { return nil }

// stallReplica is a replica as the app builds it (pipelineReplica), whose
// ordered source hands the consumer over when its pipeline's stall age for
// the rule reaches limit (SourceConfig.StallAge from the pipeline's
// Health); a sick one publishes into failingSink. Its source's state
// changes are recorded.
type stallReplica struct {
	src *Source
	mu  sync.Mutex
	log []SourceState
}

func (r *stallReplica) states() []SourceState {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.log)
}

// stallFences returns the epochs of r that ended with a stall fence, as
// (epoch start, fence time) pairs.
func (r *stallReplica) stallFences() [][2]time.Time {
	var out [][2]time.Time
	for _, st := range r.states() {
		if st.LastFenceAt.Equal(st.Since) && strings.HasPrefix(st.LastFence, "stalled") {
			out = append(out, [2]time.Time{st.EpochStart, st.LastFenceAt})
		}
	}
	return out
}

func startStallReplica(t *testing.T, srv *natstest.Server, table *router.Table, sick bool, limit time.Duration, opts ...func(*SourceConfig, *bridge.Health)) *stallReplica {
	t.Helper()
	nc, js := srv.Connect(t)
	real, err := NewSink(map[string]jetstream.JetStream{"nats": js}, SinkConfig{AckTimeout: 2 * time.Second}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	var sink bridge.Sink = real
	if sick {
		sink = failingSink{}
	}
	store := dedupe.NewMemory(dedupe.MemoryConfig{})
	met := bridge.NewMetrics("test")
	health := bridge.NewHealth(met, quiet, nil)
	p, err := bridge.New(bridge.Config{AckWait: testAckWait, MaxInFlight: 64},
		bridge.Deps{Rules: router.NewHolder(table), Dedupe: store, Sinks: bridge.StaticSinks(map[string]bridge.Sink{"nats": sink}),
			Metrics: met, Health: health, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	eff := p.Config()
	r := &stallReplica{}
	cfg := orderedConfig()
	cfg.MaxAckPending = eff.MaxInFlight + eff.MaxHeld + eff.FetchBatch
	cfg.StallAge = func() time.Duration { return health.StallAge("orders") }
	cfg.StallLimit = limit
	cfg.OnState = func(st SourceState) {
		r.mu.Lock()
		r.log = append(r.log, st)
		r.mu.Unlock()
	}
	for _, o := range opts {
		o(&cfg, health)
	}
	r.src = newSource(t, js, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- r.src.Run(ctx, p.Handle) }()
	t.Cleanup(func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Run: %v", err)
		}
		dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer dcancel()
		_ = p.Close(dctx)
		if err := r.src.Close(dctx); err != nil {
			t.Errorf("source Close: %v", err)
		}
		_ = real.Close(dctx)
		_ = store.Close(dctx)
		nc.Close()
	})
	return r
}

// TestOrderedStalledOwnerHandsOver: the replica holding the pin cannot
// publish (every publish to its target fails from where it runs), while a
// standby could. Once its pipeline has held the oldest message for the
// stall limit, it fences its epoch, resets the consumer and unpins: the
// standby takes over at once and forwards everything, in order; the sick
// replica keeps out of its way.
func TestOrderedStalledOwnerHandsOver(t *testing.T) {
	table, err := router.Parse("rules.yaml", []byte(pipelineRules))
	if err != nil {
		t.Fatal(err)
	}
	srv, js := takeoverSetup(t)
	const limit = 1500 * time.Millisecond
	fd := newFeed(40, 4)
	a := startStallReplica(t, srv, table, true, limit)
	fd.publish(t, js, 0)
	eventually(t, 20*time.Second, "A active", func() bool { return a.src.State().State == StateActive })
	b := startStallReplica(t, srv, table, false, limit)
	eventually(t, 20*time.Second, "B in standby", func() bool { return b.src.State().State == StateStandby })
	for i := 1; i < fd.n; i++ {
		fd.publish(t, js, i)
	}
	checkOut(t, js, fd)
	sa, sb := a.src.State(), b.src.State()
	fences := a.stallFences()
	if len(fences) != 1 || sb.State != StateActive || sb.Takeovers != 1 || sb.Fences != 0 {
		t.Fatalf("A: %d stall fences (%+v), B: %+v; want A to hand over once and B to forward", len(fences), sa, sb)
	}
	ran := fences[0][1].Sub(fences[0][0])
	t.Logf("A stalled and handed over after %s; B took over %s later (takeover %s)", ran.Round(time.Millisecond),
		sb.LastTakeover.Sub(fences[0][1]).Round(time.Millisecond), sb.LastTakeoverDuration.Round(time.Millisecond))
	if ran < limit {
		t.Errorf("A handed over after %s, before the stall limit %s", ran, limit)
	}
	if gap := sb.LastTakeover.Sub(fences[0][1]); gap >= testPinnedTTL {
		t.Errorf("B took over %s after A's fence: the pin was left to lapse instead of being given back", gap)
	}
}

// TestOrderedStalledReplicasBackOff: no replica can publish (the target is
// down for everyone). The consumer passes from one to the other at the
// stall limit, but each replica's limit doubles with every stall fence in
// a row, so that the hand-overs come less and less often instead of
// ping-ponging at the limit.
func TestOrderedStalledReplicasBackOff(t *testing.T) {
	table, err := router.Parse("rules.yaml", []byte(pipelineRules))
	if err != nil {
		t.Fatal(err)
	}
	srv, js := takeoverSetup(t)
	const limit = time.Second
	a := startStallReplica(t, srv, table, true, limit)
	fd := newFeed(1, 1)
	fd.publish(t, js, 0)
	eventually(t, 20*time.Second, "A active", func() bool { return a.src.State().State == StateActive })
	b := startStallReplica(t, srv, table, true, limit)
	eventually(t, 30*time.Second, "A stall-fenced twice", func() bool { return len(a.stallFences()) >= 2 })
	fa, fb := a.stallFences(), b.stallFences()
	first, second := fa[0][1].Sub(fa[0][0]), fa[1][1].Sub(fa[1][0])
	t.Logf("A's epochs before its stall fences: %s, %s; B's stall fences: %d", first.Round(time.Millisecond), second.Round(time.Millisecond), len(fb))
	if len(fb) == 0 || !fb[0][1].Before(fa[1][0]) {
		t.Errorf("A took the consumer back before B had it and stalled (B's stall fences %v)", fb)
	}
	if second < 2*limit {
		t.Errorf("A's second epoch ended after %s: the stall limit did not double (limit %s)", second, limit)
	}
}

// TestOrderedStallHandOverWithheldPastWindow: no replica can publish, and
// the duplicate window the targets are guaranteed to have is short. The
// first stall hand-over re-reads messages young enough and happens; the
// second one would re-read messages whose first copies (had they been
// forwarded) are older than the window allows, so the owner keeps the
// consumer, says why once, and nobody takes it from it.
func TestOrderedStallHandOverWithheldPastWindow(t *testing.T) {
	table, err := router.Parse("rules.yaml", []byte(pipelineRules))
	if err != nil {
		t.Fatal(err)
	}
	srv, js := takeoverSetup(t)
	const (
		limit  = 4 * time.Second
		margin = time.Second
		// Withheld from an unacked age of 2×limit - 100ms = 7.9s on. A's
		// fence comes at limit plus the time from the publish to A's epoch,
		// up to one run-loop tick (1s) and the gauges' sampling lag
		// (0.5s): about 5.6s, 2.3s to spare on a loaded machine. B's check
		// comes after B's own limit on top of A's age: at least 2×limit,
		// past it (both ages come from the same samples).
		window = 2*limit - 100*time.Millisecond + testPinnedTTL + margin
	)
	guard := func(cfg *SourceConfig, h *bridge.Health) {
		cfg.UnackedAge = func() time.Duration { return h.UnackedAge("orders") }
		cfg.HandOverWindow, cfg.HandOverMargin = window, margin
	}
	a := startStallReplica(t, srv, table, true, limit, guard)
	fd := newFeed(1, 1)
	fd.publish(t, js, 0)
	eventually(t, 20*time.Second, "A active", func() bool { return a.src.State().State == StateActive })
	b := startStallReplica(t, srv, table, true, limit, guard)
	eventually(t, 30*time.Second, "B withholds its stall hand-over", func() bool { return b.src.State().LastWithheld != "" })
	// Long enough for two more stall limits of either replica.
	time.Sleep(2*limit + time.Second)
	sa, sb := a.src.State(), b.src.State()
	fa, fb := a.stallFences(), b.stallFences()
	t.Logf("A: %d stall fence(s), B: %d, B withheld: %s", len(fa), len(fb), sb.LastWithheld)
	if len(fa) != 1 || len(fb) != 0 || sb.State != StateActive || sa.State == StateActive || sa.LastWithheld != "" {
		t.Fatalf("A %+v (stall fences %v), B %+v (stall fences %v); want one hand-over from A to B, then B keeping the consumer", sa, fa, sb, fb)
	}
	if !strings.Contains(sb.LastWithheld, "duplicate window") {
		t.Errorf("B's reason %q does not name the duplicate window", sb.LastWithheld)
	}
}

// TestOrderedForeignResetFences: another client resets the consumer while
// this replica forwards (a stray kick). The delivery numbering starts again
// at 1, which the owner does not take as a continuation: it fences and
// takes the consumer over again with its own reset; nothing is lost or
// reordered.
func TestOrderedForeignResetFences(t *testing.T) {
	srv, js := takeoverSetup(t)
	fd := newFeed(30, 3)
	a := startReplica(t, srv, orderedConfig())
	fd.first(t, js, a.f)
	hold := make(chan struct{})
	var once sync.Once
	a.f.mu.Lock()
	a.f.block = func(*bridge.Message) { once.Do(func() { <-hold }) }
	a.f.mu.Unlock()
	for i := 1; i < fd.n/2; i++ {
		fd.publish(t, js, i)
	}
	eventually(t, 10*time.Second, "A holds deliveries unacked", func() bool {
		info, err := a.src.consumer().Info(testCtx(t))
		return err == nil && info.NumAckPending > 1
	})
	before := a.src.State()
	if _, err := js.ResetConsumer(testCtx(t), "ORDERS", "cellbridge-orders"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "A fenced by the foreign reset", func() bool { return a.src.State().Fences > before.Fences })
	close(hold)
	for i := fd.n / 2; i < fd.n; i++ {
		fd.publish(t, js, i)
	}
	checkOut(t, js, fd)
	st := a.src.State()
	if !strings.Contains(st.LastFence, "reset by another client") || st.Epochs != before.Epochs+1 || st.State != StateActive {
		t.Errorf("A after a foreign reset: %+v; want one fence for it and a new epoch of its own", st)
	}
}

// TestOrderedReleaseDrainsWithinCtx: Release waits for the epoch's open
// deliveries as long as its ctx allows, also beyond PinnedTTL (a partition
// that moves waits its drainTimeout: its lease keeps other replicas from
// running the consumer meanwhile), and revokes nothing that settled in
// time.
func TestOrderedReleaseDrainsWithinCtx(t *testing.T) {
	_, js := takeoverSetup(t)
	s := newSource(t, js, orderedConfig())
	settle := 3 * testPinnedTTL / 2
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	var first atomic.Pointer[bridge.Epoch]
	h := func(_ context.Context, m *bridge.Message, ack bridge.Ack) error {
		first.CompareAndSwap(nil, m.Epoch)
		wg.Go(func() {
			time.Sleep(settle) // a slow publish
			_ = ack(context.Background(), nil)
		})
		return nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx, h) }()
	publish(t, js, "orders.k1", "one", nil)
	eventually(t, 20*time.Second, "the message handed over", func() bool { return first.Load() != nil })
	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithTimeout(context.Background(), 2*settle)
	defer rcancel()
	start := time.Now()
	if err := s.Release(rctx); err != nil {
		t.Errorf("Release after %s: %v; want the delivery settled within the ctx", time.Since(start).Round(time.Millisecond), err)
	}
	if first.Load().Revoked() {
		t.Error("the epoch was revoked although its delivery settled within Release's ctx")
	}
	if err := s.Close(testCtx(t)); err != nil {
		t.Error(err)
	}
}

// withholdHandOver's arithmetic: no check without a window, always withheld
// with a negative one (no window protects a re-read), else withheld from
// UnackedAge + PinnedTTL + HandOverMargin = HandOverWindow on.
func TestWithholdHandOverBounds(t *testing.T) {
	age := 30 * time.Second
	run := func(window time.Duration) string {
		cfg := SourceConfig{PinnedTTL: 5 * time.Second, HandOverMargin: 5 * time.Second, HandOverWindow: window,
			UnackedAge: func() time.Duration { return age }}
		return (&pinRun{s: &Source{cfg: cfg}}).withholdHandOver()
	}
	if why := run(0); why != "" {
		t.Errorf("no window: withheld (%s)", why)
	}
	if why := run(-1); !strings.Contains(why, "no duplicate window") {
		t.Errorf("negative window: %q, want it withheld for having no window", why)
	}
	if why := run(40*time.Second + time.Nanosecond); why != "" {
		t.Errorf("30s + 5s + 5s below the window: withheld (%s)", why)
	}
	if why := run(40 * time.Second); !strings.Contains(why, "30s ago") {
		t.Errorf("30s + 5s + 5s reaching the window: %q, want it withheld", why)
	}
}
