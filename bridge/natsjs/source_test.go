package natsjs

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

// got is one delivery seen by a test handler.
type got struct {
	m   *bridge.Message
	ack bridge.Ack
	at  time.Time
}

// collector is a bridge.Handler that records deliveries and optionally
// settles them.
type collector struct {
	mu     sync.Mutex
	seen   []got
	settle func(g got) // nil: leave unsettled
}

func (c *collector) handle(_ context.Context, m *bridge.Message, ack bridge.Ack) error {
	g := got{m: m, ack: ack, at: time.Now()}
	c.mu.Lock()
	c.seen = append(c.seen, g)
	settle := c.settle
	c.mu.Unlock()
	if settle != nil {
		settle(g)
	}
	return nil
}

func (c *collector) all() []got {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]got(nil), c.seen...)
}

// of returns the deliveries of the message whose body is body.
func (c *collector) of(body string) []got {
	var out []got
	for _, g := range c.all() {
		if string(g.m.Body) == body {
			out = append(out, g)
		}
	}
	return out
}

// bothOrderings runs test once per ordering mode: the single-source
// behaviour is the same in both.
func bothOrderings(t *testing.T, test func(t *testing.T, o Ordering)) {
	for _, o := range []Ordering{Ordered, Unordered} {
		t.Run(string(o), func(t *testing.T) { test(t, o) })
	}
}

