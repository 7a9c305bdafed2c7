package rmq

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
	"github.com/cellbridge/cellbridge/internal/syncbuf"
	"github.com/cellbridge/cellbridge/router"
)

func newSink(t *testing.T, cfg SinkConfig) *Sink {
	t.Helper()
	s, err := NewSink(cfg, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("sink close: %v", err)
		}
	})
	return s
}

func outgoing(topic, id string, extra ...string) *bridge.Outgoing {
	h := map[string][]string{
		bridge.HeaderMsgID: {id}, bridge.HeaderCell: {"rz01"}, bridge.HeaderShard: {"42"},
		bridge.HeaderRulesVersion: {"3"}, bridge.HeaderSource: {"nats/ORDERS"}, bridge.HeaderHops: {"1"},
		"X-User-Id": {"2088"}, "DELAY": {"3"}, "Bad\x01Name": {"x"}, "Empty": {},
	}
	for i := 0; i+1 < len(extra); i += 2 {
		h[extra[i]] = []string{extra[i+1]}
	}
	return &bridge.Outgoing{Target: router.Target{Broker: "rmq-test", Topic: topic}, MsgID: id, Header: h, Body: []byte("payload " + id)}
}

func publish(t *testing.T, s *Sink, m *bridge.Outgoing) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	return bridge.Publish(ctx, s, m)
}

func TestSinkPropertiesAndKeys(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{brokerConfig(b)}})
	if err := publish(t, s, outgoing("cell_rz01_orders", "ORDERS:7")); err != nil {
		t.Fatal(err)
	}
	ms := b.Messages("cell_rz01_orders")
	if len(ms) != 1 {
		t.Fatalf("stored %d messages", len(ms))
	}
	m := ms[0]
	if m.Keys != "ORDERS:7" || string(m.Body) != "payload ORDERS:7" {
		t.Errorf("keys %q body %q", m.Keys, m.Body)
	}
	for k, v := range map[string]string{"Cell-Msg-Id": "ORDERS:7", "Cell-Name": "rz01", "Cell-Shard": "42",
		"Cell-Rules-Version": "3", "Cell-Source": "nats/ORDERS", "Cell-Hops": "1", "X-User-Id": "2088"} {
		if m.Properties[k] != v {
			t.Errorf("property %s = %q, want %q", k, m.Properties[k], v)
		}
	}
	if _, ok := m.Properties["DELAY"]; ok {
		t.Error("a header named like a system property was sent")
	}
	for k := range m.Properties {
		if strings.Contains(k, "Bad") || k == "Empty" {
			t.Errorf("unusable header sent: %q", k)
		}
	}
	if err := publish(t, s, &bridge.Outgoing{Target: router.Target{Broker: "other", Topic: "x"}}); err == nil {
		t.Error("publish to an unknown broker succeeded")
	}
}

func TestSinkRetriesFailedSends(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	if err := b.CreateTopic("retried", 2); err != nil {
		t.Fatal(err)
	}
	var logs syncbuf.Buffer
	var retried atomic.Int32
	s, err := NewSink(SinkConfig{Brokers: []BrokerConfig{brokerConfig(b)}, Retries: 2, RetryBackoff: 10 * time.Millisecond,
		OnRetry: func(broker string, err error) {
			if broker != "rmq-test" {
				t.Errorf("OnRetry broker %q", broker)
			}
			retried.Add(1)
		}}, slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo})))
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Close(ctx); err != nil {
			t.Errorf("sink close: %v", err)
		}
	}()
	b.FailSends(2, 14) // service not available, twice
	if err := publish(t, s, outgoing("retried", "id-1")); err != nil {
		t.Fatalf("publish after two failed attempts: %v", err)
	}
	if n := len(b.Messages("retried")); n != 1 {
		t.Fatalf("stored %d messages, want 1", n)
	}
	b.FailSends(3, 1)
	err = publish(t, s, outgoing("retried", "id-2"))
	if err == nil || !strings.Contains(err.Error(), "CODE: 1") {
		t.Fatalf("publish after three failed attempts: %v, want the broker's error", err)
	}
	if n := len(b.Messages("retried")); n != 1 {
		t.Fatalf("stored %d messages, want 1", n)
	}
	// Every failed attempt the sink tried again is reported (2 + 2); the
	// last one of id-2 is the pipeline's to count. Each streak is logged
	// once at warn (its later attempts at debug), its end at info.
	if n := retried.Load(); n != 4 {
		t.Errorf("OnRetry called %d times, want 4", n)
	}
	out := logs.String()
	if n := strings.Count(out, "level=WARN msg=\"rocketmq send failed; retrying\""); n != 2 {
		t.Errorf("%d warnings, want 2 (one per streak):\n%s", n, out)
	}
	if n := strings.Count(out, "rocketmq sends succeed again"); n != 1 {
		t.Errorf("%d recoveries logged, want 1:\n%s", n, out)
	}
}

