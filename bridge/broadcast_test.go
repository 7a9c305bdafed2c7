package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

// bcastDoc is a rule set with cells ca, cb (city x), cc, cd (city y) and a
// broadcast rule b keyed by X-User-Id to cells (a target.cells value),
// excluding the origin; down lists cells marked down.
func bcastDoc(version int, cells string, down ...string) string {
	state := func(c string) string {
		if slices.Contains(down, c) {
			return "down"
		}
		return "active"
	}
	return fmt.Sprintf(`kind: CellMap
version: %d
shards: 4
cells:
  - {name: ca, city: x, state: %s, failover: cb, shards: ["0"]}
  - {name: cb, city: x, state: %s, failover: cc, shards: ["1"]}
  - {name: cc, city: y, state: %s, failover: cb, shards: ["2"]}
  - {name: cd, city: y, state: %s, failover: cb, shards: ["3"]}
---
kind: TopicRule
name: b
source: {broker: nats, stream: B, subject: "b.>"}
key: {header: X-User-Id}
target: {broker: nats, subject: "cell.{cell}.b", cells: %s, excludeOrigin: true}
dlq: {broker: nats, subject: dlq.b}
`, version, state("ca"), state("cb"), state("cc"), state("cd"), cells)
}

// byCell groups published copies by subject: for each cell's subject, the
// bodies in confirm order.
func byCell(got []published) map[string][]string {
	out := map[string][]string{}
	for _, g := range got {
		out[g.Subject] = append(out[g.Subject], g.Body)
	}
	return out
}

func handleMsg(t *testing.T, e *env, m *Message, a *ackRec) {
	t.Helper()
	if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
		t.Fatal(err)
	}
}

// One message, one copy per selected cell, each with the cell's headers,
// the event's Cell-Msg-Id and a per-cell idempotency key; the message is
// acked once, after the last copy; a redelivery publishes nothing.
func TestBroadcastFanOut(t *testing.T) {
	e := newEnv(t, Config{}, bcastDoc(3, "all"), nil, nil)
	m, a := msg("b", "k1", "v1")
	handleMsg(t, e, m, a)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	got := e.sink.published()
	if len(got) != 4 {
		t.Fatalf("%d copies, want 4: %+v", len(got), got)
	}
	seen := map[string]bool{}
	for _, g := range got {
		cell := strings.Split(g.Subject, ".")[1]
		seen[cell] = true
		want := map[string]string{HeaderMsgID: m.SourceID, HeaderCell: cell, HeaderShard: "-1", HeaderRulesVersion: "3",
			HeaderSource: "test/b", HeaderHops: "1", "X-Trace": "abc"}
		for k, v := range want {
			if h := g.Header[k]; len(h) != 1 || h[0] != v {
				t.Errorf("copy to %s: %s = %q, want %q", cell, k, h, v)
			}
		}
		if g.MsgID != m.SourceID+"@"+cell || g.Body != "v1" {
			t.Errorf("copy to %s: MsgID %q body %q", cell, g.MsgID, g.Body)
		}
	}
	if len(seen) != 4 {
		t.Fatalf("cells %v", seen)
	}
	if _, ok := m.Header[HeaderCell]; ok {
		t.Error("the source message's header map was written")
	}
	for _, c := range []string{"ca", "cb", "cc", "cd"} {
		if v := value(e.p.met.Forwarded.WithLabelValues("b", c)); v != 1 {
			t.Errorf("forwarded{cell=%s} = %v", c, v)
		}
	}
	if v := counter(t, e, "b", OutcomeForwarded); v != 1 {
		t.Errorf("messages forwarded %v, want 1", v)
	}

	m2, a2 := msg("b", "k1", "v1")
	m2.SourceID = m.SourceID // a redelivery
	handleMsg(t, e, m2, a2)
	if err := a2.result(t); err != nil {
		t.Fatal(err)
	}
	if n := len(e.sink.published()); n != 4 {
		t.Fatalf("a redelivery published again: %d copies", n)
	}
	if v := counter(t, e, "b", OutcomeDuplicate); v != 1 {
		t.Errorf("duplicates %v, want 1", v)
	}
	if st := e.p.Status(); st.InFlight != 0 || st.Lagging != 0 {
		t.Errorf("left over: %+v", st)
	}
}

