package bridgetest

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/poll"
)

// Raw is one message as an upstream producer publishes it to a source topic.
type Raw struct {
	// Header holds user headers (NATS headers, RocketMQ user properties),
	// one value each; nil for none.
	Header map[string]string
	Body   []byte
}

// SourceFixture is one fresh, empty source topic (a stream, a RocketMQ
// topic) on a running broker, made for one test.
type SourceFixture struct {
	// Rule is the topic rule name the fixture's sources are configured with;
	// every bridge.Message must carry it.
	Rule string
	// Publish stores msgs, in order, in one partition of the topic (one
	// stream, one queue) as an upstream producer would, and returns once the
	// broker stored them; it fails the test otherwise.
	Publish func(t *testing.T, msgs ...Raw)
	// NewSource returns a new, not yet running Source over the topic that
	// reads as consumer group (durable) group. Sources of one group share
	// its progress: a source started after another one was closed begins at
	// the earliest message the earlier one did not acknowledge. The suite
	// runs and closes every source it asks for.
	NewSource func(t *testing.T, group string) bridge.Source
}

// SourceHarness adapts one Source implementation to the suite.
type SourceHarness struct {
	// Open makes a fixture for one test: a fresh topic, and a broker of the
	// test's own or shared. Whatever it starts it stops in t.Cleanup.
	Open func(t *testing.T) SourceFixture
	// OffsetCommit says the source records a group's progress as a committed
	// offset per partition (RocketMQ): a message acknowledged with nil
	// behind one still unsettled is read again by the group's next source,
	// with the same SourceID, so that deduplication drops it. Otherwise an
	// acknowledged message is done for good.
	OffsetCommit bool
	// AckDeadline is how long a delivered message may stay unsettled before
	// the source redelivers it (JetStream's AckWait), as the fixture's
	// sources are configured; 0 when the source has no ack deadline. The
	// suite signals bridge.ErrInProgress for longer than this.
	AckDeadline time.Duration
}

// Bounds of the suite's waits. They are generous because test binaries
// run side by side under -race; a conforming adapter meets them with a
// wide margin.
const (
	// deliverWithin bounds waits for a delivery, including a source's start
	// and a redelivery to the group's next source.
	deliverWithin = 30 * time.Second
	// returnWithin bounds Run's return after ctx was cancelled, Close, and
	// PublishAsync's return after its ctx ended.
	returnWithin = 10 * time.Second
	// holdDelay is the delay of the bridge.Hold the suite asks for.
	holdDelay = 800 * time.Millisecond
)

// TestSource runs the Source contract suite (see the package docs) against
// the adapter h describes. Each contract point is a subtest with a fixture
// of its own.
func TestSource(t *testing.T, h SourceHarness) {
	runPoints(t, h, h.Open, []point[SourceHarness, SourceFixture]{
		{"MessageFields", sourceMessageFields},
		{"Order", sourceOrder},
		{"AckIsFinal", sourceAckIsFinal},
		{"NackRedelivers", sourceNackRedelivers},
		{"HoldDelaysRedelivery", sourceHoldDelaysRedelivery},
		{"InProgressIsNotFinal", sourceInProgressIsNotFinal},
		{"UnsettledComesBack", sourceUnsettledComesBack},
		{"AcksAfterRunCount", sourceAcksAfterRunCount},
		{"AckBehindUnsettled", sourceAckBehindUnsettled},
		{"BlockedHandlerCancel", sourceBlockedHandlerCancel},
		{"CancelledBeforeRun", sourceCancelledBeforeRun},
	})
}

// point is one contract point: a subtest given the harness and a fixture
// of its own.
type point[H, F any] struct {
	name string
	run  func(t *testing.T, h H, fx F)
}

func runPoints[H, F any](t *testing.T, h H, open func(*testing.T) F, points []point[H, F]) {
	for _, p := range points {
		t.Run(p.name, func(t *testing.T) { p.run(t, h, open(t)) })
	}
}

// delivery is one call of the handler, with copies of what the message held
// when it was handed over (the pipeline may change the Message afterwards).
type delivery struct {
	m          *bridge.Message
	ack        bridge.Ack
	at         time.Time
	body       string
	header     map[string][]string
	sourceID   string
	deliveries int
}

// recorder is a bridge.Handler that records deliveries; settle, when set,
// runs in the handler for each delivery and its result is the handler's.
// Without settle deliveries stay unsettled.
type recorder struct {
	mu     sync.Mutex
	got    []delivery
	settle func(ctx context.Context, d delivery) error
}