// Many concurrent publishes through a small pending limit all complete.
func TestSinkBackPressure(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{brokerConfig(b)}, MaxPending: 4, Workers: 2})
	var wg sync.WaitGroup
	errs := make(chan error, 200)
	for i := range 200 {
		wg.Add(1)
		s.PublishAsync(context.Background(), outgoing("bp", seqBody(i)), func(err error) {
			errs <- err
			wg.Done()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := len(b.Messages("bp")); n != 200 {
		t.Fatalf("stored %d", n)
	}
}

func TestSinkTransactionalCommit(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Minute, ReserveTTL: 5 * time.Second})
	defer store.Close(context.Background())
	bc := brokerConfig(b)
	bc.Transactional = true
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{bc}, Dedupe: store})
	// As the pipeline does: reserve, publish, (commit).
	if o, _ := store.Reserve(context.Background(), "k-1"); o != dedupe.Reserved {
		t.Fatal(o)
	}
	if err := publish(t, s, outgoing("txn", "k-1")); err != nil {
		t.Fatal(err)
	}
	// The send is confirmed after a barrier behind its end-transaction on
	// the producer's connection; this broker handles a connection's
	// requests in order, so the commit is done by then.
	if n := len(b.Messages("txn")); n != 1 {
		const searchOffsetByTimestamp = 29 // the barrier's request code
		t.Fatalf("committed copies when the publish was confirmed: %d, want 1 (barriers: %d)", n, b.Requests(searchOffsetByTimestamp))
	}
	// The local transaction decided slot 0; the message key is the
	// pipeline's to commit, after the confirmation.
	if o, _ := store.Reserve(context.Background(), decidedKey("k-1", 0)); o != dedupe.Duplicate {
		t.Fatalf("decision of slot 0: %v, want committed (Duplicate)", o)
	}
	if o, _ := store.Reserve(context.Background(), "k-1"); o != dedupe.InFlight {
		t.Fatalf("key after the local transaction: %v, want still reserved by the pipeline", o)
	}
	if m := b.Messages("txn")[0]; m.Properties[HeaderTxSlot] != "" || m.Properties[bridge.HeaderMsgID] != "k-1" {
		t.Errorf("committed copy: properties %v", m.Properties)
	}
	if hm := b.HalfMessages(); len(hm) != 0 {
		t.Fatalf("unresolved half messages: %d", len(hm))
	}
	// A DLQ copy commits its own key.
	if err := publish(t, s, outgoing("txn-dlq", "k-1", bridge.HeaderError, "bad_key: x")); err != nil {
		t.Fatal(err)
	}
	if o, _ := store.Reserve(context.Background(), decidedKey("k-1\x00dlq", 0)); o != dedupe.Duplicate {
		t.Fatalf("dlq key's decision: %v", o)
	}
}

