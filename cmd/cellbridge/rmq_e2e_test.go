package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"github.com/nats-io/nats.go"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
	"github.com/cellbridge/cellbridge/router"
)

// The RocketMQ pairs run `cellbridge run` in-process (package app) with one
// config each, against an rmqtest broker and a test nats-server, and walk
// through forwarded, DLQ and held-then-released, as TestE2E does for
// NATS → NATS.

// rmqEnv is a test RocketMQ broker plus a NATS server and a rules
// directory holding the example cell map and one `orders` topic rule.
type rmqEnv struct {
	b     *rmqtest.Broker
	nats  *natstest.Server
	rules string
	prod  interface {
		SendSync(ctx context.Context, msgs ...*primitive.Message) (*primitive.SendResult, error)
		Shutdown() error
	}
}

var rmqInstance atomic.Int64

func init() {
	// Install the client's log adapter before any client exists (the
	// client reads its logger without synchronization); in-process bridges
	// then only switch its target.
	rmq.SetLogger(slog.New(slog.DiscardHandler))
}

func newRMQEnv(t *testing.T, opts rmqtest.Options, ordersRule string) *rmqEnv {
	t.Helper()
	if opts.MaxSuspend == 0 {
		opts.MaxSuspend = time.Second
	}
	env := &rmqEnv{b: rmqtesting.StartTB(t, opts), nats: natstest.Start(t)}
	env.rules = exampleRules(t)
	for _, f := range []string{"orders.yaml", "payments.yaml"} {
		if err := os.Remove(filepath.Join(env.rules, f)); err != nil {
			t.Fatal(err)
		}
	}
	writeFile(t, env.rules, "orders.yaml", ordersRule)
	return env
}

// producer returns the test's RocketMQ producer (started once).
func (e *rmqEnv) producer(t *testing.T) {
	t.Helper()
	if e.prod != nil {
		return
	}
	p, err := producer.NewDefaultProducer(
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{e.b.NameServerAddr()})),
		producer.WithGroupName("test-source-producer"),
		producer.WithInstanceName(fmt.Sprintf("test-producer-%d-%d", os.Getpid(), rmqInstance.Add(1))),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	e.prod = p
	t.Cleanup(func() { _ = p.Shutdown() })
}

// sendRMQ stores one order event in the source topic and returns its
// idempotency key as the bridge derives it (the unique message id).
func (e *rmqEnv) sendRMQ(t *testing.T, topic, body string, props ...string) string {
	t.Helper()
	e.producer(t)
	m := primitive.NewMessage(topic, []byte(body))
	for i := 0; i+1 < len(props); i += 2 {
		m.WithProperty(props[i], props[i+1])
	}
	res, err := e.prod.SendSync(testCtx(t, 10*time.Second), m)
	if err != nil || res.Status != primitive.SendOK {
		t.Fatalf("send: %v %v", res, err)
	}
	return res.MsgID
}

// rmqMsg is a forwarded message as the tests compare it, from either sink.
type rmqMsg struct {
	where  string // NATS subject or RocketMQ topic
	header map[string]string
	body   []byte
}

// findRMQ waits for a message whose last key is id (the idempotency key,
// added to the source's keys) in a RocketMQ topic.
func (e *rmqEnv) findRMQ(t *testing.T, topic, id string) rmqMsg {
	t.Helper()
	var out rmqMsg
	eventually(t, 20*time.Second, topic+" holds "+id, func() bool {
		for _, m := range e.b.Messages(topic) {
			if keys := strings.Fields(m.Keys); len(keys) > 0 && keys[len(keys)-1] == id {
				out = rmqMsg{where: topic, header: m.Properties, body: m.Body}
				return true
			}
		}
		return false
	})
	return out
}

func (e *rmqEnv) inRMQ(topic, id string) bool {
	for _, m := range e.b.Messages(topic) {
		if m.Properties[bridge.HeaderMsgID] == id {
			return true
		}
	}
	return false
}

// pairCase describes one source → sink pair for the shared walk-through.
type pairCase struct {
	name   string
	source string // "nats" | "rmq"
	sink   string // "nats" | "rmq"
}

func ordersRule(src, sink string) string {
	var b strings.Builder
	b.WriteString("kind: TopicRule\nname: orders\n")
	if src == "rmq" {
		b.WriteString("source: {broker: rmq, topic: orders, group: cellbridge-orders}\n")
	} else {
		b.WriteString("source: {broker: nats, stream: ORDERS, subject: \"orders.>\", group: cellbridge-orders}\n")
	}
	b.WriteString("key: {json: user.id}\nshard: {func: digits, from: -3, to: -1}\nonMissingKey: dlq\n")
	if sink == "rmq" {
		b.WriteString("target: {broker: rmq, topic: \"cell_{cell}_orders\"}\ndlq: {broker: rmq, topic: dlq_orders}\n")
	} else {
		b.WriteString("target: {broker: nats, subject: \"cell.{cell}.orders\"}\ndlq: {broker: nats, subject: dlq.orders}\n")
	}
	return b.String()
}

