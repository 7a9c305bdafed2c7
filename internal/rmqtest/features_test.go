package rmqtest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
)

func sendN(t *testing.T, p *producerHandle, topic, prefix string, n int, tag string) {
	t.Helper()
	for i := range n {
		m := primitive.NewMessage(topic, []byte(fmt.Sprintf("%s-%d", prefix, i)))
		if tag != "" {
			m.WithTag(tag)
		}
		p.send(t, m)
	}
}

func bodies(msgs []*primitive.MessageExt) map[string]int {
	out := map[string]int{}
	for _, m := range msgs {
		out[string(m.Body)]++
	}
	return out
}

func TestTagFilter(t *testing.T) {
	b := startBroker(t, Options{})
	const topic = "tags"
	if err := b.CreateTopic(topic, 2); err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, b, "pg-tags")
	sendN(t, p, topic, "a", 6, "A")
	sendN(t, p, topic, "b", 6, "B")
	sendN(t, p, topic, "c", 6, "C")
	sendN(t, p, topic, "none", 3, "")

	var r received
	newConsumer(t, b, "cg-tags", topic, "A || C", &r)
	eventually(t, 15*time.Second, "12 tagged messages", func() bool { return r.count() >= 12 })
	// Messages after the filtered ones prove the filtered ones were skipped, not pending.
	sendN(t, p, topic, "late-a", 2, "A")
	eventually(t, 15*time.Second, "2 late messages", func() bool { return r.count() >= 14 })
	for body, n := range bodies(r.snapshot()) {
		if n != 1 || !(strings.HasPrefix(body, "a-") || strings.HasPrefix(body, "c-") || strings.HasPrefix(body, "late-a-")) {
			t.Fatalf("unexpected delivery %q x%d", body, n)
		}
	}
}

func TestOffsetsResume(t *testing.T) {
	b := startBroker(t, Options{})
	const topic, group = "resume", "cg-resume"
	if err := b.CreateTopic(topic, 4); err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, b, "pg-resume")
	sendN(t, p, topic, "first", 20, "")

	var r1 received
	c1 := newConsumer(t, b, group, topic, "*", &r1)
	eventually(t, 15*time.Second, "20 messages", func() bool { return r1.count() >= 20 })
	// Shutdown persists the offsets (oneway UPDATE_CONSUMER_OFFSET) before closing the connection;
	// the broker reads them before it sees the close.
	c1.shutdown()
	eventually(t, 5*time.Second, "group empty", func() bool { return len(b.Consumers(group)) == 0 })
	var committed int64
	for q := range 4 {
		off, _ := b.CommittedOffset(group, topic, q)
		committed += off
	}
	// The client may not yet have advanced its offsets for the last messages it handed to the
	// callback when Shutdown persists them: those are redelivered (at-least-once), nothing else.
	if committed == 0 || committed > 20 {
		t.Fatalf("committed %d of 20", committed)
	}

	sendN(t, p, topic, "second", 10, "")
	var r2 received
	newConsumer(t, b, group, topic, "*", &r2)
	want := 10 + int(20-committed)
	eventually(t, 15*time.Second, "new and uncommitted messages", func() bool { return r2.count() >= want })
	second := 0
	for body, n := range bodies(r2.snapshot()) {
		if n != 1 {
			t.Fatalf("%q delivered %d times", body, n)
		}
		if strings.HasPrefix(body, "second-") {
			second++
		}
	}
	if second != 10 || r2.count() != want {
		t.Fatalf("resumed consumer got %d messages (%d new), want %d (10 new)", r2.count(), second, want)
	}
}

func TestRebalance(t *testing.T) {
	b := startBroker(t, Options{})
	const topic, group = "rebalance", "cg-rebalance"
	if err := b.CreateTopic(topic, 4); err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, b, "pg-rebalance")
	var ra, rb received
	ca := newConsumer(t, b, group, topic, "*", &ra)
	cb := newConsumer(t, b, group, topic, "*", &rb)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.WaitConsumers(ctx, group, 2); err != nil {
		t.Fatal(err)
	}

	// Each consumer owns two queues once both rebalanced after the membership notification.
	sendN(t, p, topic, "split", 40, "")
	eventually(t, 15*time.Second, "40 split messages", func() bool {
		return len(bodies(append(ra.snapshot(), rb.snapshot()...))) >= 40
	})
	if ra.count() == 0 || rb.count() == 0 {
		t.Fatalf("queues not split: a=%d b=%d", ra.count(), rb.count())
	}

	// One consumer shuts down: the broker sees its connection close and notifies the other, which
	// takes over every queue.
	ca.shutdown()
	eventually(t, 10*time.Second, "one member", func() bool { return len(b.Consumers(group)) == 1 })
	before := rb.count()
	sendN(t, p, topic, "after-shutdown", 40, "")
	eventually(t, 15*time.Second, "b takes all", func() bool {
		n := 0
		for body := range bodies(rb.snapshot()) {
			if strings.HasPrefix(body, "after-shutdown-") {
				n++
			}
		}
		return n == 40
	})
	_ = before

	// A third consumer joins, then its connection drops: the broker forgets it and b takes all again.
	var rc received
	cc := newConsumer(t, b, group, topic, "*", &rc)
	eventually(t, 10*time.Second, "two members again", func() bool { return len(b.Consumers(group)) == 2 })
	// Drop only once c settled: its start, rebalance and first periodic (1s) heartbeats are in, so it
	// does not come back before its next one 30s later.
	eventually(t, 10*time.Second, "c settled", func() bool { return heartbeats(b, group, cc.name) >= 3 })
	if n := b.DropConnections(MatchClient(cc.name)); n == 0 {
		t.Fatal("no connection dropped")
	}
	eventually(t, 10*time.Second, "c forgotten", func() bool {
		m := b.Consumers(group)
		return len(m) == 1 && strings.Contains(m[0], cb.name)
	})
	sendN(t, p, topic, "after-drop", 40, "")
	eventually(t, 20*time.Second, "b takes all after drop", func() bool {
		n := 0
		for body := range bodies(rb.snapshot()) {
			if strings.HasPrefix(body, "after-drop-") {
				n++
			}
		}
		return n == 40
	})
}

