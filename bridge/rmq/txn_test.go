package rmq

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
)

// A half message names its store key and slot through its unique id only;
// the check-back reads them back from the id and Cell-Msg-Id (or the last
// of the Keys), and still from an earlier version's Cell-Tx-Slot.
func TestTxRef(t *testing.T) {
	for _, slot := range []int{0, 1, 17, maxTxSlots - 1} {
		for _, key := range []string{"ORDERS:1", "k with spaces", "k-dlq"} {
			props := map[string]string{bridge.HeaderMsgID: key}
			store := key
			if key == "k-dlq" {
				props[bridge.HeaderError] = "bad_key: x"
				store = key + "\x00dlq"
			}
			id := txUniqID(store, slot)
			if len(id) != 32 || id[:8] != primitive.CreateUniqID()[:8] {
				t.Fatalf("unique id %q: want 32 hex digits starting with the client's IP", id)
			}
			props[primitive.PropertyUniqueClientMessageIdKeyIndex] = id
			if ref, ok := txRef(props); !ok || ref != (slotRef{store, slot}) {
				t.Errorf("%q slot %d: read back %+v %v", key, slot, ref, ok)
			}
			// Keys instead of Cell-Msg-Id: the idempotency key is the last.
			delete(props, bridge.HeaderMsgID)
			props[primitive.PropertyKeys] = "src-1 src-2 " + key
			if !strings.Contains(key, " ") {
				if ref, ok := txRef(props); !ok || ref != (slotRef{store, slot}) {
					t.Errorf("%q slot %d from Keys: read back %+v %v", key, slot, ref, ok)
				}
			}
		}
	}
	if _, ok := txRef(map[string]string{bridge.HeaderMsgID: "a", primitive.PropertyUniqueClientMessageIdKeyIndex: txUniqID("b", 3)}); ok {
		t.Error("a unique id made for another key was accepted")
	}
	if _, ok := txRef(map[string]string{bridge.HeaderMsgID: "a", primitive.PropertyUniqueClientMessageIdKeyIndex: primitive.CreateUniqID()}); ok {
		t.Error("a message the bridge did not send was accepted")
	}
	if ref, ok := txRef(map[string]string{bridge.HeaderMsgID: "a", HeaderTxSlot: "5",
		primitive.PropertyUniqueClientMessageIdKeyIndex: primitive.CreateUniqID()}); !ok || ref != (slotRef{"a", 5}) {
		t.Errorf("earlier version's half message: %+v %v", ref, ok)
	}
}

// deadSink plays a bridge that sent a half message for key in shard, ran
// its local transaction (decided) or not, and died before its
// end-transaction reached the broker.
func deadSink(t *testing.T, bc BrokerConfig, l *txListener, topic, key, shard string, decided bool) {
	t.Helper()
	p, err := producer.NewTransactionProducer(&crashingListener{real: l, executed: decided},
		producer.WithNsResolver(bc.resolver()),
		producer.WithGroupName("cellbridge-"+bc.Name),
		producer.WithInstanceName(bc.instanceName("crashed")),
		producer.WithQueueSelector(&orderSelector{}),
		producer.WithRetry(0))
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = p.Shutdown() }()
	slot, _, err := l.claimSlot(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	m := outgoingMessage(outgoing(topic, key, bridge.HeaderShard, shard), false)
	m.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, txUniqID(key, slot))
	if _, err := p.SendMessageInTransaction(context.Background(), m); err != nil {
		t.Fatal(err)
	}
}

// publishAsync starts a publish and returns its result channel.
func publishAsync(s *Sink, m *bridge.Outgoing) <-chan error {
	done := make(chan error, 1)
	s.PublishAsync(context.Background(), m, func(err error) { done <- err })
	return done
}

func waitDone(t *testing.T, what string, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		t.Fatalf("%s: no result within 30s", what)
		return nil
	}
}

// queueOrder lists the Cell-Msg-Ids of a topic's copies in one queue, in
// queue order.
func queueOrder(b *rmqtest.Broker, topic string, queue int) []string {
	var out []string
	for _, m := range b.Messages(topic) {
		if m.QueueID == queue {
			out = append(out, m.Properties[bridge.HeaderMsgID])
		}
	}
	return out
}

