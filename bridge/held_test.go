package bridge

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// subjectsOf returns, for messages with X-User-Id key, the subjects and
// bodies in confirm order.
func subjectsOf(got []published, key string) []string {
	var out []string
	for _, g := range got {
		if v := g.Header["X-User-Id"]; len(v) == 1 && v[0] == key {
			out = append(out, g.Subject+" "+g.Body)
		}
	}
	return out
}

func handle(t *testing.T, e *env, rule, key, body string) *ackRec {
	t.Helper()
	m, a := msg(rule, key, body)
	if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
		t.Fatal(err)
	}
	return a
}

// A switch: messages of a key queued when its shard gets blocked are parked
// in order behind each other, later arrivals of the key park behind them,
// other keys keep flowing, nothing is acked or published while blocked, and
// the new table releases them in order to the new owner.
func TestHeldParkedAndReleasedInOrder(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{})
	e := newEnv(t, Config{AckWait: 40 * time.Millisecond, HeldRecheck: time.Hour}, rulesDoc(1, "", 0), s, nil)
	a := keyFor(42, 1)
	b := keyFor(10, 2)
	a1 := handle(t, e, "t", a, "a1") // publishing (sink blocked)
	a2 := handle(t, e, "t", a, "a2") // queued behind a1
	a3 := handle(t, e, "t", a, "a3")
	e.hold.Store(table(t, rulesDoc(2, `"40-44"`, 0))) // block shards 40-44
	close(s.block)
	if err := a1.result(t); err != nil { // published before the block: confirmed, acked
		t.Fatal(err)
	}
	eventually(t, "a2, a3 parked", func() bool { return e.p.Status().Held == 2 })
	a4 := handle(t, e, "t", a, "a4") // arrives while held: parked behind a3
	if h := e.p.Status().Held; h != 3 {
		t.Fatalf("held %d, want 3", h)
	}
	var bs []*ackRec
	for i := range 5 {
		bs = append(bs, handle(t, e, "t", b, fmt.Sprintf("b%d", i)))
	}
	for _, x := range bs {
		if err := x.result(t); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "heartbeats for parked messages", func() bool { return a2.beats() > 0 && a4.beats() > 0 })
	for _, x := range []*ackRec{a2, a3, a4} {
		if x.isSettled() {
			t.Fatal("a held message was settled")
		}
	}
	if got := subjectsOf(s.published(), a); len(got) != 1 {
		t.Fatalf("published while held: %v", got)
	}
	st := e.p.Status()
	var rs RuleStatus
	for _, r := range st.Rules {
		if r.Rule == "t" {
			rs = r
		}
	}
	if rs.Held != 3 || len(rs.HeldShards) != 1 || rs.HeldShards[0].Shard != 42 || rs.HeldShards[0].Held != 3 ||
		len(rs.HeldRanges) != 1 || rs.HeldRanges[0].Shards != "42" {
		t.Fatalf("status %+v", rs)
	}
	eventually(t, "held gauge", func() bool { return value(e.p.met.HeldMessages.WithLabelValues("t")) == 3 })
	eventually(t, "held gauge of the blocked range 40-44", func() bool {
		return value(e.p.met.HeldRange.WithLabelValues("t", "40-44")) == 3 &&
			value(e.p.met.HeldRangeOldest.WithLabelValues("t", "40-44")) > 0
	})
	if n := counter(t, e, "t", OutcomeHeld); n != 3 {
		t.Fatalf("held outcome %v", n)
	}

	// Step 3 of a switch: shards 40-49 now belong to rz01, unblocked. The
	// sweeper notices the version change by itself (HeldRecheck is 1h).
	e.hold.Store(table(t, rulesDoc(3, "", 40)))
	for _, x := range []*ackRec{a2, a3, a4} {
		if err := x.result(t); err != nil {
			t.Fatal(err)
		}
	}
	a5 := handle(t, e, "t", a, "a5")
	if err := a5.result(t); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the range gauge gone once 40-44 is no longer blocked", func() bool {
		return seriesOf(t, e, MetricHeldRange) == 0
	})
	want := []string{"cell.rz00.t a1", "cell.rz01.t a2", "cell.rz01.t a3", "cell.rz01.t a4", "cell.rz01.t a5"}
	if got := subjectsOf(s.published(), a); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("order across the switch:\n got %v\nwant %v", got, want)
	}
	for _, g := range s.published() {
		if g.Body == "a2" && g.Header[HeaderRulesVersion][0] != "3" {
			t.Fatalf("released message stamped with version %v", g.Header[HeaderRulesVersion])
		}
	}
	if st := e.p.Status(); st.Held != 0 {
		t.Fatalf("held %d after release", st.Held)
	}
}

