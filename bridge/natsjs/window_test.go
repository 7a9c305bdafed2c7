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
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

func TestSinkDuplicateWindow(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "OUT", "out.>") // the server's default window
	if _, err := js.CreateStream(testCtx(t), jetstream.StreamConfig{Name: "SHORT", Subjects: []string{"short.>"}, Duplicates: time.Second}); err != nil {
		t.Fatal(err)
	}
	s := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{AckTimeout: 2 * time.Second})
	for _, tc := range []struct {
		tg   router.Target
		want time.Duration
	}{
		{router.Target{Broker: "nats", Subject: "out.rz00"}, 2 * time.Minute},
		{router.Target{Broker: "nats", Subject: "short.rz00"}, time.Second},
	} {
		w, err := s.DuplicateWindow(testCtx(t), tc.tg)
		if err != nil || w != tc.want {
			t.Errorf("DuplicateWindow(%v) = %v, %v; want %v", tc.tg, w, err, tc.want)
		}
	}
	if _, err := s.DuplicateWindow(testCtx(t), router.Target{Broker: "nats", Subject: "nowhere.x"}); err == nil || !strings.Contains(err.Error(), `"nowhere.x"`) {
		t.Errorf("DuplicateWindow of a subject no stream captures: %v, want an error naming the subject", err)
	}
	if _, err := s.DuplicateWindow(testCtx(t), router.Target{Broker: "other", Subject: "out.x"}); !errors.Is(err, ErrUnknownBroker) {
		t.Errorf("DuplicateWindow of an unknown broker: %v, want ErrUnknownBroker", err)
	}
}

// windowRules route ORDERS by the subject's second token to two cells:
// rz00's subject is stored by a stream with the default two-minute
// duplicate window (check-then-commit), rz01's by one with a window of a
// second, shorter than the store's ReserveTTL (reservations).
const windowRules = `kind: CellMap
version: 1
shards: 16
cells:
  - {name: rz00, state: active, shards: ["0-7"]}
  - {name: rz01, state: active, shards: ["8-15"]}
---
kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>", group: cellbridge-orders}
key: {subjectToken: 2}
shard: {func: fnv1a}
target: {broker: nats, subject: "out.{cell}"}
dlq: {broker: nats, subject: dlq.orders}
`

