package bridge

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/cellbridge/cellbridge/dedupe"
)

func counter(t testing.TB, e *env, rule, outcome string) float64 {
	t.Helper()
	return value(e.p.met.Messages.WithLabelValues(rule, outcome))
}

func TestOutcomes(t *testing.T) {
	big := strings.Repeat("x", 2000)
	cases := []struct {
		name    string
		rule    string
		key     string
		body    string
		header  map[string]string
		subject string // "" = nothing published
		cell    string
		outcome string
		reason  string // DLQ reason
		ack     string // "ok" or "hold"
	}{
		{name: "owner rz00", rule: "t", key: keyFor(10, 1), subject: "cell.rz00.t", cell: "rz00", outcome: OutcomeForwarded, ack: "ok"},
		{name: "owner rz01", rule: "t", key: keyFor(70, 2), subject: "cell.rz01.t", cell: "rz01", outcome: OutcomeForwarded, ack: "ok"},
		{name: "missing key to dlq", rule: "t", subject: "dlq.t", outcome: OutcomeDLQ, reason: DLQMissingKey, ack: "ok"},
		{name: "bad key to dlq", rule: "t", key: "12ab4", subject: "dlq.t", outcome: OutcomeDLQ, reason: DLQBadKey, ack: "ok"},
		{name: "missing key to global", rule: "g", subject: "cell.gz00.g", cell: "gz00", outcome: OutcomeForwarded, ack: "ok"},
		{name: "too large", rule: "t", key: keyFor(10, 3), body: big, subject: "dlq.t", outcome: OutcomeDLQ, reason: DLQTooLarge, ack: "ok"},
		{name: "too many hops", rule: "t", key: keyFor(10, 4), header: map[string]string{HeaderHops: "4"}, subject: "dlq.t", outcome: OutcomeDLQ, reason: DLQTooManyHops, ack: "ok"},
		{name: "hop counted", rule: "t", key: keyFor(10, 5), header: map[string]string{HeaderHops: "2"}, subject: "cell.rz00.t", cell: "rz00", outcome: OutcomeForwarded, ack: "ok"},
		{name: "incoming msg id kept", rule: "t", key: keyFor(60, 6), header: map[string]string{HeaderMsgID: "upstream-1"}, subject: "cell.rz01.t", cell: "rz01", outcome: OutcomeForwarded, ack: "ok"},
		{name: "unknown rule held", rule: "nope", key: keyFor(10, 7), outcome: "", ack: "hold"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, Config{MaxMessageBytes: 1000}, rulesDoc(7, "", 0), nil, nil)
			body := tc.body
			if body == "" {
				body = `{"n":1}`
			}
			m, a := msg(tc.rule, tc.key, body)
			for k, v := range tc.header {
				m.Header[k] = []string{v}
			}
			if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
				t.Fatal(err)
			}
			res := a.result(t)
			switch tc.ack {
			case "ok":
				if res != nil {
					t.Fatalf("ack: %v, want nil", res)
				}
			case "hold":
				if d, ok := HoldDelay(res); !ok || d != 5*time.Second {
					t.Fatalf("ack: %v, want Hold(5s)", res)
				}
			}
			got := e.sink.published()
			if tc.subject == "" {
				if len(got) != 0 {
					t.Fatalf("published %v, want nothing", got)
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("published %d messages, want 1: %+v", len(got), got)
			}
			g := got[0]
			if g.Subject != tc.subject {
				t.Errorf("subject %q, want %q", g.Subject, tc.subject)
			}
			if g.Body != body {
				t.Errorf("body changed")
			}
			if g.Header["X-Trace"][0] != "abc" {
				t.Errorf("original header lost: %v", g.Header)
			}
			wantID := m.SourceID
			if v := tc.header[HeaderMsgID]; v != "" {
				wantID = v
			}
			if g.MsgID != wantID {
				t.Errorf("MsgID %q, want %q", g.MsgID, wantID)
			}
			if tc.outcome == OutcomeDLQ {
				ce := g.Header[HeaderError]
				if len(ce) != 1 || !strings.HasPrefix(ce[0], tc.reason+": ") {
					t.Errorf("Cell-Error %q, want prefix %q", ce, tc.reason)
				}
				if _, ok := g.Header[HeaderCell]; ok {
					t.Errorf("DLQ copy carries routing header Cell-Name")
				}
				if id := g.Header[HeaderMsgID]; len(id) != 1 || id[0] != wantID {
					t.Errorf("DLQ copy Cell-Msg-Id %q, want %q", id, wantID)
				}
				if got := value(e.p.met.DLQ.WithLabelValues(tc.rule, tc.reason)); got != 1 {
					t.Errorf("dlq_total{reason=%s} = %v", tc.reason, got)
				}
			} else {
				hops := 1
				if v := tc.header[HeaderHops]; v != "" {
					hops = int(v[0]-'0') + 1
				}
				want := map[string]string{HeaderMsgID: wantID, HeaderCell: tc.cell, HeaderRulesVersion: "7",
					HeaderSource: "test/" + tc.rule, HeaderHops: fmt.Sprint(hops)}
				for k, v := range want {
					if got := g.Header[k]; len(got) != 1 || got[0] != v {
						t.Errorf("header %s = %q, want %q", k, got, v)
					}
				}
				if tc.key != "" && g.Header[HeaderShard][0] != tc.key[len(tc.key)-3:len(tc.key)-1] {
					t.Errorf("Cell-Shard %q for key %s", g.Header[HeaderShard], tc.key)
				}
				if got := value(e.p.met.Forwarded.WithLabelValues(tc.rule, tc.cell)); got != 1 {
					t.Errorf("forwarded_total{cell=%s} = %v", tc.cell, got)
				}
			}
			if got := counter(t, e, tc.rule, tc.outcome); got != 1 {
				t.Errorf("messages_total{outcome=%s} = %v", tc.outcome, got)
			}
		})
	}
}

