package bridge

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/router"
)

// rulesDoc is a small rule set: cells rz00 (shards 0..split-1), rz01
// (split..99), global gz00; topic t keyed by header X-User-Id (digits
// -3..-1) with a DLQ; topic g like t but onMissingKey global. blocked is a
// YAML list body such as `"40-44"`.
func rulesDoc(version int, blocked string, split int) string {
	if split == 0 {
		split = 50
	}
	return fmt.Sprintf(`kind: CellMap
version: %d
shards: 100
global: gz00
cells:
  - {name: rz00, state: active, failover: rz01, shards: ["0-%d"]}
  - {name: rz01, state: active, failover: rz00, shards: ["%d-99"]}
  - {name: gz00, state: active}
blocked: [%s]
---
kind: TopicRule
name: t
source: {broker: nats, stream: T, subject: "t.>"}
key: {header: X-User-Id}
shard: {func: digits, from: -3, to: -1}
target: {broker: nats, subject: "cell.{cell}.t"}
onMissingKey: dlq
dlq: {broker: nats, subject: dlq.t}
---
kind: TopicRule
name: g
source: {broker: nats, stream: G, subject: "g.>"}
key: {header: X-User-Id}
shard: {func: digits, from: -3, to: -1}
target: {broker: nats, subject: "cell.{cell}.g"}
onMissingKey: global
dlq: {broker: nats, subject: dlq.g}
`, version, split-1, split, blocked)
}

func table(t testing.TB, doc string) *router.Table {
	t.Helper()
	tb, err := router.Parse("rules.yaml", []byte(doc))
	if err != nil {
		t.Fatalf("rules: %v", err)
	}
	return tb
}

// keyFor returns a user id whose shard (3rd and 2nd to last digits) is shard.
func keyFor(shard, n int) string { return fmt.Sprintf("2088%08d%02d%d", n, shard, n%10) }

// published is what the test sink stored.
type published struct {
	Subject string
	MsgID   string
	Header  map[string][]string
	Body    string
}

// testSink is an in-memory Sink: optional random confirm delays, injected
// failures, and a check that no two messages of one key are unconfirmed at
// once (the lane rule).
type testSink struct {
	delay   time.Duration // max random delay before done; 0: done at once
	fail    func(o *Outgoing, attempt int) error
	block   chan struct{} // when non-nil, confirms wait for it to close
	blockOf string        // when set, only messages with this X-User-Id wait for block
	blockTo string        // when set, only messages to this subject wait for block
	mu      sync.Mutex
	got     []published
	tries   map[string]int
	pending map[string]int // key (X-User-Id) → unconfirmed publishes
	overlap atomic.Int64
	wg      sync.WaitGroup
}

func newTestSink() *testSink {
	return &testSink{tries: map[string]int{}, pending: map[string]int{}}
}

func (s *testSink) PublishAsync(ctx context.Context, o *Outgoing, done func(error)) {
	key := headerValue(o.Header, "X-User-Id")
	s.mu.Lock()
	s.tries[o.MsgID+"|"+o.Target.Subject]++
	attempt := s.tries[o.MsgID+"|"+o.Target.Subject]
	if key != "" {
		s.pending[key]++
		if s.pending[key] > 1 {
			s.overlap.Add(1)
		}
	}
	var err error
	if s.fail != nil {
		err = s.fail(o, attempt)
	}
	s.mu.Unlock()
	finish := func() {
		s.mu.Lock()
		if key != "" {
			s.pending[key]--
		}
		if err == nil {
			h := make(map[string][]string, len(o.Header))
			for k, v := range o.Header {
				h[k] = append([]string(nil), v...)
			}
			s.got = append(s.got, published{Subject: o.Target.Subject, MsgID: o.MsgID, Header: h, Body: string(o.Body)})
		}
		s.mu.Unlock()
		done(err)
	}
	if s.block != nil && (s.blockOf == "" || s.blockOf == key) && (s.blockTo == "" || s.blockTo == o.Target.Subject) {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			select {
			case <-s.block:
			case <-ctx.Done():
				err = ctx.Err()
			}
			finish()
		}()
		return
	}
	if s.delay > 0 {
		s.wg.Add(1)
		time.AfterFunc(time.Duration(rand.Int64N(int64(s.delay))), func() {
			defer s.wg.Done()
			finish()
		})
		return
	}
	finish()
}