func newSource(t testing.TB, js jetstream.JetStream, cfg SourceConfig) *Source {
	t.Helper()
	if cfg.Stream == "" {
		cfg.Stream, cfg.Subject, cfg.Durable, cfg.Rule, cfg.Broker = "ORDERS", "orders.>", "cellbridge-orders", "orders", "nats"
	}
	s, err := NewSource(testCtx(t), js, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// run starts s.Run and returns a stop function that cancels it, checks
// that it returned nil and closes s.
func run(t testing.TB, s *Source, h bridge.Handler) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- s.Run(ctx, h) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			if err := <-errc; err != nil {
				t.Errorf("Run: %v", err)
			}
			if err := s.Close(testCtx(t)); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func publish(t testing.TB, js jetstream.JetStream, subject, body string, hdr nats.Header) {
	t.Helper()
	if _, err := js.PublishMsg(testCtx(t), &nats.Msg{Subject: subject, Data: []byte(body), Header: hdr}); err != nil {
		t.Fatal(err)
	}
}

func TestSourceDeliversFields(t *testing.T) { bothOrderings(t, sourceDeliversFields) }

func sourceDeliversFields(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	before := time.Now().Add(-time.Second)
	publish(t, js, "orders.created", `{"user":{"id":"2088000000000042"}}`,
		nats.Header{"Nats-Msg-Id": {"o-1"}, "X-User-Id": {"2088000000000042"}})
	publish(t, js, "orders.paid", "plain", nil)

	c := &collector{settle: func(g got) {
		if err := g.ack(context.Background(), nil); err != nil {
			t.Errorf("ack: %v", err)
		}
	}}
	src := newSource(t, js, SourceConfig{Ordering: o})
	run(t, src, c.handle)
	eventually(t, 10*time.Second, "two deliveries", func() bool { return len(c.all()) == 2 })

	first, second := c.all()[0].m, c.all()[1].m
	if first.Subject != "orders.created" || string(first.Body) != `{"user":{"id":"2088000000000042"}}` ||
		first.Header["X-User-Id"][0] != "2088000000000042" || first.Rule != "orders" || first.Source != "nats/ORDERS" ||
		first.SourceID != "o-1" || first.Deliveries != 1 || first.Time.Before(before) || first.Time.After(time.Now()) {
		t.Errorf("first message: %+v", first)
	}
	if second.SourceID != "ORDERS:2" || second.Subject != "orders.paid" || second.Header != nil || second.Deliveries != 1 {
		t.Errorf("second message: %+v", second)
	}
	// Acked: nothing comes back, and the consumer has nothing pending.
	cons, err := js.Consumer(testCtx(t), "ORDERS", "cellbridge-orders")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "acks recorded", func() bool {
		info, err := cons.Info(testCtx(t))
		return err == nil && info.NumAckPending == 0 && info.AckFloor.Stream == 2
	})
	cfg := cons.CachedInfo().Config
	if cfg.MaxDeliver != -1 || cfg.AckPolicy != jetstream.AckExplicitPolicy || cfg.FilterSubject != "orders.>" {
		t.Errorf("consumer config: %+v", cfg)
	}
	pinned := cfg.PriorityPolicy == jetstream.PriorityPolicyPinned && len(cfg.PriorityGroups) == 1 &&
		cfg.PriorityGroups[0] == DefaultGroup && cfg.PinnedTTL == DefaultPinnedTTL
	if plain := cfg.PriorityPolicy == jetstream.PriorityPolicyNone && len(cfg.PriorityGroups) == 0; (o == Ordered && !pinned) || (o == Unordered && !plain) {
		t.Errorf("ordering %s: consumer priority policy %v groups %v ttl %s", o, cfg.PriorityPolicy, cfg.PriorityGroups, cfg.PinnedTTL)
	}
}

func TestSourceAckOutcomes(t *testing.T) { bothOrderings(t, sourceAckOutcomes) }

// sourceAckOutcomes settles three messages with an ack, a nack and a Hold
// that lets later messages of its key overtake (as the pipeline's MaxHeld
// overflow does), and each again with an ack. The Hold comes back after its
// delay as a redelivery in both modes; the nack at once, unordered as a
// redelivery, ordered through the next epoch, because a nack ends the
// epoch (its reset delivers the message again; the count goes on).
func sourceAckOutcomes(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	const hold = 400 * time.Millisecond
	c := &collector{}
	c.settle = func(g got) {
		var err error
		switch {
		case len(c.of(string(g.m.Body))) > 1 || string(g.m.Body) == "ack":
			err = nil
		case string(g.m.Body) == "nak":
			err = errors.New("sink failed")
		case string(g.m.Body) == "hold":
			err = &bridge.HoldError{Delay: hold, Overtake: true}
		}
		if aerr := g.ack(context.Background(), err); aerr != nil {
			t.Errorf("ack(%v): %v", err, aerr)
		}
	}
	src := newSource(t, js, SourceConfig{Ordering: o, AckWait: time.Minute})
	run(t, src, c.handle)
	for _, body := range []string{"ack", "nak", "hold"} {
		publish(t, js, "orders."+body, body, nil)
	}
	eventually(t, 10*time.Second, "nak redelivered", func() bool { return len(c.of("nak")) == 2 })
	eventually(t, 10*time.Second, "hold redelivered", func() bool { return len(c.of("hold")) == 2 })
	h := c.of("hold")
	if h[1].m.Deliveries != 2 || h[1].m.SourceID != h[0].m.SourceID {
		t.Errorf("held message redelivered as %+v", h[1].m)
	}
	if d := h[1].at.Sub(h[0].at); d < hold*3/4 {
		t.Errorf("held message came back after %s, before its delay of %s", d, hold)
	}
	if n := c.of("nak"); n[1].m.Deliveries != 2 {
		t.Errorf("nak'ed message redelivered with Deliveries %d", n[1].m.Deliveries)
	}
	if st := src.State(); o == Ordered && (st.Fences != 1 || !strings.Contains(st.LastFence, "negatively acknowledged") || st.Epochs != 2) {
		t.Errorf("ordered source after a nack: %d fences (last %q), %d epochs; want the nack to end the first epoch", st.Fences, st.LastFence, st.Epochs)
	}
	// Everything is settled for good now; the acked message came once.
	cons, err := js.Consumer(testCtx(t), "ORDERS", "cellbridge-orders")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "all acked", func() bool {
		info, err := cons.Info(testCtx(t))
		return err == nil && info.NumAckPending == 0 && info.NumPending == 0
	})
	if n := len(c.of("ack")); n != 1 {
		t.Errorf("acked message delivered %d times", n)
	}
	// A second final call is refused: settling happens once.
	if err := c.of("ack")[0].ack(context.Background(), nil); !errors.Is(err, jetstream.ErrMsgAlreadyAckd) {
		t.Errorf("second ack: err = %v, want ErrMsgAlreadyAckd", err)
	}
}

func TestSourceInProgressExtendsAckWait(t *testing.T) {
	bothOrderings(t, sourceInProgressExtendsAckWait)
}