func TestDuplicateIsAckedNotPublished(t *testing.T) {
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), nil, nil)
	m1, a1 := msg("t", keyFor(3, 1), "{}")
	m2, a2 := msg("t", keyFor(3, 1), "{}")
	m2.SourceID = m1.SourceID // a redelivery
	for _, x := range []struct {
		m *Message
		a *ackRec
	}{{m1, a1}, {m2, a2}} {
		if err := e.p.Handle(context.Background(), x.m, x.a.ack); err != nil {
			t.Fatal(err)
		}
		if err := x.a.result(t); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(e.sink.published()); n != 1 {
		t.Fatalf("published %d, want 1", n)
	}
	if got := counter(t, e, "t", OutcomeDuplicate); got != 1 {
		t.Fatalf("duplicates %v", got)
	}
}

// The sink dropping a repeat by its own idempotency window counts as
// confirmed: the message is acked.
func TestSinkDuplicateCountsAsConfirmed(t *testing.T) {
	s := newTestSink()
	s.fail = func(o *Outgoing, attempt int) error { return fmt.Errorf("pub ack: %w", ErrDuplicate) }
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), s, nil)
	m, a := msg("t", keyFor(3, 1), "{}")
	_ = e.p.Handle(context.Background(), m, a.ack)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if got := counter(t, e, "t", OutcomeRetried); got != 0 {
		t.Fatalf("retried %v", got)
	}
}

// Same key → confirmed in arrival order, one unconfirmed publish per key at a
// time; different keys concurrently; random confirm delays and injected
// failures; every message exactly once.
func TestPerKeyOrderUnderConcurrency(t *testing.T) {
	for _, workers := range []int{0, 64} { // 0: inline (memory store), 64: worker pool
		t.Run(fmt.Sprintf("workers=%d", workers), func(t *testing.T) {
			s := newTestSink()
			s.delay = 300 * time.Microsecond
			var failed atomic.Int64
			s.fail = func(o *Outgoing, attempt int) error {
				if attempt == 1 && rand.IntN(10) == 0 {
					failed.Add(1)
					return errors.New("injected sink failure")
				}
				return nil
			}
			var store dedupe.Store = dedupe.NewMemory(dedupe.MemoryConfig{})
			if workers > 0 {
				store = wrapStore{store} // not *dedupe.Memory: exercises the worker pool
			}
			e := newEnv(t, Config{MaxInFlight: 64, Workers: workers, Lanes: 16, Retry: RetryConfig{Initial: time.Millisecond, Max: 4 * time.Millisecond}},
				rulesDoc(1, "", 0), s, store)
			const producers, keysPer, perKey = 4, 8, 40
			var acks sync.Map
			var wg sync.WaitGroup
			for pr := range producers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range keysPer * perKey {
						k := pr*keysPer + i%keysPer
						m, a := msg("t", keyFor(k, k), fmt.Sprintf("%d/%d", k, i/keysPer))
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
			got := e.sink.published()
			if len(got) != producers*keysPer*perKey {
				t.Fatalf("published %d, want %d", len(got), producers*keysPer*perKey)
			}
			next := map[string]int{}
			for _, g := range got {
				var k, i int
				fmt.Sscanf(g.Body, "%d/%d", &k, &i)
				key := g.Header["X-User-Id"][0]
				if i != next[key] {
					t.Fatalf("key %s: got message %d, want %d", key, i, next[key])
				}
				next[key]++
			}
			if n := s.overlap.Load(); n != 0 {
				t.Fatalf("%d times two messages of one key were unconfirmed at once", n)
			}
			if failed.Load() == 0 || counter(t, e, "t", OutcomeRetried) < float64(failed.Load()) {
				t.Fatalf("failures %d, retried %v", failed.Load(), counter(t, e, "t", OutcomeRetried))
			}
		})
	}
}

// wrapStore presents the memory store as a remote one (worker pool code
// path).
type wrapStore struct{ dedupe.Store }

func (wrapStore) Local() bool { return false }

func TestDLQPublishFailureRetried(t *testing.T) {
	s := newTestSink()
	s.fail = func(o *Outgoing, attempt int) error {
		if o.Target.Subject == "dlq.t" && attempt <= 2 {
			return errors.New("dlq stream unavailable")
		}
		return nil
	}
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, rulesDoc(1, "", 0), s, nil)
	m, a := msg("t", "", "{}")
	_ = e.p.Handle(context.Background(), m, a.ack)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	got := s.published()
	if len(got) != 1 || got[0].Subject != "dlq.t" {
		t.Fatalf("published %+v", got)
	}
	if r := counter(t, e, "t", OutcomeRetried); r != 2 {
		t.Fatalf("retried %v, want 2", r)
	}
	if d := counter(t, e, "t", OutcomeDLQ); d != 1 {
		t.Fatalf("dlq %v", d)
	}
}