func TestSendBackRetryAndDLQ(t *testing.T) {
	b := startBroker(t, Options{DelayScale: 0.002}) // level 3 (10s) takes 20ms
	const topic, group = "retry", "cg-retry"
	if err := b.CreateTopic(topic, 2); err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, b, "pg-retry")
	sendN(t, p, topic, "flaky", 5, "T")
	sendN(t, p, topic, "poison", 1, "T")

	r := received{fail: func(m *primitive.MessageExt) bool {
		return strings.HasPrefix(string(m.Body), "poison") || m.ReconsumeTimes == 0
	}}
	newConsumer(t, b, group, topic, "*", &r, consumer.WithMaxReconsumeTimes(2))
	eventually(t, 20*time.Second, "5 redelivered messages", func() bool { return r.count() >= 5 })
	for _, m := range r.snapshot() {
		if m.ReconsumeTimes != 1 || m.Topic != topic || m.GetTags() != "T" {
			t.Fatalf("redelivery: topic %q reconsume %d tags %q", m.Topic, m.ReconsumeTimes, m.GetTags())
		}
		if m.GetProperty("ORIGIN_MESSAGE_ID") == "" || m.GetProperty("RETRY_TOPIC") != topic {
			t.Fatalf("retry properties missing: %v", m.GetProperties())
		}
	}
	if len(b.Messages("%RETRY%"+group)) < 5 {
		t.Fatalf("retry topic holds %d messages", len(b.Messages("%RETRY%"+group)))
	}
	eventually(t, 20*time.Second, "poison in DLQ", func() bool {
		for _, m := range b.Messages("%DLQ%" + group) {
			if string(m.Body) == "poison-0" {
				return true
			}
		}
		return false
	})
	dlq := b.Messages("%DLQ%" + group)
	if len(dlq) != 1 || dlq[0].ReconsumeTimes != 3 {
		t.Fatalf("DLQ: %+v", dlq)
	}
}

func TestDelayedMessage(t *testing.T) {
	b := startBroker(t, Options{DelayScale: 0.01}) // level 2 (5s) takes 50ms
	p := newProducer(t, b, "pg-delay")
	if err := b.CreateTopic("delayed", 1); err != nil {
		t.Fatal(err)
	}
	m := primitive.NewMessage("delayed", []byte("later"))
	m.WithDelayTimeLevel(2)
	p.send(t, m)
	eventually(t, 5*time.Second, "delivery", func() bool { return len(b.Messages("delayed")) == 1 })
	got := b.Messages("delayed")[0]
	if _, ok := got.Properties["DELAY"]; ok || got.Properties["REAL_TOPIC"] != "delayed" {
		t.Fatalf("delivered properties: %v", got.Properties)
	}
}

type txListener struct {
	mu      sync.Mutex
	checked map[string]int
	b       *Broker
	// invisible records, per body, whether the half message was held back while the local
	// transaction ran: in HalfMessages and not in its topic.
	invisible map[string]bool
}

func (l *txListener) ExecuteLocalTransaction(m *primitive.Message) primitive.LocalTransactionState {
	half, visible := false, false
	for _, h := range l.b.HalfMessages() {
		half = half || string(h.Body) == string(m.Body)
	}
	for _, v := range l.b.Messages(m.Topic) {
		visible = visible || string(v.Body) == string(m.Body)
	}
	l.mu.Lock()
	l.invisible[string(m.Body)] = half && !visible
	l.mu.Unlock()
	switch {
	case strings.HasPrefix(string(m.Body), "commit"):
		return primitive.CommitMessageState
	case strings.HasPrefix(string(m.Body), "rollback"):
		return primitive.RollbackMessageState
	default:
		return primitive.UnkonwnState
	}
}