// TestPipelineDedupeProtocols runs two replicas, each with its own
// connection, JetStream sink and KV dedupe store over one bucket, on a
// shared durable: every event lands exactly once, the target with the
// long window costs the bucket one write per message (Check, Commit) and
// the other two (Reserve, Commit), a failed publish is retried without a
// write of its own (Check) or with the Release's read and purge (Reserve),
// repeats of a key are dropped as duplicates without a write, and Status
// names each target's protocol.
func TestPipelineDedupeProtocols(t *testing.T) {
	table, err := router.Parse("rules.yaml", []byte(windowRules))
	if err != nil {
		t.Fatal(err)
	}
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "ORDERS", "orders.>")
	createStream(t, js, "DLQ", "dlq.>")
	createStream(t, js, "OUT0", "out.rz00")
	if _, err := js.CreateStream(testCtx(t), jetstream.StreamConfig{Name: "OUT1", Subjects: []string{"out.rz01"}, Duplicates: time.Second}); err != nil {
		t.Fatal(err)
	}
	const bucket = "window-test"
	var pipes []*bridge.Pipeline
	for range 2 {
		_, rjs := srv.Connect(t)
		store, err := dedupe.NewJetStream(testCtx(t), rjs, dedupe.KVConfig{Bucket: bucket, ReserveTTL: 30 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		sink := &failFirstSink{Sink: newSink(t, map[string]jetstream.JetStream{"nats": rjs}, SinkConfig{AckTimeout: 2 * time.Second}), tried: map[string]bool{}}
		met := bridge.NewMetrics("test")
		p := checkPipeline(t, bridge.Config{AckWait: testAckWait, MaxInFlight: 256, Retry: bridge.RetryConfig{Initial: 10 * time.Millisecond, Max: 100 * time.Millisecond}},
			table, store, sink, met)
		pipes = append(pipes, p)
		run(t, newSource(t, rjs, SourceConfig{Ordering: Unordered}), p.Handle)
	}

	const n = 400
	send := func(from, to int) {
		for i := from; i < to; i++ {
			publish(t, js, fmt.Sprint("orders.u", i), fmt.Sprint("event ", i), nats.Header{bridge.HeaderMsgID: {fmt.Sprint("e", i)}})
		}
	}
	// Settled: the consumer's ack floor has reached the last message
	// stored. Pending counts alone are not enough: the server tells a
	// stream's consumers of a new message after it answered its publish,
	// so for a moment after the last PubAck they may still count 0.
	settled := func(what string) {
		st, err := js.Stream(testCtx(t), "ORDERS")
		if err != nil {
			t.Fatal(err)
		}
		last := st.CachedInfo().State.LastSeq
		eventually(t, 30*time.Second, what, func() bool {
			c, err := js.Consumer(testCtx(t), "ORDERS", "cellbridge-orders")
			if err != nil {
				return false
			}
			info, err := c.Info(testCtx(t))
			return err == nil && info.AckFloor.Stream >= last && info.NumPending == 0 && info.NumAckPending == 0
		})
	}
	writes := func() uint64 {
		st, err := js.Stream(testCtx(t), "KV_"+bucket)
		if err != nil {
			t.Fatal(err)
		}
		info, err := st.Info(testCtx(t))
		if err != nil {
			t.Fatal(err)
		}
		return info.State.LastSeq
	}
	// Until a target's window is known its messages reserve (two writes):
	// one warm-up event per cell and replica settles the protocols first,
	// and the writes are counted from there.
	warm := map[string]string{}
	for i := 0; len(warm) < 2; i++ {
		s := fmt.Sprint("orders.w", i)
		if c := table.Route("orders", &router.Message{Subject: s}).Cell; warm[c] == "" {
			warm[c] = s
		}
	}
	known := func() bool {
		for _, p := range pipes {
			if len(p.Status().DedupeProtocols) < 2 {
				return false
			}
		}
		return true
	}
	// The replicas share the durable, so which one a warm-up event reaches
	// is the server's choice: rounds go on until both have seen both
	// targets (on a loaded machine one replica can take many in a row).
	warmUntil := time.Now().Add(20 * time.Second)
	for round := 0; !known(); round++ {
		if time.Now().After(warmUntil) {
			t.Fatalf("the dedupe protocols of both targets are still unknown after %d warm-up rounds", round)
		}
		if round > 0 {
			time.Sleep(20 * time.Millisecond)
		}
		for c, s := range warm {
			publish(t, js, s, "warm-up", nats.Header{bridge.HeaderMsgID: {fmt.Sprint("warm-", c, "-", round)}})
		}
		settled("warm-up events acknowledged")
	}
	warmed := map[string]bool{}
	for _, name := range []string{"OUT0", "OUT1"} {
		for _, m := range readAll(t, js, name) {
			warmed[m.Headers().Get(jetstream.MsgIDHeader)] = true
		}
	}
	base := writes()

	send(0, n)
	settled("every event acknowledged")

	ids := map[string]int{}
	var perCell [2]uint64
	for i, name := range []string{"OUT0", "OUT1"} {
		for _, m := range readAll(t, js, name) {
			if id := m.Headers().Get(jetstream.MsgIDHeader); !warmed[id] {
				ids[id]++
				perCell[i]++
			}
		}
	}
	if len(ids) != n || perCell[0]+perCell[1] != n {
		var missing []string
		for i := range n {
			if ids[fmt.Sprint("e", i)] == 0 {
				missing = append(missing, fmt.Sprint("e", i))
			}
		}
		var dlq []string
		for _, m := range readAll(t, js, "DLQ") {
			dlq = append(dlq, fmt.Sprintf("%s (%s)", m.Headers().Get(jetstream.MsgIDHeader), m.Headers().Get(bridge.HeaderError)))
		}
		for _, p := range pipes {
			t.Logf("replica status: %+v", p.Status())
		}
		for _, name := range []string{"OUT0", "OUT1"} {
			st, _ := js.Stream(testCtx(t), name)
			info, err := st.Info(testCtx(t))
			t.Logf("stream %s: %+v %v; read now: %d", name, info.State, err, len(readAll(t, js, name)))
		}
		t.Fatalf("cells hold %d messages under %d ids, want %d once each; missing %v; the DLQ holds %v",
			perCell[0]+perCell[1], len(ids), n, missing, dlq)
	}
	if perCell[0] == 0 || perCell[1] == 0 {
		t.Fatalf("messages per cell %v: the test needs both targets", perCell)
	}
	// Check writes nothing, Commit one message; Reserve one more, and a
	// Release after a failed publish a purge marker and the Reserve of
	// the retry.
	var failedRZ01 uint64
	for i := 7; i < n; i += 10 {
		if d := table.Route("orders", &router.Message{Subject: fmt.Sprint("orders.u", i)}); d.Cell == "rz01" {
			failedRZ01++
		}
	}
	if failedRZ01 == 0 || failedRZ01 == n/10 {
		t.Fatalf("%d of %d failed publishes went to rz01: the test needs failures on both targets", failedRZ01, n/10)
	}
	if got, want := writes()-base, perCell[0]+2*perCell[1]+2*failedRZ01; got != want {
		t.Fatalf("the bucket took %d writes, want %d (one per message to rz00, two per message to rz01, two more per failed publish to rz01)", got, want)
	}
	for _, p := range pipes {
		st := p.Status()
		if got := st.DedupeProtocols["publishing to broker nats subject out.rz00"]; !strings.HasPrefix(got, bridge.ProtoCheck+" ") {
			t.Errorf("protocol for rz00 = %q, want check (%v)", got, st.DedupeProtocols)
		}
		if got := st.DedupeProtocols["publishing to broker nats subject out.rz01"]; !strings.HasPrefix(got, bridge.ProtoReserve+" ") {
			t.Errorf("protocol for rz01 = %q, want reserve (%v)", got, st.DedupeProtocols)
		}
	}

	// The same events again (a producer's retry): duplicates, no write.
	before := writes()
	send(0, n/4)
	settled("every repeat acknowledged")
	for _, name := range []string{"OUT0", "OUT1"} {
		for _, m := range readAll(t, js, name) {
			if id := m.Headers().Get(jetstream.MsgIDHeader); !warmed[id] {
				ids[id]--
			}
		}
	}
	for id, c := range ids {
		if c != 0 {
			t.Fatalf("id %s stored %d more times after the repeats", id, -c)
		}
	}
	if got := writes(); got != before {
		t.Fatalf("repeats wrote %d messages to the bucket, want none", got-before)
	}
}

// failFirstSink fails the first publish of every event whose number ends
// in 7 (nothing is sent), as a target that refuses for a moment; it keeps
// the JetStream sink's DuplicateWindow.
type failFirstSink struct {
	*Sink
	mu    sync.Mutex
	tried map[string]bool
}

func (s *failFirstSink) PublishAsync(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	if strings.HasSuffix(string(m.Body), "7") {
		s.mu.Lock()
		first := !s.tried[string(m.Body)]
		s.tried[string(m.Body)] = true
		s.mu.Unlock()
		if first {
			done(errors.New("refused for the test"))
			return
		}
	}
	s.Sink.PublishAsync(ctx, m, done)
}

// readAll returns every message of stream name.
func readAll(t *testing.T, js jetstream.JetStream, name string) []jetstream.Msg {
	t.Helper()
	c, err := js.OrderedConsumer(testCtx(t), name, jetstream.OrderedConsumerConfig{})
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(testCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	var out []jetstream.Msg
	for left := int(info.NumPending); left > 0; {
		b, err := c.Fetch(left, jetstream.FetchMaxWait(5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		for m := range b.Messages() {
			out = append(out, m)
			left--
		}
		if err := b.Error(); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// stallWindowSink is a JetStream sink whose window lookups wait until
// release is closed (or their ctx ends), as they do while the target's
// broker does not answer; asked counts the lookups begun.
type stallWindowSink struct {
	*Sink
	release chan struct{}
	asked   atomic.Int32
}

func (s *stallWindowSink) DuplicateWindow(ctx context.Context, tg router.Target) (time.Duration, error) {
	s.asked.Add(1)
	select {
	case <-s.release:
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	return s.Sink.DuplicateWindow(ctx, tg)
}

// TestWindowLookupOffIntake: with the KV store, messages of check targets
// run on the goroutine that delivers them, but the window lookup waits for
// the target's broker: it runs on a worker, so intake (and the store's
// answers, which carry every target's messages) go on while one target's
// broker does not answer it. The message waits for the lookup and is then
// forwarded once, with Check.
func TestWindowLookupOffIntake(t *testing.T) {
	table, err := router.Parse("rules.yaml", []byte(windowRules))
	if err != nil {
		t.Fatal(err)
	}
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "OUT0", "out.rz00")
	createStream(t, js, "DLQ", "dlq.>")
	store, err := dedupe.NewJetStream(testCtx(t), js, dedupe.KVConfig{Bucket: "lookup-test", ReserveTTL: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	sink := &stallWindowSink{Sink: newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{AckTimeout: 2 * time.Second}), release: make(chan struct{})}
	met := bridge.NewMetrics("test")
	p := checkPipeline(t, bridge.Config{AckWait: testAckWait, MaxInFlight: 16}, table, store, sink, met)
	var released sync.Once
	t.Cleanup(func() { released.Do(func() { close(sink.release) }) }) // runs first: frees a stuck Handle

	subject := ""
	for i := 0; subject == ""; i++ {
		if s := fmt.Sprint("orders.u", i); table.Route("orders", &router.Message{Subject: s}).Cell == "rz00" {
			subject = s
		}
	}
	acked := make(chan error, 1)
	returned := make(chan error, 1)
	go func() {
		m := &bridge.Message{Message: router.Message{Subject: subject, Body: []byte("event")}, Rule: "orders", SourceID: "ORDERS:1"}
		returned <- p.Handle(context.Background(), m, func(_ context.Context, err error) error {
			if !errors.Is(err, bridge.ErrInProgress) {
				acked <- err
			}
			return nil
		})
	}()
	eventually(t, 10*time.Second, "the window lookup started", func() bool { return sink.asked.Load() > 0 })
	eventually(t, 10*time.Second, "Handle returned while the window lookup waits", func() bool { return len(returned) > 0 })
	if err := <-returned; err != nil {
		t.Fatalf("Handle: %v", err)
	}
	select {
	case err := <-acked:
		t.Fatalf("message settled (%v) before its target's window was known", err)
	default:
	}
	released.Do(func() { close(sink.release) })
	select {
	case err := <-acked:
		if err != nil {
			t.Fatalf("message settled with %v, want an ack", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("message not acknowledged 10s after the window lookup was answered")
	}
	if msgs := readAll(t, js, "OUT0"); len(msgs) != 1 {
		t.Fatalf("OUT0 holds %d messages, want 1", len(msgs))
	}
	if got := p.Status().DedupeProtocols["publishing to broker nats subject out.rz00"]; !strings.HasPrefix(got, bridge.ProtoCheck+" ") {
		t.Fatalf("protocol for rz00 = %q, want check", got)
	}

	// A failed Check counts as a check error, not as a reserve error.
	if err := store.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	m := &bridge.Message{Message: router.Message{Subject: subject, Body: []byte("event 2")}, Rule: "orders", SourceID: "ORDERS:2"}
	if err := p.Handle(context.Background(), m, func(context.Context, error) error { return nil }); err != nil {
		t.Fatalf("Handle: %v", err)
	}
	eventually(t, 10*time.Second, "a check error counted", func() bool { return counterValue(t, met.DedupeErrors.WithLabelValues("check")) > 0 })
	if n := counterValue(t, met.DedupeErrors.WithLabelValues("reserve")); n != 0 {
		t.Fatalf("%v reserve errors counted for a check target's failed Check, want 0", n)
	}
}

// counterValue reads a counter.
func counterValue(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// checkPipeline is a pipeline on table with the KV store (its check
// protocol on) and one sink for broker "nats"; the test's end closes both.
func checkPipeline(t *testing.T, cfg bridge.Config, table *router.Table, store *dedupe.KV, sink bridge.Sink, met *bridge.Metrics) *bridge.Pipeline {
	t.Helper()
	p, err := bridge.New(cfg, bridge.Deps{Rules: router.NewHolder(table), Dedupe: store, DedupeCheck: true,
		Sinks: bridge.StaticSinks(map[string]bridge.Sink{"nats": sink}), Metrics: met, Health: bridge.NewHealth(met, quiet, nil), Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = p.Close(ctx)
		_ = store.Close(ctx)
	})
	return p
}
