package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/e2etest"
	"github.com/cellbridge/cellbridge/router"
)

// The crash tests run the real binary (`cellbridge run -config FILE`) as a
// subprocess against a test nats-server, kill it with SIGKILL mid-stream and
// check from what arrived in the cell streams that every event took effect
// exactly once and each key's copies are in the order of its events. They
// take about a minute together; -short skips them.

const (
	crashEvents      = 50_000
	replicaEvents    = 30_000 // the KV store's round trips make this run slower per event
	crashPoisonEvery = 150    // 333 poison events: missing key, bad key, bad JSON
	crashKills       = 5
	// crashUsers is how many users the events are drawn from (besides the
	// pinned user's one in fifty): about 25 events per user and topic, so
	// that the order of each key's copies is checked across every kill.
	crashUsers = 1_000
)

// crashSeed is logged so that a failure can be replayed with
// CELLBRIDGE_CRASH_SEED.
func crashSeed(t *testing.T) uint64 {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("CELLBRIDGE_CRASH_SEED"); s != "" {
		if _, err := fmt.Sscan(s, &seed); err != nil {
			t.Fatalf("CELLBRIDGE_CRASH_SEED: %v", err)
		}
	}
	t.Logf("seed %d (replay with CELLBRIDGE_CRASH_SEED=%d)", seed, seed)
	return seed
}

// crashEnv is a test server with the example rules' streams, loaded with
// events, and a config file for the bridge.
type crashEnv struct {
	t      *testing.T
	js     jetstream.JetStream
	table  *router.Table
	exp    published
	config string
	dir    string
	// reported is when waitDone last logged its progress.
	reported time.Time
}

