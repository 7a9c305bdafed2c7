package natsjs

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/router"
)

func cumulativeConfig() SourceConfig {
	cfg := orderedConfig()
	cfg.CumulativeAcks = true
	return cfg
}

func durableInfo(t *testing.T, js jetstream.JetStream) *jetstream.ConsumerInfo {
	t.Helper()
	cons, err := js.Consumer(testCtx(t), "ORDERS", "cellbridge-orders")
	if err != nil {
		t.Fatal(err)
	}
	return cons.CachedInfo()
}

// TestCumulativeAcksFloorStopsAtOpen: with cumulative acks the consumer is
// created with AckPolicy all, and its ack floor never passes a delivery the
// handler has not settled, however many later ones it settled (out of
// order, as lanes do); once that one is settled the floor reaches the last
// message, with nothing pending. Stopped while one is open, the next owner
// gets it again, and every later one, from the floor.
func TestCumulativeAcksFloorStopsAtOpen(t *testing.T) {
	_, js := takeoverSetup(t)
	const n = 300
	var (
		mu   sync.Mutex
		open = map[int]bridge.Ack{}
		seen = map[int]int{}
	)
	hold := 100 // the handler keeps the delivery of message hold open
	c := &collector{settle: func(g got) {
		var i int
		fmt.Sscanf(string(g.m.Body), "m%d", &i)
		mu.Lock()
		seen[i]++
		if i == hold {
			open[i] = g.ack
			mu.Unlock()
			return
		}
		// Every second message settles only after the next one: out of
		// order.
		if i%2 == 0 {
			open[i] = g.ack
			mu.Unlock()
			return
		}
		var prev bridge.Ack
		if i-1 != hold {
			prev = open[i-1]
			delete(open, i-1)
		}
		mu.Unlock()
		_ = g.ack(testCtx(t), nil)
		if prev != nil {
			_ = prev(testCtx(t), nil)
		}
	}}
	src := newSource(t, js, cumulativeConfig())
	stop := run(t, src, c.handle)
	if p := durableInfo(t, js).Config.AckPolicy; p != jetstream.AckAllPolicy {
		t.Fatalf("ack policy %v, want all", p)
	}
	for i := 1; i <= n; i++ {
		publish(t, js, "orders.k", fmt.Sprintf("m%d", i), nil)
	}
	eventually(t, 20*time.Second, "all delivered", func() bool { mu.Lock(); defer mu.Unlock(); return len(seen) == n })
	// The floor settles one message below the held one (messages are
	// stream sequences 1..n here).
	eventually(t, 10*time.Second, "the floor just below the open delivery", func() bool {
		return durableInfo(t, js).AckFloor.Stream == uint64(hold-1)
	})
	time.Sleep(300 * time.Millisecond) // a few ack delays: it must not move on
	if f := durableInfo(t, js).AckFloor.Stream; f != uint64(hold-1) {
		t.Fatalf("ack floor %d passed the open delivery %d", f, hold)
	}

	// The owner stops with message hold open: the next one re-reads from it.
	mu.Lock()
	heldAck := open[hold]
	var rest []bridge.Ack // the last even message has no odd one after it
	for i, a := range open {
		if i != hold {
			rest = append(rest, a)
		}
	}
	mu.Unlock()
	for _, a := range rest {
		_ = a(testCtx(t), nil)
	}
	if f := durableInfo(t, js).AckFloor.Stream; f != uint64(hold-1) {
		t.Fatalf("ack floor %d passed the open delivery %d", f, hold)
	}
	go func() {
		time.Sleep(200 * time.Millisecond)
		_ = heldAck(testCtx(t), bridge.ErrRevoked)
	}()
	stopAt := time.Now()
	stop()
	t.Logf("stopped in %s", time.Since(stopAt).Round(time.Millisecond))
	c2 := &collector{settle: func(g got) { _ = g.ack(testCtx(t), nil) }}
	src2 := newSource(t, js, cumulativeConfig())
	run(t, src2, c2.handle)
	eventually(t, 30*time.Second, "the next owner re-read from the open delivery and settled everything", func() bool {
		info := durableInfo(t, js)
		return info.AckFloor.Stream == n && info.NumAckPending == 0
	})
	t.Logf("next owner settled everything %s after the stop", time.Since(stopAt).Round(time.Millisecond))
	got := c2.all()
	if len(got) < n-hold+1 || string(got[0].m.Body) != fmt.Sprintf("m%d", hold) {
		t.Fatalf("next owner got %d deliveries starting with %q, want %d from m%d", len(got), got[0].m.Body, n-hold+1, hold)
	}
	for k, g := range got[:n-hold+1] {
		if want := fmt.Sprintf("m%d", hold+k); string(g.m.Body) != want {
			t.Fatalf("next owner's delivery %d is %q, want %q (stream order from the floor)", k, g.m.Body, want)
		}
	}
}

