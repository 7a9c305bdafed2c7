package main

import (
	"context"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// The RocketMQ order crash tests: keyed events with a per-key sequence
// number go through `cellbridge run` into RocketMQ cell topics, from a
// RocketMQ or a NATS source, with and without exactlyOnce: transactional,
// while the bridge is killed with SIGKILL three times. Every event must
// arrive, in its owning cell; a key's copies must all be in one queue of
// its cell topic, in the key's order (first copies: a replay stores older
// events again, which consumers drop by Cell-Msg-Id); with transactions
// nothing arrives twice, without them only what the documented replay
// allows (see rmqReplayWindow).

const (
	rmqOrderEvents = 10_000
	rmqOrderKills  = 3
	rmqOrderKeys   = 400
	// rmqReplayWindow bounds the replay the README documents for a crash:
	// what the bridge had in flight (pipeline.maxInFlight, 512 here) and
	// what it acknowledged in the last persist interval (200ms) for a
	// RocketMQ source, or above the ack floor for a JetStream one; at the
	// test's rates, well under a second of traffic.
	rmqReplayWindow = time.Second
	// rmqCheckBackWait is the sinks' order-gate wait in these tests: the
	// test broker scans for half messages every 500ms and checks those at
	// least 1s old.
	rmqCheckBackWait = 3 * time.Second
	// killSlack is how long after a SIGKILL a send the process had written
	// may still be stored.
	killSlack = 250 * time.Millisecond
)

// orderEvent is one keyed event as sent.
type orderEvent struct {
	tally.Sent
	cell string // owning cell at send time
}

func TestCrashKill9RocketMQOrder(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: skipped with -short")
	}
	for _, tc := range []struct{ src, mode string }{
		{"rmq", "none"}, {"rmq", "transactional"}, {"nats", "none"}, {"nats", "transactional"},
	} {
		t.Run(fmt.Sprintf("%s-to-rmq-%s", tc.src, tc.mode), func(t *testing.T) { testRMQOrderCrash(t, tc.src, tc.mode) })
	}
}

