package bridgetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/router"
)

// Stored is one message as a sink's target broker holds it.
type Stored struct {
	// MsgID is the broker's idempotency key (Nats-Msg-Id, RocketMQ Keys).
	MsgID string
	// Header holds the stored headers (user properties), first value each.
	Header map[string]string
	Body   []byte
}

// SinkFixture is a running broker (or several) that a test's sinks publish
// to.
type SinkFixture struct {
	// NewSink returns a Sink serving the fixture's broker whose pending limit
	// (publishes accepted and not yet resolved, beyond which PublishAsync
	// blocks) is maxPending. The suite closes every sink it asks for.
	NewSink func(t *testing.T, maxPending int) bridge.Sink
	// Target returns a fresh target on the fixture's broker where publishes
	// are stored; every call names a new, empty topic.
	Target func(t *testing.T) router.Target
	// Stored returns the messages stored at target, in store order.
	Stored func(t *testing.T, target router.Target) []Stored
	// Unconfirmed returns a target whose broker takes publishes but does not
	// confirm them for the rest of the test (nor fail them within a minute).
	// Once it was called, publishes to the fixture's other targets may stay
	// unconfirmed too.
	Unconfirmed func(t *testing.T) router.Target
}

// SinkHarness adapts one Sink implementation to the suite.
type SinkHarness struct {
	// Open makes a fixture for one test. Whatever it starts it stops in
	// t.Cleanup.
	Open func(t *testing.T) SinkFixture
	// DropsDuplicates says the broker drops a message whose MsgID it already
	// stored (done gets an error wrapping bridge.ErrDuplicate); otherwise it
	// stores the repeat, and both copies carry the MsgID.
	DropsDuplicates bool
}

// closeSlack is how long after its ctx ended Close may take to return.
const closeSlack = 2 * time.Second

// TestSink runs the Sink contract suite (see the package docs) against the
// adapter h describes. Each contract point is a subtest with a fixture of
// its own.
func TestSink(t *testing.T, h SinkHarness) {
	runPoints(t, h, h.Open, []point[SinkHarness, SinkFixture]{
		{"StoresBodyHeadersAndMsgID", sinkStoresBodyHeadersAndMsgID},
		{"DoneExactlyOnce", sinkDoneExactlyOnce},
		{"Duplicate", sinkDuplicate},
		{"UnknownBroker", sinkUnknownBroker},
		{"BlockedPublishHonoursContext", sinkBlockedPublishHonoursContext},
		{"CloseWaitsForPending", sinkCloseWaitsForPending},
		{"CloseWithinContext", sinkCloseWithinContext},
	})
}

// openSink returns a sink of fx and a close function that closes it once
// (with a ctx of returnWithin) and returns Close's error; the test's
// cleanup closes it if the test did not.
func openSink(t *testing.T, fx SinkFixture, maxPending int) (bridge.Sink, func(ctx context.Context) error) {
	t.Helper()
	s := fx.NewSink(t, maxPending)
	var once sync.Once
	var err error
	closeFn := func(ctx context.Context) error {
		once.Do(func() { err = s.Close(ctx) })
		return err
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), returnWithin)
		defer cancel()
		_ = closeFn(ctx)
	})
	return s, closeFn
}

// outcomes counts done calls per publish and keeps each one's first result.
type outcomes struct {
	mu    sync.Mutex
	calls map[int]int
	errs  map[int]error
}

func newOutcomes() *outcomes { return &outcomes{calls: map[int]int{}, errs: map[int]error{}} }

// done returns publish i's done callback; after, when set, runs inside done
// (the Outgoing is the caller's again there) before the result is recorded,
// so whoever sees the result also sees what after did.
func (o *outcomes) done(i int, after func()) func(error) {
	return func(err error) {
		if after != nil {
			after()
		}
		o.mu.Lock()
		o.calls[i]++
		if o.calls[i] == 1 {
			o.errs[i] = err
		}
		o.mu.Unlock()
	}
}

func (o *outcomes) resolved() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.calls)
}

func (o *outcomes) result(i int) (calls int, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.calls[i], o.errs[i]
}

