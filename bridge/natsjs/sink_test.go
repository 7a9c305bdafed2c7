package natsjs

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
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
	sink, st := streamSink(t, SinkConfig{})

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
	sink, st := streamSink(t, SinkConfig{})

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
	sink, st := streamSink(t, SinkConfig{})
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
	if !errors.Is(err, jetstream.ErrNoStreamResponse) || !errors.Is(err, nats.ErrNoResponders) ||
		!strings.Contains(err.Error(), `broker "nats" subject "nowhere.x"`) {
		t.Fatalf("no stream: err = %v", err)
	}
	if errors.Is(err, bridge.ErrDuplicate) {
		t.Fatal("a failure must not look like a duplicate")
	}
}

// TestSinkBackPressure fills the pending limit with publishes a fake stream
// has not answered and checks that the next PublishAsync blocks until a
// completion has freed a slot.
func TestSinkBackPressure(t *testing.T) {
	sink, nc, sub := fakeSink(t, SinkConfig{MaxPending: 2, AckTimeout: -1})
	res := newResult()
	ctx := testCtx(t)
	sink.PublishAsync(ctx, out("nats", "fake.1", "1", "b"), res.done(1))
	sink.PublishAsync(ctx, out("nats", "fake.2", "2", "b"), res.done(2))
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		sink.PublishAsync(ctx, out("nats", "fake.3", "3", "b"), res.done(3))
		res.note("third returned")
	}()
	p := sink.brokers["nats"]
	eventually(t, 10*time.Second, "third publish blocked", func() bool { return p.pipe.Stats().Blocked == 1 })
	answer(t, nc, nextMsg(t, sub).Reply, `{"stream":"FAKE","seq":1}`)
	<-returned
	for range 2 {
		answer(t, nc, nextMsg(t, sub).Reply, `{"stream":"FAKE","seq":2}`)
	}
	eventually(t, 10*time.Second, "all done", func() bool { return res.count() == 3 })
	res.mu.Lock()
	defer res.mu.Unlock()
	if res.log[0] != "done 1" || res.log[1] != "third returned" {
		t.Fatalf("order %v: the third publish did not wait for a free slot", res.log)
	}
}

