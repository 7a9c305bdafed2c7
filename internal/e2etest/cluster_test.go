//go:build unix

package e2etest

import (
	"context"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/router"
)

// The first cluster scenario, as an operator would run it: three
// nats-server processes, R3 source, cell and DLQ streams and an R3 dedupe
// bucket, two bridge replicas on the three URLs, load with a per-key
// sequence number, and the leader of one cell stream killed with SIGKILL
// mid-run. Exactly-once and per-key order must hold (the rules are
// ordered: one replica forwards each rule); latency is measured and
// reported.
const (
	clusterEvents = 6_000
	clusterRate   = 1_500
	clusterKeys   = 500
	clusterTopic  = "orders"
	clusterCell   = "rz01" // whose stream's leader is killed
	// lateAfter lists events that took longer than this from the source
	// stream to their cell stream.
	lateAfter = 10 * time.Second
)

func TestClusterKillCellStreamLeader(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test: skipped with -short")
	}
	begin := time.Now()
	natstest.ServerBinary(t)
	serverBuilt := time.Since(begin)
	BridgeBinary(t) // built once per test binary: maybe by an earlier test
	step := time.Now()
	c := natstest.StartCluster(t, 3)
	clusterUp := time.Since(step)
	t.Logf("nats-server binary %v (cached across runs), cellbridge binary %v (once per test binary), 3-node cluster ready %v",
		serverBuilt.Round(time.Millisecond), BridgeBuildTime().Round(time.Millisecond), clusterUp.Round(time.Millisecond))

	rules, table := exampleTable(t)
	_, js := c.Connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	if err := natsjs.EnsureStreams(ctx, js, table, natsjs.StreamOptions{Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	// Every bucket the bridge creates is R3 as well, the leases bucket
	// (which also holds the replicas' rules versions) included: an R1
	// stream's leader cannot be moved off the server the test kills.
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: c.URLs(),
		Dedupe: "{store: jetstream, bucket: e2e-dedupe, replicas: 3}", Partitions: "{replicas: 3}"})
	dir := t.TempDir()
	a := StartBridge(t, BridgeOptions{Name: "replica-a", Config: cfg, Dir: dir})
	a.WaitReady()
	b := StartBridge(t, BridgeOptions{Name: "replica-b", Config: cfg, Dir: dir})
	b.WaitReady()
	for _, s := range []string{"ORDERS", natsjs.CellStream(clusterCell), natsjs.DLQStream, "KV_e2e-dedupe", "KV_cellbridge-leases"} {
		st, err := js.Stream(ctx, s)
		if err != nil {
			t.Fatalf("stream %s: %v", s, err)
		}
		if r := st.CachedInfo().Config.Replicas; r != 3 {
			t.Fatalf("stream %s has %d replicas, want 3", s, r)
		}
	}
	t.Logf("streams and 2 replicas ready %v after the start", time.Since(begin).Round(time.Millisecond))

	stream := natsjs.CellStream(clusterCell)
	victim, also := isolate(t, c, js, table, stream)
	t.Logf("%s leads %s%s, no other stream or consumer, and no replica is attached to it (the load's connection: %v)",
		c.Node(victim).Name, stream, also, loadOn(t, c, victim))

	load, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule(clusterTopic), Keys: Keys(clusterKeys),
		Rate: clusterRate, Events: clusterEvents})
	if err != nil {
		t.Fatal(err)
	}
	defer load.Stop()
	loadStart := time.Now()

	// A sixth of the way into the load, kill -9 the leader of the cell
	// stream; bring it back once the load has been stored.
	poll.Eventually(t, 30*time.Second, "a sixth of the load stored", func() bool { return load.Stats().Stored >= clusterEvents/6 })
	killedAt := time.Now()
	c.Kill(victim)
	t.Logf("kill -9 %s, leader of %s%s, %v into the load", c.Node(victim).Name, stream, also, killedAt.Sub(loadStart).Round(time.Millisecond))
	newLeader := c.StreamLeader(stream)
	t.Logf("%s has a new leader, %s, %v after the kill", stream, c.Node(newLeader).Name, time.Since(killedAt).Round(time.Millisecond))

	if err := load.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	ls := load.Stats()
	t.Logf("load stored: %d events in %v (%d retries, %d recognised duplicates, schedule at worst %v behind; errors %v)",
		ls.Stored, time.Since(loadStart).Round(time.Millisecond), ls.Retries, ls.Duplicates, ls.Behind.Round(time.Millisecond), ls.Errors)
	c.Restart(victim)

	// Done: every event has a copy and the source consumer has nothing
	// left to deliver or to settle (no copy can come later).
	sent := load.Sent()
	settled := time.Now()
	var arrived uint64
	idle := func() bool {
		if arrived, err = Arrived(ctx, js, table); err != nil || arrived < uint64(len(sent)) {
			return false
		}
		// Bounded: a request lost while leaders change is never answered.
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		cons, err := js.Consumer(cctx, "ORDERS", table.Rule(clusterTopic).Source.Group)
		return err == nil && cons.CachedInfo().NumPending == 0 && cons.CachedInfo().NumAckPending == 0
	}
	if !pollFor(90*time.Second, idle) {
		t.Errorf("not settled within 90s of the load: %d of %d events arrived", arrived, len(sent))
	}
	t.Logf("settled %v after the load was stored (%v after the kill)", time.Since(settled).Round(time.Millisecond), time.Since(killedAt).Round(time.Millisecond))
	c.WaitReady()

	v, err := Verify(ctx, js, table, clusterTopic, sent, lateAfter)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("per cell: %v, foreign %d", v.PerCell, v.Foreign)
	t.Logf("result: %v", v.Result)
	if !v.ExactlyOnce() || v.Arrived != len(sent) {
		t.Errorf("exactly-once violated (%d of %d arrived):\n%s", v.Arrived, len(sent), strings.Join(v.Problems(20), "\n"))
	}
	// Per-key order is asserted; latency reported.
	perStream := map[string]int{}
	for _, r := range v.Reordered {
		perStream[r.Stream]++
	}
	t.Logf("per-key reorderings: %d in %d keys, by stream %v", len(v.Reordered), v.ReorderedKeys, perStream)
	if len(v.Reordered) > 0 {
		t.Errorf("per-key order violated: %d copies in %d keys stored after a later event of their key", len(v.Reordered), v.ReorderedKeys)
	}
	for _, r := range v.Reordered[:min(len(v.Reordered), 10)] {
		t.Logf("  key %s in %s: seq %d (%s, stream seq %d) after seq %d (%s)", r.Key, r.Stream, r.Seq, r.ID, r.StreamSeq, r.After, r.AfterID)
	}
	t.Logf("latency source → cell: max %v, p50 %v, p99 %v over %d events; %d later than %v",
		v.Latency.Max, v.Latency.P50, v.Latency.P99, v.Latency.N, len(v.Latency.Late), lateAfter)
	if late := v.Latency.Late; len(late) > 0 {
		keys, cells := map[string]bool{}, map[string]int{}
		for _, l := range late {
			keys[l.Key] = true
			cells[l.Cell]++
		}
		byLatency := append(late[:0:0], late...)
		sort.Slice(byLatency, func(i, j int) bool { return byLatency[i].Latency > byLatency[j].Latency })
		t.Logf("late events: %d of %d keys, by cell %v, from %v to %v late; the latest:", len(late), len(keys), cells,
			byLatency[len(byLatency)-1].Latency, byLatency[0].Latency)
		for _, l := range byLatency[:min(len(byLatency), 5)] {
			t.Logf("  %s (key %s seq %d) → %s after %v", l.ID, l.Key, l.Seq, l.Cell, l.Latency)
		}
	}
	t.Logf("test ran %v", time.Since(begin).Round(time.Millisecond))
}