// wait waits until n publishes were resolved.
func (o *outcomes) wait(t *testing.T, n int) {
	t.Helper()
	poll.Eventually(t, deliverWithin, fmt.Sprintf("%d publishes resolved", n), func() bool { return o.resolved() >= n })
}

// checkOnce fails unless publishes 0..n-1 each got exactly one done, and
// checks each result with check.
func (o *outcomes) checkOnce(t *testing.T, n int, check func(i int, err error)) {
	t.Helper()
	for i := range n {
		calls, err := o.result(i)
		if calls != 1 {
			t.Errorf("publish %d: done called %d times, want exactly once", i, calls)
			continue
		}
		check(i, err)
	}
}

func outgoing(target router.Target, id string, header map[string][]string, body string) *bridge.Outgoing {
	return &bridge.Outgoing{Target: target, MsgID: id, Header: header, Body: []byte(body)}
}

func suiteHeader(id string) map[string][]string {
	return map[string][]string{
		bridge.HeaderMsgID: {id}, bridge.HeaderCell: {"rz00"}, bridge.HeaderShard: {"42"},
		bridge.HeaderRulesVersion: {"7"}, bridge.HeaderSource: {"suite/IN"}, bridge.HeaderHops: {"1"},
		"X-Suite-Id": {"2088000000000042"},
	}
}

// publishWait publishes m and waits for its result.
func publishWait(t *testing.T, s bridge.Sink, m *bridge.Outgoing, o *outcomes, i int, after func()) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), deliverWithin)
	defer cancel()
	s.PublishAsync(ctx, m, o.done(i, after))
	poll.Eventually(t, deliverWithin, fmt.Sprintf("done of publish %d", i), func() bool {
		calls, _ := o.result(i)
		return calls > 0
	})
	_, err := o.result(i)
	return err
}

func sinkStoresBodyHeadersAndMsgID(t *testing.T, _ SinkHarness, fx SinkFixture) {
	s, _ := openSink(t, fx, 16)
	target := fx.Target(t)
	o := newOutcomes()

	const id, body = "IN:1", `{"user":{"id":"2088000000000042"}}`
	hdr := suiteHeader(id)
	m := outgoing(target, id, hdr, body)
	var after map[string][]string
	// Once done ran, the Outgoing is the caller's again: the pipeline
	// reuses it. The suite scribbles over it; the stored copy must not
	// change (and -race catches a sink still reading it).
	err := publishWait(t, s, m, o, 0, func() {
		after = maps.Clone(m.Header)
		clear(m.Header)
		for i := range m.Body {
			m.Body[i] = 'X'
		}
	})
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	for k, want := range suiteHeader(id) {
		if v := after[k]; !slices.Equal(v, want) {
			t.Errorf("after the publish the Outgoing's header %s = %q, want %q unchanged", k, v, want)
		}
	}
	for k := range after {
		if _, ours := suiteHeader(id)[k]; !ours {
			t.Logf("the sink added header %s = %q (its idempotency header)", k, after[k])
		}
	}

	headerless := outgoing(target, "IN:2", nil, "no headers")
	if err := publishWait(t, s, headerless, o, 1, nil); err != nil {
		t.Fatalf("publish without headers: %v", err)
	}

	got := fx.Stored(t, target)
	if len(got) != 2 {
		t.Fatalf("target holds %d messages, want 2", len(got))
	}
	if got[0].MsgID != id || string(got[0].Body) != body {
		t.Errorf("stored MsgID %q body %q, want %q %q", got[0].MsgID, got[0].Body, id, body)
	}
	for k, want := range suiteHeader(id) {
		if v, ok := got[0].Header[k]; !ok || v != want[0] {
			t.Errorf("stored header %s = %q (present %v), want %q", k, v, ok, want[0])
		}
	}
	if got[1].MsgID != "IN:2" || string(got[1].Body) != "no headers" {
		t.Errorf("headerless message stored as MsgID %q body %q", got[1].MsgID, got[1].Body)
	}
}