func sourceInProgressExtendsAckWait(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	const ackWait, busy = time.Second, 1500 * time.Millisecond
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	c := &collector{}
	c.settle = func(g got) {
		if g.m.Deliveries > 1 {
			_ = g.ack(context.Background(), nil)
			return
		}
		// Work "longer than AckWait", signalling progress, then give up
		// without a final ack: the message must come back only afterwards.
		wg.Go(func() {
			for end := time.Now().Add(busy); time.Now().Before(end); time.Sleep(ackWait / 10) {
				if err := g.ack(context.Background(), bridge.ErrInProgress); err != nil {
					t.Errorf("in progress: %v", err)
				}
			}
		})
	}
	src := newSource(t, js, SourceConfig{Ordering: o, AckWait: ackWait})
	run(t, src, c.handle)
	publish(t, js, "orders.slow", "slow", nil)
	eventually(t, 10*time.Second, "redelivered after progress stopped", func() bool { return len(c.of("slow")) == 2 })
	d := c.of("slow")
	if gap := d[1].at.Sub(d[0].at); gap < busy {
		t.Errorf("redelivered after %s although progress was signalled for %s (AckWait %s)", gap, busy, ackWait)
	}
}

func TestSourceDurableResumesAfterRestart(t *testing.T) {
	bothOrderings(t, sourceDurableResumesAfterRestart)
}

func sourceDurableResumesAfterRestart(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	nc, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	for i := 1; i <= 5; i++ {
		publish(t, js, "orders.x", fmt.Sprint(i), nil)
	}
	ackAll := func(g got) { _ = g.ack(context.Background(), nil) }
	c1 := &collector{settle: ackAll}
	stop := run(t, newSource(t, js, SourceConfig{Ordering: o}), c1.handle)
	eventually(t, 10*time.Second, "first five", func() bool { return len(c1.all()) == 5 })
	stop()
	// Acks are asynchronous: make sure they reached the server before it
	// goes down.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	cons, err := js.Consumer(testCtx(t), "ORDERS", "cellbridge-orders")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "acks stored", func() bool {
		info, err := cons.Info(testCtx(t))
		return err == nil && info.AckFloor.Stream == 5
	})
	nc.Close()
	srv.Shutdown()
	srv.WaitForShutdown()

	srv2 := natstest.StartDir(t, srv.StoreDir)
	_, js2 := srv2.Connect(t)
	for i := 6; i <= 8; i++ {
		publish(t, js2, "orders.x", fmt.Sprint(i), nil)
	}
	c2 := &collector{settle: ackAll}
	run(t, newSource(t, js2, SourceConfig{Ordering: o}), c2.handle)
	eventually(t, 10*time.Second, "the rest", func() bool { return len(c2.all()) == 3 })
	for i, g := range c2.all() {
		if want := fmt.Sprint(i + 6); string(g.m.Body) != want || g.m.SourceID != "ORDERS:"+want || g.m.Deliveries != 1 {
			t.Errorf("after restart delivery %d: body %q id %s deliveries %d", i, g.m.Body, g.m.SourceID, g.m.Deliveries)
		}
	}
}

func TestSourceReportsBacklog(t *testing.T) { bothOrderings(t, sourceReportsBacklog) }

func sourceReportsBacklog(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	for i := range 50 {
		publish(t, js, "orders.x", fmt.Sprint(i), nil)
	}
	var mu sync.Mutex
	var last uint64 = 1 << 63
	backlog := func(n uint64) { mu.Lock(); last = n; mu.Unlock() }
	reported := func() uint64 { mu.Lock(); defer mu.Unlock(); return last }
	// Nothing is acked and at most 10 may be pending: 40 stay undelivered.
	c := &collector{}
	src := newSource(t, js, SourceConfig{Ordering: o, MaxAckPending: 10, FetchBatch: 10, Backlog: backlog, BacklogInterval: 20 * time.Millisecond})
	run(t, src, c.handle)
	eventually(t, 10*time.Second, "ten delivered", func() bool { return len(c.all()) == 10 })
	eventually(t, 10*time.Second, "backlog 40", func() bool { return reported() == 40 })
	c.mu.Lock()
	c.settle = func(g got) { _ = g.ack(context.Background(), nil) }
	c.mu.Unlock()
	for _, g := range c.all() {
		_ = g.ack(context.Background(), nil)
	}
	eventually(t, 10*time.Second, "backlog 0", func() bool {
		return reported() == 0
	})
}

func TestSourceRunLifecycle(t *testing.T) { bothOrderings(t, sourceRunLifecycle) }