func TestSinkFailureRetriedAndReadiness(t *testing.T) {
	s := newTestSink()
	var down atomic.Bool
	down.Store(true)
	s.fail = func(o *Outgoing, attempt int) error {
		if down.Load() {
			return errors.New("connection refused")
		}
		return nil
	}
	e := newEnv(t, Config{AckWait: 40 * time.Millisecond, Retry: RetryConfig{Initial: time.Millisecond, Max: 5 * time.Millisecond}},
		rulesDoc(1, "", 0), s, nil)
	m, a := msg("t", keyFor(20, 1), "{}")
	m2, a2 := msg("t", keyFor(20, 1), "{}") // queued behind m
	_ = e.p.Handle(context.Background(), m, a.ack)
	_ = e.p.Handle(context.Background(), m2, a2.ack)
	eventually(t, "retries and in-progress heartbeats", func() bool {
		return counter(t, e, "t", OutcomeRetried) >= 3 && a.beats() > 0 && a2.beats() > 0
	})
	ok, why := e.p.Health().Ready()
	if ok || !strings.Contains(why, "publishing to broker nats subject cell.rz00.t keeps failing: connection refused") {
		t.Fatalf("ready=%v why=%q", ok, why)
	}
	if a.isSettled() || a2.isSettled() {
		t.Fatal("acked while the sink is down")
	}
	if n := value(e.p.met.SinkPublishErrors.WithLabelValues("nats")); n < 3 {
		t.Fatalf("sink errors %v", n)
	}
	down.Store(false)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if err := a2.result(t); err != nil {
		t.Fatal(err)
	}
	// Ready again once a second passed without a failure (recoverHold).
	eventually(t, "ready after recovery", func() bool { ok, _ := e.p.Health().Ready(); return ok })
	got := s.published()
	if len(got) != 2 || got[0].MsgID != m.SourceID || got[1].MsgID != m2.SourceID {
		t.Fatalf("published %+v", got)
	}
	if d := counter(t, e, "t", OutcomeDLQ); d != 0 {
		t.Fatal("a sink failure was dead-lettered")
	}
}

// flakyStore fails or reports InFlight for the first calls.
type flakyStore struct {
	dedupe.Store
	reserveErrs, inFlight atomic.Int64
}

// Local reports false: the failures stand for a remote store's.
func (f *flakyStore) Local() bool { return false }

func (f *flakyStore) Reserve(ctx context.Context, key string) (dedupe.Outcome, error) {
	if f.reserveErrs.Add(-1) >= 0 {
		return 0, errors.New("kv timeout")
	}
	if f.inFlight.Add(-1) >= 0 {
		return dedupe.InFlight, nil
	}
	return f.Store.Reserve(ctx, key)
}

func TestDedupeStoreFailureAndInFlightRetried(t *testing.T) {
	st := &flakyStore{Store: dedupe.NewMemory(dedupe.MemoryConfig{})}
	st.reserveErrs.Store(2)
	st.inFlight.Store(2)
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, rulesDoc(1, "", 0), nil, st)
	m, a := msg("t", keyFor(20, 1), "{}")
	_ = e.p.Handle(context.Background(), m, a.ack)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if n := len(e.sink.published()); n != 1 {
		t.Fatalf("published %d", n)
	}
	if r := counter(t, e, "t", OutcomeRetried); r != 4 {
		t.Fatalf("retried %v, want 4", r)
	}
	if n := value(e.p.met.DedupeErrors.WithLabelValues("reserve")); n != 2 {
		t.Fatalf("dedupe errors %v", n)
	}
}

// value reads a counter or gauge.
func value(c prometheus.Metric) float64 {
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		panic(err)
	}
	if m.Counter != nil {
		return m.Counter.GetValue()
	}
	return m.Gauge.GetValue()
}
