package bridge

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

// Drain: intake stops, queued and parked messages are negatively acked, the
// message whose publish started is acked once the sink confirms.
func TestDrainFinishesInFlightNacksTheRest(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{})
	e := newEnv(t, Config{}, rulesDoc(1, `"40-44"`, 0), s, nil)
	a1 := handle(t, e, "t", keyFor(10, 1), "a1") // publishing
	a2 := handle(t, e, "t", keyFor(10, 1), "a2") // queued
	h1 := handle(t, e, "t", keyFor(42, 2), "h1") // parked
	closed := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		closed <- e.p.Close(ctx)
	}()
	for _, x := range []*ackRec{a2, h1} {
		if err := x.result(t); !errors.Is(err, errDraining) {
			t.Fatalf("queued/parked message: %v, want a negative ack", err)
		}
	}
	if a1.isSettled() {
		t.Fatal("in-flight message settled before the sink confirmed")
	}
	late := handle(t, e, "t", keyFor(11, 3), "late")
	if err := late.result(t); err == nil {
		t.Fatal("message handed over during drain was acked")
	}
	close(s.block)
	if err := a1.result(t); err != nil {
		t.Fatalf("in-flight message: %v", err)
	}
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if got := s.published(); len(got) != 1 || got[0].Body != "a1" {
		t.Fatalf("published %+v", got)
	}
}

// At the drain deadline unconfirmed messages are negatively acked, never
// acked, and Close says how many.
func TestDrainDeadlineNacks(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{}) // never confirms
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), s, nil)
	a1 := handle(t, e, "t", keyFor(10, 1), "a1")
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := e.p.Close(ctx)
	if err == nil || !strings.Contains(err.Error(), "1 messages unconfirmed") {
		t.Fatalf("Close: %v", err)
	}
	if r := a1.result(t); r == nil {
		t.Fatal("unconfirmed message acked")
	}
}

// A source blocked in Handle on the in-flight budget is released by ctx.
func TestHandleBackPressureHonoursCtx(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{})
	defer close(s.block)
	e := newEnv(t, Config{MaxInFlight: 1}, rulesDoc(1, "", 0), s, nil)
	handle(t, e, "t", keyFor(10, 1), "a1")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	m, a := msg("t", keyFor(11, 2), "a2")
	if err := e.p.Handle(ctx, m, a.ack); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Handle: %v", err)
	}
	if r := a.result(t); r == nil {
		t.Fatal("message refused by back-pressure was acked")
	}
}

// A message that waits in Handle for an in-flight slot is not tracked yet,
// so the pipeline's heartbeat does not see it: the wait itself sends it
// ErrInProgress every AckWait/4, so that its source does not redeliver it
// while the budget is full (a target failing for longer than AckWait).
func TestWaitingForASlotKeepsTheMessageAlive(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{})
	e := newEnv(t, Config{MaxInFlight: 1, AckWait: 40 * time.Millisecond}, rulesDoc(1, "", 0), s, nil)
	handle(t, e, "t", keyFor(10, 1), "a1")
	m, a := msg("t", keyFor(11, 2), "a2")
	done := make(chan error, 1)
	go func() { done <- e.p.Handle(context.Background(), m, a.ack) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		a.mu.Lock()
		n := a.inProgress
		a.mu.Unlock()
		if n >= 3 {
			break
		}
		if time.Now().After(deadline) {
			close(s.block)
			t.Fatalf("%d in-progress acks for a message waiting for a slot, want at least 3", n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("Handle returned while the budget was full: %v", err)
	default:
	}
	close(s.block)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if r := a.result(t); r != nil {
		t.Fatalf("the waiting message settled with %v, want nil", r)
	}
}

// A rule whose messages only wait for in-flight slots, taken by another
// rule's stuck target, is stalled too: its stall age and oldest
// unacknowledged age grow with the wait (an ordered source then gives its
// consumer to a replica with free slots), though none of its messages is
// tracked yet.
func TestSlotWaitCountsInTheStallAge(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{})
	s.blockTo = "cell.rz00.t"
	e := newEnv(t, Config{MaxInFlight: 1, StallTimeout: 100 * time.Millisecond}, rulesDoc(1, "", 0), s, nil)
	handle(t, e, "t", keyFor(10, 1), "t1") // holds the only slot
	m, a := msg("g", keyFor(11, 2), "g1")
	done := make(chan error, 1)
	go func() { done <- e.p.Handle(context.Background(), m, a.ack) }()
	g := e.p.ruleState("g")
	deadline := time.Now().Add(10 * time.Second)
	for {
		g.mu.Lock()
		n := len(g.waiting)
		g.mu.Unlock()
		if n == 1 {
			break
		}
		if time.Now().After(deadline) {
			close(s.block)
			t.Fatal("g's message is not seen waiting for a slot")
		}
		time.Sleep(time.Millisecond)
	}
	now := SystemClock.Now().UnixNano() + int64(7*time.Second) // seven seconds on

	if age, slot := g.stallAge(now); time.Duration(age) < 7*time.Second || !slot {
		t.Errorf("g's stall age %v (slot %v) while its message waited 7s for a slot", time.Duration(age), slot)
	}
	if _, oldest := g.snapshot(now); oldest < 7 {
		t.Errorf("g's oldest unacknowledged age %.1fs, want at least 7s", oldest)
	}
	// /readyz says what g waits for, not that a message is unsettled.
	var why string
	for end := time.Now().Add(10 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if _, why = e.p.Health().Ready(); strings.Contains(why, "rule g: a message has waited ") {
			break
		}
	}
	if !strings.Contains(why, "rule g: a message has waited ") || !strings.Contains(why, "for an in-flight slot (pipeline.maxInFlight is taken") {
		t.Errorf("/readyz while g waits for a slot: %q", why)
	}
	close(s.block)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if r := a.result(t); r != nil {
		t.Fatalf("g's message settled with %v", r)
	}
	g.mu.Lock()
	left := len(g.waiting)
	g.mu.Unlock()
	if left != 0 {
		t.Errorf("%d waiters left after the slot was taken", left)
	}
}