func TestSinkBlockedPublishHonoursContext(t *testing.T) {
	sink, _, _ := fakeSink(t, SinkConfig{MaxPending: 1, AckTimeout: -1})
	res := newResult()
	sink.PublishAsync(testCtx(t), out("nats", "fake.1", "1", "b"), res.done(1))
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	sink.PublishAsync(ctx, out("nats", "fake.2", "2", "b"), res.done(2))
	if err := res.err(2); !errors.Is(err, context.Canceled) {
		t.Fatalf("blocked publish: err = %v, want context.Canceled", err)
	}
	// The unanswered publish is resolved by Close's deadline.
	if err := sink.Close(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close: err = %v, want context.Canceled", err)
	}
	if err := res.err(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("pending publish: err = %v, want ErrClosed", err)
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
	sink, nc, sub := fakeSink(t, SinkConfig{AckTimeout: -1})
	res := newResult()
	sink.PublishAsync(testCtx(t), out("nats", "fake.1", "1", "b"), res.done(1))
	m := nextMsg(t, sub)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := sink.Close(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close: err = %v, want context.Canceled", err)
	}
	if err := res.err(1); !errors.Is(err, ErrClosed) {
		t.Fatalf("pending publish: err = %v, want ErrClosed", err)
	}
	// Its ack arriving now changes nothing (done ran once: result panics otherwise).
	answer(t, nc, m.Reply, `{"stream":"FAKE","seq":1}`)
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

// A publish whose ack never comes (a plain subscriber takes the subject, so
// there is no "no responders" answer either) fails with
// jetstream.ErrAsyncPublishTimeout after SinkConfig.AckTimeout, and so does
// the one behind it; their slots are free again, so with MaxPending 2 a
// stream publish after them goes through.
func TestSinkAckTimeout(t *testing.T) {
	srv := natstest.Start(t)
	nc, js := srv.Connect(t)
	createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sub, err := nc.SubscribeSync("lost.>")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{MaxPending: 2, AckTimeout: 300 * time.Millisecond})
	errs := make(chan error, 2)
	for i := range 2 {
		sink.PublishAsync(testCtx(t), out("nats", "lost.x", fmt.Sprint("L", i), "x"), func(err error) { errs <- err })
	}
	for range 2 {
		if err := recv(t, errs); !errors.Is(err, jetstream.ErrAsyncPublishTimeout) || !strings.Contains(err.Error(), `"lost.x"`) {
			t.Fatalf("err = %v, want ErrAsyncPublishTimeout naming the subject", err)
		}
	}
	if err := bridge.Publish(testCtx(t), sink, out("nats", "cell.rz00.orders", "ok", "x")); err != nil {
		t.Fatal(err)
	}
}

// TestSinkAckTimeoutPerBroker: AckTimeouts sets the timeout per broker
// name (the configuration's brokers.<name>.ackTimeout); the other brokers
// keep AckTimeout.
func TestSinkAckTimeoutPerBroker(t *testing.T) {
	srv := natstest.Start(t)
	nc, js := srv.Connect(t)
	sub, err := nc.SubscribeSync("lost.>")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	sink, err := NewSink(map[string]jetstream.JetStream{"fast": js, "slow": js},
		SinkConfig{AckTimeout: time.Minute, AckTimeouts: map[string]time.Duration{"fast": 200 * time.Millisecond}}, quiet)
	if err != nil {
		t.Fatal(err)
	}
	fast, slow := make(chan error, 1), make(chan error, 1)
	start := time.Now()
	sink.PublishAsync(testCtx(t), out("fast", "lost.f", "F", "x"), func(err error) { fast <- err })
	sink.PublishAsync(testCtx(t), out("slow", "lost.s", "S", "x"), func(err error) { slow <- err })
	if err := recv(t, fast); !errors.Is(err, jetstream.ErrAsyncPublishTimeout) {
		t.Fatalf("fast broker: err = %v, want its 200ms ack timeout", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("fast broker's timeout came after %v", took)
	}
	select {
	case err := <-slow:
		t.Fatalf("slow broker's publish resolved (%v) long before its 1m ack timeout", err)
	case <-time.After(time.Second):
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := sink.Close(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close: %v", err)
	}
	if err := recv(t, slow); !errors.Is(err, ErrClosed) {
		t.Fatalf("slow broker after Close: %v", err)
	}
}

// streamSink starts a server with stream CELL_RZ00 on cell.rz00.> and
// returns a Sink publishing there as broker "nats" (closed when the test ends).
func streamSink(t *testing.T, cfg SinkConfig) (*Sink, jetstream.Stream) {
	t.Helper()
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	st := createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	return newSink(t, map[string]jetstream.JetStream{"nats": js}, cfg), st
}

// fakeSink starts a server where a plain subscriber (returned, on the Sink's
// connection nc) stands in for a stream on fake.>, and a Sink as broker
// "nats" (closed when the test ends; closing it earlier is fine).
func fakeSink(t *testing.T, cfg SinkConfig) (*Sink, *nats.Conn, *nats.Subscription) {
	t.Helper()
	srv := natstest.Start(t)
	nc, js := srv.Connect(t)
	sub := fakeStream(t, nc, "fake.>")
	return newSink(t, map[string]jetstream.JetStream{"nats": js}, cfg), nc, sub
}

// fakeStream takes subject on nc with a plain subscriber, so the test
// decides when and how publishes to it are answered.
func fakeStream(t *testing.T, nc *nats.Conn, subject string) *nats.Subscription {
	t.Helper()
	sub, err := nc.SubscribeSync(subject)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return sub
}

func nextMsg(t *testing.T, sub *nats.Subscription) *nats.Msg {
	t.Helper()
	m, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// recv waits for the result a done callback sends on errs.
func recv(t *testing.T, errs <-chan error) error {
	t.Helper()
	select {
	case err := <-errs:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("publish not resolved")
		return nil
	}
}

func answer(t *testing.T, nc *nats.Conn, reply, body string) {
	t.Helper()
	if err := nc.Publish(reply, []byte(body)); err != nil {
		t.Fatal(err)
	}
}

// With one slot, the second publish reuses the first one's slot. A late
// answer to the first publish's reply subject (and one with a token that
// names no slot) must not resolve the second: only its own answer does.
func TestSinkIgnoresStaleAckForReusedSlot(t *testing.T) {
	sink, nc, sub := fakeSink(t, SinkConfig{MaxPending: 1, AckTimeout: -1})
	res := newResult()
	ctx := testCtx(t)

	sink.PublishAsync(ctx, out("nats", "fake.1", "1", "a"), res.done(1))
	first := nextMsg(t, sub)
	answer(t, nc, first.Reply, `{"stream":"FAKE","seq":1}`)
	eventually(t, 10*time.Second, "first resolved", func() bool { return res.count() == 1 })
	if err := res.err(1); err != nil {
		t.Fatalf("first publish: %v", err)
	}

	sink.PublishAsync(ctx, out("nats", "fake.2", "2", "a"), res.done(2))
	second := nextMsg(t, sub)
	if second.Reply == first.Reply {
		t.Fatalf("reused slot got the same reply subject %q", second.Reply)
	}
	prefix := first.Reply[:strings.LastIndexByte(first.Reply, '.')+1]
	answer(t, nc, first.Reply, `{"error":{"code":400,"err_code":10071,"description":"stale"}}`)
	answer(t, nc, prefix+"zz", `{"stream":"FAKE","seq":9}`)
	answer(t, nc, prefix+"not-a-token", `{"stream":"FAKE","seq":9}`)
	// Acks arrive in the order they were sent: the stale ones come first.
	answer(t, nc, second.Reply, `{"stream":"FAKE","seq":2,"duplicate":true}`)
	eventually(t, 10*time.Second, "second resolved", func() bool { return res.count() == 2 })
	var dup *DuplicateError
	if err := res.err(2); !errors.As(err, &dup) || dup.Seq != 2 || dup.Stream != "FAKE" || dup.Broker != "nats" {
		t.Fatalf("second publish: err = %v, want its own ack (duplicate of seq 2)", err)
	}
}

// Each kind of answer a stream (or something posing as one) may give maps
// to the documented result.
func TestSinkAckShapes(t *testing.T) {
	sink, nc, sub := fakeSink(t, SinkConfig{AckTimeout: -1})
	for _, c := range []struct {
		name, body string
		hdr        nats.Header
		check      func(error) bool
	}{
		{"stored", `{"stream":"FAKE","seq":3}`, nil, func(err error) bool { return err == nil }},
		{"stored with domain", ` { "stream" : "FAKE" , "domain":"hub", "seq" : 4 } `, nil, func(err error) bool { return err == nil }},
		{"escaped stream", `{"stream":"F\u0041KE","seq":5,"duplicate":true}`, nil, func(err error) bool {
			var dup *DuplicateError
			return errors.As(err, &dup) && dup.Stream == "FAKE" && dup.Seq == 5
		}},
		{"api error", `{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},"stream":"FAKE"}`, nil, func(err error) bool {
			var api *jetstream.APIError
			return errors.As(err, &api) && api.ErrorCode == 10077 && strings.Contains(err.Error(), "maximum messages exceeded")
		}},
		{"no stream name", `{"seq":1}`, nil, func(err error) bool { return errors.Is(err, jetstream.ErrInvalidJSAck) }},
		{"not json", `ok`, nil, func(err error) bool { return errors.Is(err, jetstream.ErrInvalidJSAck) }},
		{"no responders", "", nats.Header{"Status": {"503"}}, func(err error) bool { return errors.Is(err, jetstream.ErrNoStreamResponse) }},
		{"other status", "", nats.Header{"Status": {"408"}, "Description": {"Request Timeout"}}, func(err error) bool {
			return errors.Is(err, jetstream.ErrInvalidJSAck) && strings.Contains(err.Error(), "Request Timeout")
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			errs := make(chan error, 1)
			sink.PublishAsync(testCtx(t), out("nats", "fake.x", c.name, "x"), func(err error) { errs <- err })
			m := nextMsg(t, sub)
			if err := nc.PublishMsg(&nats.Msg{Subject: m.Reply, Header: c.hdr, Data: []byte(c.body)}); err != nil {
				t.Fatal(err)
			}
			err := recv(t, errs)
			if !c.check(err) {
				t.Fatalf("err = %v", err)
			}
			if err != nil && !errors.As(err, new(*DuplicateError)) && !strings.Contains(err.Error(), `broker "nats" subject "fake.x"`) {
				t.Fatalf("error does not name broker and subject: %v", err)
			}
		})
	}
}

// A stream's refusal reaches done as the server's API error, named with
// broker, subject and the server's description, and is not a duplicate.
func TestSinkStreamRefusal(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	st, err := js.CreateStream(testCtx(t), jetstream.StreamConfig{Name: "CELL_RZ00", Subjects: []string{"cell.rz00.>"}, MaxMsgSize: 64})
	if err != nil {
		t.Fatal(err)
	}
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})
	m := out("nats", "cell.rz00.orders", "ORDERS:1", strings.Repeat("x", 200))
	err = bridge.Publish(testCtx(t), sink, m)
	var api *jetstream.APIError
	if !errors.As(err, &api) || api.ErrorCode != jetstream.JSErrCodeStreamMessageExceedsMaximum {
		t.Fatalf("err = %v, want the server's message-too-large error", err)
	}
	for _, want := range []string{`broker "nats"`, `subject "cell.rz00.orders"`, api.Description} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if errors.Is(err, bridge.ErrDuplicate) {
		t.Fatal("a refusal must not look like a duplicate")
	}
	if n := streamMsgs(t, st); n != 0 {
		t.Fatalf("stream holds %d messages, want 0", n)
	}
}

// The producer's JetStream control headers on the source message are not
// carried to the target: with them the target stream would refuse every copy
// (an expected stream or last sequence that is the source's) or act on them
// (rollup, TTL). Other headers and the sink's Nats-Msg-Id stay.
func TestSinkDropsSourceControlHeaders(t *testing.T) {
	sink, st := streamSink(t, SinkConfig{})
	m := out("nats", "cell.rz00.orders", "ORDERS:1", "x")
	m.Header[jetstream.ExpectedStreamHeader] = []string{"ORDERS"}
	m.Header[jetstream.ExpectedLastSeqHeader] = []string{"5"}
	m.Header[jetstream.ExpectedLastSubjSeqHeader] = []string{"7"}
	m.Header["Nats-Rollup"] = []string{"sub"}
	m.Header["Nats-TTL"] = []string{"1s"}
	m.Header["X-User-Id"] = []string{"2088000000012345"}
	if err := bridge.Publish(testCtx(t), sink, m); err != nil {
		t.Fatalf("publish with the source's control headers: %v", err)
	}
	if n := streamMsgs(t, st); n != 1 {
		t.Fatalf("stream holds %d messages, want 1", n)
	}
	got, err := st.GetLastMsgForSubject(testCtx(t), "cell.rz00.orders")
	if err != nil {
		t.Fatal(err)
	}
	for k := range got.Header {
		if strings.HasPrefix(k, "Nats-") && k != jetstream.MsgIDHeader {
			t.Errorf("stored copy carries control header %s", k)
		}
	}
	if v := got.Header.Get(jetstream.MsgIDHeader); v != "ORDERS:1" {
		t.Errorf("Nats-Msg-Id = %q, want ORDERS:1", v)
	}
	if v := got.Header.Get("X-User-Id"); v != "2088000000012345" {
		t.Errorf("X-User-Id = %q, want it kept", v)
	}
}

// Close waits for an ack that arrives after it started, and a publish
// blocked at the cap when Close starts gets ErrClosed.
func TestSinkCloseWaitsForLateAck(t *testing.T) {
	sink, nc, sub := fakeSink(t, SinkConfig{MaxPending: 1, AckTimeout: -1})
	res := newResult()
	sink.PublishAsync(testCtx(t), out("nats", "fake.1", "1", "x"), res.done(1))
	m := nextMsg(t, sub)
	blocked := make(chan struct{})
	go func() {
		defer close(blocked)
		sink.PublishAsync(testCtx(t), out("nats", "fake.2", "2", "x"), res.done(2))
	}()
	p := sink.brokers["nats"]
	eventually(t, 10*time.Second, "second publish blocked", func() bool { return p.pipe.Stats().Blocked == 1 })
	closed := make(chan error, 1)
	go func() { closed <- sink.Close(testCtx(t)) }()
	<-blocked
	if err := res.err(2); !errors.Is(err, ErrClosed) {
		t.Fatalf("blocked publish: err = %v, want ErrClosed", err)
	}
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) before the outstanding ack arrived", err)
	default:
	}
	answer(t, nc, m.Reply, `{"stream":"FAKE","seq":1}`)
	select {
	case err := <-closed:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return after the ack")
	}
	if err := res.err(1); err != nil {
		t.Fatalf("outstanding publish: %v", err)
	}
}

