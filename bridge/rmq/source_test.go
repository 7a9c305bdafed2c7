package rmq

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
)

func TestSourceMessageFields(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic = "orders"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	m := msg(topic, `{"user":{"id":"42"}}`, "X-User-Id", "2088000000000042", "Cell-Msg-Id", "upstream-1")
	m.WithTag("A")
	m.WithKeys([]string{"k1", "k2"})
	other := msg(topic, "skipped")
	other.WithTag("B")
	before := time.Now().Add(-time.Second)
	send(t, b, m, other, msg(topic, "plain"))

	src, err := NewSource(brokerConfig(b), SourceConfig{Rule: "orders", Topic: topic, Tags: "A", Group: "cg-fields"}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
	runSource(t, b, src, rec.handle)
	waitFor(t, 15*time.Second, "the tagged message", func() bool { return len(rec.snapshot()) >= 1 })

	g := rec.snapshot()[0].m
	stored := b.Messages(topic)[0]
	if g.Rule != "orders" || g.Subject != topic || string(g.Body) != `{"user":{"id":"42"}}` {
		t.Fatalf("rule/subject/body: %+v", g)
	}
	if g.Source != "rmq-test/"+topic {
		t.Errorf("Source = %q", g.Source)
	}
	if g.SourceID != stored.Properties[primitive.PropertyUniqueClientMessageIdKeyIndex] || g.SourceID == "" {
		t.Errorf("SourceID = %q, want UNIQ_KEY %q", g.SourceID, stored.Properties["UNIQ_KEY"])
	}
	if g.Keys != "k1 k2" {
		t.Errorf("Keys = %q", g.Keys)
	}
	if g.Time.Before(before) || g.Time.After(time.Now()) {
		t.Errorf("Time = %v", g.Time)
	}
	if g.Deliveries != 1 {
		t.Errorf("Deliveries = %d", g.Deliveries)
	}
	if v := g.Header["X-User-Id"]; len(v) != 1 || v[0] != "2088000000000042" {
		t.Errorf("header X-User-Id = %v", v)
	}
	if v := g.Header["Cell-Msg-Id"]; len(v) != 1 || v[0] != "upstream-1" {
		t.Errorf("header Cell-Msg-Id = %v", v)
	}
	// The tag and keys travel as headers of their names (a RocketMQ sink
	// gives them back to the copy); no other system property does.
	if v := g.Header["TAGS"]; len(v) != 1 || v[0] != "A" {
		t.Errorf("header TAGS = %v", v)
	}
	if v := g.Header["KEYS"]; len(v) != 1 || v[0] != "k1 k2" {
		t.Errorf("header KEYS = %v", v)
	}
	for k := range g.Header {
		if systemProps[k] && !passedProps[k] {
			t.Errorf("system property %s passed on as a header", k)
		}
	}
}

// Offsets never pass a message the pipeline has not settled with nil: a
// message left unsettled at shutdown is read again by the group.
func TestSourceOffsetStopsAtUnsettled(t *testing.T) {
	const topic, group = "offsets", "cg-offsets"
	b := startBrokerWith(t, topic, 10)

	src, err := NewSource(brokerConfig(b), SourceConfig{Rule: "r", Topic: topic, Group: group, FetchBatch: 1}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder(func(m *bridge.Message) (error, bool) {
		return nil, string(m.Body) != seqBody(3) // m003 stays in the pipeline
	})
	stop := runSource(t, b, src, rec.handle)
	waitFor(t, 15*time.Second, "10 messages", func() bool { return len(rec.snapshot()) == 10 })
	if got := bodies(rec.snapshot()); strings.Join(got, ",") != "m000,m001,m002,m003,m004,m005,m006,m007,m008,m009" {
		t.Fatalf("order: %v", got)
	}
	stop()
	// Settled after the source stopped: dropped, not acknowledged.
	_ = rec.snapshot()[3].ack(context.Background(), errors.New("draining"))
	// Close persists with a oneway request: poll for the broker to store it.
	waitCommitted(t, b, group, topic, 3) // the first unsettled message

	// The group's next consumer starts at the unsettled message.
	src2, err := NewSource(brokerConfig(b), SourceConfig{Rule: "r", Topic: topic, Group: group}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	rec2 := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
	stop2 := runSource(t, b, src2, rec2.handle)
	waitFor(t, 15*time.Second, "the redelivery", func() bool { return len(rec2.snapshot()) == 7 })
	if got := bodies(rec2.snapshot()); got[0] != seqBody(3) {
		t.Fatalf("second consumer starts at %v", got)
	}
	stop2()
	waitCommitted(t, b, group, topic, 10)
}

// Acknowledged offsets reach the broker while the source runs, within a
// few PersistInterval (the client alone sends them 10s after start, then
// every 5s): a crash re-reads little. They never pass an unsettled message.
func TestSourcePersistsOffsetsPromptly(t *testing.T) {
	const topic, group = "persisted", "cg-persisted"
	b := startBrokerWith(t, topic, 20)
	src, err := NewSource(brokerConfig(b), SourceConfig{Rule: "r", Topic: topic, Group: group, FetchBatch: 4,
		PersistInterval: 100 * time.Millisecond}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	var hold atomic.Bool
	hold.Store(true)
	rec := newRecorder(func(m *bridge.Message) (error, bool) {
		return nil, !hold.Load() || string(m.Body) != seqBody(13) // m013 stays in the pipeline for now
	})
	runSource(t, b, src, rec.handle)
	waitFor(t, 15*time.Second, "20 messages", func() bool { return len(rec.snapshot()) == 20 })
	// While running (waitCommitted polls for 5s): the batch of m012..m015
	// is not complete, so the offset stops at m012.
	waitCommitted(t, b, group, topic, 12)
	_ = rec.snapshot()[13].ack(context.Background(), nil)
	waitCommitted(t, b, group, topic, 20)
}

// A hold or a plain negative ack hands the message again (locally, with
// Deliveries counting up); the offset moves only after the final nil.
func TestSourceHoldAndNack(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic, group = "held", "cg-held"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	send(t, b, msg(topic, "held"), msg(topic, "nacked"), msg(topic, "fine"))
	src, err := NewSource(brokerConfig(b), SourceConfig{Rule: "r", Topic: topic, Group: group, Redeliver: 20 * time.Millisecond}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	var release atomic.Bool
	rec := newRecorder(func(m *bridge.Message) (error, bool) {
		switch {
		case m.Deliveries > 1:
			return nil, true
		case string(m.Body) == "held":
			return bridge.Hold(50 * time.Millisecond), true
		case string(m.Body) == "nacked":
			return errors.New("sink down"), true
		case release.Load():
			return nil, true
		}
		return bridge.ErrInProgress, true // not final: must not count
	})
	stop := runSource(t, b, src, rec.handle)
	waitFor(t, 15*time.Second, "redeliveries", func() bool { return len(rec.snapshot()) >= 5 })
	gs := rec.snapshot()
	n := map[string]int{}
	for _, g := range gs {
		n[string(g.m.Body)] = max(n[string(g.m.Body)], g.m.Deliveries)
	}
	if n["held"] != 2 || n["nacked"] != 2 || n["fine"] != 1 {
		t.Fatalf("deliveries: %v", n)
	}
	// "fine" only got ErrInProgress: the batch is open, the offset stays.
	// (A rebalance at start may hand a queue's messages again; settle
	// every delivery of "fine".)
	if off, _ := b.CommittedOffset(group, topic, 0); off != 0 {
		t.Fatalf("committed offset %d while a message is unsettled", off)
	}
	release.Store(true)
	for _, g := range rec.snapshot() {
		if string(g.m.Body) == "fine" {
			_ = g.ack(context.Background(), nil)
		}
	}
	stop()
	waitCommitted(t, b, group, topic, 3)
}

func TestSourceWaitsForTopic(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	var failing atomic.Pointer[error] // the last OnFailing (nil: none yet)
	src, err := NewSource(brokerConfig(b), SourceConfig{Rule: "r", Topic: "late", Group: "cg-late", StartRetry: 50 * time.Millisecond,
		OnFailing: func(err error) { failing.Store(&err) }}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	rec := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
	runSource(t, b, src, rec.handle)
	// While it cannot start, the source says why (the pipeline's health:
	// not ready, cellbridge_source_failing).
	waitFor(t, 15*time.Second, "the source failing", func() bool {
		f := failing.Load()
		return f != nil && *f != nil && strings.Contains((*f).Error(), "rocketmq consumer cannot start (topic late, group cg-late")
	})
	send(t, b, msg("late", "x"))
	waitFor(t, 15*time.Second, "the message of a topic created after start", func() bool { return len(rec.snapshot()) == 1 })
	if f := failing.Load(); f == nil || *f != nil {
		t.Fatalf("failing after the start: %v", f)
	}
}

func TestBrokerConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		ns   []string
		want string
	}{
		{nil, "at least one"},
		{[]string{"localhost:9876"}, "not an IP address"},
		{[]string{"10.0.0.1"}, "want IP:port"},
		{[]string{"10.0.0.1:0"}, "bad port"},
		{[]string{"10.0.0.1:9876", "[::1]:9876"}, ""},
	} {
		err := BrokerConfig{Name: "x", NameServers: tc.ns}.Validate()
		if (tc.want == "") != (err == nil) || (err != nil && !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%v: err = %v, want %q", tc.ns, err, tc.want)
		}
	}
	if err := (BrokerConfig{Name: "x", NameServers: []string{"1.2.3.4:1"}, AccessKey: "a"}).Validate(); err == nil {
		t.Error("accessKey without secretKey accepted")
	}
}

// waitCommitted waits until queue 0's committed offset is want, and fails
// at once when it goes past want.
func waitCommitted(t *testing.T, b *rmqtest.Broker, group, topic string, want int64) {
	t.Helper()
	var off int64
	defer func() {
		if t.Failed() {
			t.Logf("committed offset %d, want %d; update-offset requests %d", off, want, b.Requests(15))
		}
	}()
	waitFor(t, 5*time.Second, "committed offset", func() bool {
		off, _ = b.CommittedOffset(group, topic, 0)
		if off > want {
			t.Fatalf("committed offset %d is past %d", off, want)
		}
		return off == want
	})
}

// A queue that a rebalance gives to another consumer of the group no longer
// counts in this consumer's backlog (its last value stayed for good, and a
// quiet rule then went not ready after progressTimeout).
func TestSourceBacklogForgetsRebalancedQueue(t *testing.T) {
	const topic, group = "rebal", "cg-rebal"
	b := startBrokerWith(t, topic, 20)
	// Queues go to the group's consumers in the order of their client ids
	// (IP@instance name): "aa-..." (second) sorts before "zz-..." (first),
	// so the second takes the only queue from the first.
	bcFirst, bcSecond := brokerConfig(b), brokerConfig(b)
	bcFirst.InstancePrefix, bcSecond.InstancePrefix = "zz", "aa"
	var backlogA, backlogB atomic.Int64
	backlogA.Store(-1)
	backlogB.Store(-1)
	srcA, err := NewSource(bcFirst, SourceConfig{Rule: "r", Topic: topic, Group: group, FetchBatch: 1,
		Backlog: func(n int64) { backlogA.Store(n) }}, testLog(t))
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
		return len(msgsA.snapshot()) == 1 && backlogA.Load() > 0
	})

	srcB, err := NewSource(bcSecond, SourceConfig{Rule: "r", Topic: topic, Group: group,
		Backlog: func(n int64) { backlogB.Store(n) }}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	msgsB := newRecorder(func(*bridge.Message) (error, bool) { return nil, true })
	runSource(t, b, srcB, msgsB.handle)
	waitFor(t, 20*time.Second, "the second consumer to read all 20", func() bool { return len(msgsB.snapshot()) >= 20 })
	releaseA()
	waitFor(t, 10*time.Second, "both backlogs 0", func() bool { return backlogA.Load() == 0 && backlogB.Load() == 0 })
}

// startBrokerWith starts a broker with topic, one queue, holding n
// messages with the bodies seqBody(0..n-1).
func startBrokerWith(t *testing.T, topic string, n int) *rmqtest.Broker {
	t.Helper()
	b := startBroker(t, rmqtest.Options{})
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	var ms []*primitive.Message
	for i := range n {
		ms = append(ms, msg(topic, seqBody(i)))
	}
	send(t, b, ms...)
	return b
}