// Beyond MaxHeld a held message is negatively acknowledged with HoldDelay;
// later messages of the same key are refused too until the key is released.
// Those Holds let later messages of the key overtake (HoldError.Overtake):
// the documented exception to per-key order, which an ordered source must
// not turn into an end of its epoch.
func TestHeldOverflowFallsBackToHold(t *testing.T) {
	e := newEnv(t, Config{MaxHeld: 2, HoldDelay: 3 * time.Second, HeldRecheck: time.Hour}, rulesDoc(1, `"40-44"`, 0), nil, nil)
	a := keyFor(41, 1)
	a1 := handle(t, e, "t", a, "a1")
	a2 := handle(t, e, "t", a, "a2")
	a3 := handle(t, e, "t", a, "a3")
	if r := a3.result(t); !MayOvertake(r) {
		t.Fatalf("a3 held back with %v, want a Hold that later messages may overtake", r)
	} else if d, ok := HoldDelay(r); !ok || d != 3*time.Second {
		t.Fatalf("a3 not held back with the hold delay")
	}
	if a1.isSettled() || a2.isSettled() {
		t.Fatal("parked messages settled")
	}
	c := keyFor(43, 2) // another key: the parked set is full
	c1 := handle(t, e, "t", c, "c1")
	if _, ok := HoldDelay(c1.result(t)); !ok {
		t.Fatal("c1 not held back")
	}
	if v := value(e.p.met.HeldOverflow.WithLabelValues("t")); v != 2 {
		t.Fatalf("cellbridge_held_overflow_total %v, want 2 (a3 and c1)", v)
	}
	e.hold.Store(table(t, rulesDoc(2, "", 0)))
	e.p.RulesReloaded(2, 1, nil, time.Now())
	for _, x := range []*ackRec{a1, a2} {
		if err := x.result(t); err != nil {
			t.Fatal(err)
		}
	}
	if got := subjectsOf(e.sink.published(), a); strings.Join(got, ",") != "cell.rz00.t a1,cell.rz00.t a2" {
		t.Fatalf("got %v", got)
	}
	// The key is no longer parked: its redelivered message flows again.
	a3b := handle(t, e, "t", a, "a3")
	if err := a3b.result(t); err != nil {
		t.Fatal(err)
	}
}

// A refused reload is counted, shown until a reload succeeds, and changes
// nothing.
func TestReloadRefusedCounted(t *testing.T) {
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), nil, nil)
	e.p.RulesReloaded(1, 2, errors.New("lower version"), time.Now())
	if v := value(e.p.met.RulesReloadFails); v != 1 {
		t.Fatalf("reload failures %v", v)
	}
	if v := value(e.p.met.RulesVersion); v != 1 {
		t.Fatalf("rules version %v", v)
	}
	// The refusal stays visible until a reload succeeds.
	if v := value(e.p.met.RulesFailing); v != 1 {
		t.Fatalf("rules reload failing %v after a refusal, want 1", v)
	}
	e.p.RulesReloaded(1, 1, nil, time.Now()) // the directory holds the running rules again
	if v, ver := value(e.p.met.RulesFailing), value(e.p.met.RulesVersion); v != 0 || ver != 1 {
		t.Fatalf("after the refused rules were reverted: failing %v, version %v; want 0 and 1", v, ver)
	}
	e.p.RulesReloaded(1, 2, errors.New("lower version"), time.Now())
	e.p.RulesReloaded(3, 1, nil, time.Now())
	if v := value(e.p.met.RulesFailing); v != 0 {
		t.Fatalf("rules reload failing %v after a good reload, want 0", v)
	}
}

// A target broker without a sink dead-letters with no_route; a rule whose
// DLQ broker has no sink either holds the message (never acks it).
func TestNoRouteAndNoDLQ(t *testing.T) {
	doc := strings.Replace(rulesDoc(1, "", 0), `target: {broker: nats, subject: "cell.{cell}.t"}`, `target: {broker: "nats-{cell}", subject: "cell.{cell}.t"}`, 1)
	e := newEnv(t, Config{HoldDelay: time.Second}, doc, nil, nil)
	a := handle(t, e, "t", keyFor(10, 1), "x")
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	got := e.sink.published()
	if len(got) != 1 || got[0].Subject != "dlq.t" || !strings.HasPrefix(got[0].Header[HeaderError][0], "no_route: ") {
		t.Fatalf("published %+v", got)
	}
	doc = strings.Replace(doc, `dlq: {broker: nats, subject: dlq.t}`, `dlq: {broker: nowhere, subject: dlq.t}`, 1)
	e2 := newEnv(t, Config{HoldDelay: time.Second}, doc, nil, nil)
	b := handle(t, e2, "t", "", "y") // missing key → DLQ, whose broker has no sink
	if d, ok := HoldDelay(b.result(t)); !ok || d != time.Second || !MayOvertake(b.result(t)) {
		t.Fatal("message without a usable DLQ was not held back (with a Hold that later messages may overtake: it goes to no cell)")
	}
	if n := len(e2.sink.published()); n != 0 {
		t.Fatalf("published %d", n)
	}
}