func newRecorder(settle func(ctx context.Context, d delivery) error) *recorder {
	return &recorder{settle: settle}
}

func (r *recorder) handle(ctx context.Context, m *bridge.Message, ack bridge.Ack) error {
	d := delivery{
		m: m, ack: ack, at: time.Now(), body: string(m.Body), sourceID: m.SourceID, deliveries: m.Deliveries,
		header: maps.Clone(m.Header),
	}
	for k, v := range d.header {
		d.header[k] = slices.Clone(v)
	}
	r.mu.Lock()
	r.got = append(r.got, d)
	settle := r.settle
	r.mu.Unlock()
	if settle == nil {
		return nil
	}
	return settle(ctx, d)
}

func (r *recorder) all() []delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// of returns the deliveries of the message with the given body.
func (r *recorder) of(body string) []delivery {
	var out []delivery
	for _, d := range r.all() {
		if d.body == body {
			out = append(out, d)
		}
	}
	return out
}

// bodies lists the bodies of all deliveries in delivery order.
func (r *recorder) bodies() []string {
	var out []string
	for _, d := range r.all() {
		out = append(out, d.body)
	}
	return out
}

// trace describes every delivery so far: body, Deliveries, SourceID, time.
func (r *recorder) trace() string {
	var b strings.Builder
	for _, d := range r.all() {
		fmt.Fprintf(&b, "[%q #%d %s at %s] ", d.body, d.deliveries, d.sourceID, d.at.Format("15:04:05.000"))
	}
	return b.String()
}

// waitFor waits until the message with the given body was delivered n
// times (or more).
func (r *recorder) waitFor(t *testing.T, body string, n int) []delivery {
	t.Helper()
	poll.Eventually(t, deliverWithin, fmt.Sprintf("%d deliveries of %q (all so far: %q)", n, body, r.bodies()),
		func() bool { return len(r.of(body)) >= n })
	return r.of(body)
}

// ackNil settles every delivery with nil from a goroutine of its own (an
// Ack is safe to call from any goroutine).
func ackNil(ctx context.Context, d delivery) error {
	go func() { _ = d.ack(context.WithoutCancel(ctx), nil) }()
	return nil
}

// running is a Source whose Run runs on a goroutine of the suite.
type running struct {
	src    bridge.Source
	cancel context.CancelFunc
	errc   chan error
	once   sync.Once
	closed sync.Once
}

// start runs src with h until stop; the test's cleanup stops and closes it
// if the test did not.
func start(t *testing.T, src bridge.Source, h bridge.Handler) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{src: src, cancel: cancel, errc: make(chan error, 1)}
	go func() { r.errc <- src.Run(ctx, h) }()
	t.Cleanup(func() {
		r.stop(t)
		r.close(t)
	})
	return r
}

// stop cancels Run's ctx and checks that Run returns nil within returnWithin.
func (r *running) stop(t *testing.T) {
	t.Helper()
	r.once.Do(func() {
		r.cancel()
		checkRunReturns(t, r.errc)
	})
}

// close closes the source (after stop) and checks that Close returns nil.
func (r *running) close(t *testing.T) {
	t.Helper()
	r.closed.Do(func() { closeSource(t, r.src) })
}

func checkRunReturns(t *testing.T, errc <-chan error) {
	t.Helper()
	timer := time.NewTimer(returnWithin)
	defer timer.Stop()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("Run returned %v after its ctx was cancelled, want nil", err)
		}
	case <-timer.C:
		t.Fatalf("Run has not returned %s after its ctx was cancelled", returnWithin)
	}
}

func closeSource(t *testing.T, src bridge.Source) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), returnWithin)
	defer cancel()
	if err := src.Close(ctx); err != nil {
		t.Errorf("Close: %v", err)
	}
}

// restart stops and closes r and starts the group's next source.
func restart(t *testing.T, fx SourceFixture, r *running, group string, h bridge.Handler) *running {
	t.Helper()
	r.stop(t)
	r.close(t)
	return start(t, fx.NewSource(t, group), h)
}

// marker publishes a message with the given body and waits until rec got
// it: every message published before it in the partition has been delivered
// by then if it was going to be.
func marker(t *testing.T, fx SourceFixture, rec *recorder, body string) {
	t.Helper()
	fx.Publish(t, Raw{Body: []byte(body)})
	rec.waitFor(t, body, 1)
}