// chanSource is a Source over a channel, for Run.
type chanSource struct{ ch chan *Message }

func (c *chanSource) Run(ctx context.Context, h Handler) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case m := <-c.ch:
			if err := h(ctx, m, func(context.Context, error) error { return nil }); err != nil {
				return nil
			}
		}
	}
}
func (c *chanSource) Close(context.Context) error { return nil }

var _ Source = (*chanSource)(nil)

func TestRunAndReadiness(t *testing.T) {
	e := newEnv(t, Config{ProgressTimeout: 30 * time.Millisecond}, rulesDoc(1, "", 0), nil, nil)
	src := &chanSource{ch: make(chan *Message)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.p.Run(ctx, src) }()
	m, _ := msg("t", keyFor(5, 1), "x")
	src.ch <- m
	eventually(t, "forwarded", func() bool { return len(e.sink.published()) == 1 })
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	h := e.p.Health()
	h.ConnectionChanged("nats", RoleSource, true)
	if ok, why := h.Ready(); !ok {
		t.Fatalf("not ready: %s", why)
	}
	h.ConnectionChanged("nats", RoleSink, false)
	if ok, why := h.Ready(); ok || !strings.Contains(why, "sink connection to broker nats is down") {
		t.Fatalf("ready=%v %q", ok, why)
	}
	h.ConnectionChanged("nats", RoleSink, true)
	h.Backlog("t", 10)
	eventually(t, "stuck backlog reported", func() bool {
		ok, why := h.Ready()
		return !ok && strings.Contains(why, "rule t: 10 messages waiting at the source but nothing forwarded")
	})
	if v := value(e.p.met.Ready); v != 0 {
		t.Fatalf("ready gauge %v", v)
	}
	h.Backlog("t", 0)
	// Ready again once recoverHold passed without a problem, not at the
	// first answer without one.
	if ok, why := h.Ready(); ok || !strings.Contains(why, "recovering: rule t: 10 messages waiting") {
		t.Fatalf("ready=%v %q right after the backlog moved, want recovering", ok, why)
	}
	eventually(t, "ready recoverHold after the last problem", func() bool { ok, _ := h.Ready(); return ok })
}

func TestHTTP(t *testing.T) {
	e := newEnv(t, Config{}, rulesDoc(4, "", 0), nil, nil)
	a := handle(t, e, "t", keyFor(60, 1), "x")
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(NewHTTP(e.p))
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tc := range []struct {
		path string
		code int
		want string
	}{
		{"/healthz", 200, "ok"},
		{"/readyz", 200, "ready"},
		{"/route?topic=t&key=" + keyFor(60, 9), 200, `"cell": "rz01"`},
		{"/route?topic=t&key=", 200, `"reason": "dlq"`},
		{"/route?key=1", 400, "missing query parameter topic"},
		{"/route?topic=zzz&key=1", 400, `unknown topic rule "zzz"; known rules: g, t`},
		{"/route?topic=t", 400, "missing query parameter key"},
		{"/status", 200, `"rulesVersion": 4`},
		{"/metrics", 200, `cellbridge_forwarded_total{cell="rz01",rule="t"} 1`},
	} {
		code, body := get(tc.path)
		if code != tc.code || !strings.Contains(body, tc.want) {
			t.Errorf("%s: %d %q, want %d containing %q", tc.path, code, body, tc.code, tc.want)
		}
	}
	_, body := get("/route?topic=t&key=" + keyFor(60, 9))
	var d router.Decision
	if err := json.Unmarshal([]byte(body), &d); err != nil || d.Target.Subject != "cell.rz01.t" || d.Version != 4 {
		t.Fatalf("decision %+v %v", d, err)
	}
}