// TestCumulativeAcksLateAckRepaired: a cumulative ack that arrives after a
// reset with a delivery number above the new epoch's (what a late ack of an
// earlier owner does) makes the server ignore the epoch's acks; the monitor
// sees the ack floor above the deliveries and the owner resets again from
// that floor, so that its acks count and nothing stays pending.
func TestCumulativeAcksLateAckRepaired(t *testing.T) {
	srv, js := takeoverSetup(t)
	nc, _ := srv.Connect(t)
	var mu sync.Mutex
	var heldAck bridge.Ack
	c := &collector{settle: func(g got) {
		if string(g.m.Body) == "m5" {
			mu.Lock()
			heldAck = g.ack
			mu.Unlock()
			return
		}
		_ = g.ack(testCtx(t), nil)
	}}
	cfg := cumulativeConfig()
	src := newSource(t, js, cfg)
	run(t, src, c.handle)
	for i := 1; i <= 5; i++ {
		publish(t, js, "orders.k", fmt.Sprintf("m%d", i), nil)
	}
	eventually(t, 20*time.Second, "floor at 4, m5 open", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return heldAck != nil && durableInfo(t, js).AckFloor.Stream == 4
	})
	// A late cumulative ack of message 5 from an "earlier epoch" with a
	// delivery number far above this epoch's.
	replyOf := fmt.Sprintf("$JS.ACK.ORDERS.cellbridge-orders.1.5.1000000.%d.0", time.Now().UnixNano())
	if err := nc.Publish(replyOf, []byte("+ACK")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the late ack applied", func() bool { return durableInfo(t, js).AckFloor.Consumer == 1000000 })
	mu.Lock()
	_ = heldAck(testCtx(t), nil)
	mu.Unlock()
	for i := 6; i <= 50; i++ {
		publish(t, js, "orders.k", fmt.Sprintf("m%d", i), nil)
	}
	start := time.Now()
	eventually(t, 15*time.Second, "everything acknowledged after the repair", func() bool {
		info := durableInfo(t, js)
		return info.AckFloor.Stream == 50 && info.NumAckPending == 0 && info.AckFloor.Consumer <= info.Delivered.Consumer
	})
	t.Logf("repaired and acknowledged %s after the late ack", time.Since(start).Round(time.Millisecond))
	for i := 6; i <= 50; i++ {
		if len(c.of(fmt.Sprintf("m%d", i))) == 0 {
			t.Fatalf("m%d never delivered", i)
		}
	}
	if st := src.State(); st.State != StateActive {
		t.Fatalf("state %s after the repair, want active", st.State)
	}
}

// TestCumulativeAcksPolicySwitch: a durable made with explicit acks (an
// earlier version, or acks: each) is made again with AckPolicy all when a
// replica with cumulative acks starts and no other client pulls from it,
// starting after its ack floor; and back.
func TestCumulativeAcksPolicySwitch(t *testing.T) {
	_, js := takeoverSetup(t)
	for round, cfg := range []SourceConfig{orderedConfig(), cumulativeConfig(), orderedConfig()} {
		c := &collector{settle: func(g got) { _ = g.ack(testCtx(t), nil) }}
		src := newSource(t, js, cfg)
		want := jetstream.AckExplicitPolicy
		if cfg.CumulativeAcks {
			want = jetstream.AckAllPolicy
		}
		if p := durableInfo(t, js).Config.AckPolicy; p != want {
			t.Fatalf("round %d: ack policy %v, want %v", round, p, want)
		}
		stop := run(t, src, c.handle)
		for i := range 20 {
			publish(t, js, "orders.k", fmt.Sprintf("r%d-%d", round, i), nil)
		}
		eventually(t, 20*time.Second, "round's messages settled", func() bool {
			info := durableInfo(t, js)
			return info.AckFloor.Stream == uint64(20*(round+1)) && info.NumAckPending == 0
		})
		stop()
		for _, g := range c.all() {
			var r, i int
			fmt.Sscanf(string(g.m.Body), "r%d-%d", &r, &i)
			if r != round {
				t.Fatalf("round %d re-read %q: the recreated durable did not start after its ack floor", round, g.m.Body)
			}
		}
		if n := len(c.all()); n != 20 {
			t.Fatalf("round %d: %d deliveries, want 20", round, n)
		}
	}
}