// Down cells and the origin get no copy and are counted; /status shows
// what a down cell missed; a message every cell skips is acked as skipped.
func TestBroadcastSkips(t *testing.T) {
	e := newEnv(t, Config{}, bcastDoc(1, "all", "cd"), nil, nil)
	var first *Message
	for i := range 3 {
		m, a := msg("b", "k"+strconv.Itoa(i), "v")
		m.Header[router.OriginHeader] = []string{"ca"}
		m.Time = time.Unix(1000+int64(i), 0)
		if first == nil {
			first = m
		}
		handleMsg(t, e, m, a)
		if err := a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	cells := byCell(e.sink.published())
	if len(cells) != 2 || len(cells["cell.cb.b"]) != 3 || len(cells["cell.cc.b"]) != 3 {
		t.Fatalf("copies %v, want cb and cc only", cells)
	}
	for cell, reason := range map[string]string{"cd": router.SkipDown, "ca": router.SkipOrigin} {
		if v := value(e.p.met.BroadcastSkipped.WithLabelValues("b", cell, reason)); v != 3 {
			t.Errorf("skipped{%s,%s} = %v", cell, reason, v)
		}
	}
	var rs RuleStatus
	for _, r := range e.p.Status().Rules {
		if r.Rule == "b" {
			rs = r
		}
	}
	var cd CellCopies
	for _, c := range rs.Broadcast {
		if c.Cell == "cd" {
			cd = c
		}
	}
	want := MissedCopies{Count: 3, First: time.Unix(1000, 0), FirstSourceID: first.SourceID, Last: time.Unix(1002, 0), Ongoing: true}
	want.LastSourceID = cd.Missed.LastSourceID
	if cd.Missed != want || cd.Missed.LastSourceID == first.SourceID {
		t.Fatalf("status of cd: %+v, want missed %+v", cd, want)
	}

	// The cell is back: the streak of misses ends, its range stays visible.
	e.hold.Store(table(t, bcastDoc(2, "all")))
	m, a := msg("b", "k9", "v")
	handleMsg(t, e, m, a)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	for _, r := range e.p.Status().Rules {
		for _, c := range r.Broadcast {
			if c.Cell == "cd" && (c.Missed.Ongoing || c.Missed.Count != 3) {
				t.Fatalf("after the cell came back: %+v", c)
			}
		}
	}

	e.hold.Store(table(t, bcastDoc(3, "[ca, cd]", "cd")))
	m, a = msg("b", "k1", "v")
	m.Header[router.OriginHeader] = []string{"ca"}
	handleMsg(t, e, m, a)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if v := counter(t, e, "b", OutcomeSkipped); v != 1 {
		t.Fatalf("skipped messages %v, want 1", v)
	}
}

// cellGate is a sink whose publishes to one subject fail while failing is
// set, and whose other publishes confirm at once; it records the confirm
// order per subject.
type cellGate struct {
	*testSink
	subject string
	failing atomic.Bool
	tries   atomic.Int64
}

func newCellGate(subject string) *cellGate {
	g := &cellGate{testSink: newTestSink(), subject: subject}
	g.fail = func(o *Outgoing, attempt int) error {
		if o.Target.Subject == g.subject && g.failing.Load() {
			g.tries.Add(1)
			return errors.New("stream unavailable")
		}
		return nil
	}
	return g
}

// A failing cell does not hold up the others: with 8 in-flight slots, 200
// messages of 10 keys reach the three healthy cells while the fourth fails;
// its copies lag (outside the budget) and follow in per-key order once it
// recovers; the messages are acked only then.
func TestBroadcastFailingCellIndependent(t *testing.T) {
	g := newCellGate("cell.cd.b")
	g.failing.Store(true)
	e := newEnv(t, Config{MaxInFlight: 8, Lanes: 4, Retry: RetryConfig{Initial: time.Millisecond, Max: 5 * time.Millisecond}},
		bcastDoc(1, "all"), g.testSink, nil)
	const keys, per = 10, 20
	var acks []*ackRec
	for i := range keys * per {
		m, a := msg("b", "k"+strconv.Itoa(i%keys), strconv.Itoa(i/keys))
		handleMsg(t, e, m, a)
		acks = append(acks, a)
	}
	eventually(t, "every copy to the healthy cells", func() bool {
		c := byCell(g.published())
		return len(c["cell.ca.b"]) == keys*per && len(c["cell.cb.b"]) == keys*per && len(c["cell.cc.b"]) == keys*per
	})
	st := e.p.Status()
	if st.Lagging != keys*per || st.InFlight != 0 {
		t.Fatalf("lagging %d (want every copy to cd), in flight %d: %+v", st.Lagging, st.InFlight, st)
	}
	for _, a := range acks {
		if a.isSettled() {
			t.Fatal("a message was settled before its copy to the failing cell")
		}
	}
	eventually(t, "lagging gauge", func() bool { return value(e.p.met.BroadcastLagging.WithLabelValues("b", "cd")) == keys*per })
	if ok, why := e.p.Health().Ready(); ok || !strings.Contains(why, "subject cell.cd.b keeps failing") {
		t.Fatalf("ready %v: %s", ok, why)
	}
	g.failing.Store(false)
	for _, a := range acks {
		if err := a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	checkPerKeyOrder(t, g.published(), 4, keys, per)
	if st := e.p.Status(); st.Lagging != 0 || st.InFlight != 0 {
		t.Fatalf("left over: %+v", st)
	}
	if g.tries.Load() == 0 {
		t.Fatal("the failing cell was never tried")
	}
}

// checkPerKeyOrder checks that every cell holds every message exactly once
// and each key's messages in order (bodies count up per key).
func checkPerKeyOrder(t *testing.T, got []published, cells, keys, per int) {
	t.Helper()
	type ck struct{ subject, key string }
	next := map[ck]int{}
	seen := map[string]bool{}
	for _, g := range got {
		if seen[g.MsgID] {
			t.Fatalf("%s published twice", g.MsgID)
		}
		seen[g.MsgID] = true
		k := ck{g.Subject, g.Header["X-User-Id"][0]}
		i, _ := strconv.Atoi(g.Body)
		if i != next[k] {
			t.Fatalf("cell %s key %s: message %d arrived, want %d", k.subject, k.key, i, next[k])
		}
		next[k]++
	}
	if len(got) != cells*keys*per {
		t.Fatalf("%d copies, want %d", len(got), cells*keys*per)
	}
}

// Beyond maxLagging a failing cell's copies keep their in-flight slots:
// once those are used up, intake waits (back-pressure) instead of losing or
// reordering anything, and resumes when the cell recovers.
func TestBroadcastLaggingBound(t *testing.T) {
	g := newCellGate("cell.cd.b")
	g.failing.Store(true)
	e := newEnv(t, Config{MaxInFlight: 8, MaxLagging: 6, Lanes: 4, Retry: RetryConfig{Initial: time.Millisecond, Max: 5 * time.Millisecond}},
		bcastDoc(1, "all"), g.testSink, nil)
	const n = 40
	done := make(chan struct{})
	var handled atomic.Int64
	var acks []*ackRec
	var mu sync.Mutex
	go func() {
		defer close(done)
		for i := range n {
			m, a := msg("b", "k"+strconv.Itoa(i%3), strconv.Itoa(i/3))
			mu.Lock()
			acks = append(acks, a)
			mu.Unlock()
			if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
				t.Error(err)
			}
			handled.Add(1)
		}
	}()
	// 6 copies to cd lag; the next ones keep their in-flight slots until
	// none is free (a message waits for its first slot and takes the
	// others at once), and intake waits.
	// cd fails every copy, so its Pending counts the messages accepted.
	cdPending := func() (pending int64, full bool) {
		for _, r := range e.p.Status().Rules {
			for _, c := range r.Broadcast {
				if c.Cell == "cd" {
					// cd's copies settle only once it recovers: once 8 of
					// them hold slots, none is free.
					return c.Pending, c.Lagging == 6 && c.Pending-c.Lagging >= 8
				}
			}
		}
		return 0, false
	}
	// Full, and every accepted message's Handle has returned (the
	// goroutine counts a message only after Handle returns).
	eventually(t, "intake waiting with the lagging set and the budget full", func() bool {
		p, full := cdPending()
		return full && handled.Load() == p
	})
	h, _ := cdPending()
	time.Sleep(50 * time.Millisecond) // a wait that must not end: intake is stopped
	if p, _ := cdPending(); handled.Load() != h || p != h || h >= n {
		t.Fatalf("intake went on (%d accepted, then %d handled, %d accepted) beyond the bound", h, handled.Load(), p)
	}
	g.failing.Store(false)
	<-done
	mu.Lock()
	defer mu.Unlock()
	for _, a := range acks {
		if err := a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	next := map[string]int{}
	for _, p := range g.published() {
		if p.Subject != "cell.cd.b" {
			continue
		}
		k := p.Header["X-User-Id"][0]
		if i, _ := strconv.Atoi(p.Body); i != next[k] {
			t.Fatalf("cd key %s: %d after %d", k, i, next[k])
		}
		next[k]++
	}
}

// Random delays and failures on every cell: each cell holds every message
// exactly once and per key in order, with the worker pool and inline.
func TestBroadcastOrderPerCell(t *testing.T) {
	for _, workers := range []int{0, 32} {
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			s := newTestSink()
			s.delay = 200 * time.Microsecond
			s.fail = func(o *Outgoing, attempt int) error {
				if attempt == 1 && rand.IntN(8) == 0 {
					return errors.New("injected")
				}
				return nil
			}
			var store dedupe.Store = dedupe.NewMemory(dedupe.MemoryConfig{})
			if workers > 0 {
				store = wrapStore{store}
			}
			e := newEnv(t, Config{MaxInFlight: 32, MaxLagging: 16, Workers: workers, Lanes: 8,
				Retry: RetryConfig{Initial: time.Millisecond, Max: 3 * time.Millisecond}}, bcastDoc(1, "all"), s, store)
			const keys, per = 12, 25
			var acks sync.Map
			var wg sync.WaitGroup
			for pr := range 3 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range keys / 3 * per {
						k := pr*keys/3 + i%(keys/3)
						m, a := msg("b", "k"+strconv.Itoa(k), strconv.Itoa(i/(keys/3)))
						acks.Store(m.SourceID, a)
						if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
							t.Error(err)
						}
					}
				}()
			}
			wg.Wait()
			acks.Range(func(_, v any) bool {
				if err := v.(*ackRec).result(t); err != nil {
					t.Errorf("ack %v", err)
				}
				return true
			})
			checkPerKeyOrder(t, s.published(), 4, keys, per)
		})
	}
}

