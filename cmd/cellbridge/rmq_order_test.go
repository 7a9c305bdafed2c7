package main

import (
	"context"
	"errors"
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
// allows (see checkReplays).

const (
	rmqOrderEvents = 10_000
	rmqOrderKills  = 3
	rmqOrderKeys   = 400
	// rmqOrderRate and rmqOrderStep pace the source: 10,000 events in 10s.
	rmqOrderRate = 1000
	rmqOrderStep = 50 * time.Millisecond
	// The replay the README documents for a crash: what the bridge had in
	// flight (pipeline.maxInFlight, rmqMaxInFlight here) or pulled in
	// batches it had not finished (a RocketMQ source acknowledges whole
	// pulled batches: rmqSourceQueues × the adapter's 128; a JetStream
	// source re-reads from its ack floor: the pipeline's fetchBatch, 2048),
	// plus what it forwarded in about the last second (rmqReplayWindow: a
	// RocketMQ source persists its offsets at most 200ms after an
	// acknowledgement).
	rmqMaxInFlight  = 512
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
	hdr  map[string][]string
	body []byte
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
	events := prepareOrderEvents(t, e, seed)
	published := publishOrderEvents(t, e, b, src, events)

	progress := func() uint64 {
		var n int64
		for _, topic := range rmqTargetTopics(e.table) {
			for _, q := range b.QueueOffsets(topic) {
				n += q
			}
		}
		return uint64(n)
	}
	start := time.Now()
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
	published()
	t.Logf("%d events of %d keys published at %d/s", len(events), rmqOrderKeys, rmqOrderRate)
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
	checkRMQOrder(t, b, e.table, src, events, mode == "transactional", kills)
}

// prepareOrderEvents makes the events: rmqOrderKeys users, each event of a
// random one with the user's next sequence number, routed as the rules
// say.
func prepareOrderEvents(t *testing.T, e *crashEnv, seed uint64) []orderEvent {
	t.Helper()
	rnd := rand.New(rand.NewPCG(seed, 7))
	rule := e.table.Rule(rmqTopicOrders)
	users := make([]string, rmqOrderKeys)
	for i := range users {
		users[i] = fmt.Sprintf("2088%012d", rnd.Uint64N(1e12))
	}
	seq := map[string]int{}
	events := make([]orderEvent, rmqOrderEvents)
	for i := range events {
		user := users[rnd.IntN(len(users))]
		seq[user]++
		ev := orderEvent{Sent: tally.Sent{ID: fmt.Sprintf("ev-%05d", i), Key: user, Seq: seq[user]}}
		var err error
		ev.hdr, ev.body, err = tally.Encode(rule, tally.Payload{ID: ev.ID, Key: user, Seq: ev.Seq, Run: "crash"})
		if err != nil {
			t.Fatal(err)
		}
		d := e.table.Route(rmqTopicOrders, &router.Message{Subject: rmqTopicOrders, Header: ev.hdr, Body: ev.body})
		if d.Reason != router.ReasonOwner {
			t.Fatalf("event %s of %s: routed %v, want to its owner", ev.ID, user, d)
		}
		ev.cell = d.Cell
		events[i] = ev
	}
	return events
}

// publishOrderEvents stores the events in the source at rmqOrderRate, in
// steps of rmqOrderStep, on a goroutine of its own, and returns a function
// that waits until all are stored. From RocketMQ, each user's events go
// to one queue of the source topic (a producer that wants per-key order
// does that); from NATS, one stream. A paced source makes each bridge
// between two kills live for seconds, so that its offsets matter.
func publishOrderEvents(t *testing.T, e *crashEnv, b *rmqtest.Broker, src string, events []orderEvent) (wait func()) {
	t.Helper()
	var send func(chunk []orderEvent) error
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
		t.Cleanup(func() { _ = p.Shutdown() })
		send = func(chunk []orderEvent) error {
			batches := make([][]*primitive.Message, rmqSourceQueues)
			for _, ev := range chunk {
				m := primitive.NewMessage(rmqTopicOrders, ev.body)
				m.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, primitive.CreateUniqID())
				for k, vs := range ev.hdr {
					m.WithProperty(k, vs[0])
				}
				q := int(fnvOf(ev.Key) % rmqSourceQueues)
				batches[q] = append(batches[q], m)
			}
			for q, batch := range batches {
				if len(batch) == 0 {
					continue
				}
				batch[0].Queue = &primitive.MessageQueue{Topic: rmqTopicOrders, BrokerName: "broker-a", QueueId: q}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				res, err := p.SendSync(ctx, batch...)
				cancel()
				if err != nil || res.Status != primitive.SendOK {
					return fmt.Errorf("send batch: %v %v", res, err)
				}
			}
			return nil
		}
	} else {
		send = func(chunk []orderEvent) error {
			var acks []jetstream.PubAckFuture
			for _, ev := range chunk {
				m := nats.NewMsg(rmqTopicOrders + ".created")
				for k, vs := range ev.hdr {
					m.Header[k] = vs
				}
				m.Data = ev.body
				f, err := e.js.PublishMsgAsync(m)
				if err != nil {
					return err
				}
				acks = append(acks, f)
			}
			for _, f := range acks {
				select {
				case <-f.Ok():
				case err := <-f.Err():
					return err
				case <-time.After(30 * time.Second):
					return errors.New("no PubAck within 30s")
				}
			}
			return nil
		}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		step := rmqOrderRate * int(rmqOrderStep) / int(time.Second)
		tick := time.NewTicker(rmqOrderStep)
		defer tick.Stop()
		for i := 0; i < len(events); i += step {
			if err := send(events[i:min(i+step, len(events))]); err != nil {
				t.Errorf("publish: %v", err)
				return
			}
			<-tick.C
		}
	}()
	return func() {
		select {
		case <-done:
		case <-time.After(2 * time.Minute):
			t.Fatal("publishing the events took over 2 minutes")
		}
		if t.Failed() {
			t.FailNow()
		}
	}
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
func checkRMQOrder(t *testing.T, b *rmqtest.Broker, table *router.Table, src string, events []orderEvent, exactlyOnce bool, kills []time.Time) {
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
		buffered := rmqSourceQueues * 128
		if src == "nats" {
			buffered = 1024
		}
		problems = append(problems, checkReplays(arrivals, r.Duplicated, kills, rmqMaxInFlight+buffered, t)...)
	}
	if len(problems) > 0 {
		var ks []string
		for _, k := range kills {
			ks = append(ks, k.Format(time.StampMilli))
		}
		t.Fatalf("%d problems (kills at %s):\n%s", len(problems), strings.Join(ks, ", "), strings.Join(problems, "\n"))
	}
}

