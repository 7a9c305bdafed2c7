package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// eventually waits for cond (see poll.Eventually).
var eventually = poll.Eventually

func testCtx(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int { return natstest.FreePorts(t, 1)[0] }

// expectation is where one published event must end up.
type expectation struct {
	EventID string
	Topic   string
	Cell    string // "" for DLQ
	Subject string // target subject (cell subject or DLQ subject)
	Poison  string // dlq reason kind; "" for routable
	Shard   int
	// Key is the user id of a routable event and Seq its number among the
	// events of its topic and user, from 1, in publishing (= stream) order;
	// the event carries it in the headerKeySeq header.
	Key string
	Seq int
}

// headerKeySeq carries an event's per-key sequence number (expectation.Seq)
// through the bridge into its copy.
const headerKeySeq = "X-Key-Seq"

// published maps Cell-Msg-Id (the bridge derives it from stream:sequence)
// to its expectation.
type published map[string]expectation

// onceEach checks that every expected idempotency key arrived (byID counts
// arrivals per key) and that no key and no event id (byEvent) arrived twice;
// each finding goes to problem, a repeated key described by dupKey. It
// returns the number of repeated keys, repeated events and missing keys.
func (exp published) onceEach(byID, byEvent map[string]int, problem func(string, ...any), dupKey func(id string, n int) string) (dupID, dupEvent, missing int) {
	for id, n := range byID {
		if n > 1 {
			dupID++
			problem("%s", dupKey(id, n))
		}
	}
	for id, n := range byEvent {
		if n > 1 {
			dupEvent++
			problem("event %s arrived %d times", id, n)
		}
	}
	for id, e := range exp {
		if byID[id] == 0 {
			missing++
			problem("missing: %s (event %s, cell %q)", id, e.EventID, e.Cell)
		}
	}
	return dupID, dupEvent, missing
}

func (p published) counts() (forwarded, dlq int) {
	for _, e := range p {
		if e.Cell == "" {
			dlq++
		} else {
			forwarded++
		}
	}
	return
}

// publishEvents publishes n sample events (seeded) to the source streams and
// returns where each must land according to the rules table.
func publishEvents(t testing.TB, js jetstream.JetStream, table *router.Table, seed uint64, n, poisonEvery int) published {
	t.Helper()
	return publishGen(t, js, table, newEventGen(seed, poisonEvery), n)
}

// publishGen publishes n events of gen as publishEvents does. Each routable
// event carries its number among its topic's events of its user
// (headerKeySeq), so that the copies' order per key can be checked.
func publishGen(t testing.TB, js jetstream.JetStream, table *router.Table, gen *eventGen, n int) published {
	t.Helper()
	ctx := testCtx(t, 2*time.Minute)
	seq := map[string]int{}
	exp := make(published, n)
	type pend struct {
		f jetstream.PubAckFuture
		e expectation
	}
	var window []pend
	flush := func() {
		for _, p := range window {
			select {
			case ack := <-p.f.Ok():
				exp[ack.Stream+":"+fmt.Sprint(ack.Sequence)] = p.e
			case err := <-p.f.Err():
				t.Fatalf("publish %s: %v", p.e.EventID, err)
			case <-ctx.Done():
				t.Fatal("publish: timeout")
			}
		}
		window = window[:0]
	}
	for range n {
		ev := gen.next()
		d := table.Route(ev.Topic, &router.Message{Subject: ev.Subject, Header: ev.Header, Body: ev.Body})
		e := expectation{EventID: ev.ID, Topic: ev.Topic, Poison: ev.Poison, Shard: d.Shard, Subject: d.Target.Subject}
		switch {
		case d.Reason == router.ReasonDLQ:
			if ev.Poison == "" {
				t.Fatalf("event %s routed to the DLQ but is not poison: %+v", ev.ID, d)
			}
		case ev.Poison != "":
			t.Fatalf("poison event %s (%s) not routed to the DLQ: %+v", ev.ID, ev.Poison, d)
		default:
			e.Cell = d.Cell
		}
		m := ev.Msg()
		if e.Cell != "" {
			// One connection publishes in order, and each topic has its own
			// stream: publishing order is stream order per topic and user.
			seq[ev.Topic+"/"+ev.Key]++
			e.Key, e.Seq = ev.Key, seq[ev.Topic+"/"+ev.Key]
			m.Header.Set(headerKeySeq, strconv.Itoa(e.Seq))
		}
		f, err := js.PublishMsgAsync(m)
		if err != nil {
			t.Fatal(err)
		}
		window = append(window, pend{f, e})
		if len(window) == 2000 {
			flush()
		}
	}
	flush()
	return exp
}

// testEnv is a test server holding the example rules' streams, with a copy
// of the example rules the test may change.
type testEnv struct {
	url   string
	js    jetstream.JetStream
	rules string
	table *router.Table
}

func newTestEnv(t testing.TB) *testEnv {
	t.Helper()
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	rules := exampleRules(t)
	table, err := router.Load(rules)
	if err != nil {
		t.Fatal(err)
	}
	ensureStreams(t, js, table)
	return &testEnv{url: srv.URL, js: js, rules: rules, table: table}
}

// ensureStreams creates the example rules' streams on a test server.
func ensureStreams(t testing.TB, js jetstream.JetStream, table *router.Table) {
	t.Helper()
	if err := natsjs.EnsureStreams(testCtx(t, 30*time.Second), js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
}

// streamCount returns a stream's message count (0 when it does not exist).
func streamCount(t testing.TB, js jetstream.JetStream, name string) uint64 {
	t.Helper()
	st, err := js.Stream(testCtx(t, 10*time.Second), name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(testCtx(t, 10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

// arrived is the number of messages in every cell stream and in the DLQ.
func arrived(t testing.TB, js jetstream.JetStream, table *router.Table) (cells, dlq uint64) {
	t.Helper()
	for _, c := range table.Cells() {
		cells += streamCount(t, js, natsjs.CellStream(c.Name))
	}
	return cells, streamCount(t, js, natsjs.DLQStream)
}

// consumersIdle reports whether every source consumer has nothing pending
// and nothing unacknowledged.
func consumersIdle(t testing.TB, js jetstream.JetStream, table *router.Table) bool {
	t.Helper()
	for _, r := range table.Rules() {
		c, err := js.Consumer(testCtx(t, 10*time.Second), r.Source.Stream, r.Source.Group)
		if err != nil {
			return false
		}
		info, err := c.Info(testCtx(t, 10*time.Second))
		if err != nil || info.NumPending != 0 || info.NumAckPending != 0 {
			return false
		}
	}
	return true
}

// readStream returns every message of a stream, in order.
func readStream(t testing.TB, js jetstream.JetStream, name string) []jetstream.Msg {
	t.Helper()
	msgs, err := tally.ReadStream(testCtx(t, time.Minute), js, name, 0)
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

// verification is the outcome of checking the streams against what was
// published.
type verification struct {
	PerCell     map[string]int
	DLQ         int
	DLQByReason map[string]int
	Problems    []string
	// Order is tally's check of the copies in the cell streams of the
	// events published with a per-key sequence number (publishGen), each
	// event's key being its topic and user and its number the one it
	// carries (headerKeySeq): Order.Reordered lists the copies stored after
	// a later event of their key in the same stream.
	Order *tally.Result
}

// verifyExactlyOnce reads every cell stream and the DLQ and checks that each
// published event is in its owning cell's subject (or the DLQ) exactly once,
// counted both by the Cell-Msg-Id header and by the event id in the payload
// (the X-Event-Id header for bodies that are not JSON), with nothing missing.
func verifyExactlyOnce(t testing.TB, js jetstream.JetStream, table *router.Table, exp published) verification {
	t.Helper()
	v := verification{PerCell: map[string]int{}, DLQByReason: map[string]int{}}
	byMsgID := map[string]int{}
	byEventID := map[string]int{}
	var arrivals []tally.Arrival
	problem := func(format string, a ...any) {
		if len(v.Problems) < 20 {
			v.Problems = append(v.Problems, fmt.Sprintf(format, a...))
		}
	}
	check := func(stream, cell string, m jetstream.Msg) {
		h := m.Headers()
		id := h.Get(bridge.HeaderMsgID)
		if cell == "" && id == "" {
			// DLQ copies keep the original headers: the idempotency key
			// is only in Nats-Msg-Id there.
			id = h.Get(jetstream.MsgIDHeader)
		}
		byMsgID[id]++
		e, ok := exp[id]
		if !ok {
			problem("%s: message with unknown %s %q", stream, bridge.HeaderMsgID, id)
			return
		}
		eventID := h.Get("X-Event-Id")
		var body struct{ ID string }
		if json.Unmarshal(m.Data(), &body) == nil {
			eventID = body.ID
		} else if e.Poison != poisonBadBody {
			problem("%s: %s: body is not JSON", stream, id)
		}
		byEventID[eventID]++
		if eventID != e.EventID {
			problem("%s: %s carries event %q, want %q", stream, id, eventID, e.EventID)
		}
		if m.Subject() != e.Subject {
			problem("%s: %s on subject %s, want %s", stream, id, m.Subject(), e.Subject)
		}
		if e.Cell != cell {
			problem("%s: %s (event %s) in cell %q, want %q", stream, id, e.EventID, cell, e.Cell)
		}
		if got := h.Get(jetstream.MsgIDHeader); got != id {
			problem("%s: %s: Nats-Msg-Id %q", stream, id, got)
		}
		if cell != "" && h.Get(bridge.HeaderCell) != cell {
			problem("%s: %s: %s %q", stream, id, bridge.HeaderCell, h.Get(bridge.HeaderCell))
		}
		if cell == "" && h.Get(bridge.HeaderError) == "" {
			problem("%s: %s: DLQ message without %s", stream, id, bridge.HeaderError)
		}
		if cell == "" || e.Seq == 0 {
			return // dead-lettered, or published without a per-key sequence number
		}
		a := tally.Arrival{Cell: cell, Stream: stream, Subject: m.Subject(), MsgID: id, ID: eventID, Key: e.Topic + "/" + e.Key}
		if md, err := m.Metadata(); err == nil {
			a.StreamSeq, a.Stored = md.Sequence.Stream, md.Timestamp
		}
		var err error
		if a.Seq, err = strconv.Atoi(h.Get(headerKeySeq)); err != nil || a.Seq != e.Seq {
			problem("%s: %s (event %s) carries %s %q, want %d", stream, id, e.EventID, headerKeySeq, h.Get(headerKeySeq), e.Seq)
		}
		arrivals = append(arrivals, a)
	}
	for _, c := range table.Cells() {
		for _, m := range readStream(t, js, natsjs.CellStream(c.Name)) {
			v.PerCell[c.Name]++
			check(natsjs.CellStream(c.Name), c.Name, m)
		}
	}
	for _, m := range readStream(t, js, natsjs.DLQStream) {
		v.DLQ++
		v.DLQByReason[strings.SplitN(m.Headers().Get(bridge.HeaderError), ":", 2)[0]]++
		check(natsjs.DLQStream, "", m)
	}
	dupID, dupEvent, missing := exp.onceEach(byMsgID, byEventID, problem, func(id string, n int) string {
		return fmt.Sprintf("%s %s arrived %d times", bridge.HeaderMsgID, id, n)
	})
	if dupID+dupEvent+missing > 0 {
		problem("summary: %d duplicate msg ids, %d duplicate event ids, %d missing", dupID, dupEvent, missing)
	}
	var sent []tally.Sent
	for id, e := range exp {
		if e.Seq > 0 {
			sent = append(sent, tally.Sent{ID: e.EventID, Key: e.Topic + "/" + e.Key, Seq: e.Seq, MsgID: id})
		}
	}
	v.Order = tally.Check(sent, arrivals, tally.Options{Owner: func(a *tally.Arrival) (string, bool) {
		e, ok := exp[a.MsgID]
		return e.Cell, ok
	}})
	return v
}

func (v verification) String() string {
	cells := make([]string, 0, len(v.PerCell))
	for c, n := range v.PerCell {
		cells = append(cells, fmt.Sprintf("%s=%d", c, n))
	}
	sort.Strings(cells)
	return fmt.Sprintf("cells[%s] dlq=%d %v", strings.Join(cells, " "), v.DLQ, v.DLQByReason)
}

// writeFile writes a file under dir and returns its path.
func writeFile(t testing.TB, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// publishOne publishes one message to a source stream and returns its
// Cell-Msg-Id as the bridge derives it (stream:sequence).
func publishOne(t testing.TB, js jetstream.JetStream, m *nats.Msg) string {
	t.Helper()
	ack, err := js.PublishMsg(testCtx(t, 10*time.Second), m)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%s:%d", ack.Stream, ack.Sequence)
}

// exampleRules copies deploy/rules into a temp dir, applying the given
// old→new replacements to every file, and returns the dir.
func exampleRules(t testing.TB, replace ...string) string {
	t.Helper()
	src := filepath.Join("..", "..", "deploy", "rules")
	dst := t.TempDir()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	r := strings.NewReplacer(replace...)
	used := make([]bool, len(replace)/2)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(replace); i += 2 {
			used[i/2] = used[i/2] || strings.Contains(string(b), replace[i])
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), []byte(r.Replace(string(b))), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The example rules may be edited; a replacement that no longer
	// matches would silently test the unmodified rules.
	for i, ok := range used {
		if !ok {
			t.Fatalf("deploy/rules no longer contains %q; update the test", replace[2*i])
		}
	}
	return dst
}