func (l *txListener) CheckLocalTransaction(m *primitive.MessageExt) primitive.LocalTransactionState {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.checked[string(m.Body)]++
	// The first check-back of "unknown-twice" stays unknown: the broker must ask again.
	if string(m.Body) == "unknown-twice" && l.checked[string(m.Body)] == 1 {
		return primitive.UnkonwnState
	}
	return primitive.CommitMessageState
}

func (l *txListener) checks(body string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.checked[body]
}

func TestTransactions(t *testing.T) {
	b := startBroker(t, Options{TransactionCheckDelay: 100 * time.Millisecond, TransactionCheckInterval: 50 * time.Millisecond})
	const topic = "tx"
	if err := b.CreateTopic(topic, 2); err != nil {
		t.Fatal(err)
	}
	l := &txListener{checked: map[string]int{}, invisible: map[string]bool{}, b: b}
	tp, err := producer.NewTransactionProducer(l,
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
		producer.WithGroupName("pg-tx"),
		producer.WithInstanceName(instance(t)),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tp.Shutdown() })

	var r received
	newConsumer(t, b, "cg-tx", topic, "*", &r)
	ctx := context.Background()
	for _, body := range []string{"commit", "rollback", "unknown", "unknown-twice"} {
		res, err := tp.SendMessageInTransaction(ctx, primitive.NewMessage(topic, []byte(body)))
		if err != nil || res.Status != primitive.SendOK {
			t.Fatalf("send %s: %v %+v", body, err, res)
		}
	}
	eventually(t, 15*time.Second, "commit, unknown and unknown-twice visible", func() bool { return r.count() >= 3 })
	eventually(t, 5*time.Second, "no half messages", func() bool { return len(b.HalfMessages()) == 0 })
	got := bodies(r.snapshot())
	if got["commit"] != 1 || got["unknown"] != 1 || got["unknown-twice"] != 1 || got["rollback"] != 0 {
		t.Fatalf("delivered %v", got)
	}
	if l.checks("commit") != 0 || l.checks("unknown") != 1 || l.checks("unknown-twice") != 2 {
		t.Fatalf("check-backs: %v", l.checked)
	}
	l.mu.Lock()
	for body, ok := range l.invisible {
		if !ok {
			t.Errorf("half message %q was visible before its commit", body)
		}
	}
	l.mu.Unlock()
	for _, m := range b.Messages(topic) {
		if _, ok := m.Properties["TRAN_MSG"]; ok {
			t.Fatalf("committed message keeps TRAN_MSG: %v", m.Properties)
		}
	}
}

// heartbeats counts the heartbeats the broker got from a member of a group.
func heartbeats(b *Broker, group, instance string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	if g := b.groups[group]; g != nil {
		for id, m := range g.members {
			if strings.Contains(id, instance) {
				return m.beats
			}
		}
	}
	return 0
}

// scanListener answers unknown to the first check-back of each message and
// records when each check-back came.
type scanListener struct {
	mu    sync.Mutex
	times map[string][]time.Time
}

func (l *scanListener) ExecuteLocalTransaction(*primitive.Message) primitive.LocalTransactionState {
	return primitive.UnkonwnState
}

func (l *scanListener) CheckLocalTransaction(m *primitive.MessageExt) primitive.LocalTransactionState {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.times[string(m.Body)] = append(l.times[string(m.Body)], time.Now())
	if len(l.times[string(m.Body)]) == 1 {
		return primitive.UnkonwnState
	}
	return primitive.CommitMessageState
}

func (l *scanListener) checks(body string) []time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]time.Time(nil), l.times[body]...)
}

// Check-backs come from a periodic scan, as on a real broker: a half
// message is first checked once it is TransactionCheckDelay old, and an
// unknown answer waits for the next scan, TransactionCheckInterval later,
// however old the message is.
func TestTransactionCheckScan(t *testing.T) {
	const delay, interval = 300 * time.Millisecond, time.Second
	b := startBroker(t, Options{TransactionCheckDelay: delay, TransactionCheckInterval: interval})
	if err := b.CreateTopic("scanned", 1); err != nil {
		t.Fatal(err)
	}
	l := &scanListener{times: map[string][]time.Time{}}
	tp, err := producer.NewTransactionProducer(l,
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
		producer.WithGroupName("pg-scan"),
		producer.WithInstanceName(instance(t)),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := tp.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = tp.Shutdown() })
	sent := time.Now()
	if _, err := tp.SendMessageInTransaction(context.Background(), primitive.NewMessage("scanned", []byte("m"))); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "committed by its second check-back", func() bool { return len(b.Messages("scanned")) == 1 })
	ts := l.checks("m")
	if len(ts) != 2 {
		t.Fatalf("%d check-backs, want 2", len(ts))
	}
	if d := ts[0].Sub(sent); d < delay {
		t.Errorf("first check-back %v after the send, before TransactionCheckDelay %v", d, delay)
	}
	// Scans are interval apart; the times are the client's, so a late
	// first delivery shortens the gap: half the interval still tells a
	// second scan from a repeat within one.
	if d := ts[1].Sub(ts[0]); d < interval/2 {
		t.Errorf("second check-back %v after the first, before the next scan (%v)", d, interval)
	}
}
