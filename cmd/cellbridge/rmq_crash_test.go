package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
	"github.com/cellbridge/cellbridge/router"
)

// The RocketMQ crash tests run `cellbridge run` as a subprocess; the rmqtest
// broker and the nats-server run in the test process, so they survive the
// kills. They kill the bridge with SIGKILL several times mid-stream and
// check that every event is in its owning cell exactly once (RocketMQ →
// NATS here, RocketMQ targets in rmq_order_test.go).

const (
	rmqCrashEvents   = 20_000
	rmqCrashKills    = 4
	rmqReplicaEvents = 10_000
	rmqSourceQueues  = 4
	rmqSendBatch     = 200
	rmqTopicOrders   = "orders"
	rmqTopicPayments = "payments"
)

// rmqRulesDir writes the example cell map plus orders and payments rules
// (the example rules' keys and shards) with the given source and target
// kinds ("rmq" or "nats").
func rmqRulesDir(t *testing.T, src, sink string) string {
	t.Helper()
	dir := exampleRules(t)
	for _, f := range []string{"orders.yaml", "payments.yaml"} {
		if err := os.Remove(filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	for _, r := range []struct{ name, stream, key string }{
		{"orders", "ORDERS", "{json: user.id}"},
		{"payments", "PAYMENTS", "{header: X-User-Id}"},
	} {
		var b strings.Builder
		fmt.Fprintf(&b, "kind: TopicRule\nname: %s\n", r.name)
		if src == "rmq" {
			fmt.Fprintf(&b, "source: {broker: rmq, topic: %s, group: cellbridge-%s}\n", r.name, r.name)
		} else {
			fmt.Fprintf(&b, "source: {broker: nats, stream: %s, subject: \"%s.>\", group: cellbridge-%s}\n", r.stream, r.name, r.name)
		}
		fmt.Fprintf(&b, "key: %s\nshard: {func: digits, from: -3, to: -1}\nonMissingKey: dlq\n", r.key)
		if sink == "rmq" {
			fmt.Fprintf(&b, "target: {broker: rmq, topic: \"cell_{cell}_%s\"}\ndlq: {broker: rmq, topic: dlq_%s}\n", r.name, r.name)
		} else {
			fmt.Fprintf(&b, "target: {broker: nats, subject: \"cell.{cell}.%s\"}\ndlq: {broker: nats, subject: dlq.%s}\n", r.name, r.name)
		}
		writeFile(t, dir, r.name+".yaml", b.String())
	}
	return dir
}

// newRMQCrashEnv starts the brokers, writes rules and config (rmqSettings
// go into the rocketmq broker's settings), and returns a crashEnv whose
// start/kill/stop run the bridge binary.
func newRMQCrashEnv(t *testing.T, opts rmqtest.Options, src, sink, dedupeYAML, rmqSettings string) (*crashEnv, *rmqtest.Broker) {
	t.Helper()
	if opts.MaxSuspend == 0 {
		opts.MaxSuspend = time.Second
	}
	b := rmqtesting.StartTB(t, opts)
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	rules := rmqRulesDir(t, src, sink)
	table, err := router.Load(rules)
	if err != nil {
		t.Fatal(err)
	}
	ensureStreams(t, js, table)
	if src == "rmq" {
		for _, topic := range []string{rmqTopicOrders, rmqTopicPayments} {
			if err := b.CreateTopic(topic, rmqSourceQueues); err != nil {
				t.Fatal(err)
			}
		}
	}
	dir := t.TempDir()
	cfg := writeFile(t, dir, "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
  rmq: {type: rocketmq, nameservers: [%q], instancePrefix: crash%s}
dedupe: %s
pipeline:
  ackWait: 2s
  maxInFlight: %d
  drainTimeout: 10s
  retry: {initial: 50ms, max: 500ms}
log: {level: info, format: json}
`, rules, srv.URL, b.NameServerAddr(), strings.TrimSuffix(", "+rmqSettings, ", "), dedupeYAML, rmqMaxInFlight))
	return &crashEnv{t: t, js: js, table: table, config: cfg, dir: dir}, b
}

// publishRMQEvents stores n sample events in the source topics (batches of
// one topic each) and returns where each must land, keyed by the
// idempotency key the bridge derives (the unique message id).
func publishRMQEvents(t *testing.T, b *rmqtest.Broker, table *router.Table, seed uint64, n int) published {
	t.Helper()
	p, err := producer.NewDefaultProducer(
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
		producer.WithGroupName("test-crash-producer"),
		producer.WithInstanceName(fmt.Sprintf("test-crash-%d-%d", os.Getpid(), rmqInstance.Add(1))),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = p.Shutdown() }()
	gen := newEventGen(seed, crashPoisonEvery)
	exp := make(published, n)
	type pend struct {
		m *primitive.Message
		e expectation
	}
	batches := map[string][]pend{}
	flush := func(topic string) {
		ps := batches[topic]
		if len(ps) == 0 {
			return
		}
		msgs := make([]*primitive.Message, len(ps))
		for i, x := range ps {
			msgs[i] = x.m
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		res, err := p.SendSync(ctx, msgs...)
		if err != nil || res.Status != primitive.SendOK {
			t.Fatalf("send batch: %v %v", res, err)
		}
		for _, x := range ps {
			id := x.m.GetProperty(primitive.PropertyUniqueClientMessageIdKeyIndex)
			if id == "" {
				t.Fatal("sent message without UNIQ_KEY")
			}
			exp[id] = x.e
		}
		batches[topic] = ps[:0]
	}
	for range n {
		ev := gen.next()
		d := table.Route(ev.Topic, &router.Message{Subject: ev.Topic, Header: ev.Header, Body: ev.Body})
		e := expectation{EventID: ev.ID, Topic: ev.Topic, Poison: ev.Poison, Shard: d.Shard, Subject: d.Target.Subject + d.Target.Topic}
		switch {
		case d.Reason == router.ReasonDLQ:
			if ev.Poison == "" {
				t.Fatalf("event %s routed to the DLQ but is not poison: %+v", ev.ID, d)
			}
		case ev.Poison != "":
			t.Fatalf("poison event %s (%s) not routed to the DLQ: %+v", ev.ID, ev.Poison, d)
		default:
			e.Cell = d.Cell
		}
		m := primitive.NewMessage(ev.Topic, ev.Body)
		// The client sets no unique id on the messages of a batch; a
		// producer that wants one per message sets it itself.
		m.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, primitive.CreateUniqID())
		for k := range ev.Header {
			m.WithProperty(k, ev.Header.Get(k))
		}
		batches[ev.Topic] = append(batches[ev.Topic], pend{m, e})
		if len(batches[ev.Topic]) == rmqSendBatch {
			flush(ev.Topic)
		}
	}
	flush(rmqTopicOrders)
	flush(rmqTopicPayments)
	return exp
}

// nextKill picks the progress at which to kill the bridge that just
// started: a random share of what is left, so that every run forwards
// something and every kill lands mid-stream, whatever the machine's speed.
func nextKill(rnd *rand.Rand, now, total uint64, killsLeft int) uint64 {
	left := total - min(now, total)
	step := left / uint64(killsLeft+1)
	return now + step/4 + uint64(rnd.Float64()*float64(step))
}

// rmqSourceDone reports whether every queue of the source topics has its
// committed offset at the queue's end.
func rmqSourceDone(b *rmqtest.Broker) bool {
	for _, topic := range []string{rmqTopicOrders, rmqTopicPayments} {
		for q, max := range b.QueueOffsets(topic) {
			if off, _ := b.CommittedOffset("cellbridge-"+topic, topic, q); off != max {
				return false
			}
		}
	}
	return true
}

// TestCrashKill9RocketMQSource: RocketMQ → NATS (memory dedupe store: the
// cell streams' Nats-Msg-Id window drops what a restarted bridge forwards
// again), kill -9 four times during 20,000 events.
func TestCrashKill9RocketMQSource(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: skipped with -short")
	}
	seed := crashSeed(t)
	rnd := rand.New(rand.NewPCG(seed, 3))
	e, b := newRMQCrashEnv(t, rmqtest.Options{}, "rmq", "nats", "{store: memory}", "")
	start := time.Now()
	e.exp = publishRMQEvents(t, b, e.table, seed, rmqCrashEvents)
	fwd, dlq := e.exp.counts()
	t.Logf("published %d events (%d routable, %d poison) in %v", len(e.exp), fwd, dlq, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	for i := range rmqCrashKills {
		e.runUntilKilled(i+1, rnd, 60*time.Second, e.progress, func() uint64 {
			return nextKill(rnd, e.progress(), uint64(len(e.exp)), rmqCrashKills-i)
		})
		t.Logf("kill -9 #%d at %d of %d messages arrived (%v)", i+1, e.progress(), len(e.exp), time.Since(start).Round(time.Millisecond))
	}
	p := e.start("final")
	eventually(t, 60*time.Second, "every event forwarded", func() bool {
		c, d := arrived(t, e.js, e.table)
		return c >= uint64(fwd) && d >= uint64(dlq)
	})
	// Arrival can be complete before the last bridge re-read what the
	// killed ones forwarded but had not committed yet; its offsets reach
	// the end once it has (persisted every 5s while it runs).
	eventually(t, 30*time.Second, "source offsets at the end of every queue", func() bool { return rmqSourceDone(b) })
	p.stop(t)
	t.Logf("done %v after start", time.Since(start).Round(time.Millisecond))
	e.verify()
}

// rmqTargetTopics lists every cell and DLQ topic of the rules.
func rmqTargetTopics(table *router.Table) []string {
	var out []string
	for _, r := range table.Rules() {
		for _, c := range table.Cells() {
			out = append(out, r.Render(c.Name, -1).Topic)
		}
		if r.DLQ != nil {
			out = append(out, r.DLQ.Topic)
		}
	}
	return out
}

// TestRebalanceRocketMQTwoReplicas runs two bridge processes in one
// consumer group (RocketMQ → NATS, shared JetStream KV dedupe store) and
// stops one of them gracefully mid-stream: its queues move to the other,
// which reads them from the committed offsets. Nothing is lost, and the
// messages read twice are dropped by the dedupe store or the cell
// streams' Nats-Msg-Id window (each event is in its cell once).
func TestRebalanceRocketMQTwoReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: skipped with -short")
	}
	seed := crashSeed(t)
	rnd := rand.New(rand.NewPCG(seed, 5))
	e, b := newRMQCrashEnv(t, rmqtest.Options{}, "rmq", "nats", "{store: jetstream, bucket: rmq-rebalance, ttl: 5m, reserveTTL: 2s}", "")
	e.exp = publishRMQEvents(t, b, e.table, seed, rmqReplicaEvents)
	fwd, dlq := e.exp.counts()
	start := time.Now()
	a := e.start("replica-a")
	r := e.start("replica-b")
	eventually(t, 30*time.Second, "both replicas in each group", func() bool {
		return len(b.Consumers("cellbridge-orders")) == 2 && len(b.Consumers("cellbridge-payments")) == 2
	})
	at := nextKill(rnd, e.progress(), uint64(len(e.exp)), 1)
	eventually(t, 60*time.Second, fmt.Sprintf("progress %d before the stop", at), func() bool { return e.progress() >= at })
	forwarded := func(p *proc) float64 {
		return metric(t, p.http, "cellbridge_messages_total", map[string]string{"rule": "orders", "outcome": "forwarded"}) +
			metric(t, p.http, "cellbridge_messages_total", map[string]string{"rule": "payments", "outcome": "forwarded"})
	}
	fa := forwarded(a)
	a.stop(t)
	t.Logf("replica-a stopped at %d of %d messages arrived, after forwarding %.0f (%v)", e.progress(), len(e.exp), fa, time.Since(start).Round(time.Millisecond))
	eventually(t, 60*time.Second, "every event forwarded", func() bool {
		c, d := arrived(t, e.js, e.table)
		return c >= uint64(fwd) && d >= uint64(dlq)
	})
	fb := forwarded(r)
	dups := metric(t, r.http, "cellbridge_messages_total", map[string]string{"rule": "orders", "outcome": "duplicate"}) +
		metric(t, r.http, "cellbridge_messages_total", map[string]string{"rule": "payments", "outcome": "duplicate"})
	eventually(t, 30*time.Second, "source offsets at the end of every queue", func() bool { return rmqSourceDone(b) })
	r.stop(t)
	t.Logf("done %v after start; replica-a forwarded %.0f, replica-b %.0f (+%.0f dropped as duplicates by the dedupe store)",
		time.Since(start).Round(time.Millisecond), fa, fb, dups)
	if fa == 0 || fb == 0 {
		t.Errorf("work not shared: replica-a forwarded %.0f, replica-b %.0f", fa, fb)
	}
	e.verify()
}
