package rmq

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/retry"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
)

// healthRec records what a Source reports and feeds it into a real
// bridge.Health, as the application does.
type healthRec struct {
	h       *bridge.Health
	rule    string
	mu      sync.Mutex
	failing []error // every OnFailing call, in order (nil: cleared)
	conn    []bool
	backlog []int64
	reqErrs []*retry.AttemptError
}

func newHealthRec(rule string) *healthRec {
	return &healthRec{h: bridge.NewHealth(nil, nil, nil), rule: rule}
}

// wire sets the source callbacks of cfg.
func (r *healthRec) wire(cfg SourceConfig) SourceConfig {
	cfg.OnFailing = func(err error) {
		r.mu.Lock()
		r.failing = append(r.failing, err)
		r.mu.Unlock()
		r.h.SourceFailing(r.rule, err)
	}
	cfg.OnConnection = func(up bool) {
		r.mu.Lock()
		r.conn = append(r.conn, up)
		r.mu.Unlock()
		r.h.ConnectionChanged("rmq-test", bridge.RoleSource, up)
	}
	cfg.Backlog = func(n int64) {
		r.mu.Lock()
		r.backlog = append(r.backlog, n)
		r.mu.Unlock()
		r.h.Backlog(r.rule, n)
	}
	cfg.OnRequestError = func(err error) {
		var ae *retry.AttemptError
		if errors.As(err, &ae) {
			r.mu.Lock()
			r.reqErrs = append(r.reqErrs, ae)
			r.mu.Unlock()
		}
	}
	// Fast probes for the tests.
	cfg.ProbeInterval = 100 * time.Millisecond
	cfg.ProbeTimeout = time.Second
	return cfg
}

// lastFailing returns the failure reported last (nil: none or cleared)
// and whether any was reported.
func (r *healthRec) lastFailing() (error, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.failing) == 0 {
		return nil, false
	}
	return r.failing[len(r.failing)-1], true
}

// connUp returns the connection state reported last and whether any was.
func (r *healthRec) connUp() (bool, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.conn) == 0 {
		return false, false
	}
	return r.conn[len(r.conn)-1], true
}

func (r *healthRec) lastBacklog() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.backlog) == 0 {
		return -1
	}
	return r.backlog[len(r.backlog)-1]
}

func (r *healthRec) requestErrors(op string) []*retry.AttemptError {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*retry.AttemptError
	for _, e := range r.reqErrs {
		if e.Op == op {
			out = append(out, e)
		}
	}
	return out
}

// readyReasons returns the reasons /readyz would give (the pipeline is not
// started in these tests, so "pipeline not started" is always among them).
func (r *healthRec) readyReasons() string {
	_, why := r.h.Ready()
	return why
}

func sendN(t *testing.T, b *rmqtest.Broker, topic string, n int, tag string) {
	t.Helper()
	var ms []*primitive.Message
	for i := range n {
		m := msg(topic, fmt.Sprintf("%s-%03d", tag, i))
		if tag != "" {
			m.WithTag(tag)
		}
		ms = append(ms, m)
	}
	send(t, b, ms...)
}

// A source whose broker goes down reports it: the source fails (with
// nothing pending: wrapped in bridge.ErrNothingPending, so that the source
// reason alone does not hold readiness) and its connection goes down;
// both clear when the broker is back.
func TestSourceHealthBrokerDownIdle(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic = "hdown"
	if err := b.CreateTopic(topic, 2); err != nil {
		t.Fatal(err)
	}
	sendN(t, b, topic, 4, "")
	rec := newHealthRec("r")
	src, err := NewSource(brokerConfig(b), rec.wire(SourceConfig{Rule: "r", Topic: topic, Group: "cg-hdown"}), testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	msgs := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
	runSource(t, b, src, msgs.handle)
	waitFor(t, 15*time.Second, "4 messages", func() bool { return len(msgs.snapshot()) == 4 })
	// Both queues assigned, with the consumer's offsets past the 4.
	waitFor(t, 10*time.Second, "connection up, both queues consumed, backlog 0, active", func() bool {
		up, ok := rec.connUp()
		qs := src.Queues()
		return ok && up && len(qs) == 2 && qs[0].Assigned && qs[1].Assigned && qs[0].Offset+qs[1].Offset == 4 &&
			rec.lastBacklog() == 0 && src.SourceStatus().State == stateActive
	})
	if err, _ := rec.lastFailing(); err != nil {
		t.Fatalf("failing while the broker answers: %v", err)
	}
	// Idle: answers showing nothing pending for two probe intervals.
	waitFor(t, 10*time.Second, "the source to count as idle", src.idle.idle)

	if err := b.Down(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the failure and the connection down", func() bool {
		err, _ := rec.lastFailing()
		up, _ := rec.connUp()
		return err != nil && !up
	})
	ferr, _ := rec.lastFailing()
	if !errors.Is(ferr, bridge.ErrNothingPending) {
		t.Errorf("idle source's failure %q does not wrap ErrNothingPending", ferr)
	}
	if !strings.Contains(ferr.Error(), "broker-a") {
		t.Errorf("failure %q does not name the broker", ferr)
	}
	if st := src.SourceStatus(); st.State != stateFailing || st.Rule != "r" {
		t.Errorf("status %+v, want failing", st)
	}
	why := rec.readyReasons()
	if strings.Contains(why, "source of rule r") {
		t.Errorf("an idle source's failure holds readiness: %q", why)
	}
	if !strings.Contains(why, "source connection to broker rmq-test is down") {
		t.Errorf("readiness does not show the connection down: %q", why)
	}
	if errs := rec.requestErrors(retry.OpConsumerInfo); len(errs) == 0 || errs[0].Broker != "rmq-test" {
		t.Errorf("probe failures reported as request errors: %v", errs)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Up(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the failure cleared and the connection up", func() bool {
		err, _ := rec.lastFailing()
		up, _ := rec.connUp()
		return err == nil && up
	})
	if st := src.SourceStatus(); st.State != stateActive {
		t.Errorf("status %+v after recovery, want active", st)
	}
	// The source delivers again.
	sendN(t, b, topic, 2, "after")
	waitFor(t, 20*time.Second, "messages sent after the outage", func() bool { return len(msgs.snapshot()) >= 6 })
}