// isolate makes one server the leader of stream and of nothing else the
// load goes through: the server with the fewest clients of the test on it
// (a bridge replica attached to the victim would add the fault "the server
// a replica is connected to"; the load's own connection only retries),
// preferably not the meta leader, and leading no other stream and no
// consumer of the rules. The meta group's lead cannot be moved without the
// system account: also says when the victim leads it too.
func isolate(t *testing.T, c *natstest.Cluster, js jetstream.JetStream, table *router.Table, stream string) (victim int, also string) {
	t.Helper()
	meta := c.MetaLeader()
	victim = -1
	best := 0
	for i := range c.Len() {
		names, err := c.Connections(i)
		if err != nil {
			t.Fatal(err)
		}
		cost := 0
		for _, n := range names {
			switch {
			case strings.HasPrefix(n, "cellbridge/"):
				cost += 100
			case n == t.Name():
				cost += 10
			}
		}
		if i == meta {
			cost++
		}
		if victim < 0 || cost < best {
			victim, best = i, cost
		}
	}
	if best >= 100 {
		t.Fatalf("every server has a bridge replica attached")
	}
	c.MoveStreamLeader(stream, victim)
	other := (victim + 1) % c.Len()
	// The names first, then the moves: the lister hands names over while
	// its context lasts, and each move (a step-down and an election) can
	// take seconds on a loaded machine.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lister := js.StreamNames(ctx)
	var streams []string
	for s := range lister.Name() {
		streams = append(streams, s)
	}
	if err := lister.Err(); err != nil {
		t.Fatal(err)
	}
	for _, s := range streams {
		if s != stream && c.StreamLeader(s) == victim {
			c.MoveStreamLeader(s, other)
		}
	}
	for _, r := range table.Rules() {
		if c.ConsumerLeader(r.Source.Stream, r.Source.Group) == victim {
			c.MoveConsumerLeader(r.Source.Stream, r.Source.Group, other)
		}
	}
	if victim == meta {
		also = " and the meta group"
	}
	return victim, also
}

// loadOn reports whether the test's own connection (the load's) is on
// server i.
func loadOn(t *testing.T, c *natstest.Cluster, i int) bool {
	names, err := c.Connections(i)
	if err != nil {
		t.Fatal(err)
	}
	return slices.Contains(names, t.Name())
}

// pollFor calls cond every 20ms until it holds (true) or within passes.
func pollFor(within time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}
