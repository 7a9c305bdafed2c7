package rmq

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
)

func queues(n int) []*primitive.MessageQueue {
	out := make([]*primitive.MessageQueue, n)
	for i := range out {
		out[i] = &primitive.MessageQueue{Topic: "t", BrokerName: "broker-a", QueueId: i}
	}
	return out
}

// The selector puts shard s into queue s mod n of whatever write queues
// the client hands it at the time (the route it last read), and a copy
// without a shard, or a DLQ copy, into the hash of its idempotency key.
func TestOrderSelector(t *testing.T) {
	sel := &orderSelector{}
	for _, n := range []int{1, 4, 8, 3} {
		mqs := queues(n)
		for s := range 40 {
			m := outgoingMessage(outgoing("t", fmt.Sprint("id-", s), bridge.HeaderShard, strconv.Itoa(s)), false)
			if q := sel.Select(m, mqs, ""); q != mqs[s%n] {
				t.Fatalf("%d queues: shard %d went to queue %d, want %d", n, s, q.QueueId, s%n)
			}
		}
		// Keyless and DLQ copies: spread by their key, the same key always
		// to the same queue.
		used := map[int]bool{}
		for i := range 64 {
			id := fmt.Sprint("keyless-", i)
			m := outgoingMessage(outgoing("t", id, bridge.HeaderShard, "-1"), false)
			q := sel.Select(m, mqs, "")
			again := sel.Select(outgoingMessage(outgoing("t", id, bridge.HeaderShard, "-1"), false), mqs, "")
			if q != again {
				t.Fatalf("keyless %s went to queues %d and %d", id, q.QueueId, again.QueueId)
			}
			used[q.QueueId] = true
			dlq := outgoingMessage(outgoing("t", id, bridge.HeaderShard, "7", bridge.HeaderError, "bad_key: x"), false)
			if q := sel.Select(dlq, mqs, ""); q != mqs[queueIndex("", true, id, "", n)] {
				t.Fatalf("DLQ copy %s in queue %d, want its key's", id, q.QueueId)
			}
		}
		if len(used) != n {
			t.Errorf("%d queues: keyless copies used %d of them", n, len(used))
		}
	}
	if q := sel.Select(outgoingMessage(outgoing("t", "x"), false), nil, ""); q != nil {
		t.Errorf("no queues: got %v", q)
	}
}

// Through the real client and broker: every copy of a shard lands in the
// queue of its shard.
func TestSinkQueueByShard(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic = "by_shard"
	if err := b.CreateTopic(topic, 4); err != nil {
		t.Fatal(err)
	}
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{brokerConfig(b)}})
	for i := range 40 {
		shard := i % 10
		if err := publish(t, s, outgoing(topic, fmt.Sprint("k", i), bridge.HeaderShard, strconv.Itoa(shard))); err != nil {
			t.Fatal(err)
		}
	}
	ms := b.Messages(topic)
	if len(ms) != 40 {
		t.Fatalf("stored %d, want 40", len(ms))
	}
	for _, m := range ms {
		shard, _ := strconv.Atoi(m.Properties[bridge.HeaderShard])
		if m.QueueID != shard%4 {
			t.Errorf("%s (shard %d) in queue %d, want %d", m.Keys, shard, m.QueueID, shard%4)
		}
	}
}

// The copy keeps the source's tag and keys (a RocketMQ source passes them
// as the headers TAGS and KEYS) and adds the idempotency key to the keys;
// with MessageGroups it carries the 5.x message group.
func TestSinkTagsKeysAndGroup(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	bc := brokerConfig(b)
	bc.MessageGroups = true
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{bc}})
	for _, tc := range []struct {
		id, tags, keys, wantKeys, wantGroup string
		extra                               []string
	}{
		{id: "id-1", tags: "TagA", keys: "order-9 user-4", wantKeys: "order-9 user-4 id-1", wantGroup: "42"},
		{id: "id-2", wantKeys: "id-2", wantGroup: "42"},
		{id: "id-3", keys: "id-3 other", wantKeys: "id-3 other", wantGroup: "42"}, // already among them
		{id: "id-4", tags: "T", wantKeys: "id-4", wantGroup: "id-4", extra: []string{bridge.HeaderShard, "-1"}},
	} {
		extra := append([]string{}, tc.extra...)
		if tc.tags != "" {
			extra = append(extra, primitive.PropertyTags, tc.tags)
		}
		if tc.keys != "" {
			extra = append(extra, primitive.PropertyKeys, tc.keys)
		}
		if err := publish(t, s, outgoing("fidelity", tc.id, extra...)); err != nil {
			t.Fatal(err)
		}
		var got *rmqtest.Message
		for _, m := range b.Messages("fidelity") {
			if m.Properties[bridge.HeaderMsgID] == tc.id {
				got = &m
			}
		}
		if got == nil {
			t.Fatalf("%s not stored", tc.id)
		}
		if got.Tags != tc.tags || got.Keys != tc.wantKeys {
			t.Errorf("%s: tags %q keys %q, want %q %q", tc.id, got.Tags, got.Keys, tc.tags, tc.wantKeys)
		}
		if g := got.Properties[PropertyMessageGroup]; g != tc.wantGroup {
			t.Errorf("%s: message group %q, want %q", tc.id, g, tc.wantGroup)
		}
	}
}