// nextGetsOnlyNew replaces r by the group's next source and checks that it
// delivers a marker published now and nothing before it: every message r
// was handed was acknowledged. lost says what it means otherwise.
func nextGetsOnlyNew(t *testing.T, fx SourceFixture, r *running, group, lost string) {
	t.Helper()
	rec := newRecorder(ackNil)
	restart(t, fx, r, group, rec.handle)
	const body = "next-marker"
	marker(t, fx, rec, body)
	if got := rec.bodies(); !slices.Equal(got, []string{body}) {
		t.Fatalf("the group's next source got %s, want only the new marker: %s", rec.trace(), lost)
	}
}

// checkOnce fails unless every body in bodies was delivered exactly once.
func checkOnce(t *testing.T, rec *recorder, bodies ...string) {
	t.Helper()
	for _, b := range bodies {
		if ds := rec.of(b); len(ds) != 1 {
			t.Errorf("%q delivered %d times, want once (deliveries: %s)", b, len(ds), rec.trace())
		}
	}
}

func sourceMessageFields(t *testing.T, _ SourceHarness, fx SourceFixture) {
	before := time.Now().Add(-time.Second) // brokers store milliseconds
	fx.Publish(t,
		Raw{Header: map[string]string{"X-Suite-Id": "2088000000000042", "X-Suite-Other": "o"}, Body: []byte(`{"n":1}`)},
		Raw{Body: []byte("headerless")})
	rec := newRecorder(ackNil)
	start(t, fx.NewSource(t, "fields"), rec.handle)
	first := rec.waitFor(t, `{"n":1}`, 1)[0]
	second := rec.waitFor(t, "headerless", 1)[0]
	after := time.Now()

	for _, d := range []delivery{first, second} {
		m := d.m
		if m.Rule != fx.Rule {
			t.Errorf("%q: Rule = %q, want %q", d.body, m.Rule, fx.Rule)
		}
		if m.Subject == "" || m.Source == "" || d.sourceID == "" {
			t.Errorf("%q: Subject %q, Source %q, SourceID %q: none may be empty", d.body, m.Subject, m.Source, d.sourceID)
		}
		if d.deliveries != 1 {
			t.Errorf("%q: Deliveries = %d on the first delivery, want 1", d.body, d.deliveries)
		}
		if m.Time.Before(before) || m.Time.After(after) {
			t.Errorf("%q: Time = %v, want the store time, between %v and %v", d.body, m.Time, before, after)
		}
	}
	if first.sourceID == second.sourceID {
		t.Errorf("two messages share SourceID %q", first.sourceID)
	}
	for k, want := range map[string]string{"X-Suite-Id": "2088000000000042", "X-Suite-Other": "o"} {
		if v := first.header[k]; len(v) != 1 || v[0] != want {
			t.Errorf("header %s = %q, want [%q] (all: %v)", k, v, want, first.header)
		}
	}
	for k := range second.header {
		if len(k) > 7 && k[:7] == "X-Suite" {
			t.Errorf("headerless message has header %s", k)
		}
	}
}

func sourceOrder(t *testing.T, _ SourceHarness, fx SourceFixture) {
	const n = 40
	msgs := make([]Raw, n)
	want := make([]string, n)
	for i := range msgs {
		want[i] = fmt.Sprintf("m%03d", i)
		msgs[i] = Raw{Body: []byte(want[i])}
	}
	fx.Publish(t, msgs...)
	rec := newRecorder(ackNil)
	start(t, fx.NewSource(t, "order"), rec.handle)
	rec.waitFor(t, want[n-1], 1)
	var first []string
	seen := map[string]bool{}
	for _, d := range rec.all() {
		if d.deliveries == 1 && !seen[d.body] {
			seen[d.body] = true
			first = append(first, d.body)
		}
	}
	if !slices.Equal(first, want) {
		t.Fatalf("first deliveries in order %q, want publish order %q", first, want)
	}
}

func sourceAckIsFinal(t *testing.T, _ SourceHarness, fx SourceFixture) {
	acked := []string{"a0", "a1", "a2", "a3", "a4"}
	for _, b := range acked {
		fx.Publish(t, Raw{Body: []byte(b)})
	}
	rec := newRecorder(ackNil)
	r := start(t, fx.NewSource(t, "final"), rec.handle)
	marker(t, fx, rec, "marker-1")
	checkOnce(t, rec, acked...)

	nextGetsOnlyNew(t, fx, r, "final", "acknowledged messages came back")
}