// A source with messages waiting whose broker goes down fails without
// ErrNothingPending: the failure holds readiness.
func TestSourceHealthBrokerDownPending(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic = "hpending"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	sendN(t, b, topic, 3, "")
	rec := newHealthRec("r")
	src, err := NewSource(brokerConfig(b), rec.wire(SourceConfig{Rule: "r", Topic: topic, Group: "cg-hpending"}), testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	msgs := newRecorder(nil) // nothing is settled: the messages wait
	runSource(t, b, src, msgs.handle)
	waitFor(t, 15*time.Second, "3 messages and a backlog of 3", func() bool {
		return len(msgs.snapshot()) == 3 && rec.lastBacklog() == 3
	})
	if err := b.Down(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the failure", func() bool { err, _ := rec.lastFailing(); return err != nil })
	ferr, _ := rec.lastFailing()
	if errors.Is(ferr, bridge.ErrNothingPending) {
		t.Errorf("failure %q with 3 messages waiting wraps ErrNothingPending", ferr)
	}
	if why := rec.readyReasons(); !strings.Contains(why, "source of rule r: ") {
		t.Errorf("the failure does not hold readiness: %q", why)
	}
	if rec.lastBacklog() != 3 {
		t.Errorf("backlog %d while down, want the last seen 3", rec.lastBacklog())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.Up(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the failure cleared", func() bool { err, ok := rec.lastFailing(); return ok && err == nil })
	for _, g := range msgs.snapshot() {
		_ = g.ack(context.Background(), nil)
	}
	waitFor(t, 10*time.Second, "backlog 0 once settled", func() bool { return rec.lastBacklog() == 0 })
}

// A source that cannot start (its topic does not exist yet; its name
// server does not answer) fails with the reason until it started and its
// broker answered.
func TestSourceHealthCannotStart(t *testing.T) {
	t.Run("topic missing", func(t *testing.T) {
		b := startBroker(t, rmqtest.Options{})
		rec := newHealthRec("r")
		src, err := NewSource(brokerConfig(b), rec.wire(SourceConfig{Rule: "r", Topic: "misspelt", Group: "cg-nostart",
			StartRetry: 50 * time.Millisecond}), testLog(t))
		if err != nil {
			t.Fatal(err)
		}
		msgs := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
		runSource(t, b, src, msgs.handle)
		waitFor(t, 10*time.Second, "a start failure", func() bool { err, _ := rec.lastFailing(); return err != nil })
		ferr, _ := rec.lastFailing()
		if !strings.Contains(ferr.Error(), "cannot start") || !strings.Contains(ferr.Error(), "misspelt") ||
			errors.Is(ferr, bridge.ErrNothingPending) {
			t.Errorf("failure %q", ferr)
		}
		if why := rec.readyReasons(); !strings.Contains(why, "source of rule r: rocketmq consumer cannot start") {
			t.Errorf("readiness: %q", why)
		}
		if st := src.SourceStatus(); st.State != stateStarting {
			t.Errorf("status %+v, want starting", st)
		}
		if errs := rec.requestErrors(retry.OpConsumerCreate); len(errs) == 0 {
			t.Error("start attempts not reported as request errors")
		}
		send(t, b, msg("misspelt", "x")) // the topic appears
		waitFor(t, 15*time.Second, "the message and the failure cleared", func() bool {
			err, _ := rec.lastFailing()
			return err == nil && len(msgs.snapshot()) == 1
		})
	})
	t.Run("name server down", func(t *testing.T) {
		b := startBroker(t, rmqtest.Options{})
		const topic = "nsdown"
		if err := b.CreateTopic(topic, 1); err != nil {
			t.Fatal(err)
		}
		sendN(t, b, topic, 1, "")
		if err := b.Down(); err != nil {
			t.Fatal(err)
		}
		rec := newHealthRec("r")
		src, err := NewSource(brokerConfig(b), rec.wire(SourceConfig{Rule: "r", Topic: topic, Group: "cg-nsdown",
			StartRetry: 100 * time.Millisecond}), testLog(t))
		if err != nil {
			t.Fatal(err)
		}
		msgs := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
		runSource(t, b, src, msgs.handle)
		waitFor(t, 10*time.Second, "a start failure", func() bool { err, _ := rec.lastFailing(); return err != nil })
		if ferr, _ := rec.lastFailing(); !strings.Contains(ferr.Error(), "cannot start") {
			t.Errorf("failure %q", ferr)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Up(ctx); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 20*time.Second, "the message and the failure cleared", func() bool {
			err, _ := rec.lastFailing()
			return err == nil && len(msgs.snapshot()) == 1
		})
	})
}

// The backlog counts the queues assigned now: a queue a rebalance gave to
// another consumer of the group leaves it (it used to keep its last value,
// which held readiness once progressTimeout passed).
func TestSourceBacklogAssignedQueuesOnly(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic, group = "rebal", "cg-rebal"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	sendN(t, b, topic, 20, "")
	// Queues go to the group's consumers in the order of their client ids
	// (IP@instance name): "aa-..." (second) sorts before "zz-..." (first),
	// so the second takes the only queue from the first.
	bcFirst, bcSecond := brokerConfig(b), brokerConfig(b)
	bcFirst.InstancePrefix, bcSecond.InstancePrefix = "zz", "aa"

	recA := newHealthRec("r")
	srcA, err := NewSource(bcFirst, recA.wire(SourceConfig{Rule: "r", Topic: topic, Group: group, FetchBatch: 1}), testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	var once sync.Once
	releaseA := func() { once.Do(func() { close(release) }) }
	t.Cleanup(releaseA)
	msgsA := newRecorder(nil)
	blocking := func(ctx context.Context, m *bridge.Message, ack bridge.Ack) error {
		_ = msgsA.handle(ctx, m, ack)
		select { // the first consumer is stuck on its first message
		case <-release:
			return ack(ctx, nil)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	runSource(t, b, srcA, blocking)
	waitFor(t, 15*time.Second, "the first consumer's backlog", func() bool {
		return len(msgsA.snapshot()) == 1 && recA.lastBacklog() == 20
	})

	recB := newHealthRec("r")
	srcB, err := NewSource(bcSecond, recB.wire(SourceConfig{Rule: "r", Topic: topic, Group: group}), testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	msgsB := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
	runSource(t, b, srcB, msgsB.handle)
	waitFor(t, 20*time.Second, "the second consumer to read all 20", func() bool { return len(msgsB.snapshot()) >= 20 })
	releaseA()
	// The first consumer has no queue left, the second has the only one,
	// consumed to its end: both backlogs are 0.
	waitFor(t, 10*time.Second, "both backlogs 0", func() bool {
		qa, qb := srcA.Queues(), srcB.Queues()
		return len(qa) == 1 && !qa[0].Assigned && len(qb) == 1 && qb[0].Assigned && qb[0].Offset == 20 &&
			recA.lastBacklog() == 0 && recB.lastBacklog() == 0
	})
	if err, _ := recA.lastFailing(); err != nil {
		t.Errorf("first consumer failing: %v", err)
	}
}

// With a tag filter the backlog is what waits beyond the consumer's
// offset, which the client moves past the messages the broker skipped: it
// reaches 0 once the matching ones are settled (it used to count the other
// tags' messages after the last match forever).
func TestSourceBacklogTagFilter(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic = "tagged"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	sendN(t, b, topic, 3, "A")
	sendN(t, b, topic, 10, "B")
	rec := newHealthRec("r")
	src, err := NewSource(brokerConfig(b), rec.wire(SourceConfig{Rule: "r", Topic: topic, Tags: "A", Group: "cg-tagged"}), testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	msgs := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
	runSource(t, b, src, msgs.handle)
	waitFor(t, 15*time.Second, "the 3 tagged messages", func() bool { return len(msgs.snapshot()) == 3 })
	// The consumer's offset moves past the skipped messages (13), and
	// nothing is left in the backlog.
	waitFor(t, 15*time.Second, "offset 13 and backlog 0", func() bool {
		qs := src.Queues()
		return len(qs) == 1 && qs[0].Assigned && qs[0].Offset == 13 && rec.lastBacklog() == 0
	})
	for _, g := range msgs.snapshot() {
		if !strings.HasPrefix(string(g.m.Body), "A-") {
			t.Errorf("delivered %q", g.m.Body)
		}
	}
}