// Rules change under waiting copies: a cell marked down or removed from the
// selection stops getting them (counted), a new cell gets the messages
// accepted after the change, and every copy carries the version it was
// published under.
func TestBroadcastRulesChange(t *testing.T) {
	g := newCellGate("cell.cd.b")
	g.failing.Store(true)
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, bcastDoc(1, "[ca, cb, cd]"), g.testSink, nil)
	var acks []*ackRec
	for i := range 3 {
		m, a := msg("b", "k", strconv.Itoa(i))
		handleMsg(t, e, m, a)
		acks = append(acks, a)
	}
	eventually(t, "copies to ca and cb", func() bool {
		c := byCell(g.published())
		return len(c["cell.ca.b"]) == 3 && len(c["cell.cb.b"]) == 3
	})
	// cd is marked down while its copies retry: they stop, counted as
	// missed, and the messages are acked.
	e.hold.Store(table(t, bcastDoc(2, "[ca, cb, cd]", "cd")))
	for _, a := range acks {
		if err := a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	if v := value(e.p.met.BroadcastSkipped.WithLabelValues("b", "cd", router.SkipDown)); v != 3 {
		t.Fatalf("missed copies of cd %v, want 3", v)
	}
	// cc joins, cb leaves; cb's waiting copy is removed.
	g.subject = "cell.cb.b"
	g.failing.Store(true)
	m, a := msg("b", "k", "3")
	handleMsg(t, e, m, a)
	eventually(t, "cb failing", func() bool { return g.tries.Load() > 3 })
	e.hold.Store(table(t, bcastDoc(3, "[ca, cc]")))
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if v := value(e.p.met.BroadcastSkipped.WithLabelValues("b", "cb", SkipRemoved)); v != 1 {
		t.Fatalf("removed copies of cb %v, want 1", v)
	}
	m, a = msg("b", "k", "4")
	handleMsg(t, e, m, a)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	c := byCell(g.published())
	if strings.Join(c["cell.ca.b"], ",") != "0,1,2,3,4" || strings.Join(c["cell.cb.b"], ",") != "0,1,2" ||
		strings.Join(c["cell.cc.b"], ",") != "4" || len(c["cell.cd.b"]) != 0 {
		t.Fatalf("copies %v", c)
	}
	for _, p := range g.published() {
		if p.Body == "4" && p.Header[HeaderRulesVersion][0] != "3" {
			t.Fatalf("copy stamped %v", p.Header[HeaderRulesVersion])
		}
	}
}

