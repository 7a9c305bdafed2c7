package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/deployment"
	"github.com/cellbridge/cellbridge/internal/syncbuf"
	"github.com/cellbridge/cellbridge/router"
)

// syncBuffer is a log sink tests read while the code writes.
type syncBuffer = syncbuf.Buffer

// inProcess is a bridge started in the test process (package app).
type inProcess struct {
	info     app.Info
	a        *app.App
	stopOnce sync.Once
	logs     *syncBuffer
	base     string // http://host:port
}

// startInProcess runs `cellbridge run -config cfgPath` inside the test; it
// stops when the test ends (or earlier, with stop).
func startInProcess(t *testing.T, cfgPath string, tune func(*app.Options)) *inProcess {
	t.Helper()
	var stderr bytes.Buffer
	o, code := prepareRun(&runFlags{config: cfgPath, data: t.TempDir(), natsPort: -1}, &stderr)
	if o == nil {
		t.Fatalf("prepareRun: exit %d\n%s", code, stderr.String())
	}
	ip := &inProcess{logs: &syncBuffer{}}
	o.Log = slog.New(slog.NewJSONHandler(ip.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if tune != nil {
		tune(o)
	}
	a, err := app.Start(testCtx(t, 30*time.Second), *o)
	if err != nil {
		t.Fatalf("start: %v\nbridge log:\n%s", err, tail(ip.logs.String(), 6000))
	}
	ip.a, ip.info = a, a.Info
	ip.base = "http://" + ip.info.HTTPAddr
	t.Cleanup(func() {
		ip.stop(t)
		if t.Failed() {
			t.Logf("bridge log:\n%s", tail(ip.logs.String(), 6000))
		}
	})
	return ip
}

// stop stops the bridge (once) and fails the test if it does not stop
// cleanly within 30s.
func (ip *inProcess) stop(t testing.TB) {
	t.Helper()
	ip.stopOnce.Do(func() {
		if err := ip.a.Stop(testCtx(t, 30*time.Second)); err != nil {
			t.Errorf("stop: %v", err)
		}
	})
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// get fetches a URL and returns status and body.
func get(t testing.TB, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

// metric returns the value of one sample from /metrics (0 when absent);
// labels must match exactly the sample's label set.
func metric(t testing.TB, base, name string, labels map[string]string) float64 {
	t.Helper()
	_, body := get(t, base+"/metrics")
	for _, s := range deployment.MetricSamples(body, name) {
		if maps.Equal(s.Labels, labels) {
			return s.Value
		}
	}
	return 0
}

// findMsg waits until a message with the given Nats-Msg-Id is in stream and
// returns it.
func findMsg(t testing.TB, js jetstream.JetStream, stream, id string) jetstream.Msg {
	t.Helper()
	var found jetstream.Msg
	eventually(t, 20*time.Second, stream+" holds "+id, func() bool {
		for _, m := range readStream(t, js, stream) {
			if m.Headers().Get(jetstream.MsgIDHeader) == id {
				found = m
				return true
			}
		}
		return false
	})
	return found
}

// inStream reports whether a message with Nats-Msg-Id id is in stream now.
func inStream(t testing.TB, js jetstream.JetStream, stream, id string) bool {
	for _, m := range readStream(t, js, stream) {
		if m.Headers().Get(jetstream.MsgIDHeader) == id {
			return true
		}
	}
	return false
}

// writeRules atomically replaces a file of a rules directory (a rename, as
// ConfigMap updates and editors do), so the watcher never sees half a file.
func writeRules(t testing.TB, dir, name, body string) {
	t.Helper()
	tmp := filepath.Join(dir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

func orderMsg(subject, user, eventID string) *nats.Msg {
	m := nats.NewMsg(subject)
	m.Header.Set("X-Event-Id", eventID)
	m.Data = []byte(`{"id":"` + eventID + `","user":{"id":` + user + `}}`)
	return m
}

// TestE2E runs one bridge in-process against a test server and walks
// through every outcome: forwarded, duplicate, held then released by a rules
// update on disk, and the DLQ for each poison kind; then the HTTP endpoints.
func TestE2E(t *testing.T) {
	env := newTestEnv(t)
	js, rules, table := env.js, env.rules, env.table
	dir := t.TempDir()
	cfg := writeFile(t, dir, "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
dedupe: {store: jetstream, bucket: e2e}
http: {listen: "127.0.0.1:0"}
pipeline:
  maxMessageBytes: 4KiB
  maxHops: 3
  holdDelay: 200ms
  heldRecheck: 100ms
  ackWait: 5s
`, rules, env.url))
	b := startInProcess(t, cfg, nil)
	cellStream := natsjs.CellStream

	t.Run("forwarded", func(t *testing.T) {
		// 2088000000012345: digits [-3:-1] = "34" → shard 34 → rz01.
		id := publishOne(t, js, orderMsg("orders.created", "2088000000012345", "e2e-fwd-1"))
		m := findMsg(t, js, cellStream("rz01"), id)
		want := map[string]string{
			bridge.HeaderMsgID: id, jetstream.MsgIDHeader: id, bridge.HeaderCell: "rz01", bridge.HeaderShard: "34",
			bridge.HeaderRulesVersion: "1", bridge.HeaderSource: "nats/ORDERS", bridge.HeaderHops: "1",
			"X-Event-Id": "e2e-fwd-1",
		}
		for k, v := range want {
			if got := m.Headers().Get(k); got != v {
				t.Errorf("header %s = %q, want %q", k, got, v)
			}
		}
		if m.Subject() != "cell.rz01.orders" {
			t.Errorf("subject %s", m.Subject())
		}
		// A payment keyed by header, and the pinned user (→ rz10).
		pm := nats.NewMsg("payments.captured")
		pm.Header.Set("X-User-Id", "2088000000000042")
		pm.Data = []byte(`{"id":"e2e-pay-1"}`)
		pid := publishOne(t, js, pm)
		m = findMsg(t, js, cellStream("rz10"), pid)
		if m.Subject() != "cell.rz10.payments" || m.Headers().Get(bridge.HeaderCell) != "rz10" {
			t.Errorf("pinned payment: subject %s, cell %s", m.Subject(), m.Headers().Get(bridge.HeaderCell))
		}
		eventually(t, 10*time.Second, "forwarded metric", func() bool {
			return metric(t, b.base, "cellbridge_forwarded_total", map[string]string{"rule": "orders", "cell": "rz01"}) >= 1
		})
	})

	t.Run("duplicate", func(t *testing.T) {
		// The producer's own Cell-Msg-Id is kept end to end: a repeat of
		// it is recognised however it reaches the bridge.
		before := metric(t, b.base, "cellbridge_messages_total", map[string]string{"rule": "orders", "outcome": "duplicate"})
		for range 2 {
			m := orderMsg("orders.paid", "2088000000012345", "e2e-dup")
			m.Header.Set(bridge.HeaderMsgID, "producer-key-77")
			publishOne(t, js, m)
		}
		eventually(t, 10*time.Second, "duplicate counted", func() bool {
			return metric(t, b.base, "cellbridge_messages_total", map[string]string{"rule": "orders", "outcome": "duplicate"}) >= before+1
		})
		n := 0
		for _, m := range readStream(t, js, cellStream("rz01")) {
			if m.Headers().Get(bridge.HeaderMsgID) == "producer-key-77" {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("producer-key-77 arrived %d times, want 1", n)
		}
	})

	t.Run("held then released by a rules update", func(t *testing.T) {
		cellmap, err := os.ReadFile(filepath.Join(rules, "cellmap.yaml"))
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
		v2 := replace(string(cellmap), "version: 1", "version: 2", "blocked: []", `blocked: ["34"]`)
		writeRules(t, rules, "cellmap.yaml", v2)
		eventually(t, 10*time.Second, "rules version 2 loaded", func() bool {
			return metric(t, b.base, "cellbridge_rules_version", nil) == 2
		})
		id := publishOne(t, js, orderMsg("orders.created", "2088000000099341", "e2e-held")) // shard 34
		eventually(t, 10*time.Second, "message held", func() bool {
			return metric(t, b.base, "cellbridge_held_messages", map[string]string{"rule": "orders"}) >= 1
		})
		for _, c := range table.Cells() {
			if inStream(t, js, cellStream(c.Name), id) {
				t.Fatalf("held message reached cell %s", c.Name)
			}
		}
		// Version 3 unblocks shard 34 and moves it to rz10.
		v3 := replace(string(cellmap), "version: 1", "version: 3", `shards: ["66-99"]`, `shards: ["34", "66-99"]`,
			`shards: ["33-65"]`, `shards: ["33", "35-65"]`)
		writeRules(t, rules, "cellmap.yaml", v3)
		m := findMsg(t, js, cellStream("rz10"), id)
		if got := m.Headers().Get(bridge.HeaderRulesVersion); got != "3" {
			t.Errorf("released message stamped with rules version %s, want 3", got)
		}
		if inStream(t, js, cellStream("rz01"), id) {
			t.Error("released message also reached the old owner rz01")
		}
		if !strings.Contains(b.logs.String(), `"msg":"rules reloaded"`) {
			t.Error("no reload log line")
		}
	})

	t.Run("dlq", func(t *testing.T) {
		big := orderMsg("orders.created", "2088000000012345", "e2e-big")
		big.Data = append(big.Data[:len(big.Data)-1], []byte(`,"pad":"`+strings.Repeat("x", 5000)+`"}`)...)
		hops := orderMsg("orders.created", "2088000000012345", "e2e-hops")
		hops.Header.Set(bridge.HeaderHops, "3")
		missing := nats.NewMsg("orders.created")
		missing.Data = []byte(`{"id":"e2e-missing","user":{}}`)
		badJSON := nats.NewMsg("orders.created")
		badJSON.Data = []byte(`{"id":"e2e-badjson","user":`)
		badKey := orderMsg("orders.created", `"guest-ab"`, "e2e-badkey")
		payNoKey := nats.NewMsg("payments.captured")
		payNoKey.Data = []byte(`{"id":"e2e-pay-nokey"}`)
		for _, tc := range []struct {
			m      *nats.Msg
			reason string
			dlq    string
		}{
			{missing, bridge.DLQMissingKey, "dlq.orders"},
			{badJSON, bridge.DLQBadBody, "dlq.orders"},
			{badKey, bridge.DLQBadKey, "dlq.orders"},
			{big, bridge.DLQTooLarge, "dlq.orders"},
			{hops, bridge.DLQTooManyHops, "dlq.orders"},
			{payNoKey, bridge.DLQMissingKey, "dlq.payments"},
		} {
			id := publishOne(t, js, tc.m)
			m := findMsg(t, js, natsjs.DLQStream, id)
			if e := m.Headers().Get(bridge.HeaderError); !strings.HasPrefix(e, tc.reason+": ") {
				t.Errorf("%s: Cell-Error %q, want prefix %s", id, e, tc.reason)
			}
			if m.Subject() != tc.dlq {
				t.Errorf("%s: DLQ subject %s, want %s", id, m.Subject(), tc.dlq)
			}
			if !bytes.Equal(m.Data(), tc.m.Data) {
				t.Errorf("%s: DLQ payload changed", id)
			}
		}
		for _, r := range []string{bridge.DLQMissingKey, bridge.DLQBadBody, bridge.DLQBadKey, bridge.DLQTooLarge, bridge.DLQTooManyHops} {
			if metric(t, b.base, "cellbridge_dlq_total", map[string]string{"rule": "orders", "reason": r}) < 1 {
				t.Errorf("cellbridge_dlq_total{rule=orders,reason=%s} not counted", r)
			}
		}
	})

	t.Run("http", func(t *testing.T) {
		if code, body := get(t, b.base+"/healthz"); code != 200 {
			t.Errorf("/healthz: %d %s", code, body)
		}
		eventually(t, 10*time.Second, "/readyz 200", func() bool {
			code, _ := get(t, b.base+"/readyz")
			return code == 200
		})
		code, body := get(t, b.base+"/route?topic=orders&key=2088000000012345")
		var d router.Decision
		if code != 200 || json.Unmarshal([]byte(body), &d) != nil {
			t.Fatalf("/route: %d %s", code, body)
		}
		// Version 3 moved shard 34 to rz10.
		if d.Cell != "rz10" || d.Shard != 34 || d.Version != 3 || d.Target.Subject != "cell.rz10.orders" || d.Reason != router.ReasonOwner {
			t.Errorf("/route decision %+v", d)
		}
		if code, _ := get(t, b.base+"/route?topic=nope&key=1"); code != 400 {
			t.Errorf("/route unknown topic: %d", code)
		}
		_, metrics := get(t, b.base+"/metrics")
		for _, name := range []string{"cellbridge_messages_total", "cellbridge_latency_seconds_bucket", "cellbridge_rules_last_reload_timestamp_seconds",
			"cellbridge_connection_up", "cellbridge_ready", "cellbridge_build_info"} {
			if !strings.Contains(metrics, name) {
				t.Errorf("/metrics lacks %s", name)
			}
		}
		if v := metric(t, b.base, "cellbridge_connection_up", map[string]string{"broker": "nats", "role": "dedupe"}); v != 1 {
			t.Errorf("connection_up{dedupe} = %v", v)
		}
		if code, body := get(t, b.base+"/status"); code != 200 || !strings.Contains(body, `"rulesVersion": 3`) {
			t.Errorf("/status: %d %s", code, body)
		}
	})
}

// TestE2EOrderPerKey publishes many events for a few keys and checks that
// each key's events arrive in its cell in publish order, while different
// keys are processed concurrently (JetStream KV store: the worker path).
func TestE2EOrderPerKey(t *testing.T) {
	env := newTestEnv(t)
	cfg := writeFile(t, t.TempDir(), "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
dedupe: {store: jetstream, bucket: order}
http: {listen: "127.0.0.1:0"}
`, env.rules, env.url))
	const keys, perKey = 24, 150
	var futs []jetstream.PubAckFuture
	for i := range keys * perKey {
		user := fmt.Sprintf("2088%012d", (i%keys)*7919+i%keys) // 24 users spread over the shards
		m := orderMsg("orders.created", user, fmt.Sprintf("%s-%06d", user, i/keys))
		f, err := env.js.PublishMsgAsync(m)
		if err != nil {
			t.Fatal(err)
		}
		futs = append(futs, f)
	}
	for _, f := range futs {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			t.Fatal(err)
		}
	}
	startInProcess(t, cfg, nil)
	eventually(t, 60*time.Second, "all forwarded", func() bool {
		c, _ := arrived(t, env.js, env.table)
		return c >= keys*perKey
	})
	last := map[string]int{}
	for _, c := range env.table.Cells() {
		for _, m := range readStream(t, env.js, natsjs.CellStream(c.Name)) {
			user, n, _ := strings.Cut(m.Headers().Get("X-Event-Id"), "-")
			seq, _ := strconv.Atoi(n)
			if prev, ok := last[user]; ok && seq != prev+1 {
				t.Fatalf("key %s: event %d arrived after %d", user, seq, prev)
			}
			if _, ok := last[user]; !ok && seq != 0 {
				t.Fatalf("key %s: first event to arrive is %d", user, seq)
			}
			last[user] = seq
		}
	}
	if len(last) != keys {
		t.Fatalf("%d keys arrived, want %d", len(last), keys)
	}
}