func sinkDoneExactlyOnce(t *testing.T, _ SinkHarness, fx SinkFixture) {
	s, closeSink := openSink(t, fx, 32)
	target := fx.Target(t)
	o := newOutcomes()
	const publishers, each = 4, 50
	var wg sync.WaitGroup
	ctx, cancel := context.WithTimeout(context.Background(), deliverWithin)
	defer cancel()
	for p := range publishers {
		wg.Go(func() {
			for j := range each {
				i := p*each + j
				id := fmt.Sprintf("IN:%d", i)
				s.PublishAsync(ctx, outgoing(target, id, suiteHeader(id), id), o.done(i, nil))
			}
		})
	}
	wg.Wait()
	o.wait(t, publishers*each)
	if err := closeSink(ctx); err != nil {
		t.Errorf("Close: %v", err)
	}
	o.checkOnce(t, publishers*each, func(i int, err error) {
		if err != nil {
			t.Errorf("publish %d: %v", i, err)
		}
	})
	count := map[string]int{}
	for _, m := range fx.Stored(t, target) {
		count[m.MsgID]++
		if m.MsgID != string(m.Body) {
			t.Errorf("stored MsgID %q with body %q", m.MsgID, m.Body)
		}
	}
	for i := range publishers * each {
		if id := fmt.Sprintf("IN:%d", i); count[id] != 1 {
			t.Errorf("%s stored %d times, want once", id, count[id])
		}
	}
}

func sinkDuplicate(t *testing.T, h SinkHarness, fx SinkFixture) {
	s, _ := openSink(t, fx, 16)
	target := fx.Target(t)
	o := newOutcomes()
	const id = "IN:dup"
	if err := publishWait(t, s, outgoing(target, id, suiteHeader(id), "first"), o, 0, nil); err != nil {
		t.Fatalf("first publish: %v", err)
	}
	err := publishWait(t, s, outgoing(target, id, suiteHeader(id), "again"), o, 1, nil)
	got := fx.Stored(t, target)
	if h.DropsDuplicates {
		if !errors.Is(err, bridge.ErrDuplicate) {
			t.Errorf("repeated MsgID: done got %v, want an error wrapping bridge.ErrDuplicate", err)
		}
		if len(got) != 1 {
			t.Errorf("target holds %d messages, want 1: the repeat was stored", len(got))
		}
		return
	}
	if err != nil {
		t.Errorf("repeated MsgID: done got %v, want nil (the broker stores repeats)", err)
	}
	if len(got) != 2 || got[0].MsgID != id || got[1].MsgID != id {
		t.Errorf("target holds %+v, want two copies with MsgID %q", got, id)
	}
}

func sinkUnknownBroker(t *testing.T, _ SinkHarness, fx SinkFixture) {
	s, _ := openSink(t, fx, 16)
	target := fx.Target(t)
	target.Broker = "bridgetest-no-such-broker"
	o := newOutcomes()
	err := publishWait(t, s, outgoing(target, "IN:1", suiteHeader("IN:1"), "x"), o, 0, nil)
	if err == nil || errors.Is(err, bridge.ErrDuplicate) {
		t.Errorf("publish to an unknown broker: done got %v, want a failure that is not a duplicate", err)
	}
}

// fillUnconfirmed publishes n messages to an unconfirmed target and checks
// that each PublishAsync returned (the pending limit was not reached) and
// none was resolved.
func fillUnconfirmed(t *testing.T, s bridge.Sink, fx SinkFixture, o *outcomes, n int) {
	t.Helper()
	target := fx.Unconfirmed(t)
	returned := make(chan struct{})
	go func() {
		defer close(returned)
		for i := range n {
			id := fmt.Sprintf("U:%d", i)
			s.PublishAsync(context.Background(), outgoing(target, id, suiteHeader(id), id), o.done(i, nil))
		}
	}()
	select {
	case <-returned:
	case <-time.After(returnWithin):
		t.Fatalf("%d publishes within the pending limit of %d did not return", n, n)
	}
	if r := o.resolved(); r != 0 {
		t.Fatalf("%d unconfirmed publishes were resolved", r)
	}
}

