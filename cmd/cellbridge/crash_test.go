package main

import (
	"fmt"
	"math/rand/v2"
	"os"
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
// exactly once. They take about a minute together; -short skips them.

const (
	crashEvents      = 50_000
	replicaEvents    = 30_000 // the KV store's round trips make this run slower per event
	crashPoisonEvery = 150    // 333 poison events: missing key, bad key, bad JSON
	crashKills       = 5
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
}

func newCrashEnv(t *testing.T, seed uint64, n int, dedupeYAML string) *crashEnv {
	env := newTestEnv(t)
	js, rules, table := env.js, env.rules, env.table
	start := time.Now()
	exp := publishEvents(t, js, table, seed, n, crashPoisonEvery)
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
}

func (e *crashEnv) start(name string) *proc {
	b := e2etest.StartBridge(e.t, e2etest.BridgeOptions{Name: name, Config: e.config, Dir: e.dir})
	return &proc{Bridge: b, http: b.URL}
}

func (p *proc) kill(*testing.T) { p.Kill9() }

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
// nothing unacknowledged.
func (e *crashEnv) waitDone(within time.Duration, p *proc) {
	fwd, dlq := e.exp.counts()
	eventually(e.t, within, "every event forwarded and acknowledged", func() bool {
		if exited, err := p.Exited(); exited {
			e.t.Fatalf("bridge exited: %v\n%s", err, p.LogTail(60))
		}
		c, d := arrived(e.t, e.js, e.table)
		return c >= uint64(fwd) && d >= uint64(dlq) && consumersIdle(e.t, e.js, e.table)
	})
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
// it works through 50,000 events, restarting it each time.
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
// consumers with the shared JetStream KV dedupe store and kills one of them
// mid-stream (30,000 events); the other finishes the work.
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
	a.kill(t)
	t.Logf("kill -9 replica-a at %d of %d messages arrived (%v)", e.progress(), len(e.exp), time.Since(start).Round(time.Millisecond))
	e.waitDone(90*time.Second, b)
	b.stop(t)
	t.Logf("done %v after start", time.Since(start).Round(time.Millisecond))
	if !strings.Contains(b.LogTail(60), "bridge stopped") {
		t.Errorf("replica-b log lacks the shutdown line:\n%s", b.LogTail(60))
	}
	e.verify()
}