// Publishes queued behind each other go out as batches, each to the queue
// of its copies' shard, every copy with its own properties and unique id;
// a batch that fails is sent again message by message.
func TestSinkBatches(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	const topic = "batched"
	if err := b.CreateTopic(topic, 4); err != nil {
		t.Fatal(err)
	}
	// One worker: the publishes queue up behind the first.
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{brokerConfig(b)}, Workers: 1, MaxPending: 512, RetryBackoff: 10 * time.Millisecond})
	if err := publish(t, s, outgoing(topic, "first", bridge.HeaderShard, "0")); err != nil { // the route: the topic's queue count
		t.Fatal(err)
	}
	send := func(from, n int) {
		t.Helper()
		errs := make(chan error, n)
		for i := from; i < from+n; i++ {
			s.PublishAsync(context.Background(), outgoing(topic, fmt.Sprint("id-", i), bridge.HeaderShard, strconv.Itoa(i%10)),
				func(err error) { errs <- err })
		}
		for range n {
			if err := <-errs; err != nil {
				t.Fatal(err)
			}
		}
	}
	send(0, 300)
	batches := b.Requests(rmqtest.CodeSendBatchMessage)
	if batches == 0 {
		t.Fatal("no batch request: every copy went on its own")
	}
	// A failing batch: its copies go one by one, each stored once.
	b.FailSends(1, 14)
	send(300, 300)
	ms := b.Messages(topic)
	if len(ms) != 601 {
		t.Fatalf("stored %d copies, want 601", len(ms))
	}
	ids := map[string]bool{}
	for _, m := range ms {
		shard, _ := strconv.Atoi(m.Properties[bridge.HeaderShard])
		if m.QueueID != shard%4 {
			t.Errorf("%s (shard %d) in queue %d, want %d", m.Properties[bridge.HeaderMsgID], shard, m.QueueID, shard%4)
		}
		if m.MsgID == "" || ids[m.MsgID] {
			t.Errorf("%s: unique id %q missing or repeated", m.Properties[bridge.HeaderMsgID], m.MsgID)
		}
		ids[m.MsgID] = true
		if id := m.Properties[bridge.HeaderMsgID]; m.Keys != id || m.Properties[bridge.HeaderCell] != "rz01" {
			t.Errorf("%s: keys %q, properties %v", id, m.Keys, m.Properties)
		}
	}
	t.Logf("%d batch requests for 600 copies", b.Requests(rmqtest.CodeSendBatchMessage))
}

// A batch made for n queues is refused once the topic has another number
// of queues: its copies go one by one to the queues of the new route.
func TestOrderSelectorBatchHint(t *testing.T) {
	sel := &orderSelector{}
	mark := &primitive.MessageQueue{Topic: "t"}
	sel.hints.Store(mark, batchHint{idx: 3, n: 4})
	batch := &primitive.Message{Topic: "t", Batch: true, Queue: mark}
	if q := sel.Select(batch, queues(4), ""); q == nil || q.QueueId != 3 {
		t.Fatalf("batch for queue 3 of 4: %v", q)
	}
	if q := sel.Select(batch, queues(8), ""); q != nil {
		t.Fatalf("batch for 4 queues sent to queue %d of 8", q.QueueId)
	}
	// An index that does not fit the count it names is refused, not sent
	// out of range (it would panic in the client's send).
	sel.hints.Store(mark, batchHint{idx: 7, n: 4})
	if q := sel.Select(batch, queues(4), ""); q != nil {
		t.Fatalf("batch hint for queue 7 of 4 sent to queue %d", q.QueueId)
	}
	if q := sel.Select(&primitive.Message{Topic: "t", Batch: true, Queue: &primitive.MessageQueue{}}, queues(4), ""); q != nil {
		t.Fatalf("batch without a hint sent to queue %d", q.QueueId)
	}
	sel.Select(outgoingMessage(outgoing("t", "x"), false), queues(8), "")
	if n, ok := sel.queues("t"); !ok || n != 8 {
		t.Fatalf("queue count after a send to 8 queues: %d %v", n, ok)
	}
}