func sourceNackRedelivers(t *testing.T, _ SourceHarness, fx SourceFixture) {
	fx.Publish(t, Raw{Header: map[string]string{"X-Suite-Id": "n1"}, Body: []byte("nacked")})
	rec := newRecorder(func(ctx context.Context, d delivery) error {
		if d.body == "nacked" && d.deliveries == 1 {
			// What the pipeline does to the message it is handed: it adds
			// its headers to the map in place.
			if d.m.Header == nil {
				d.m.Header = map[string][]string{}
			}
			d.m.Header[bridge.HeaderCell] = []string{"suite"}
			_ = d.ack(ctx, errors.New("bridgetest: sink failed"))
			return nil
		}
		return ackNil(ctx, d)
	})
	start(t, fx.NewSource(t, "nack"), rec.handle)
	ds := rec.waitFor(t, "nacked", 2)
	first, again := ds[0], ds[1]
	if again.sourceID != first.sourceID || again.deliveries != 2 {
		t.Errorf("redelivered with SourceID %q Deliveries %d, want %q and 2", again.sourceID, again.deliveries, first.sourceID)
	}
	if v := again.header["X-Suite-Id"]; len(v) != 1 || v[0] != "n1" {
		t.Errorf("redelivered header X-Suite-Id = %q, want [n1]", v)
	}
	if _, ok := again.header[bridge.HeaderCell]; ok {
		t.Errorf("redelivery carries %s, added to the first delivery's header map: the map was reused", bridge.HeaderCell)
	}
	marker(t, fx, rec, "marker")
	checkOnce(t, rec, "marker")
	if n := len(rec.of("nacked")); n != 2 {
		t.Errorf("nacked message delivered %d times, want 2 (settled with nil on the second)", n)
	}
}

func sourceHoldDelaysRedelivery(t *testing.T, _ SourceHarness, fx SourceFixture) {
	fx.Publish(t, Raw{Body: []byte("held")})
	rec := newRecorder(func(ctx context.Context, d delivery) error {
		if d.body == "held" && d.deliveries == 1 {
			_ = d.ack(ctx, bridge.Hold(holdDelay))
			return nil
		}
		return ackNil(ctx, d)
	})
	start(t, fx.NewSource(t, "hold"), rec.handle)
	ds := rec.waitFor(t, "held", 2)
	if ds[1].deliveries != 2 || ds[1].sourceID != ds[0].sourceID {
		t.Errorf("held message came back with Deliveries %d SourceID %q, want 2 and %q", ds[1].deliveries, ds[1].sourceID, ds[0].sourceID)
	}
	// A quarter of slack for brokers that time delays on their own clock.
	if gap := ds[1].at.Sub(ds[0].at); gap < holdDelay*3/4 {
		t.Errorf("held message came back after %s, before its hold of %s", gap, holdDelay)
	}
}

func sourceInProgressIsNotFinal(t *testing.T, h SourceHarness, fx SourceFixture) {
	busy := max(h.AckDeadline*3/2, 300*time.Millisecond)
	fx.Publish(t, Raw{Body: []byte("slow")})
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	finalAt := make(chan time.Time, 1)
	rec := newRecorder(func(ctx context.Context, d delivery) error {
		if d.body != "slow" || d.deliveries > 1 {
			return ackNil(ctx, d)
		}
		wg.Go(func() {
			tick := time.NewTicker(busy / 10)
			defer tick.Stop()
			for end := time.Now().Add(busy); time.Now().Before(end); <-tick.C {
				_ = d.ack(context.Background(), bridge.ErrInProgress)
			}
			finalAt <- time.Now()
			_ = d.ack(context.Background(), nil)
		})
		return nil
	})
	start(t, fx.NewSource(t, "progress"), rec.handle)
	rec.waitFor(t, "slow", 1)
	var final time.Time
	select {
	case final = <-finalAt:
	case <-time.After(deliverWithin):
		t.Fatal("the in-progress goroutine did not finish")
	}
	marker(t, fx, rec, "marker")
	ds := rec.of("slow")
	if len(ds) != 1 {
		t.Fatalf("delivered %d times (at %v; final ack at %v), want once: ErrInProgress did not hold the message, or the final nil did not settle it",
			len(ds), deliveryTimes(ds), final)
	}
}

func deliveryTimes(ds []delivery) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.at.Format("15:04:05.000")
	}
	return out
}