func TestHeldRanges(t *testing.T) {
	got := heldRanges([]ShardHeld{{40, 2, 1}, {41, 1, 3}, {42, 1, 2}, {50, 4, 5}})
	want := []RangeHeld{{"40-42", 40, 42, 4, 3}, {"50", 50, 50, 4, 5}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("%v, want %v", got, want)
	}
}

// Keys that share a lane do not wait for each other: with one lane, a key
// whose publish hangs does not delay another key; its own later messages
// wait behind it.
func TestKeysSharingALaneDoNotBlockEachOther(t *testing.T) {
	s := newTestSink()
	a, b := keyFor(10, 1), keyFor(20, 2)
	s.block, s.blockOf = make(chan struct{}), a
	e := newEnv(t, Config{Lanes: 1}, rulesDoc(1, "", 0), s, nil)
	a1 := handle(t, e, "t", a, "a1")
	a2 := handle(t, e, "t", a, "a2")
	var bs []*ackRec
	for i := range 5 {
		bs = append(bs, handle(t, e, "t", b, fmt.Sprintf("b%d", i)))
	}
	for _, x := range bs {
		if err := x.result(t); err != nil {
			t.Fatal(err)
		}
	}
	if a1.isSettled() || a2.isSettled() {
		t.Fatal("a settled while its publish hangs")
	}
	if got := subjectsOf(s.published(), a); len(got) != 0 {
		t.Fatalf("a2 published before a1 confirmed: %v", got)
	}
	close(s.block)
	for _, x := range []*ackRec{a1, a2} {
		if err := x.result(t); err != nil {
			t.Fatal(err)
		}
	}
	if got := subjectsOf(s.published(), a); strings.Join(got, ",") != "cell.rz00.t a1,cell.rz00.t a2" {
		t.Fatalf("got %v", got)
	}
}

// seriesOf counts the series of a metric in the pipeline's registry.
func seriesOf(t testing.TB, e *env, name string) int {
	t.Helper()
	mfs, err := e.p.met.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name {
			return len(mf.GetMetric())
		}
	}
	return 0
}

// A switch longer than StallTimeout: the messages released from the park
// are not "stalled" at their release. Their stall age counts from the
// release (time in the park is the operator's, not the bridge's), so
// /readyz does not fail, and an ordered source does not hand over, because
// a switch ended.
func TestHeldReleasedStallAgeFromRelease(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{}) // released messages wait in the sink
	const stall = 300 * time.Millisecond
	e := newEnv(t, Config{StallTimeout: stall, HeldRecheck: time.Hour}, rulesDoc(1, "", 0), s, nil)
	a := keyFor(42, 1)
	e.hold.Store(table(t, rulesDoc(2, `"40-44"`, 0))) // shard 42 blocked before anything arrives
	a1 := handle(t, e, "t", a, "a1")
	a2 := handle(t, e, "t", a, "a2")
	if h := e.p.Status().Held; h != 2 {
		t.Fatalf("held %d, want 2", h)
	}
	time.Sleep(3 * stall) // parked for three stall timeouts
	if age := e.p.Health().StallAge("t"); age != 0 {
		t.Fatalf("stall age %v while every message is parked, want 0", age)
	}
	released := time.Now()
	e.hold.Store(table(t, rulesDoc(3, "", 40))) // unblocked: released, then held up in the sink
	eventually(t, "the stall age sampled after the release", func() bool { return e.p.Health().StallAge("t") > 0 })
	if age, since := e.p.Health().StallAge("t"), time.Since(released); age > since {
		t.Fatalf("stall age %v, %v after the release: counted from before it (the messages were parked %v)", age, since, 3*stall)
	}
	close(s.block)
	for _, x := range []*ackRec{a1, a2} {
		if err := x.result(t); err != nil {
			t.Fatal(err)
		}
	}
}

// The rule's oldest unacknowledged message is found anywhere in its list:
// tracking order is arrival order only per delivering goroutine, so the
// head need not be the oldest (several RocketMQ queues, partitions).
func TestSnapshotOldestAnywhereInTheList(t *testing.T) {
	rs := &ruleState{name: "r"}
	sec := int64(time.Second)
	for _, arrived := range []int64{5 * sec, 2 * sec, 7 * sec} {
		tk := &task{arrived: arrived}
		tk.m = &Message{}
		rs.track(tk)
	}
	n, oldest := rs.snapshot(10 * sec)
	if n != 3 || oldest != 8 {
		t.Fatalf("snapshot: %d messages, oldest %vs; want 3 and 8s (the second tracked)", n, oldest)
	}
	// A source store time earlier than the arrival counts from the store.
	tk := &task{arrived: 9 * sec}
	tk.m = &Message{Time: time.Unix(0, 1*sec)}
	rs.track(tk)
	if _, oldest := rs.snapshot(10 * sec); oldest != 9 {
		t.Fatalf("oldest %vs, want 9s (a store time)", oldest)
	}
}