// TestAckPolicySwitchAtFloorZero: a durable made with DeliverNew on an
// empty stream has ack floor 0. When its ack policy changes (acks: each →
// cumulative) it is made again from sequence 1, not with its DeliverNew:
// what it had delivered and no one acknowledged is delivered again.
func TestAckPolicySwitchAtFloorZero(t *testing.T) {
	_, js := takeoverSetup(t)
	// Made again by hand with DeliverNew, as an operator may have.
	cons, cc := remakeDurable(t, js, func(cc *jetstream.ConsumerConfig) { cc.DeliverPolicy = jetstream.DeliverNewPolicy })
	for i := range 5 {
		publish(t, js, "orders.k", fmt.Sprintf("m%d", i), nil)
	}
	batch, err := cons.Fetch(5, jetstream.FetchPriorityGroup(cc.PriorityGroups[0]), jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for range batch.Messages() {
		n++ // delivered, never acknowledged
	}
	if info := durableInfo(t, js); n != 5 || info.AckFloor.Stream != 0 {
		t.Fatalf("%d delivered, ack floor %d; want 5 and 0", n, info.AckFloor.Stream)
	}

	c := &collector{settle: func(g got) { _ = g.ack(testCtx(t), nil) }}
	src := newSource(t, js, cumulativeConfig())
	if info := durableInfo(t, js); info.Config.AckPolicy != jetstream.AckAllPolicy || info.Config.DeliverPolicy != jetstream.DeliverByStartSequencePolicy {
		t.Fatalf("durable made again with %v from %v, want ack policy all from a start sequence", info.Config.AckPolicy, info.Config.DeliverPolicy)
	}
	stop := run(t, src, c.handle)
	defer stop()
	eventually(t, 20*time.Second, "the five delivered again", func() bool { return len(c.all()) == 5 })
}

// TestAckPolicySwitchKeepsAStartSequence: a durable that starts at a
// sequence (as one made again after a loss does) and has acknowledged
// nothing is made again for its new ack policy from that sequence, not
// from the stream's start. (The server reports floor start−1 here; the
// code also keeps the start when a server reports 0, which this test
// cannot produce.)
func TestAckPolicySwitchKeepsAStartSequence(t *testing.T) {
	_, js := takeoverSetup(t)
	for i := range 10 {
		publish(t, js, "orders.k", fmt.Sprintf("m%d", i+1), nil)
	}
	remakeDurable(t, js, func(cc *jetstream.ConsumerConfig) {
		cc.DeliverPolicy, cc.OptStartSeq = jetstream.DeliverByStartSequencePolicy, 6
	})
	c := &collector{settle: func(g got) { _ = g.ack(testCtx(t), nil) }}
	src := newSource(t, js, cumulativeConfig())
	if info := durableInfo(t, js); info.Config.AckPolicy != jetstream.AckAllPolicy || info.Config.OptStartSeq != 6 {
		t.Fatalf("durable made again with %v from sequence %d, want ack policy all from 6", info.Config.AckPolicy, info.Config.OptStartSeq)
	}
	stop := run(t, src, c.handle)
	defer stop()
	eventually(t, 20*time.Second, "m6..m10 delivered", func() bool { return len(c.all()) == 5 })
	time.Sleep(300 * time.Millisecond)
	if n := len(c.all()); n != 5 || len(c.of("m1")) != 0 {
		t.Fatalf("%d deliveries (m1 %d), want m6..m10 only", n, len(c.of("m1")))
	}
}

// TestCumulativeAcksModeConflict: a replica configured for cumulative acks
// does not recreate a durable that a replica with acks: each pulls from: it
// waits (StateWaiting) and takes over the durable, recreated with AckPolicy
// all, once the other one stopped.
func TestCumulativeAcksModeConflict(t *testing.T) {
	srv, js := takeoverSetup(t)
	old := startReplica(t, srv, orderedConfig())
	publish(t, js, "orders.k1", "k1:0", nil)
	eventually(t, 20*time.Second, "forwarded by the running replica", func() bool { _, n, _, _, _ := old.f.stats(); return n == 1 })

	nw := startReplica(t, srv, cumulativeConfig())
	eventually(t, 20*time.Second, "the newcomer waits", func() bool { return nw.state() == StateWaiting })
	publish(t, js, "orders.k1", "k1:1", nil)
	eventually(t, 20*time.Second, "forwarded by the running replica", func() bool { _, n, _, _, _ := old.f.stats(); return n == 2 })
	if p := durableInfo(t, js).Config.AckPolicy; p != jetstream.AckExplicitPolicy {
		t.Fatalf("durable's ack policy changed to %v under the running replica", p)
	}

	old.stop()
	eventually(t, 30*time.Second, "the newcomer recreated the durable", func() bool {
		s := nw.state()
		return s == StateStandby || s == StateActive
	})
	if p := durableInfo(t, js).Config.AckPolicy; p != jetstream.AckAllPolicy {
		t.Fatalf("durable's ack policy %v after the switch, want all", p)
	}
	publish(t, js, "orders.k1", "k1:2", nil)
	eventually(t, 20*time.Second, "forwarded by the newcomer", func() bool { _, n, _, _, _ := nw.f.stats(); return n >= 1 })
	if _, n, _, _, _ := nw.f.stats(); n != 1 {
		t.Fatalf("the newcomer forwarded %d messages, want 1 (the recreated durable starts after the floor)", n)
	}
}

// TestCumulativeAcksBlockedShard: with cumulative acks the messages of a
// blocked shard are parked and hold the ack floor; the other shards go on
// until the consumer's MaxAckPending (64 here) and then wait, as the docs
// say. Once the shard is unblocked everything arrives once and in order per
// key, and the floor reaches the last message.
func TestCumulativeAcksBlockedShard(t *testing.T) {
	srv, js := takeoverSetup(t)
	blocked, err := router.Parse("rules.yaml", []byte(strings.Replace(pipelineRules, "shards: 16\n", "shards: 16\nblocked: [\"0-7\"]\n", 1)))
	if err != nil {
		t.Fatal(err)
	}
	open, err := router.Parse("rules.yaml", []byte(pipelineRules))
	if err != nil {
		t.Fatal(err)
	}
	const maxAckPending = 64
	r := startPipelineReplica(t, srv, blocked, func(c *SourceConfig) {
		c.CumulativeAcks = true
		c.MaxAckPending = maxAckPending
	})
	fd := newFeed(400, 40)
	heldKeys := 0
	for k := range fd.keys {
		if d := blocked.Resolve("orders", fmt.Sprintf("k%d", k)); d.Reason == router.ReasonHeld {
			heldKeys++
		}
	}
	if heldKeys == 0 || heldKeys == fd.keys {
		t.Fatalf("%d of %d keys in blocked shards: the test needs some of each", heldKeys, fd.keys)
	}
	fd.run(t, js, 0, time.Millisecond, nil)
	outCount := func() uint64 {
		st, err := js.Stream(testCtx(t), "OUT")
		if err != nil {
			t.Fatal(err)
		}
		return st.CachedInfo().State.Msgs
	}
	eventually(t, 20*time.Second, "the consumer at MaxAckPending", func() bool {
		return durableInfo(t, js).NumAckPending == maxAckPending
	})
	time.Sleep(time.Second)
	forwarded, info := outCount(), durableInfo(t, js)
	free := uint64(fd.n - fd.n/fd.keys*heldKeys)
	t.Logf("blocked: %d of %d keys held; %d of the other shards' %d events forwarded, ack floor %d, %d pending",
		heldKeys, fd.keys, forwarded, free, info.AckFloor.Stream, info.NumAckPending)
	if forwarded >= free {
		t.Fatalf("all %d events of the open shards forwarded while the floor was held: MaxAckPending did not bind", forwarded)
	}
	r.rules.Store(open)
	o := checkOut(t, js, fd)
	eventually(t, 20*time.Second, "everything acknowledged after the unblock", func() bool {
		info := durableInfo(t, js)
		return info.AckFloor.Stream == uint64(fd.n) && info.NumAckPending == 0
	})
	t.Logf("after the unblock: %d stored, max lateness %s", o.stored, o.maxLate.Round(time.Millisecond))
}

// remakeDurable creates the ordered rule's durable through a source, then
// deletes it and makes it again by hand with its configuration changed by
// edit, as an operator (or an earlier version) may have left it.
func remakeDurable(t *testing.T, js jetstream.JetStream, edit func(*jetstream.ConsumerConfig)) (jetstream.Consumer, jetstream.ConsumerConfig) {
	t.Helper()
	ctx := testCtx(t)
	first := newSource(t, js, orderedConfig())
	_ = first.Close(ctx)
	cc := durableInfo(t, js).Config
	if err := js.DeleteConsumer(ctx, "ORDERS", cc.Durable); err != nil {
		t.Fatal(err)
	}
	time.Sleep(vanishSettle)
	edit(&cc)
	cons, err := js.CreateConsumer(ctx, "ORDERS", cc)
	if err != nil {
		t.Fatal(err)
	}
	return cons, cc
}