// Drain: copies still queued or retrying are not published; the message is
// nacked once its last copy settled, never acked; the copies confirmed
// before are duplicates on the redelivery.
func TestBroadcastDrain(t *testing.T) {
	g := newCellGate("cell.cd.b")
	g.failing.Store(true)
	store := dedupe.NewMemory(dedupe.MemoryConfig{})
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, bcastDoc(1, "all"), g.testSink, store)
	m, a := msg("b", "k", "0")
	handleMsg(t, e, m, a)
	eventually(t, "three copies confirmed", func() bool { return len(g.published()) == 3 })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.result(t); !errors.Is(err, errDraining) {
		t.Fatalf("drained message settled with %v, want a nack", err)
	}
	// The redelivery, to a new pipeline on the same store: the three
	// confirmed copies are duplicates, the fourth is published.
	g.failing.Store(false)
	e2 := newEnv(t, Config{}, bcastDoc(1, "all"), g.testSink, store)
	m2, a2 := msg("b", "k", "0")
	m2.SourceID = m.SourceID
	handleMsg(t, e2, m2, a2)
	if err := a2.result(t); err != nil {
		t.Fatal(err)
	}
	if c := byCell(g.published()); len(g.published()) != 4 || len(c["cell.cd.b"]) != 1 {
		t.Fatalf("after the redelivery: %v", c)
	}
}