// A bridge died after deciding k1's half message and before its
// end-transaction: only the check-back can still make k1 visible. The next
// bridge, to which the source redelivers k1, finds it decided; it must not
// report the duplicate (after which the pipeline would send k2, the key's
// next message) before k1 is visible. Other keys go on meanwhile. Two
// replicas share the store; whichever answers the check-back, the replica
// holding k1 learns it.
func TestSinkTransactionalWaitsForCheckBack(t *testing.T) {
	b := startBroker(t, rmqtest.Options{TransactionCheckDelay: 2 * time.Second, TransactionCheckInterval: 200 * time.Millisecond})
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Minute, ReserveTTL: time.Minute})
	defer store.Close(context.Background())
	bc := brokerConfig(b)
	bc.Transactional = true
	const topic = "waited"
	if err := b.CreateTopic(topic, 4); err != nil {
		t.Fatal(err)
	}
	deadSink(t, bc, &txListener{store: store, log: testLog(t), timeout: time.Second}, topic, "k1", "5", true)

	holding := newSink(t, SinkConfig{Brokers: []BrokerConfig{bc}, Dedupe: store})
	other := newSink(t, SinkConfig{Brokers: []BrokerConfig{bc}, Dedupe: store})
	if err := publish(t, other, outgoing(topic, "warm-up", bridge.HeaderShard, "3")); err != nil { // registers it as a producer of the group
		t.Fatal(err)
	}
	// k1 again (the redelivery): decided by the dead bridge; held until
	// its check-back committed it.
	k1 := publishAsync(holding, outgoing(topic, "k1", bridge.HeaderShard, "5"))
	// Another key, even of the same shard, is not held up: k3 is stored
	// while k1 is still a half message (its first check-back comes 2s
	// after it was sent).
	if err := publish(t, holding, outgoing(topic, "k3", bridge.HeaderShard, "5")); err != nil {
		t.Fatal(err)
	}
	k1open := false
	for _, h := range b.HalfMessages() {
		k1open = k1open || h.Properties[bridge.HeaderMsgID] == "k1"
	}
	select {
	case err := <-k1:
		t.Fatalf("k1 resolved (%v) while its half message was open: %v", err, k1open)
	default:
	}
	if !k1open {
		t.Fatal("k1's half message was resolved before k3 went out: the test's check delay is too short to tell")
	}
	if err := waitDone(t, "k1", k1); !errors.Is(err, bridge.ErrDuplicate) {
		t.Fatalf("k1 again: %v, want ErrDuplicate once its check-back committed it", err)
	}
	// As the pipeline does: k1 settled, so the key's next message.
	if err := publish(t, holding, outgoing(topic, "k2", bridge.HeaderShard, "5")); err != nil {
		t.Fatal(err)
	}
	// End-transactions are one way: the broker may still be storing k2.
	waitFor(t, 5*time.Second, "k2 stored", func() bool { return len(queueOrder(b, topic, 5%4)) == 3 })
	if got := queueOrder(b, topic, 5%4); strings.Join(got, " ") != "k3 k1 k2" {
		t.Fatalf("queue of shard 5 holds %v, want k3, then k1 (committed by its check-back), then k2", got)
	}
	waitFor(t, 5*time.Second, "no half message open", func() bool { return len(b.HalfMessages()) == 0 })
}

// A decided slot whose end-transaction did reach the broker leaves no
// check-back to wait for: the duplicate is reported after CheckBackWait.
func TestSinkTransactionalWaitRunsOut(t *testing.T) {
	b := startBroker(t, rmqtest.Options{TransactionCheckDelay: 200 * time.Millisecond, TransactionCheckInterval: 100 * time.Millisecond})
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Minute, ReserveTTL: time.Minute})
	defer store.Close(context.Background())
	bc := brokerConfig(b)
	bc.Transactional = true
	bc.CheckBackWait = 1500 * time.Millisecond
	s := newSink(t, SinkConfig{Brokers: []BrokerConfig{bc}, Dedupe: store})
	const topic = "ended"
	if err := publish(t, s, outgoing(topic, "k4", bridge.HeaderShard, "8")); err != nil {
		t.Fatal(err)
	}
	// The pipeline never committed k4 (it died right after the send), so
	// its redelivery reaches the sink: decided, and no check-back will come.
	start := time.Now()
	if err := publish(t, s, outgoing(topic, "k4", bridge.HeaderShard, "8")); !errors.Is(err, bridge.ErrDuplicate) {
		t.Fatalf("k4 again: %v, want ErrDuplicate", err)
	}
	if waited := time.Since(start); waited < bc.CheckBackWait {
		t.Fatalf("k4's duplicate reported %v after the claim, before CheckBackWait %v", waited, bc.CheckBackWait)
	}
	if n := len(b.Messages(topic)); n != 1 {
		t.Fatalf("stored %d copies of k4", n)
	}
}