func (s *testSink) Close(ctx context.Context) error {
	s.wg.Wait()
	return nil
}

func (s *testSink) published() []published {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]published(nil), s.got...)
}

// ackRec records what the pipeline did with one message.
type ackRec struct {
	mu         sync.Mutex
	final      []error
	inProgress int
	settled    chan struct{}
}

func (a *ackRec) ack(ctx context.Context, err error) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if errors.Is(err, ErrInProgress) {
		if len(a.final) > 0 {
			panic("in-progress after the final ack")
		}
		a.inProgress++
		return nil
	}
	a.final = append(a.final, err)
	if len(a.final) == 1 {
		close(a.settled)
	}
	return nil
}

func (a *ackRec) result(t testing.TB) error {
	t.Helper()
	select {
	case <-a.settled:
	case <-time.After(10 * time.Second):
		t.Fatal("message not settled within 10s")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.final) != 1 {
		t.Fatalf("settled %d times: %v", len(a.final), a.final)
	}
	return a.final[0]
}

func (a *ackRec) isSettled() bool {
	select {
	case <-a.settled:
		return true
	default:
		return false
	}
}

func (a *ackRec) beats() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.inProgress
}

var seq atomic.Int64

// msg builds a message of rule with X-User-Id key (omitted when ""), body
// and a unique SourceID.
func msg(rule, key, body string) (*Message, *ackRec) {
	h := map[string][]string{"X-Trace": {"abc"}}
	if key != "" {
		h["X-User-Id"] = []string{key}
	}
	n := seq.Add(1)
	m := &Message{
		Message:  router.Message{Subject: rule + ".x", Header: h, Body: []byte(body)},
		Rule:     rule,
		SourceID: fmt.Sprintf("S:%d", n),
		Source:   "test/" + rule,
		Time:     time.Now(),
	}
	return m, &ackRec{settled: make(chan struct{})}
}

type env struct {
	p     *Pipeline
	sink  *testSink
	hold  *router.Holder
	store dedupe.Store
}

func newEnv(t testing.TB, cfg Config, doc string, sink *testSink, store dedupe.Store) *env {
	t.Helper()
	if sink == nil {
		sink = newTestSink()
	}
	e := newEnvSinks(t, cfg, doc, map[string]*testSink{"nats": sink}, store)
	e.sink = sink
	return e
}

// newEnvSinks is newEnv with one test sink per broker name.
func newEnvSinks(t testing.TB, cfg Config, doc string, sinks map[string]*testSink, store dedupe.Store) *env {
	t.Helper()
	m := make(map[string]Sink, len(sinks))
	for name, s := range sinks {
		m[name] = s
	}
	return newEnvWith(t, cfg, doc, m, store)
}

// newEnvSink is newEnv with a sink that wraps a test sink (the env's sink
// field stays nil).
func newEnvSink(t testing.TB, cfg Config, doc string, sink Sink, store dedupe.Store) *env {
	t.Helper()
	return newEnvWith(t, cfg, doc, map[string]Sink{"nats": sink}, store)
}

func newEnvWith(t testing.TB, cfg Config, doc string, m map[string]Sink, store dedupe.Store) *env {
	t.Helper()
	if store == nil {
		store = dedupe.NewMemory(dedupe.MemoryConfig{})
	}
	h := router.NewHolder(table(t, doc))
	p, err := New(cfg, Deps{
		Rules: h, Dedupe: store, Sinks: StaticSinks(m),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = p.Close(ctx)
		for _, s := range m {
			_ = s.Close(ctx)
		}
		_ = store.Close(ctx)
	})
	return &env{p: p, hold: h, store: store}
}

// eventually polls cond until it holds or 10s pass.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	poll.Eventually(t, 10*time.Second, what, cond)
}