func newCrashEnv(t *testing.T, seed uint64, n int, dedupeYAML string) *crashEnv {
	env := newTestEnv(t)
	js, rules, table := env.js, env.rules, env.table
	start := time.Now()
	gen := newEventGen(seed, crashPoisonEvery)
	gen.users = crashUsers
	exp := publishGen(t, js, table, gen, n)
	fwd, dlq := exp.counts()
	t.Logf("published %d events (%d routable, %d poison) in %v", len(exp), fwd, dlq, time.Since(start).Round(time.Millisecond))
	dir := t.TempDir()
	// Short ack wait and reservation TTL: messages a killed process held
	// come back within seconds, which keeps the test short.
	cfg := writeFile(t, dir, "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
dedupe: %s
pipeline:
  ackWait: 2s
  drainTimeout: 10s
  retry: {initial: 50ms, max: 500ms}
log: {level: info, format: json}
`, rules, env.url, dedupeYAML))
	return &crashEnv{t: t, js: js, table: table, exp: exp, config: cfg, dir: dir}
}

// ackTimeout sets the NATS broker's publish ack timeout in the config: the
// test server runs in the test process, under the race detector when the
// tests do, and two replicas' publishes and KV round trips at full speed
// can keep its acks longer than the 3s default; a publish that times out
// is sent again, which adds to the load that delayed it.
func (e *crashEnv) ackTimeout(d time.Duration) {
	data, err := os.ReadFile(e.config)
	if err != nil {
		e.t.Fatal(err)
	}
	out := strings.Replace(string(data), "  nats: {type: nats, url: ", fmt.Sprintf("  nats: {type: nats, ackTimeout: %s, url: ", d), 1)
	if out == string(data) {
		e.t.Fatal("crash env config: no nats broker line")
	}
	if err := os.WriteFile(e.config, []byte(out), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// proc is one bridge subprocess.
type proc struct {
	*e2etest.Bridge
	http string
	name string
}

func (e *crashEnv) start(name string) *proc {
	b := e2etest.StartBridge(e.t, e2etest.BridgeOptions{Name: name, Config: e.config, Dir: e.dir})
	return &proc{Bridge: b, http: b.URL, name: name}
}

func (p *proc) kill(*testing.T) { p.Kill9() }

// activeFor returns the replica whose /status shows rule's ordered consumer
// active, or nil when none (or more than one) does.
func activeFor(rule string, ps ...*proc) *proc {
	var found []*proc
	for _, p := range ps {
		if slices.Contains(activeRules(p), rule) {
			found = append(found, p)
		}
	}
	if len(found) != 1 {
		return nil
	}
	return found[0]
}

// activeRules lists the rules whose ordered consumer p holds (/status),
// none when p does not answer within two seconds.
func activeRules(p *proc) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	st, err := p.Status(ctx)
	if err != nil {
		return nil
	}
	var out []string
	for _, r := range st.Rules {
		if r.Source != nil && r.Source.State == "active" {
			out = append(out, r.Rule)
		}
	}
	return out
}

// stop ends the process gracefully and requires exit code 0.
func (p *proc) stop(t *testing.T) {
	if err := p.Term(); err != nil {
		t.Fatalf("graceful stop: %v\n%s", err, p.LogTail(60))
	}
}

// runUntilKilled starts bridge run n, waits until progress reaches the
// point killAt picks (called once the bridge has started), and kills it
// with SIGKILL.
func (e *crashEnv) runUntilKilled(n int, rnd *rand.Rand, within time.Duration, progress, killAt func() uint64) {
	p := e.start(fmt.Sprintf("run%d", n))
	at := killAt()
	eventually(e.t, within, fmt.Sprintf("progress %d before kill %d", at, n), func() bool { return progress() >= at })
	// A little jitter so the kill does not always follow a stream info
	// round trip (jitter, not synchronization).
	time.Sleep(time.Duration(rnd.IntN(20)) * time.Millisecond)
	p.kill(e.t)
}

// progress is the number of messages that reached a cell stream or the DLQ.
func (e *crashEnv) progress() uint64 {
	c, d := arrived(e.t, e.js, e.table)
	return c + d
}

// waitDone waits until every event arrived and the source consumers hold
// nothing unacknowledged. It looks every 200ms: each look is a dozen
// JetStream API requests to the test server, which runs in this process
// and serves the bridge too; looking every few milliseconds would take a
// good part of its time.
func (e *crashEnv) waitDone(within time.Duration, p *proc) {
	fwd, dlq := e.exp.counts()
	deadline := time.Now().Add(within)
	for {
		if exited, err := p.Exited(); exited {
			e.t.Fatalf("bridge exited: %v\n%s", err, p.LogTail(60))
		}
		c, d := arrived(e.t, e.js, e.table)
		if c >= uint64(fwd) && d >= uint64(dlq) && consumersIdle(e.t, e.js, e.table) {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("not within %v: every event forwarded and acknowledged: %d of %d forwarded, %d of %d dead-lettered",
				within, c, fwd, d, dlq)
		}
		if time.Since(e.reported) > 10*time.Second {
			e.reported = time.Now()
			e.t.Logf("waiting: %d of %d forwarded, %d of %d dead-lettered so far", c, fwd, d, dlq)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (e *crashEnv) verify() {
	t := e.t
	v := verifyExactlyOnce(t, e.js, e.table, e.exp)
	fwd, dlq := e.exp.counts()
	t.Logf("arrived: %v (expected %d forwarded, %d dlq)", v, fwd, dlq)
	if len(v.Problems) > 0 {
		t.Fatalf("exactly-once violated:\n%s", strings.Join(v.Problems, "\n"))
	}
	sum := 0
	for _, n := range v.PerCell {
		sum += n
	}
	if sum != fwd || v.DLQ != dlq {
		t.Fatalf("arrived %d forwarded + %d dlq, want %d + %d", sum, v.DLQ, fwd, dlq)
	}
	for _, kind := range []string{poisonMissingKey, poisonBadKey, poisonBadBody} {
		if v.DLQByReason[kind] == 0 {
			t.Errorf("no DLQ message with Cell-Error %s: %v", kind, v.DLQByReason)
		}
	}
	// Per-key order: each key (topic and user) has its copies in its cell
	// stream in the order the source stored the events.
	keys, most := map[string]int{}, 0
	for _, x := range e.exp {
		if x.Seq > 0 {
			keys[x.Topic+"/"+x.Key] = max(keys[x.Topic+"/"+x.Key], x.Seq)
			most = max(most, x.Seq)
		}
	}
	if len(keys) == 0 {
		// The RocketMQ source tests send without a per-key sequence
		// number: their producer spreads a key over the queues, so the
		// source holds no per-key order to keep.
		t.Logf("per-key order not checked: no event carries a per-key sequence number")
		return
	}
	t.Logf("per-key order over %d keys (up to %d events each): %d reorderings in %d keys", len(keys), most, len(v.Order.Reordered), v.Order.ReorderedKeys)
	if len(v.Order.Reordered) > 0 || !v.Order.ExactlyOnce() {
		t.Errorf("per-key order violated: %v", v.Order)
		for _, r := range v.Order.Reordered[:min(len(v.Order.Reordered), 10)] {
			t.Logf("  key %s in %s: seq %d (%s, stream seq %d) after seq %d (%s)", r.Key, r.Stream, r.Seq, r.ID, r.StreamSeq, r.After, r.AfterID)
		}
	}
}

// killPoints picks n increasing progress thresholds between 5% and 90% of
// total: the bridge is killed as soon as that many messages arrived, so
// every kill lands mid-stream whatever the machine's speed.
func killPoints(rnd *rand.Rand, n int, total uint64) []uint64 {
	pts := make([]uint64, n)
	for i := range pts {
		pts[i] = total/20 + uint64(rnd.Float64()*float64(total*85/100))
	}
	sort.Slice(pts, func(i, j int) bool { return pts[i] < pts[j] })
	return pts
}

// TestCrashKill9 kills the bridge with SIGKILL at five random moments while
// it works through 50,000 events, restarting it each time; every event
// arrives once, each key's copies in order.
func TestCrashKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: skipped with -short")
	}
	seed := crashSeed(t)
	rnd := rand.New(rand.NewPCG(seed, 1))
	e := newCrashEnv(t, seed, crashEvents, "{store: memory}")
	start := time.Now()
	for i, at := range killPoints(rnd, crashKills, uint64(len(e.exp))) {
		e.runUntilKilled(i+1, rnd, 90*time.Second, e.progress, func() uint64 { return at })
		t.Logf("kill -9 #%d at %d of %d messages arrived (%v)", i+1, e.progress(), len(e.exp), time.Since(start).Round(time.Millisecond))
	}
	p := e.start("final")
	e.waitDone(90*time.Second, p)
	p.stop(t)
	t.Logf("done %v after start", time.Since(start).Round(time.Millisecond))
	e.verify()
}

// TestCrashTwoReplicas runs two bridge processes on the same durable
// consumers with the shared JetStream KV dedupe store and kills the one
// forwarding orders mid-stream (30,000 events); the other takes over and
// finishes the work, each key's copies in order.
func TestCrashTwoReplicas(t *testing.T) {
	if testing.Short() {
		t.Skip("crash test: skipped with -short")
	}
	seed := crashSeed(t)
	rnd := rand.New(rand.NewPCG(seed, 2))
	// The test server runs in this (race-instrumented) process; with the
	// short reserveTTL the KV request timeout would default to 1s, below
	// its round trips under this load, and every timed-out Reserve is sent
	// again. Give the requests what the reservation allows.
	e := newCrashEnv(t, seed, replicaEvents, "{store: jetstream, bucket: crash-dedupe, ttl: 5m, reserveTTL: 2s, requestTimeout: 1900ms}")
	e.ackTimeout(10 * time.Second)
	start := time.Now()
	a := e.start("replica-a")
	b := e.start("replica-b")
	at := killPoints(rnd, 1, uint64(len(e.exp)))[0]
	eventually(t, 90*time.Second, fmt.Sprintf("progress %d before the kill", at), func() bool { return e.progress() >= at })
	// The rules are ordered: one replica forwards each rule. Kill the one
	// forwarding orders (it may forward payments too), so that the other
	// takes it over from the ack floor.
	var victim *proc
	eventually(t, 30*time.Second, "one replica active for orders", func() bool {
		victim = activeFor("orders", a, b)
		return victim != nil
	})
	survivor := a
	if victim == a {
		survivor = b
	}
	held := activeRules(victim)
	victim.kill(t)
	t.Logf("kill -9 %s, active for %v, at %d of %d messages arrived (%v)", victim.name, held, e.progress(), len(e.exp), time.Since(start).Round(time.Millisecond))
	e.waitDone(90*time.Second, survivor)
	survivor.stop(t)
	t.Logf("done %v after start", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(survivor.LogTail(60), "bridge stopped") {
		t.Errorf("%s log lacks the shutdown line:\n%s", survivor.name, survivor.LogTail(60))
	}
	e.verify()
}