func sinkBlockedPublishHonoursContext(t *testing.T, _ SinkHarness, fx SinkFixture) {
	const limit = 2
	s, closeSink := openSink(t, fx, limit)
	o := newOutcomes()
	fillUnconfirmed(t, s, fx, o, limit)
	defer func() {
		// The unconfirmed publishes hold the sink open: cut them short.
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_ = closeSink(ctx)
	}()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var returned atomic.Bool
	returnedc := make(chan struct{})
	go func() {
		defer close(returnedc)
		s.PublishAsync(ctx, outgoing(fx.Target(t), "B:0", suiteHeader("B:0"), "blocked"), o.done(limit, nil))
		returned.Store(true)
	}()
	// The limit is reached: the publish must wait. Watching it not return
	// for a while is the only outside view of "blocks".
	time.Sleep(300 * time.Millisecond)
	if returned.Load() {
		calls, err := o.result(limit)
		t.Fatalf("PublishAsync beyond the pending limit of %d returned without waiting (done calls %d, err %v)", limit, calls, err)
	}
	cancel()
	select {
	case <-returnedc:
	case <-time.After(returnWithin):
		t.Fatalf("blocked PublishAsync has not returned %s after its ctx ended", returnWithin)
	}
	calls, err := o.result(limit)
	if calls != 1 || !errors.Is(err, context.Canceled) {
		t.Errorf("blocked publish whose ctx ended: done called %d times with %v, want once with context.Canceled", calls, err)
	}
}

func sinkCloseWaitsForPending(t *testing.T, _ SinkHarness, fx SinkFixture) {
	s, closeSink := openSink(t, fx, 16)
	target := fx.Target(t)
	o := newOutcomes()
	const n = 100
	ctx, cancel := context.WithTimeout(context.Background(), deliverWithin)
	defer cancel()
	for i := range n {
		id := fmt.Sprintf("IN:%d", i)
		s.PublishAsync(ctx, outgoing(target, id, suiteHeader(id), id), o.done(i, nil))
	}
	if err := closeSink(ctx); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if r := o.resolved(); r != n {
		t.Fatalf("Close returned with %d of %d publishes resolved", r, n)
	}
	o.checkOnce(t, n, func(i int, err error) {
		if err != nil {
			t.Errorf("publish %d: %v", i, err)
		}
	})
	if got := len(fx.Stored(t, target)); got != n {
		t.Errorf("target holds %d messages, want %d", got, n)
	}

	late := make(chan struct{})
	go func() {
		defer close(late)
		s.PublishAsync(ctx, outgoing(target, "IN:late", suiteHeader("IN:late"), "late"), o.done(n, nil))
	}()
	select {
	case <-late:
	case <-time.After(returnWithin):
		t.Fatal("PublishAsync after Close did not return")
	}
	o.wait(t, n+1)
	if calls, err := o.result(n); calls != 1 || err == nil {
		t.Errorf("publish after Close: done called %d times with %v, want once with an error", calls, err)
	}
	if got := len(fx.Stored(t, target)); got != n {
		t.Errorf("target holds %d messages after a publish after Close, want %d", got, n)
	}
}

func sinkCloseWithinContext(t *testing.T, _ SinkHarness, fx SinkFixture) {
	const n = 2
	s, closeSink := openSink(t, fx, 8)
	o := newOutcomes()
	fillUnconfirmed(t, s, fx, o, n)

	const wait = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	began := time.Now()
	closed := make(chan struct{})
	go func() {
		defer close(closed)
		_ = closeSink(ctx) // its error is the sink's to choose: the publishes were cut short
	}()
	select {
	case <-closed:
	case <-time.After(wait + closeSlack):
		t.Fatalf("Close whose ctx ended after %s has not returned after %s with unconfirmed publishes pending", wait, wait+closeSlack)
	}
	t.Logf("Close returned after %s", time.Since(began).Round(time.Millisecond))
	o.checkOnce(t, n, func(i int, err error) {
		if err == nil {
			t.Errorf("unconfirmed publish %d: done got nil when Close cut it short", i)
		}
	})
}