// A send waiting for a check-back fails at once when the sink closes (the
// source delivers it again, and the next bridge waits).
func TestSinkCloseFailsWaitingSends(t *testing.T) {
	b := startBroker(t, rmqtest.Options{})
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Minute, ReserveTTL: time.Minute})
	defer store.Close(context.Background())
	bc := brokerConfig(b)
	bc.Transactional = true
	s, err := NewSink(SinkConfig{Brokers: []BrokerConfig{bc}, Dedupe: store}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := publish(t, s, outgoing("closing", "k6", bridge.HeaderShard, "1")); err != nil {
		t.Fatal(err)
	}
	k6 := publishAsync(s, outgoing("closing", "k6", bridge.HeaderShard, "1"))
	w := s.targets[bc.Name].waits
	waitFor(t, 5*time.Second, "k6 parked", func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, wt := range w.waits {
			if len(wt.jobs) == 1 {
				return true
			}
		}
		return false
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Close would wait for the parked send until ctx ends, and fail.
	if err := s.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := waitDone(t, "k6", k6); !errors.Is(err, ErrClosed) {
		t.Fatalf("waiting k6 at close: %v, want ErrClosed", err)
	}
	// The first send's end-transaction is one way: it may still be on its way.
	waitFor(t, 5*time.Second, "k6 stored", func() bool { return len(b.Messages("closing")) >= 1 })
	if n := len(b.Messages("closing")); n != 1 {
		t.Fatalf("stored %d, want k6 once", n)
	}
}

// lateClock is a clock the test moves by hand (the memory store's).
type lateClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *lateClock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *lateClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// TestTransactionalLateDecisionAfterRollback: an attempt cut off from the
// dedupe store while writing its decision keeps the write owed, and its
// reservation expires; a check-back (another replica) finds no decision and
// rolls the half message back; then the owed decision reaches the store.
// The decision must not count: the message is not in the topic. Before,
// later claims took the slot for decided, a waiting attempt reported the
// message delivered (the pipeline acknowledged its source: lost), and a
// second check-back would have committed a half message already rolled
// back.
func TestTransactionalLateDecisionAfterRollback(t *testing.T) {
	ctx := context.Background()
	clock := &lateClock{t: time.Unix(1_700_000_000, 0)}
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Hour, ReserveTTL: time.Second, Now: clock.Now})
	defer store.Close(ctx)
	l := &txListener{store: store, log: testLog(t), timeout: time.Second}
	defer l.close()

	slot, _, err := l.claimSlot(ctx, "k") // A's attempt
	if err != nil || slot != 0 {
		t.Fatalf("claim: slot %d, %v", slot, err)
	}
	clock.Advance(2 * time.Second) // A's reservation of decided(k,0) expires
	half := &primitive.MessageExt{}
	half.WithProperty(bridge.HeaderMsgID, "k")
	half.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, txUniqID("k", 0))
	if st := l.check(half); st != primitive.RollbackMessageState {
		t.Fatalf("check-back with no decision: %s, want rollback", stateName(st))
	}
	if err := store.Commit(ctx, decidedKey("k", 0)); err != nil { // A's owed write lands
		t.Fatal(err)
	}
	if st := l.check(half); st != primitive.RollbackMessageState {
		t.Errorf("check-back after the late decision: %s, want rollback again", stateName(st))
	}
	slot, decided, err := l.claimSlot(ctx, "k") // the message's next attempt
	if err != nil || slot != 1 || decided != -1 {
		t.Errorf("claim after the rollback: slot %d, decided %d, %v; want slot 1 (the message is not in the topic)", slot, decided, err)
	}
	w := &txWaits{l: l}
	if err := w.rolledBack(slotRef{"k", 0}); !errors.Is(err, errRolledBack) {
		t.Errorf("a wait for the rolled-back attempt ends with %v, want errRolledBack (not a duplicate)", err)
	}

	// A decision that reaches the store before any check-back counts.
	if _, _, err := l.claimSlot(ctx, "d"); err != nil {
		t.Fatal(err)
	}
	okMsg := &primitive.Message{}
	okMsg.WithProperty(bridge.HeaderMsgID, "d")
	okMsg.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, txUniqID("d", 0))
	if st := l.ExecuteLocalTransaction(okMsg); st != primitive.CommitMessageState {
		t.Fatalf("local transaction: %s", stateName(st))
	}
	if err := w.rolledBack(slotRef{"d", 0}); err != nil {
		t.Errorf("a wait for a decided attempt: %v, want nil (a duplicate)", err)
	}
	// A decision written after a check-back rolled its half message back
	// (a slow write that still succeeded) answers rollback itself.
	if _, _, err := l.claimSlot(ctx, "s"); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Second)
	slow := &primitive.MessageExt{}
	slow.WithProperty(bridge.HeaderMsgID, "s")
	slow.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, txUniqID("s", 0))
	if st := l.check(slow); st != primitive.RollbackMessageState {
		t.Fatalf("check-back: %s", stateName(st))
	}
	if st := l.ExecuteLocalTransaction(&slow.Message); st != primitive.RollbackMessageState {
		t.Errorf("local transaction after the rollback: %s, want rollback", stateName(st))
	}
}

