package natsjs

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

// result collects done callbacks.
type result struct {
	mu   sync.Mutex
	errs map[int]error
	log  []string
}

func newResult() *result { return &result{errs: map[int]error{}} }

func (r *result) done(i int) func(error) {
	return func(err error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		if _, dup := r.errs[i]; dup {
			panic(fmt.Sprintf("done called twice for %d", i))
		}
		r.errs[i] = err
		r.log = append(r.log, fmt.Sprintf("done %d", i))
	}
}

func (r *result) note(s string) {
	r.mu.Lock()
	r.log = append(r.log, s)
	r.mu.Unlock()
}

func (r *result) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.errs)
}

func (r *result) err(i int) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.errs[i]
}

func newSink(t testing.TB, conns map[string]jetstream.JetStream, cfg SinkConfig) *Sink {
	t.Helper()
	s, err := NewSink(conns, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := s.Close(testCtx(t)); err != nil {
			t.Error(err)
		}
	})
	return s
}

func out(broker, subject, id string, body string) *bridge.Outgoing {
	return &bridge.Outgoing{
		Target: router.Target{Broker: broker, Subject: subject},
		MsgID:  id,
		Header: map[string][]string{"Cell-Msg-Id": {id}, "Cell-Name": {"rz00"}, "X-User-Id": {"2088000000000042"}},
		Body:   []byte(body),
	}
}

func TestSinkPublishesWithMsgIDAndHeaders(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	st := createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})

	m := out("nats", "cell.rz00.orders", "ORDERS:1", `{"n":1}`)
	if err := bridge.Publish(testCtx(t), sink, m); err != nil {
		t.Fatal(err)
	}
	// The sink sets its idempotency header in place and touches nothing else.
	if v := m.Header["Nats-Msg-Id"]; len(v) != 1 || v[0] != "ORDERS:1" || len(m.Header) != 4 {
		t.Fatalf("headers after publish: %v", m.Header)
	}
	got, err := st.GetMsg(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	if got.Subject != "cell.rz00.orders" || string(got.Data) != `{"n":1}` {
		t.Fatalf("stored %q %q", got.Subject, got.Data)
	}
	for k, want := range map[string]string{
		"Nats-Msg-Id": "ORDERS:1", "Cell-Msg-Id": "ORDERS:1", "Cell-Name": "rz00", "X-User-Id": "2088000000000042",
	} {
		if got := got.Header.Get(k); got != want {
			t.Errorf("header %s = %q, want %q", k, got, want)
		}
	}
}

func TestSinkReportsDuplicateAndStoresOnce(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	st := createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})

	if err := bridge.Publish(testCtx(t), sink, out("nats", "cell.rz00.orders", "ORDERS:7", "a")); err != nil {
		t.Fatal(err)
	}
	// Same key, different id header on the map: Nats-Msg-Id must follow MsgID.
	again := out("nats", "cell.rz00.orders", "ORDERS:7", "a")
	again.Header["Nats-Msg-Id"] = []string{"producer-id"}
	err := bridge.Publish(testCtx(t), sink, again)
	if !errors.Is(err, bridge.ErrDuplicate) {
		t.Fatalf("repeat publish: err = %v, want ErrDuplicate", err)
	}
	var dup *DuplicateError
	if !errors.As(err, &dup) || dup.Stream != "CELL_RZ00" || dup.Seq != 1 {
		t.Fatalf("duplicate details = %+v", dup)
	}
	if n := streamMsgs(t, st); n != 1 {
		t.Fatalf("stream holds %d messages, want 1", n)
	}
}

func TestSinkHeaderlessMessage(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	st := createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})
	m := &bridge.Outgoing{Target: router.Target{Broker: "nats", Subject: "cell.rz00.x"}, MsgID: "k1", Body: []byte("b")}
	if err := bridge.Publish(testCtx(t), sink, m); err != nil {
		t.Fatal(err)
	}
	got, err := st.GetMsg(testCtx(t), 1)
	if err != nil {
		t.Fatal(err)
	}
	if got.Header.Get("Nats-Msg-Id") != "k1" {
		t.Fatalf("Nats-Msg-Id = %q", got.Header.Get("Nats-Msg-Id"))
	}
}

func TestSinkErrors(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})

	err := bridge.Publish(testCtx(t), sink, out("cell-rz10", "cell.rz10.orders", "x", "b"))
	if !errors.Is(err, ErrUnknownBroker) {
		t.Fatalf("unknown broker: err = %v", err)
	}
	// No stream captures the subject: the server answers "no responders".
	err = bridge.Publish(testCtx(t), sink, out("nats", "nowhere.x", "y", "b"))
	if !errors.Is(err, jetstream.ErrNoStreamResponse) {
		t.Fatalf("no stream: err = %v", err)
	}
	if errors.Is(err, bridge.ErrDuplicate) {
		t.Fatal("a failure must not look like a duplicate")
	}
}