// checkReplays attributes every repeated copy of an event to the first
// kill after the event's previous copy (from then on no bridge had
// persisted an offset past it; a bridge started after a kill may die
// before it re-forwards what it re-read), and requires each kill's replay
// to stay within the documented bound: in flight or buffered (inFlight)
// plus the copies the bridge stored in the rmqReplayWindow before it was
// killed. It logs, per kill, how many events were stored again and how
// long before the kill the oldest of them had been stored.
func checkReplays(arrivals []tally.Arrival, dups []tally.Duplicate, kills []time.Time, inFlight int, t *testing.T) []string {
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
			// Sends a bridge wrote just before it was killed reach the
			// broker a moment later (killSlack); store times have
			// millisecond resolution.
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
			perKill[k]++
			oldest[k] = max(oldest[k], kills[k].Sub(prev))
		}
	}
	for k, at := range kills {
		recent := 0
		for _, a := range arrivals {
			if !a.Stored.Before(at.Add(-rmqReplayWindow)) && !a.Stored.After(at) {
				recent++
			}
		}
		t.Logf("kill %d: %d events stored again (bound %d in flight or buffered + %d stored in the %v before the kill), the oldest stored %v before the kill",
			k+1, perKill[k], inFlight, recent, rmqReplayWindow, oldest[k].Round(time.Millisecond))
		if perKill[k] > inFlight+recent {
			problems = append(problems, fmt.Sprintf("kill %d: %d events stored again, over the documented replay of %d in flight or buffered + %d stored in the %v before it",
				k+1, perKill[k], inFlight, recent, rmqReplayWindow))
		}
	}
	return problems
}