func testRMQOrderCrash(t *testing.T, src, mode string) {
	seed := crashSeed(t)
	rnd := rand.New(rand.NewPCG(seed, 6))
	store, settings := "{store: memory}", "exactlyOnce: none"
	if mode == "transactional" {
		// Transactions need a store that outlives the bridge process.
		store = "{store: jetstream, bucket: rmq-order, ttl: 5m, reserveTTL: 2s}"
		settings = fmt.Sprintf("exactlyOnce: transactional, checkBackWait: %s", rmqCheckBackWait)
	}
	e, b := newRMQCrashEnv(t, rmqtest.Options{TransactionCheckDelay: time.Second, TransactionCheckInterval: 500 * time.Millisecond},
		src, "rmq", store, settings)
	for _, topic := range rmqTargetTopics(e.table) {
		if err := b.CreateTopic(topic, 4); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	events := sendOrderEvents(t, e, b, src, seed)
	t.Logf("sent %d events of %d keys in %v", len(events), rmqOrderKeys, time.Since(start).Round(time.Millisecond))

	progress := func() uint64 {
		var n int64
		for _, topic := range rmqTargetTopics(e.table) {
			for _, q := range b.QueueOffsets(topic) {
				n += q
			}
		}
		return uint64(n)
	}
	start = time.Now()
	var kills []time.Time
	for i := range rmqOrderKills {
		p := e.start(fmt.Sprintf("run%d", i+1))
		at := nextKill(rnd, progress(), uint64(len(events)), rmqOrderKills-i)
		eventually(t, 90*time.Second, fmt.Sprintf("progress %d before kill %d", at, i+1), func() bool { return progress() >= at })
		time.Sleep(time.Duration(rnd.IntN(20)) * time.Millisecond) // jitter, not synchronization
		kills = append(kills, time.Now())
		p.kill(t)
		t.Logf("kill -9 #%d at %d of %d messages arrived, %d half messages open (%v)", i+1, progress(), len(events),
			len(b.HalfMessages()), time.Since(start).Round(time.Millisecond))
	}
	p := e.start("final")
	eventually(t, 90*time.Second, "every event arrived, no half message open, the source settled", func() bool {
		if exited, err := p.Exited(); exited {
			t.Fatalf("bridge exited: %v\n%s", err, p.LogTail(60))
		}
		if progress() < uint64(len(events)) || len(b.HalfMessages()) != 0 {
			return false
		}
		if src == "rmq" {
			return rmqSourceDone(b)
		}
		return consumersIdle(t, e.js, e.table)
	})
	p.stop(t)
	t.Logf("done %v after the first start", time.Since(start).Round(time.Millisecond))
	if os.Getenv("CELLBRIDGE_KEEP_LOGS") != "" {
		t.Cleanup(func() { _ = os.CopyFS("/tmp/rmq-order-logs-"+src+"-"+mode, os.DirFS(e.dir)) })
	}
	checkRMQOrder(t, b, e.table, events, mode == "transactional", kills)
}

// sendOrderEvents stores the events in the source: rmqOrderKeys users,
// each event of a random one with the user's next sequence number. From
// RocketMQ, each user's events go to one queue of the source topic (a
// producer that wants per-key order does that); from NATS, one stream.
func sendOrderEvents(t *testing.T, e *crashEnv, b *rmqtest.Broker, src string, seed uint64) []orderEvent {
	t.Helper()
	rnd := rand.New(rand.NewPCG(seed, 7))
	rule := e.table.Rule(rmqTopicOrders)
	users := make([]string, rmqOrderKeys)
	for i := range users {
		users[i] = fmt.Sprintf("2088%012d", rnd.Uint64N(1e12))
	}
	seq := map[string]int{}
	events := make([]orderEvent, rmqOrderEvents)
	var rp interface {
		SendSync(ctx context.Context, msgs ...*primitive.Message) (*primitive.SendResult, error)
	}
	if src == "rmq" {
		p, err := producer.NewDefaultProducer(
			producer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
			producer.WithGroupName("test-order-producer"),
			producer.WithInstanceName(fmt.Sprintf("test-order-%d-%d", os.Getpid(), rmqInstance.Add(1))),
			producer.WithQueueSelector(producer.NewManualQueueSelector()),
		)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = p.Shutdown() }()
		rp = p
	}
	batches := make([][]*primitive.Message, rmqSourceQueues)
	flush := func(q int) {
		if len(batches[q]) == 0 {
			return
		}
		batches[q][0].Queue = &primitive.MessageQueue{Topic: rmqTopicOrders, BrokerName: "broker-a", QueueId: q}
		res, err := rp.SendSync(testCtx(t, 30*time.Second), batches[q]...)
		if err != nil || res.Status != primitive.SendOK {
			t.Fatalf("send batch: %v %v", res, err)
		}
		batches[q] = batches[q][:0]
	}
	js := e.js
	var acks []jetstream.PubAckFuture
	awaitAcks := func() {
		for _, f := range acks {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				t.Fatalf("publish: %v", err)
			case <-time.After(30 * time.Second):
				t.Fatal("publish: no PubAck within 30s")
			}
		}
		acks = acks[:0]
	}
	for i := range events {
		user := users[rnd.IntN(len(users))]
		seq[user]++
		ev := orderEvent{Sent: tally.Sent{ID: fmt.Sprintf("ev-%05d", i), Key: user, Seq: seq[user]}}
		hdr, body, err := tally.Encode(rule, tally.Payload{ID: ev.ID, Key: user, Seq: ev.Seq, Run: "crash", Sent: time.Now().UnixNano()})
		if err != nil {
			t.Fatal(err)
		}
		d := e.table.Route(rmqTopicOrders, &router.Message{Subject: rmqTopicOrders, Header: hdr, Body: body})
		if d.Reason != router.ReasonOwner {
			t.Fatalf("event %s of %s: routed %v, want to its owner", ev.ID, user, d)
		}
		ev.cell = d.Cell
		events[i] = ev
		if src == "rmq" {
			m := primitive.NewMessage(rmqTopicOrders, body)
			m.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, primitive.CreateUniqID())
			for k, vs := range hdr {
				m.WithProperty(k, vs[0])
			}
			q := int(fnvOf(user) % rmqSourceQueues)
			batches[q] = append(batches[q], m)
			if len(batches[q]) == rmqSendBatch {
				flush(q)
			}
			continue
		}
		m := nats.NewMsg(rmqTopicOrders + ".created")
		for k, vs := range hdr {
			m.Header[k] = vs
		}
		m.Data = body
		f, err := js.PublishMsgAsync(m)
		if err != nil {
			t.Fatal(err)
		}
		if acks = append(acks, f); len(acks) == 2000 {
			awaitAcks()
		}
	}
	if src == "rmq" {
		for q := range batches {
			flush(q)
		}
	} else {
		awaitAcks()
	}
	return events
}

func fnvOf(s string) uint32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(s))
	return h.Sum32()
}