// A revoked epoch: copies not yet published are dropped, the message
// settles with ErrRevoked (the new owner re-reads it), counted once.
func TestBroadcastRevoked(t *testing.T) {
	g := newCellGate("cell.cd.b")
	g.failing.Store(true)
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, bcastDoc(1, "all"), g.testSink, nil)
	ep := &Epoch{}
	m, a := msg("b", "k", "0")
	m.Epoch = ep
	handleMsg(t, e, m, a)
	eventually(t, "three copies confirmed", func() bool { return len(g.published()) == 3 })
	ep.Revoke()
	if err := a.result(t); !errors.Is(err, ErrRevoked) {
		t.Fatalf("settled with %v, want ErrRevoked", err)
	}
	if v := counter(t, e, "b", OutcomeRevoked); v != 1 {
		t.Fatalf("revoked %v, want 1", v)
	}
}

// A cell whose broker has no sink: its copy is dead-lettered (one dead
// letter per cell), the other cells get theirs.
func TestBroadcastNoSinkForCell(t *testing.T) {
	doc := strings.Replace(bcastDoc(1, "all"), `target: {broker: nats,`, `target: {broker: "nats-{cell}",`, 1)
	sinks := map[string]*testSink{"nats": newTestSink(), "nats-ca": newTestSink(), "nats-cb": newTestSink(), "nats-cc": newTestSink()}
	e := newEnvSinks(t, Config{}, doc, sinks, nil)
	m, a := msg("b", "k", "0")
	handleMsg(t, e, m, a)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	dl := sinks["nats"].published()
	if len(dl) != 1 || dl[0].Subject != "dlq.b" || dl[0].MsgID != m.SourceID+"@cd" ||
		!strings.HasPrefix(dl[0].Header[HeaderError][0], `no_route: no sink for target broker "nats-cd" of cell cd`) ||
		dl[0].Header[HeaderMsgID][0] != m.SourceID {
		t.Fatalf("dead letters %+v", dl)
	}
	for _, c := range []string{"ca", "cb", "cc"} {
		if n := len(sinks["nats-"+c].published()); n != 1 {
			t.Fatalf("cell %s got %d copies", c, n)
		}
	}
}