// MetricList names exactly the collectors of Metrics.
func TestMetricListMatchesCollectors(t *testing.T) {
	m := NewMetrics("test")
	re := regexp.MustCompile(`fqName: "([^"]+)".*variableLabels: \{([^}]*)\}`)
	got := map[string]string{}
	v := reflect.ValueOf(m).Elem()
	for i := range v.NumField() {
		if !v.Type().Field(i).IsExported() {
			continue
		}
		c, ok := v.Field(i).Interface().(prometheus.Collector)
		if !ok || v.Type().Field(i).Name == "Registry" {
			continue
		}
		ch := make(chan *prometheus.Desc, 4)
		c.Describe(ch)
		close(ch)
		for d := range ch {
			sm := re.FindStringSubmatch(d.String())
			if sm == nil {
				t.Fatalf("cannot parse %s", d)
			}
			got[sm[1]] = sm[2]
		}
	}
	for _, d := range MetricList {
		labels := append([]string(nil), d.Labels...)
		sort.Strings(labels)
		l, ok := got[d.Name]
		if !ok {
			t.Errorf("%s listed but not collected", d.Name)
			continue
		}
		have := strings.Split(l, ",")
		if l == "" {
			have = nil
		}
		sort.Strings(have)
		if strings.Join(have, ",") != strings.Join(labels, ",") {
			t.Errorf("%s labels %v, listed %v", d.Name, have, labels)
		}
		if !strings.HasPrefix(d.Name, "cellbridge_") {
			t.Errorf("%s lacks the prefix", d.Name)
		}
		delete(got, d.Name)
	}
	for n := range got {
		t.Errorf("%s collected but not in MetricList", n)
	}
}

func TestConfigValidateNamesFields(t *testing.T) {
	err := Config{MaxInFlight: -1, Retry: RetryConfig{Initial: time.Second, Max: time.Millisecond}}.WithDefaults().Validate()
	if err == nil || !strings.Contains(err.Error(), "pipeline.maxInFlight") || !strings.Contains(err.Error(), "pipeline.retry.max") {
		t.Fatalf("%v", err)
	}
}

// A sink connection down holds readiness only while the running rules
// publish to its broker: a broker that only a cell marked down uses (its
// data centre lost) leaves every replica ready; one that a DLQ or a cell
// not down uses does not.
func TestReadinessIgnoresSinkOfDownCells(t *testing.T) {
	doc := func(version int, cbState string) string {
		return fmt.Sprintf(`kind: CellMap
version: %d
shards: 4
cells:
  - {name: ca, state: active, failover: cc, shards: ["0-1"]}
  - {name: cb, state: %s, failover: ca, shards: ["2-3"]}
  - {name: cc}
---
kind: TopicRule
name: t
source: {broker: nats, stream: T, subject: "t.>"}
key: {header: X-User-Id}
shard: {func: mod}
target: {broker: "nats-{cell}", subject: "cell.{cell}.t"}
dlq: {broker: nats, subject: dlq.t}
`, version, cbState)
	}
	e := newEnv(t, Config{}, doc(1, "active"), nil, nil)
	h := e.p.Health()
	h.ConnectionChanged("nats-cb", RoleSink, false)
	if ok, why := h.Ready(); ok || !strings.Contains(why, "sink connection to broker nats-cb is down") {
		t.Fatalf("cb active: ready=%v %q", ok, why)
	}
	needed := func(broker string) float64 {
		return value(e.p.met.ConnectionNeeded.WithLabelValues(broker, RoleSink))
	}
	if v := needed("nats-cb"); v != 1 {
		t.Errorf("cellbridge_connection_needed for cb's broker while cb is active: %v, want 1", v)
	}
	e.hold.Store(table(t, doc(2, "down")))
	eventually(t, "ready with cb marked down", func() bool { ok, _ := h.Ready(); return ok })
	// The alert on the lost connection follows: its broker is no longer needed.
	eventually(t, "cb's broker not needed", func() bool { return needed("nats-cb") == 0 })
	h.ConnectionChanged("nats", RoleSink, false) // the DLQ's broker
	if v := needed("nats"); v != 1 {
		t.Errorf("cellbridge_connection_needed for the DLQ's broker: %v, want 1", v)
	}
	if ok, why := h.Ready(); ok || !strings.Contains(why, "sink connection to broker nats is down") {
		t.Fatalf("DLQ broker down: ready=%v %q", ok, why)
	}
}

// cellbridge_dedupe_evictions_total reads the memory store's count, 0
// before one is set (the jetstream store).
func TestDedupeEvictionsMetric(t *testing.T) {
	m := NewMetrics("test")
	if v := value(m.DedupeEvictions); v != 0 {
		t.Fatalf("evictions %v without a memory store", v)
	}
	mem := dedupe.NewMemory(dedupe.MemoryConfig{Size: 64}) // one key per shard
	m.SetDedupeEvictions(mem.Evictions)
	for i := range 1000 {
		if err := mem.Commit(context.Background(), fmt.Sprint("k", i)); err != nil {
			t.Fatal(err)
		}
	}
	if v, n := value(m.DedupeEvictions), mem.Evictions(); n == 0 || v != float64(n) {
		t.Fatalf("metric %v, store's evictions %d (want equal, above 0)", v, n)
	}
}