func sourceRunLifecycle(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	src := newSource(t, js, SourceConfig{Ordering: o})
	c := &collector{settle: func(g got) { _ = g.ack(context.Background(), nil) }}

	errc := make(chan error, 1)
	go func() { errc <- src.Run(context.Background(), c.handle) }()
	publish(t, js, "orders.x", "1", nil)
	eventually(t, 10*time.Second, "delivered", func() bool { return len(c.all()) == 1 })
	if err := src.Run(context.Background(), c.handle); err == nil || !strings.Contains(err.Error(), "already running") {
		t.Fatalf("second Run: err = %v", err)
	}
	if err := src.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("Run after Close: %v", err)
	}
	if err := src.Run(context.Background(), c.handle); err != nil {
		t.Fatalf("Run after Close: %v", err)
	}
}

func TestSourceRecreatesDeletedConsumerAfterAckFloor(t *testing.T) {
	bothOrderings(t, sourceRecreatesDeletedConsumerAfterAckFloor)
}

func sourceRecreatesDeletedConsumerAfterAckFloor(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	c := &collector{settle: func(g got) { _ = g.ack(context.Background(), nil) }}
	var backlog atomic.Int64
	run(t, newSource(t, js, SourceConfig{Ordering: o, BacklogInterval: 20 * time.Millisecond, Backlog: func(n uint64) { backlog.Add(1) }}), c.handle)
	for _, b := range []string{"1", "2", "3"} {
		publish(t, js, "orders.x", b, nil)
	}
	eventually(t, 10*time.Second, "delivered", func() bool { return len(c.all()) == 3 })
	// Let the source observe the ack floor.
	cons, err := js.Consumer(testCtx(t), "ORDERS", "cellbridge-orders")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "acks stored", func() bool {
		info, err := cons.Info(testCtx(t))
		return err == nil && info.AckFloor.Stream == 3
	})
	seen := backlog.Load()
	eventually(t, 15*time.Second, "two more backlog reports", func() bool { return backlog.Load() >= seen+2 })

	if err := js.DeleteConsumer(testCtx(t), "ORDERS", "cellbridge-orders"); err != nil {
		t.Fatal(err)
	}
	publish(t, js, "orders.x", "after", nil)
	eventually(t, 20*time.Second, "delivered after the consumer was recreated", func() bool { return len(c.of("after")) == 1 })
	if n := len(c.all()); n != 4 {
		t.Fatalf("%d deliveries: the recreated consumer replayed the stream", n)
	}
}

// TestSourceRecreatesConsumerDeletedWithoutWaitingPull: an unordered
// source whose durable is deleted while none of its pulls waits on the
// server (its one message is still in the handler) gets no word of it
// from the server; its next pulls find no responder. The consumer info
// it asks for every BacklogInterval finds the durable gone, and the
// source makes it again and goes on.
func TestSourceRecreatesConsumerDeletedWithoutWaitingPull(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	release := make(chan struct{})
	c := &collector{settle: func(g got) {
		if string(g.m.Body) == "1" && g.m.Deliveries == 1 {
			<-release
		}
		_ = g.ack(context.Background(), nil)
	}}
	run(t, newSource(t, js, SourceConfig{Ordering: Unordered, FetchBatch: 1, BacklogInterval: 50 * time.Millisecond}), c.handle)
	publish(t, js, "orders.x", "1", nil)
	eventually(t, 10*time.Second, "1 in the handler", func() bool { return len(c.of("1")) == 1 })
	eventually(t, 10*time.Second, "no pull waiting", func() bool {
		info := durableInfo(t, js)
		return info.NumWaiting == 0
	})
	if err := js.DeleteConsumer(testCtx(t), "ORDERS", "cellbridge-orders"); err != nil {
		t.Fatal(err)
	}
	close(release)
	publish(t, js, "orders.x", "2", nil)
	eventually(t, 20*time.Second, "2 delivered by the durable made again", func() bool { return len(c.of("2")) == 1 })
}

func TestSourceKeepsExistingDeliverPolicy(t *testing.T) {
	bothOrderings(t, sourceKeepsExistingDeliverPolicy)
}

func sourceKeepsExistingDeliverPolicy(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	publish(t, js, "orders.x", "history", nil)
	if _, err := js.CreateConsumer(testCtx(t), "ORDERS", jetstream.ConsumerConfig{
		Durable: "cellbridge-orders", AckPolicy: jetstream.AckExplicitPolicy, DeliverPolicy: jetstream.DeliverNewPolicy,
	}); err != nil {
		t.Fatal(err)
	}
	c := &collector{settle: func(g got) { _ = g.ack(context.Background(), nil) }}
	run(t, newSource(t, js, SourceConfig{Ordering: o}), c.handle)
	publish(t, js, "orders.x", "new", nil)
	eventually(t, 10*time.Second, "new delivered", func() bool { return len(c.of("new")) == 1 })
	if len(c.of("history")) != 0 {
		t.Fatal("history was delivered although the durable was created with DeliverNew")
	}
}