// checkRMQOrder reads every cell topic and checks the events against what
// was sent (tally.Check per target queue), that each key used one queue,
// and that any event stored twice (none mode) was first stored within
// rmqReplayWindow before a kill and again after it.
func checkRMQOrder(t *testing.T, b *rmqtest.Broker, table *router.Table, events []orderEvent, exactlyOnce bool, kills []time.Time) {
	t.Helper()
	sent := make([]tally.Sent, len(events))
	owner := map[string]string{}
	for i, ev := range events {
		sent[i] = ev.Sent
		owner[ev.ID] = ev.cell
	}
	var arrivals []tally.Arrival
	queuesOf := map[string]map[string]bool{}
	uniq := map[string]string{} // event → its copy, for the failure report
	for _, c := range table.Cells() {
		topic := table.Rule(rmqTopicOrders).Render(c.Name, -1).Topic
		for _, m := range b.Messages(topic) {
			p, err := tally.Decode(m.Body)
			if err != nil {
				t.Fatalf("%s q%d@%d: %v", topic, m.QueueID, m.QueueOffset, err)
			}
			where := fmt.Sprintf("%s/q%d", topic, m.QueueID)
			if _, ok := m.Properties[rmq.HeaderTxSlot]; ok {
				t.Fatalf("%s q%d@%d: the copy carries the internal property %s", topic, m.QueueID, m.QueueOffset, rmq.HeaderTxSlot)
			}
			uniq[p.ID] = fmt.Sprintf("uniq %s, Cell-Msg-Id %s, stored %s", m.MsgID, m.Properties[bridge.HeaderMsgID], m.StoreTimestamp.Format(time.StampMilli))
			arrivals = append(arrivals, tally.Arrival{Cell: c.Name, Stream: where, Subject: topic, StreamSeq: uint64(m.QueueOffset),
				Stored: m.StoreTimestamp, MsgID: m.Properties[bridge.HeaderMsgID], Run: p.Run, ID: p.ID, Key: p.Key, Seq: p.Seq})
			if queuesOf[p.Key] == nil {
				queuesOf[p.Key] = map[string]bool{}
			}
			queuesOf[p.Key][where] = true
		}
	}
	r := tally.Check(sent, arrivals, tally.Options{Owner: func(a *tally.Arrival) (string, bool) {
		c, ok := owner[a.ID]
		return c, ok
	}})
	t.Logf("%v", r)
	var problems []string
	if len(r.Lost) > 0 || len(r.Misrouted) > 0 || len(r.Unknown) > 0 || r.NoMsgID > 0 || len(r.WrongMsgID) > 0 {
		problems = append(problems, r.Problems(10)...)
	}
	for key, qs := range queuesOf {
		if len(qs) != 1 {
			problems = append(problems, fmt.Sprintf("key %s in %d queues: %v", key, len(qs), qs))
		}
	}
	for i, ro := range r.Reordered {
		if i == 10 {
			problems = append(problems, fmt.Sprintf("... %d reorderings in all", len(r.Reordered)))
			break
		}
		problems = append(problems, fmt.Sprintf("reordered: key %s in %s: seq %d (%s: %s) at %d after seq %d (%s: %s)",
			ro.Key, ro.Stream, ro.Seq, ro.ID, uniq[ro.ID], ro.StreamSeq, ro.After, ro.AfterID, uniq[ro.AfterID]))
	}
	if exactlyOnce {
		if len(r.Duplicated) > 0 || len(r.DuplicatedMsgIDs) > 0 {
			problems = append(problems, r.Problems(10)...)
		}
	} else {
		problems = append(problems, checkReplays(arrivals, r.Duplicated, kills, t)...)
	}
	if len(problems) > 0 {
		var ks []string
		for _, k := range kills {
			ks = append(ks, k.Format(time.StampMilli))
		}
		t.Fatalf("%d problems (kills at %s):\n%s", len(problems), strings.Join(ks, ", "), strings.Join(problems, "\n"))
	}
}

// checkReplays requires every repeated copy of an event to follow a kill,
// the first of which came at most rmqReplayWindow after the event's
// previous copy was stored (a bridge started after a kill may die before
// it re-forwards what it re-read), and logs the replay per kill.
func checkReplays(arrivals []tally.Arrival, dups []tally.Duplicate, kills []time.Time, t *testing.T) []string {
	byID := map[string][]tally.Arrival{}
	for _, a := range arrivals {
		byID[a.ID] = append(byID[a.ID], a)
	}
	var problems []string
	perKill := make([]int, len(kills))
	oldest := make([]time.Duration, len(kills))
	for _, d := range dups {
		cs := byID[d.ID]
		sort.Slice(cs, func(i, j int) bool { return cs[i].Stored.Before(cs[j].Stored) })
		for i, c := range cs[1:] {
			prev := cs[i].Stored
			// The first kill after the previous copy: from then on, no
			// bridge had persisted an offset past the event. Sends a bridge
			// wrote just before it was killed reach the broker a moment
			// later (killSlack); store times have millisecond resolution.
			k := -1
			for j, at := range kills {
				if !at.Before(prev.Add(-killSlack)) && !at.After(c.Stored.Add(time.Millisecond)) {
					k = j
					break
				}
			}
			if k < 0 {
				problems = append(problems, fmt.Sprintf("event %s stored again at %s without a kill since its copy at %s",
					d.ID, c.Stored.Format(time.StampMilli), prev.Format(time.StampMilli)))
				continue
			}
			age := max(0, kills[k].Sub(prev))
			perKill[k]++
			oldest[k] = max(oldest[k], age)
			if age > rmqReplayWindow {
				problems = append(problems, fmt.Sprintf("event %s replayed after kill %d, stored %v before it (over %v)",
					d.ID, k+1, age.Round(time.Millisecond), rmqReplayWindow))
			}
		}
	}
	for k := range kills {
		t.Logf("kill %d: %d events stored again, the oldest stored %v before the kill", k+1, perKill[k], oldest[k].Round(time.Millisecond))
	}
	return problems
}
