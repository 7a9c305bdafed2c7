package e2etest

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

func exampleTable(t *testing.T) (string, *router.Table) {
	t.Helper()
	dir, err := filepath.Abs("../../deploy/rules")
	if err != nil {
		t.Fatal(err)
	}
	return dir, loadTable(t, dir)
}

// loadTable loads the rules of dir, failing the test when they do not.
func loadTable(t *testing.T, dir string) *router.Table {
	t.Helper()
	table, err := router.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return table
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestKeysCoverShards: consecutive keys fall in consecutive shards of the
// example rules, and are distinct.
func TestKeysCoverShards(t *testing.T) {
	_, table := exampleTable(t)
	keys := Keys(1200)
	seen := map[string]bool{}
	for i, k := range keys {
		if seen[k] || len(k) != 16 {
			t.Fatalf("key %d %q: repeated or not 16 digits", i, k)
		}
		seen[k] = true
		if d := table.Resolve("orders", k); d.Shard != i%100 {
			t.Fatalf("key %d %s in shard %d, want %d", i, k, d.Shard, i%100)
		}
	}
}

// TestLoadSurvivesServerRestart publishes through a restart of the only
// server: attempts fail while it is down and are retried, and the source
// holds every event exactly once, each key's events in sequence order.
func TestLoadSurvivesServerRestart(t *testing.T) {
	_, table := exampleTable(t)
	dir := t.TempDir()
	port := natstest.FreePorts(t, 1)[0]
	atPort := func(o *server.Options) { o.Port = port }
	srv := natstest.StartDir(t, dir, atPort)
	nc, err := nats.Connect(srv.URL, natstest.ClientOptions(t.Name())...)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if err := natsjs.EnsureStreams(testCtx(t, 30*time.Second), js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	const events = 3000
	load, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("orders"), Keys: Keys(50), Rate: 3000, Events: events,
		AttemptTimeout: 500 * time.Millisecond, Backoff: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer load.Stop()
	poll.Eventually(t, 30*time.Second, "a third stored", func() bool { return load.Stats().Stored >= events/3 })
	srv.Shutdown()
	srv.WaitForShutdown()
	poll.Eventually(t, 30*time.Second, "publishes failing", func() bool { return load.Stats().Retries > 0 })
	natstest.StartDir(t, dir, atPort)
	if err := load.Wait(testCtx(t, 60*time.Second)); err != nil {
		t.Fatal(err)
	}
	st := load.Stats()
	t.Logf("stored %d, %d retries, %d recognised duplicates, errors %v", st.Stored, st.Retries, st.Duplicates, st.Errors)

	msgs, err := tally.ReadStream(testCtx(t, 30*time.Second), js, "ORDERS", 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) != events {
		t.Errorf("ORDERS holds %d messages, want %d", len(msgs), events)
	}
	ids, last := map[string]bool{}, map[string]int{}
	for _, m := range msgs {
		p, err := tally.Decode(m.Data())
		if err != nil {
			t.Fatal(err)
		}
		if ids[p.ID] || m.Headers().Get(jetstream.MsgIDHeader) != p.ID {
			t.Errorf("event %s stored twice, or without its Nats-Msg-Id", p.ID)
		}
		ids[p.ID] = true
		if p.Seq != last[p.Key]+1 {
			t.Errorf("key %s: seq %d stored after %d", p.Key, p.Seq, last[p.Key])
		}
		last[p.Key] = p.Seq
	}
	if len(load.Sent()) != events {
		t.Errorf("Sent has %d events", len(load.Sent()))
	}
}

// TestVerifyFindsViolations stands in for the bridge: it copies each
// source event into its cell stream by hand, then breaks the copies one
// way each, and Verify must find exactly those.
func TestVerifyFindsViolations(t *testing.T) {
	_, table := exampleTable(t)
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t, time.Minute)
	if err := natsjs.EnsureStreams(ctx, js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	load, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("orders"), Keys: Keys(20), Rate: 5000, Events: 200})
	if err != nil {
		t.Fatal(err)
	}
	if err := load.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	load.Stop()
	sent := load.Sent()
	src, err := tally.ReadStream(ctx, js, "ORDERS", 0)
	if err != nil {
		t.Fatal(err)
	}
	copyTo := func(m jetstream.Msg, cell string) {
		t.Helper()
		out := nats.NewMsg(strings.ReplaceAll("cell.{cell}.orders", "{cell}", cell))
		out.Data = m.Data()
		out.Header.Set(bridge.HeaderMsgID, m.Headers().Get(jetstream.MsgIDHeader))
		if _, err := js.PublishMsg(ctx, out); err != nil {
			t.Fatal(err)
		}
	}
	owner := func(m jetstream.Msg) string {
		p, _ := tally.Decode(m.Data())
		return table.Resolve("orders", p.Key).Cell
	}
	// By schedule order n (key n%20, seq n/20+1): event 0 is lost, event
	// 1 arrives twice, event 2 goes to a wrong cell, and event 3 (key 3's
	// first) is held back until after event 23 (key 3's second).
	nth := func(m jetstream.Msg) int {
		p, _ := tally.Decode(m.Data())
		var n int
		fmt.Sscanf(p.ID[strings.LastIndexByte(p.ID, '-')+1:], "%d", &n)
		return n - 1
	}
	id := map[int]string{}
	var held jetstream.Msg
	for _, m := range src {
		n := nth(m)
		p, _ := tally.Decode(m.Data())
		id[n] = p.ID
		switch n {
		case 0:
			continue
		case 1:
			copyTo(m, owner(m))
		case 2:
			wrong := "rz10"
			if owner(m) == wrong {
				wrong = "rz00"
			}
			copyTo(m, wrong)
			continue
		case 3:
			held = m
			continue
		case 23:
			copyTo(m, owner(m))
			copyTo(held, owner(held))
			continue
		}
		copyTo(m, owner(m))
	}
	v, err := Verify(ctx, js, table, "orders", sent, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%v", v.Result)
	if len(v.Lost) != 1 || v.Lost[0].ID != id[0] {
		t.Errorf("lost %+v, want %s", v.Lost, id[0])
	}
	if len(v.Duplicated) != 1 || v.Duplicated[0].ID != id[1] {
		t.Errorf("duplicated %+v, want %s", v.Duplicated, id[1])
	}
	if len(v.Misrouted) != 1 || v.Misrouted[0].ID != id[2] {
		t.Errorf("misrouted %+v, want %s", v.Misrouted, id[2])
	}
	if len(v.Reordered) != 1 || v.Reordered[0].ID != id[3] || v.Reordered[0].AfterID != id[23] {
		t.Errorf("reordered %+v, want %s after %s", v.Reordered, id[3], id[23])
	}
	if v.Latency.N != len(sent)-1 || v.Latency.Max <= 0 || v.Latency.Max > time.Minute || v.Foreign != 0 {
		t.Errorf("latency %+v over %d events (source times read back), foreign %d", v.Latency, v.Latency.N, v.Foreign)
	}
	if v.PerCell[""] != 0 || v.PerCell["rz00"] == 0 {
		t.Errorf("copies per cell: %v", v.PerCell)
	}
}