// When the connection drops, the publishes waiting for an ack fail at once
// (their acks are lost with the connection) instead of after AckTimeout.
func TestSinkFailsPendingOnDisconnect(t *testing.T) {
	srv := natstest.Start(t)
	nc, js := srv.Connect(t)
	sub := fakeStream(t, nc, "fake.>")
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{AckTimeout: -1})
	errs := make(chan error, 1)
	sink.PublishAsync(testCtx(t), out("nats", "fake.1", "1", "x"), func(err error) { errs <- err })
	nextMsg(t, sub)
	srv.Shutdown()
	if err := recv(t, errs); !errors.Is(err, nats.ErrDisconnected) {
		t.Fatalf("err = %v, want nats.ErrDisconnected", err)
	}
}

// Publishers on several goroutines, squeezed through a few slots, all get
// their own result: every message is stored once, and publishing them all
// again yields a duplicate for each.
func TestSinkConcurrentPublishers(t *testing.T) {
	sink, st := streamSink(t, SinkConfig{MaxPending: 8})
	const workers, each = 4, 250
	for round, want := range []func(error) bool{
		func(err error) bool { return err == nil },
		func(err error) bool { return errors.Is(err, bridge.ErrDuplicate) },
	} {
		res := newResult()
		var wg sync.WaitGroup
		for w := range workers {
			wg.Go(func() {
				for i := range each {
					n := w*each + i
					sink.PublishAsync(testCtx(t), out("nats", "cell.rz00.o", fmt.Sprint("k", n), "x"), res.done(n))
				}
			})
		}
		wg.Wait()
		eventually(t, 30*time.Second, "all resolved", func() bool { return res.count() == workers*each })
		for n := range workers * each {
			if err := res.err(n); !want(err) {
				t.Fatalf("round %d publish %d: err = %v", round, n, err)
			}
		}
	}
	if got := streamMsgs(t, st); got != workers*each {
		t.Fatalf("stream holds %d, want %d", got, workers*each)
	}
}