// refusingProducer fails its first sends with err, then stores each half
// message and runs the local transaction, as the client does.
type refusingProducer struct {
	l     *txListener
	fails int
	err   error
	sent  []int // the slot of every half message stored
}

func (p *refusingProducer) SendMessageInTransaction(_ context.Context, m *primitive.Message) (*primitive.TransactionSendResult, error) {
	if p.fails > 0 {
		p.fails--
		return nil, p.err
	}
	ref, ok := txRef(m.GetProperties())
	if !ok {
		return nil, errors.New("no transaction reference")
	}
	p.sent = append(p.sent, ref.slot)
	st := p.l.ExecuteLocalTransaction(m)
	return &primitive.TransactionSendResult{SendResult: &primitive.SendResult{Status: primitive.SendOK}, State: st}, nil
}

// TestTransactionalRefusedSendsKeepTheirSlot: sends that certainly stored
// nothing (no connection could be made: a broker that is down) do not use
// up the key's attempt slots. Before, every one burnt one of maxTxSlots,
// and a broker down for about twenty seconds left the key failing with
// "more than 64 transactional attempts" for the dedupe store's TTL. A send
// that may have stored its half message (a timeout) still uses its slot,
// and a slot taken by a later attempt is never taken again.
func TestTransactionalRefusedSendsKeepTheirSlot(t *testing.T) {
	ctx := context.Background()
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Hour, ReserveTTL: time.Minute})
	defer store.Close(ctx)
	l := &txListener{store: store, log: testLog(t), timeout: time.Second, reuseFor: time.Minute}
	defer l.close()
	send := func(p *refusingProducer, key string) error {
		out := outgoing("refused", key)
		return l.txSend(ctx, p, out, outgoingMessage(out, false))
	}

	dial := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
	p := &refusingProducer{l: l, fails: 3 * maxTxSlots, err: dial}
	var err error
	for range 3*maxTxSlots + 1 {
		if err = send(p, "k1"); err == nil || errors.As(err, new(*errEnded)) {
			break
		}
		if strings.Contains(err.Error(), "transactional attempts") {
			t.Fatalf("%d refusals left: %v", p.fails, err)
		}
	}
	if !errors.As(err, new(*errEnded)) || len(p.sent) != 1 || p.sent[0] != 0 {
		t.Fatalf("after %d refused sends: %v, half messages in slots %v; want one, in slot 0", 3*maxTxSlots, err, p.sent)
	}

	// Timeouts may have stored their half messages: each uses its slot.
	p = &refusingProducer{l: l, fails: 2, err: context.DeadlineExceeded}
	for range 3 {
		err = send(p, "k2")
	}
	if !errors.As(err, new(*errEnded)) || len(p.sent) != 1 || p.sent[0] != 2 {
		t.Fatalf("after two timeouts: %v, slots %v; want slot 2", err, p.sent)
	}

	// A refused slot is not taken again once a later attempt used the next
	// one (another replica, say): its half message may exist.
	p = &refusingProducer{l: l, fails: 1, err: dial}
	if err := send(p, "k3"); err == nil { // slot 0 refused
		t.Fatal("refused send succeeded")
	}
	if _, _, err := (&txListener{store: store, log: testLog(t), timeout: time.Second}).claimSlot(ctx, "k3"); err != nil { // slot 1, elsewhere
		t.Fatal(err)
	}
	_ = store.Release(ctx, decidedKey("k3", 1)) // that attempt died undecided
	if err := send(p, "k3"); !errors.As(err, new(*errEnded)) || len(p.sent) != 1 || p.sent[0] != 2 {
		t.Fatalf("k3: %v, slots %v; want slot 2 (not the refused 0, not the used 1)", err, p.sent)
	}
}

// sendNotStored: which failed sends certainly stored nothing.
func TestSendNotStored(t *testing.T) {
	for _, c := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}, true},
		{fmt.Errorf("send: %w", &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("i/o timeout")}), true},
		{errors.New("CODE: 14, DESC: service not available"), false}, // a proxy answers SYSTEM_ERROR for a broker timeout
		{errors.New("the topic=orders route info not found"), true},
		{&net.OpError{Op: "write", Net: "tcp", Err: errors.New("broken pipe")}, false},
		{context.DeadlineExceeded, false},
		{errors.New("wait response timeout"), false},
	} {
		if got := sendNotStored(c.err); got != c.want {
			t.Errorf("sendNotStored(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}