// A message without an identity is held back, never broadcast under a
// made-up key.
func TestBroadcastWithoutSourceID(t *testing.T) {
	e := newEnv(t, Config{HoldDelay: 2 * time.Second}, bcastDoc(1, "all"), nil, nil)
	m, a := msg("b", "k", "v")
	m.SourceID = ""
	handleMsg(t, e, m, a)
	if d, ok := HoldDelay(a.result(t)); !ok || d != 2*time.Second {
		t.Fatal("not held back")
	}
	if n := len(e.sink.published()); n != 0 {
		t.Fatalf("%d copies published", n)
	}
}

// A cell whose publishes hang (no answer, no error) is not failing yet, but
// its copies lag once their message is older than stallTimeout: with 8
// in-flight slots, 60 messages reach the other cells while it hangs, and
// follow into it in per-key order once it answers.
func TestBroadcastHangingCellLags(t *testing.T) {
	s := newTestSink()
	s.block, s.blockTo = make(chan struct{}), "cell.cd.b"
	e := newEnv(t, Config{MaxInFlight: 8, Lanes: 4, StallTimeout: 50 * time.Millisecond}, bcastDoc(1, "all"), s, nil)
	const keys, per = 3, 20
	var acks []*ackRec
	for i := range keys * per {
		m, a := msg("b", "k"+strconv.Itoa(i%keys), strconv.Itoa(i/keys))
		handleMsg(t, e, m, a)
		acks = append(acks, a)
	}
	eventually(t, "the other cells holding every message", func() bool {
		c := byCell(s.published())
		return len(c["cell.ca.b"]) == keys*per && len(c["cell.cb.b"]) == keys*per && len(c["cell.cc.b"]) == keys*per
	})
	if st := e.p.Status(); st.Lagging == 0 || len(byCell(s.published())["cell.cd.b"]) != 0 {
		t.Fatalf("lagging %d, copies to the hanging cell %d", st.Lagging, len(byCell(s.published())["cell.cd.b"]))
	}
	close(s.block)
	for _, a := range acks {
		if err := a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	checkPerKeyOrder(t, s.published(), 4, keys, per)
	if st := e.p.Status(); st.Lagging != 0 || st.InFlight != 0 {
		t.Fatalf("left over: %+v", st)
	}
}

// /route explains a broadcast like `cellbridge route`: the cells, the
// down one and the origin skipped.
func TestBroadcastRouteEndpoint(t *testing.T) {
	e := newEnv(t, Config{}, bcastDoc(1, "all", "cd"), nil, nil)
	srv := httptest.NewServer(NewHTTP(e.p))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/route?topic=b&key=k1&origin=ca")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var d router.Decision
	if err := json.NewDecoder(resp.Body).Decode(&d); err != nil {
		t.Fatal(err)
	}
	var skips []string
	for _, c := range d.Cells {
		skips = append(skips, c.Cell+":"+c.Skip)
	}
	if d.Reason != router.ReasonBroadcast || d.Origin != "ca" || strings.Join(skips, " ") != "ca:origin cb: cc: cd:down" {
		t.Fatalf("decision %+v", d)
	}
}

// Broadcasts from several goroutines (a partitioned rule's consumers) with
// a budget smaller than two messages' copies: no broadcast waits for a slot
// while it holds others, so they cannot wait on each other for ever.
func TestBroadcastConcurrentSmallBudget(t *testing.T) {
	s := newTestSink()
	e := newEnv(t, Config{MaxInFlight: 4, Lanes: 4}, bcastDoc(1, "all"), s, nil)
	const goroutines, per = 8, 40
	var wg sync.WaitGroup
	acks := make([][]*ackRec, goroutines)
	for g := range goroutines {
		wg.Go(func() {
			for i := range per {
				m, a := msg("b", fmt.Sprintf("g%d-%d", g, i), "x")
				if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
					t.Error(err)
					return
				}
				acks[g] = append(acks[g], a)
			}
		})
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatalf("broadcasts still waiting for in-flight slots after 20s (in flight %d)", e.p.Status().InFlight)
	}
	for _, as := range acks {
		for _, a := range as {
			if err := a.result(t); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// The range a down cell missed covers every missed copy, also copies that
// waited (their cell failing) from before the reload that marked it down
// and are skipped when they are decided again after newer messages were
// skipped at intake: replaying from First must include them. A copy
// decided under the older table ends no streak; one decided under a table
// where the cell is back does.
func TestBroadcastMissedRangeCoversWaitingCopies(t *testing.T) {
	g := newCellGate("cell.cd.b")
	g.failing.Store(true)
	e := newEnv(t, Config{MaxInFlight: 64, Lanes: 4, Retry: RetryConfig{Initial: 20 * time.Millisecond, Max: 50 * time.Millisecond}},
		bcastDoc(1, "all"), g.testSink, nil)
	missed := func() MissedCopies {
		for _, r := range e.p.Status().Rules {
			for _, c := range r.Broadcast {
				if r.Rule == "b" && c.Cell == "cd" {
					return c.Missed
				}
			}
		}
		return MissedCopies{}
	}
	var acks []*ackRec
	var oldest *Message
	for i := range 5 {
		m, a := msg("b", "k"+strconv.Itoa(i), "v")
		m.Time = time.Unix(1000+int64(i), 0)
		if oldest == nil {
			oldest = m
		}
		handleMsg(t, e, m, a)
		acks = append(acks, a)
	}
	eventually(t, "the copies to cd failing", func() bool { return g.tries.Load() >= 5 })

	// cd is marked down; new messages skip it at once, before the waiting
	// copies are decided again at their next attempt.
	e.hold.Store(table(t, bcastDoc(2, "all", "cd")))
	for i := range 3 {
		m, a := msg("b", "n"+strconv.Itoa(i), "v")
		m.Time = time.Unix(1010+int64(i), 0)
		handleMsg(t, e, m, a)
		acks = append(acks, a)
	}
	for _, a := range acks {
		if err := a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	got := missed()
	if got.Count != 8 || !got.Ongoing || !got.First.Equal(oldest.Time) || got.FirstSourceID != oldest.SourceID ||
		!got.Last.Equal(time.Unix(1012, 0)) {
		t.Fatalf("missed %+v, want 8 copies from %v (%s) to %v, ongoing", got, oldest.Time, oldest.SourceID, time.Unix(1012, 0))
	}
	if n := len(byCell(g.published())["cell.cd.b"]); n != 0 {
		t.Fatalf("%d copies reached cd", n)
	}

	// cd is back: the next copy to it ends the streak; its range stays.
	g.failing.Store(false)
	e.hold.Store(table(t, bcastDoc(3, "all")))
	m, a := msg("b", "k0", "v")
	m.Time = time.Unix(1020, 0)
	handleMsg(t, e, m, a)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if got := missed(); got.Ongoing || got.Count != 8 || !got.First.Equal(oldest.Time) {
		t.Fatalf("after cd came back: %+v", got)
	}
}

// A broadcast message whose every copy is skipped when decided again (its
// one cell marked down while the copy waited) counts as skipped, not as
// forwarded: nothing was published.
func TestBroadcastAllCopiesSkippedLaterIsSkipped(t *testing.T) {
	g := newCellGate("cell.cd.b")
	g.failing.Store(true)
	e := newEnv(t, Config{Retry: RetryConfig{Initial: 20 * time.Millisecond, Max: 50 * time.Millisecond}},
		bcastDoc(1, "[cd]"), g.testSink, nil)
	m, a := msg("b", "k", "v")
	handleMsg(t, e, m, a)
	eventually(t, "the copy to cd failing", func() bool { return g.tries.Load() >= 1 })
	e.hold.Store(table(t, bcastDoc(2, "[cd]", "cd")))
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if f, s := counter(t, e, "b", OutcomeForwarded), counter(t, e, "b", OutcomeSkipped); f != 0 || s != 1 {
		t.Fatalf("forwarded %v, skipped %v; want 0 and 1", f, s)
	}
}