// TestSinkBackPressure fills the pending limit with publishes whose acks
// take a while (no stream: the client retries "no responders" twice, 250ms
// apart) and checks that the next PublishAsync returns only after a slot was
// freed by a completion.
func TestSinkBackPressure(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{MaxPending: 2})
	res := newResult()
	ctx := testCtx(t)
	sink.PublishAsync(ctx, out("nats", "nowhere.1", "1", "b"), res.done(1))
	sink.PublishAsync(ctx, out("nats", "nowhere.2", "2", "b"), res.done(2))
	sink.PublishAsync(ctx, out("nats", "nowhere.3", "3", "b"), res.done(3))
	res.note("third returned")
	eventually(t, 10*time.Second, "all done", func() bool { return res.count() == 3 })
	res.mu.Lock()
	defer res.mu.Unlock()
	if res.log[0] != "done 1" || !slices.Contains(res.log[1:], "third returned") {
		t.Fatalf("order %v: the third publish did not wait for a free slot", res.log)
	}
}

func TestSinkBlockedPublishHonoursContext(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{MaxPending: 1})
	res := newResult()
	sink.PublishAsync(testCtx(t), out("nats", "nowhere.1", "1", "b"), res.done(1))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	sink.PublishAsync(ctx, out("nats", "nowhere.2", "2", "b"), res.done(2))
	eventually(t, 10*time.Second, "both done", func() bool { return res.count() == 2 })
	if err := res.err(2); !errors.Is(err, context.Canceled) {
		t.Fatalf("blocked publish: err = %v, want context.Canceled", err)
	}
}

func TestSinkAcrossTwoBrokers(t *testing.T) {
	a, b := natstest.Start(t), natstest.Start(t)
	_, jsA := a.Connect(t)
	_, jsB := b.Connect(t)
	stA := createStream(t, jsA, "CELL_RZ00", "cell.rz00.>")
	stB := createStream(t, jsB, "CELL_RZ10", "cell.rz10.>")
	sink := newSink(t, map[string]jetstream.JetStream{"nats-hz": jsA, "nats-sh": jsB}, SinkConfig{})
	res := newResult()
	const n = 200
	for i := range n {
		m := out("nats-hz", "cell.rz00.orders", fmt.Sprint("a", i), "x")
		if i%2 == 1 {
			m = out("nats-sh", "cell.rz10.orders", fmt.Sprint("b", i), "x")
		}
		sink.PublishAsync(testCtx(t), m, res.done(i))
	}
	eventually(t, 10*time.Second, "all done", func() bool { return res.count() == n })
	for i := range n {
		if err := res.err(i); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	if ga, gb := streamMsgs(t, stA), streamMsgs(t, stB); ga != n/2 || gb != n/2 {
		t.Fatalf("streams hold %d and %d, want %d each", ga, gb, n/2)
	}
}

func TestSinkCloseWaitsForPendingAcks(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sink, err := NewSink(map[string]jetstream.JetStream{"nats": js}, SinkConfig{}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	res := newResult()
	const n = 500
	for i := range n {
		sink.PublishAsync(testCtx(t), out("nats", "cell.rz00.o", fmt.Sprint(i), "x"), res.done(i))
	}
	if err := sink.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	if res.count() != n {
		t.Fatalf("Close returned with %d of %d publishes resolved", res.count(), n)
	}
	for i := range n {
		if err := res.err(i); err != nil {
			t.Fatalf("publish %d: %v", i, err)
		}
	}
	sink.PublishAsync(testCtx(t), out("nats", "cell.rz00.o", "late", "x"), res.done(n))
	if err := res.err(n); !errors.Is(err, ErrClosed) {
		t.Fatalf("publish after Close: err = %v, want ErrClosed", err)
	}
	if err := sink.Close(testCtx(t)); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestSinkCloseDeadlineResolvesPending(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	sink, err := NewSink(map[string]jetstream.JetStream{"nats": js}, SinkConfig{}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	res := newResult()
	sink.PublishAsync(testCtx(t), out("nats", "nowhere.1", "1", "b"), res.done(1))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := sink.Close(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close: err = %v, want context.Canceled", err)
	}
	if err := res.err(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("pending publish: err = %v, want ErrClosed", err)
	}
}

// A publish whose ack never comes (a plain subscriber takes the subject, so
// there is no "no responders" answer either) fails with the client's
// ErrAsyncPublishTimeout after SinkConfig.AckTimeout, and so does the one
// queued behind it; a stream publish after them still succeeds.
func TestSinkAckTimeoutOnHead(t *testing.T) {
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	js, err := NewJetStream(nc, JetStreamConfig{})
	if err != nil {
		t.Fatal(err)
	}
	createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sub, err := nc.SubscribeSync("lost.>")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{AckTimeout: 300 * time.Millisecond})
	errs := make(chan error, 2)
	for i := range 2 {
		sink.PublishAsync(testCtx(t), out("nats", "lost.x", fmt.Sprint("L", i), "x"), func(err error) { errs <- err })
	}
	for range 2 {
		select {
		case err := <-errs:
			if !errors.Is(err, jetstream.ErrAsyncPublishTimeout) {
				t.Fatalf("err = %v, want ErrAsyncPublishTimeout", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no timeout reported")
		}
	}
	if err := bridge.Publish(testCtx(t), sink, out("nats", "cell.rz00.orders", "ok", "x")); err != nil {
		t.Fatal(err)
	}
}