func sourceUnsettledComesBack(t *testing.T, _ SourceHarness, fx SourceFixture) {
	fx.Publish(t, Raw{Header: map[string]string{"X-Suite-Id": "u1"}, Body: []byte("unsettled")})
	rec := newRecorder(nil)
	r := start(t, fx.NewSource(t, "unsettled"), rec.handle)
	first := rec.waitFor(t, "unsettled", 1)[0]

	rec2 := newRecorder(ackNil)
	restart(t, fx, r, "unsettled", rec2.handle)
	again := rec2.waitFor(t, "unsettled", 1)[0]
	if again.sourceID != first.sourceID {
		t.Errorf("came back with SourceID %q, want %q", again.sourceID, first.sourceID)
	}
	if v := again.header["X-Suite-Id"]; len(v) != 1 || v[0] != "u1" {
		t.Errorf("came back with header X-Suite-Id = %q, want [u1]", v)
	}
}

func sourceAcksAfterRunCount(t *testing.T, _ SourceHarness, fx SourceFixture) {
	held := []string{"d0", "d1", "d2"}
	for _, b := range held {
		fx.Publish(t, Raw{Body: []byte(b)})
	}
	rec := newRecorder(nil)
	r := start(t, fx.NewSource(t, "drain"), rec.handle)
	for _, b := range held {
		rec.waitFor(t, b, 1)
	}
	r.stop(t)
	// Run returned: the pipeline drains, settling what it still owns.
	for _, d := range rec.all() {
		_ = d.ack(context.Background(), nil)
	}
	nextGetsOnlyNew(t, fx, r, "drain", "acks after Run returned were lost")
}

func sourceBlockedHandlerCancel(t *testing.T, _ SourceHarness, fx SourceFixture) {
	fx.Publish(t, Raw{Body: []byte("blocked")})
	entered := make(chan struct{}, 1)
	rec := newRecorder(func(ctx context.Context, d delivery) error {
		select {
		case entered <- struct{}{}:
		default:
		}
		// Back-pressure: the pipeline is at its in-flight limit until ctx
		// ends; then it negatively acknowledges and returns ctx's error.
		<-ctx.Done()
		_ = d.ack(context.WithoutCancel(ctx), ctx.Err())
		return ctx.Err()
	})
	r := start(t, fx.NewSource(t, "blocked"), rec.handle)
	first := rec.waitFor(t, "blocked", 1)[0]
	<-entered

	rec2 := newRecorder(ackNil)
	restart(t, fx, r, "blocked", rec2.handle) // stop checks Run returns nil
	again := rec2.waitFor(t, "blocked", 1)[0]
	if again.sourceID != first.sourceID {
		t.Errorf("came back with SourceID %q, want %q", again.sourceID, first.sourceID)
	}
}

func sourceCancelledBeforeRun(t *testing.T, _ SourceHarness, fx SourceFixture) {
	src := fx.NewSource(t, "cancelled")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rec := newRecorder(ackNil)
	errc := make(chan error, 1)
	go func() { errc <- src.Run(ctx, rec.handle) }()
	checkRunReturns(t, errc)
	closeSource(t, src)
}

func sourceAckBehindUnsettled(t *testing.T, h SourceHarness, fx SourceFixture) {
	fx.Publish(t, Raw{Body: []byte("unsettled")}, Raw{Body: []byte("acked")})
	rec := newRecorder(func(ctx context.Context, d delivery) error {
		if d.body == "acked" {
			return ackNil(ctx, d)
		}
		return nil
	})
	r := start(t, fx.NewSource(t, "behind"), rec.handle)
	acked := rec.waitFor(t, "acked", 1)[0]
	unsettled := rec.waitFor(t, "unsettled", 1)[0]

	rec2 := newRecorder(ackNil)
	restart(t, fx, r, "behind", rec2.handle)
	marker(t, fx, rec2, "marker")
	if !h.OffsetCommit {
		if n := len(rec2.of("acked")); n != 0 {
			t.Fatalf("the group's next source got the acknowledged message again: %s", rec2.trace())
		}
		return
	}
	// The committed offset stops at the unsettled message: the next source
	// reads from there, the acknowledged message again among the rest.
	var ids []string
	for _, d := range rec2.all() {
		ids = append(ids, d.body+"="+d.sourceID)
	}
	want := []string{"unsettled=" + unsettled.sourceID, "acked=" + acked.sourceID}
	if len(ids) < 3 || !slices.Equal(ids[:2], want) {
		t.Fatalf("the group's next source got %q, want %q first (same SourceIDs, so deduplication drops the repeat)", ids, want)
	}
}