func TestE2ERocketMQPairs(t *testing.T) {
	for _, pc := range []pairCase{
		{"rocketmq-to-rocketmq", "rmq", "rmq"},
		{"rocketmq-to-nats", "rmq", "nats"},
		{"nats-to-rocketmq", "nats", "rmq"},
	} {
		t.Run(pc.name, func(t *testing.T) { testPair(t, pc) })
	}
}

func testPair(t *testing.T, pc pairCase) {
	env := newRMQEnv(t, rmqtest.Options{}, ordersRule(pc.source, pc.sink))
	_, js := env.nats.Connect(t)
	table, err := router.Load(env.rules)
	if err != nil {
		t.Fatal(err)
	}
	ensureStreams(t, js, table)
	if pc.source == "rmq" {
		if err := env.b.CreateTopic("orders", 4); err != nil {
			t.Fatal(err)
		}
	}
	cfg := writeFile(t, t.TempDir(), "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
  rmq: {type: rocketmq, nameservers: [%q], instancePrefix: e2e}
dedupe: {store: memory}
http: {listen: "127.0.0.1:0"}
pipeline:
  maxMessageBytes: 4KiB
  holdDelay: 200ms
  heldRecheck: 100ms
  ackWait: 5s
log: {level: debug}
`, env.rules, env.nats.URL, env.b.NameServerAddr()))
	br := startInProcess(t, cfg, debugLog(t))

	// publish stores an event at the source and returns its Cell-Msg-Id.
	publish := func(user, eventID string, hdr ...string) string {
		body := `{"id":"` + eventID + `","user":{"id":` + user + `}}`
		if user == "" {
			body = `{"id":"` + eventID + `","user":{}}`
		}
		if pc.source == "rmq" {
			return env.sendRMQ(t, "orders", body, append([]string{"X-Event-Id", eventID}, hdr...)...)
		}
		m := nats.NewMsg("orders.created")
		m.Header.Set("X-Event-Id", eventID)
		for i := 0; i+1 < len(hdr); i += 2 {
			m.Header.Set(hdr[i], hdr[i+1])
		}
		m.Data = []byte(body)
		return publishOne(t, js, m)
	}
	// find waits for id in a cell ("" = the DLQ).
	find := func(cell, id string) rmqMsg {
		if pc.sink == "rmq" {
			topic := "dlq_orders"
			if cell != "" {
				topic = "cell_" + cell + "_orders"
			}
			return env.findRMQ(t, topic, id)
		}
		stream := natsjs.DLQStream
		if cell != "" {
			stream = natsjs.CellStream(cell)
		}
		m := findMsg(t, js, stream, id)
		h := map[string]string{}
		for k := range m.Headers() {
			h[k] = m.Headers().Get(k)
		}
		return rmqMsg{where: m.Subject(), header: h, body: m.Data()}
	}
	in := func(cell, id string) bool {
		if pc.sink == "rmq" {
			return env.inRMQ("cell_"+cell+"_orders", id)
		}
		return inStream(t, js, natsjs.CellStream(cell), id)
	}
	target := func(cell string) string {
		if pc.sink == "rmq" {
			return "cell_" + cell + "_orders"
		}
		return "cell." + cell + ".orders"
	}
	sourceName := "nats/ORDERS"
	if pc.source == "rmq" {
		sourceName = "rmq/orders"
	}

	t.Run("forwarded", func(t *testing.T) {
		id := publish("2088000000012345", "fwd-1") // shard 34 → rz01
		m := find("rz01", id)
		want := map[string]string{
			bridge.HeaderMsgID: id, bridge.HeaderCell: "rz01", bridge.HeaderShard: "34",
			bridge.HeaderRulesVersion: "1", bridge.HeaderSource: sourceName, bridge.HeaderHops: "1",
			"X-Event-Id": "fwd-1",
		}
		for k, v := range want {
			if m.header[k] != v {
				t.Errorf("header %s = %q, want %q", k, m.header[k], v)
			}
		}
		if m.where != target("rz01") {
			t.Errorf("arrived at %s, want %s", m.where, target("rz01"))
		}
		// A producer's own Cell-Msg-Id is kept, and a repeat is dropped.
		for range 2 {
			publish("2088000000012345", "dup", bridge.HeaderMsgID, "producer-key-9")
		}
		find("rz01", "producer-key-9")
		eventually(t, 10*time.Second, "duplicate counted", func() bool {
			return metric(t, br.base, "cellbridge_messages_total", map[string]string{"rule": "orders", "outcome": "duplicate"}) >= 1
		})
		n := 0
		if pc.sink == "rmq" {
			for _, m := range env.b.Messages(target("rz01")) {
				if m.Properties[bridge.HeaderMsgID] == "producer-key-9" {
					n++
				}
			}
		} else {
			for _, m := range readStream(t, js, natsjs.CellStream("rz01")) {
				if m.Headers().Get(bridge.HeaderMsgID) == "producer-key-9" {
					n++
				}
			}
		}
		if n != 1 {
			t.Errorf("producer-key-9 arrived %d times", n)
		}
	})

	// A RocketMQ source's tag and keys travel as the headers TAGS and KEYS; a
	// RocketMQ copy gets them back as its tag and keys (plus the
	// idempotency key), a NATS copy keeps them as headers.
	t.Run("tags and keys", func(t *testing.T) {
		id := publish("2088000000012345", "tagged", "TAGS", "TagA", "KEYS", "order-7 user-2088")
		m := find("rz01", id)
		wantKeys := "order-7 user-2088"
		if pc.sink == "rmq" {
			wantKeys += " " + id
		}
		if m.header["TAGS"] != "TagA" || m.header["KEYS"] != wantKeys {
			t.Errorf("copy's TAGS %q KEYS %q, want %q %q", m.header["TAGS"], m.header["KEYS"], "TagA", wantKeys)
		}
		if pc.sink == "rmq" {
			for k := range m.header {
				if k == rmq.HeaderTxSlot || k == "PGROUP" || k == "TRAN_MSG" {
					t.Errorf("copy carries the internal property %s", k)
				}
			}
		}
	})

	t.Run("dlq", func(t *testing.T) {
		for _, tc := range []struct{ user, reason string }{
			{"", bridge.DLQMissingKey},
			{`"guest-ab"`, bridge.DLQBadKey},
		} {
			id := publish(tc.user, "poison-"+tc.reason)
			m := find("", id)
			if !strings.HasPrefix(m.header[bridge.HeaderError], tc.reason+": ") {
				t.Errorf("%s: Cell-Error %q", tc.reason, m.header[bridge.HeaderError])
			}
			if !strings.Contains(string(m.body), "poison-"+tc.reason) {
				t.Errorf("%s: DLQ payload %q", tc.reason, m.body)
			}
		}
	})

	t.Run("held then released by a rules update", func(t *testing.T) {
		cellmap, err := os.ReadFile(filepath.Join(env.rules, "cellmap.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		replace := func(s string, oldNew ...string) string {
			for i := 0; i < len(oldNew); i += 2 {
				if !strings.Contains(s, oldNew[i]) {
					t.Fatalf("cellmap.yaml no longer contains %q; update the test", oldNew[i])
				}
				s = strings.Replace(s, oldNew[i], oldNew[i+1], 1)
			}
			return s
		}
		writeRules(t, env.rules, "cellmap.yaml", replace(string(cellmap), "version: 1", "version: 2", "blocked: []", `blocked: ["34"]`))
		eventually(t, 10*time.Second, "rules version 2", func() bool {
			return metric(t, br.base, "cellbridge_rules_version", nil) == 2
		})
		id := publish("2088000000099341", "held") // shard 34
		eventually(t, 20*time.Second, "message held", func() bool {
			return metric(t, br.base, "cellbridge_held_messages", map[string]string{"rule": "orders"}) >= 1
		})
		for _, c := range []string{"rz00", "rz01", "rz10", "gz00"} {
			if in(c, id) {
				t.Fatalf("held message reached %s", c)
			}
		}
		writeRules(t, env.rules, "cellmap.yaml", replace(string(cellmap), "version: 1", "version: 3",
			`shards: ["66-99"]`, `shards: ["34", "66-99"]`, `shards: ["33-65"]`, `shards: ["33", "35-65"]`))
		m := find("rz10", id)
		if m.header[bridge.HeaderRulesVersion] != "3" {
			t.Errorf("released with rules version %q, want 3", m.header[bridge.HeaderRulesVersion])
		}
		if in("rz01", id) {
			t.Error("released message also reached the old owner rz01")
		}
	})

	t.Run("status", func(t *testing.T) {
		eventually(t, 10*time.Second, "/readyz 200", func() bool {
			code, _ := get(t, br.base+"/readyz")
			return code == 200
		})
		if v := metric(t, br.base, "cellbridge_connection_up", map[string]string{"broker": "rmq", "role": map[bool]string{true: "source", false: "sink"}[pc.source == "rmq"]}); v != 1 {
			t.Errorf("connection_up for rmq = %v", v)
		}
	})
}

// debugLog, with CELLBRIDGE_TEST_LOG=FILE, sends the in-process bridge's
// log to FILE (the failure output shows only its tail).
func debugLog(t *testing.T) func(*app.Options) {
	path := os.Getenv("CELLBRIDGE_TEST_LOG")
	if path == "" {
		return nil
	}
	return func(o *app.Options) {
		f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		o.Log = slog.New(slog.NewJSONHandler(f, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
}