// TestSourceWaitsForAnotherRulesDurable: a durable whose description
// names another rule with another filter (a rule renamed or split keeping
// its source.group during a rolling change, or two deployments sharing a
// group) is not changed while that rule's clients pull from it: the new
// rule's source waits (StateWaiting) and takes the durable over once
// they stopped, filter and description.
func TestSourceWaitsForAnotherRulesDurable(t *testing.T) {
	bothOrderings(t, sourceWaitsForAnotherRulesDurable)
}

func sourceWaitsForAnotherRulesDurable(t *testing.T, o Ordering) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	eu := SourceConfig{Rule: "orders-eu", Broker: "nats", Stream: "ORDERS", Subject: "orders.eu.>", Durable: "cellbridge-orders",
		Ordering: o, BacklogInterval: 100 * time.Millisecond}
	c := &collector{settle: func(g got) { _ = g.ack(context.Background(), nil) }}
	stopEU := run(t, newSource(t, js, eu), c.handle)
	eventually(t, 10*time.Second, "orders-eu pulling", func() bool { return durableInfo(t, js).NumWaiting > 0 })

	us := eu
	us.Rule, us.Subject = "orders-us", "orders.us.>"
	b, err := NewSource(testCtx(t), js, us, quiet)
	if err != nil {
		t.Fatalf("NewSource of a second rule on the durable: %v", err)
	}
	var me *ModeError
	if _, err := b.ensureConsumer(testCtx(t), 0); !errors.As(err, &me) || me.OtherRule != "orders-eu" ||
		!strings.Contains(err.Error(), "is rule orders-eu's (filter orders.eu.>)") {
		t.Fatalf("second rule's consumer check: %v, want a wait for orders-eu's clients", err)
	}
	stopUS := run(t, b, c.handle)
	defer stopUS()
	eventually(t, 10*time.Second, "orders-us waiting", func() bool { return b.State().State == StateWaiting })
	time.Sleep(500 * time.Millisecond)
	if f := durableInfo(t, js).Config.FilterSubject; f != "orders.eu.>" {
		t.Fatalf("the durable's filter changed under orders-eu's clients: %q", f)
	}
	stopEU()
	eventually(t, 20*time.Second, "orders-us took the durable over", func() bool {
		cfg := durableInfo(t, js).Config
		return cfg.FilterSubject == "orders.us.>" && cfg.Description == "cellbridge rule orders-us"
	})
	publish(t, js, "orders.us.1", "us", nil)
	eventually(t, 20*time.Second, "orders-us delivering", func() bool { return len(c.of("us")) == 1 })
}

func TestSourceConfigErrors(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	for _, cfg := range []SourceConfig{
		{Durable: "d"},
		{Stream: "ORDERS"},
		{Stream: "MISSING", Durable: "d"},
	} {
		if _, err := NewSource(testCtx(t), js, cfg, quiet); err == nil {
			t.Errorf("NewSource(%+v) succeeded", cfg)
		}
	}
}

// TestSourceReplicasShareDurable runs two unordered Sources (two bridge
// replicas) on one durable: together they see every message once, and both
// take part.
func TestSourceReplicasShareDurable(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	_, js2 := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	ackAll := func(g got) { _ = g.ack(context.Background(), nil) }
	a, b := &collector{settle: ackAll}, &collector{settle: ackAll}
	run(t, newSource(t, js, SourceConfig{Ordering: Unordered, FetchBatch: 10}), a.handle)
	run(t, newSource(t, js2, SourceConfig{Ordering: Unordered, FetchBatch: 10}), b.handle)
	const n = 400
	for i := range n {
		publish(t, js, "orders.x", fmt.Sprint(i), nil)
	}
	eventually(t, 20*time.Second, "all delivered", func() bool { return len(a.all())+len(b.all()) >= n })
	seen := map[string]int{}
	for _, g := range append(a.all(), b.all()...) {
		seen[g.m.SourceID]++
	}
	if len(seen) != n {
		t.Fatalf("%d distinct messages, want %d", len(seen), n)
	}
	for id, c := range seen {
		if c != 1 {
			t.Fatalf("%s delivered %d times", id, c)
		}
	}
	if len(a.all()) == 0 || len(b.all()) == 0 {
		t.Fatalf("one replica did all the work: %d / %d", len(a.all()), len(b.all()))
	}
}