// A producer that dies after the half message (before or after its local
// transaction) leaves the outcome to the broker's check-back, which the
// sink answers from the dedupe store.
func TestSinkTransactionalCheckBack(t *testing.T) {
	b := startBroker(t, rmqtest.Options{TransactionCheckDelay: 200 * time.Millisecond, TransactionCheckInterval: 100 * time.Millisecond})
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Minute, ReserveTTL: time.Minute})
	defer store.Close(context.Background())
	ctx := context.Background()
	bc := brokerConfig(b)
	bc.Transactional = true
	l := &txListener{store: store, log: testLog(t), timeout: time.Second}

	// The crashed bridges: same producer group as the sink; each claims a
	// slot and sends its half message as the sink does, runs the local
	// transaction or not, and is gone without end-transaction.
	const topic = "checked"
	dead := func(key string, executed bool) {
		t.Helper()
		p, err := producer.NewTransactionProducer(&crashingListener{real: l, executed: executed},
			producer.WithNsResolver(bc.resolver()),
			producer.WithGroupName("cellbridge-"+bc.Name),
			producer.WithInstanceName(bc.instanceName("crashed")),
			producer.WithRetry(0))
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		slot, _, err := l.claimSlot(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		m := outgoingMessage(outgoing(topic, key), false)
		m.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, txUniqID(key, slot))
		if _, err := p.SendMessageInTransaction(ctx, m); err != nil {
			t.Fatal(err)
		}
		_ = p.Shutdown()
	}
	// 1: decided, end-transaction lost → commit (and the key is committed).
	dead("done", true)
	// 2: died before its local transaction: unknown while its slot is
	// still reserved, rollback once it is not.
	dead("alive", false)
	// 3: died before its local transaction, slot expired (released here),
	// and a later attempt of the same key delivers it → rollback, one copy.
	dead("retried", false)
	_ = store.Release(ctx, decidedKey("retried", 0))
	if n := len(b.HalfMessages()); n != 3 {
		t.Fatalf("half messages: %d, want 3", n)
	}

	// The restarted sink: the only producer of the group now. A producer
	// learns the broker's address (and heartbeats to it) with its first
	// send; from then on the broker sends it check-backs.
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{bc}, Dedupe: store})
	if err := publish(t, s, outgoing(topic, "retried")); err != nil { // takes slot 1
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "check-backs to resolve two half messages", func() bool {
		return len(b.HalfMessages()) == 1
	})
	keys := map[string]int{}
	for _, m := range b.Messages(topic) {
		keys[m.Keys]++
	}
	if len(keys) != 2 || keys["done"] != 1 || keys["retried"] != 1 {
		t.Fatalf("committed: %v, want done and retried once each", keys)
	}
	// The answer is settled (the key committed) a second after it.
	waitFor(t, 5*time.Second, "the key of the committed half message committed by its check-back", func() bool {
		o, _ := store.Reserve(ctx, "done")
		if o == dedupe.Reserved {
			_ = store.Release(ctx, "done")
		}
		return o == dedupe.Duplicate
	})
	if hm := b.HalfMessages(); hm[0].Keys != "alive" {
		t.Fatalf("still unresolved: %q, want the one whose slot is reserved", hm[0].Keys)
	}
	_ = store.Release(ctx, decidedKey("alive", 0)) // its reservation expires
	waitFor(t, 10*time.Second, "the last half message to be rolled back", func() bool { return len(b.HalfMessages()) == 0 })
	if n := len(b.Messages(topic)); n != 2 {
		t.Fatalf("topic holds %d messages, want 2", n)
	}
	if n := len(b.DiscardedHalfMessages()); n != 0 {
		t.Fatalf("%d half messages ran out of check-backs", n)
	}
	// A later attempt of a decided message is a duplicate, not a send.
	err := publish(t, s, outgoing(topic, "done"))
	if !errors.Is(err, bridge.ErrDuplicate) {
		t.Fatalf("publishing a decided message again: %v, want ErrDuplicate", err)
	}
}

// crashingListener plays a sink that dies after sending its half message:
// with executed, after its local transaction.
type crashingListener struct {
	real     *txListener
	executed bool
}

func (l *crashingListener) ExecuteLocalTransaction(m *primitive.Message) primitive.LocalTransactionState {
	if l.executed {
		l.real.ExecuteLocalTransaction(m)
	}
	return primitive.UnkonwnState // no commit reaches the broker
}

func (l *crashingListener) CheckLocalTransaction(*primitive.MessageExt) primitive.LocalTransactionState {
	return primitive.UnkonwnState
}