// A Close whose ctx has already ended returns nil when nothing was left to
// resolve: no publish was cut short, so there is no error to report.
func TestSinkCloseExpiredContextNothingPending(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	// Two brokers, each drained; repeated because a wrong answer would
	// come from a random choice.
	for i := range 20 {
		sink, err := NewSink(map[string]jetstream.JetStream{"a": js, "b": js}, SinkConfig{}, quiet)
		if err != nil {
			t.Fatal(err)
		}
		if err := bridge.Publish(testCtx(t), sink, out("a", "cell.rz00.o", fmt.Sprint(i), "x")); err != nil && !errors.Is(err, bridge.ErrDuplicate) {
			t.Fatal(err)
		}
		if err := sink.Close(ctx); err != nil {
			t.Fatalf("round %d: Close with nothing pending: %v", i, err)
		}
	}
}

// A publish made while the connection is down fails at once and is not left
// in the client's reconnect buffer: no copy of it reaches the stream when the
// server is back (by then the bridge, or another replica, may have published
// it again, past the duplicate window or into another cell). Publishing works
// again after the reconnect.
func TestSinkDoesNotBufferWhileDisconnected(t *testing.T) {
	srv := natstest.Start(t)
	nc, js := srv.Connect(t, nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond))
	createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})
	if err := bridge.Publish(testCtx(t), sink, out("nats", "cell.rz00.orders", "before", "x")); err != nil {
		t.Fatal(err)
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	p := sink.brokers["nats"]
	eventually(t, 10*time.Second, "sink sees the link down", func() bool { return p.pipe.Stats().Down })
	err := bridge.Publish(testCtx(t), sink, out("nats", "cell.rz00.orders", "during", "x"))
	if !errors.Is(err, nats.ErrDisconnected) {
		t.Fatalf("publish while down: err = %v, want nats.ErrDisconnected", err)
	}
	srv.Restart(t)
	eventually(t, 10*time.Second, "reconnected", nc.IsConnected)
	eventually(t, 10*time.Second, "publish after the reconnect", func() bool {
		return bridge.Publish(testCtx(t), sink, out("nats", "cell.rz00.orders", "after", "x")) == nil
	})
	st, err := js.Stream(testCtx(t), "CELL_RZ00")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for seq := uint64(1); seq <= 3; seq++ {
		m, err := st.GetMsg(testCtx(t), seq)
		if err != nil {
			break
		}
		seen[m.Header.Get(jetstream.MsgIDHeader)] = true
	}
	if !seen["before"] || !seen["after"] || seen["during"] {
		t.Fatalf("stream holds %v, want before and after, not during", seen)
	}
}
