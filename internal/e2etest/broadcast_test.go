package e2etest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// The broadcast tests run `cellbridge run` (and `cellbridge replay`) as
// operators do, against one test server, with rules whose topic rule
// broadcasts every event into every selected cell's stream.

// broadcastRules is a CellMap of the given cells (down ones marked) and a
// broadcast rule "prices" keyed by the X-Key header.
func broadcastRules(version int, cells []string, down ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "kind: CellMap\nversion: %d\nshards: %d\ncells:\n", version, len(cells))
	for i, c := range cells {
		state, failover := "active", cells[(i+1)%len(cells)]
		if slices.Contains(down, c) {
			state = "down"
		}
		if slices.Contains(down, failover) {
			failover = cells[0]
		}
		fmt.Fprintf(&b, "  - {name: %s, state: %s, failover: %s, shards: [\"%d\"]}\n", c, state, failover, i)
	}
	b.WriteString(`---
kind: TopicRule
name: prices
source: {broker: nats, stream: PRICES, subject: "prices.>"}
key: {header: X-Key}
target: {broker: nats, subject: "cell.{cell}.prices", cells: all}
dlq: {broker: nats, subject: dlq.prices}
`)
	return b.String()
}

// writeRules writes text as the only rule file of dir (created when
// missing) and returns dir and the table it holds.
func writeRules(t *testing.T, dir, text string) (string, *router.Table) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// Written aside and renamed: the running bridge's watcher never sees
	// half a file.
	tmp := filepath.Join(dir, ".rules.yaml.tmp")
	if err := os.WriteFile(tmp, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "rules.yaml")); err != nil {
		t.Fatal(err)
	}
	table, err := router.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, table
}

// cellStreams maps each cell to its natsjs.CellStream.
func cellStreams(cells ...string) map[string]string {
	m := map[string]string{}
	for _, c := range cells {
		m[c] = natsjs.CellStream(c)
	}
	return m
}

// streamCount is the number of messages stream holds (0 when it cannot
// tell).
func streamCount(ctx context.Context, js jetstream.JetStream, stream string) uint64 {
	cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	st, err := js.Stream(cctx, stream)
	if err != nil {
		return 0
	}
	return st.CachedInfo().State.Msgs
}

// requireExactlyOnce fails the test unless every cell's result is
// exactly-once and in per-key order, and logs each cell's summary.
func requireExactlyOnce(t *testing.T, res map[string]*tally.Result) {
	t.Helper()
	cells := slices.Sorted(func(yield func(string) bool) {
		for c := range res {
			if !yield(c) {
				return
			}
		}
	})
	for _, c := range cells {
		r := res[c]
		t.Logf("cell %s: %v", c, r)
		if !r.ExactlyOnce() {
			t.Errorf("cell %s: exactly-once violated:\n%s", c, strings.Join(r.Problems(10), "\n"))
		}
		if len(r.Reordered) > 0 {
			t.Errorf("cell %s: %d copies out of their key's order, e.g. %+v", c, len(r.Reordered), r.Reordered[0])
		}
	}
}

const (
	bcEvents = 10_000
	bcRate   = 400
	bcKeys   = 200
	// bcFailFor is how long cell d's target refuses every copy.
	bcFailFor = 20 * time.Second
)

// TestBroadcastFailingCellAndKill9: 10,000 broadcast events into four
// cells; cell d's stream refuses every publish for 20s mid-run (its subject
// is taken off the stream: no responders), and the bridge is killed with
// SIGKILL twice (before the failure, and while d's backlog drains after it)
// and restarted each time. Every cell holds every event exactly once and
// per key in order; the healthy cells' copies of the events stored during
// the failure were stored before it ended, without waiting for d; their
// latencies are reported.
func TestBroadcastFailingCellAndKill9(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	begin := time.Now()
	cells := []string{"a", "b", "c", "d"}
	// A nats-server process: in the test binary the server would run under
	// the race detector, several times slower than the bridge it serves,
	// and the latencies reported would be its own.
	srv := natstest.StartCluster(t, 1)
	_, js := srv.Connect(t)
	ctx := testCtx(t, 4*time.Minute)
	rules, table := writeRules(t, filepath.Join(t.TempDir(), "rules"), broadcastRules(1, cells))
	if err := natsjs.EnsureStreams(ctx, js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: srv.URLs(),
		Dedupe:   "{store: jetstream, bucket: bc-dedupe, ttl: 10m, reserveTTL: 2s}",
		Pipeline: "{ackWait: 5s, retry: {initial: 20ms, max: 300ms}}"})
	b := StartBridge(t, BridgeOptions{Name: "bridge", Config: cfg})
	b.WaitReady()

	load, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("prices"), Keys: Keys(bcKeys), Rate: bcRate, Events: bcEvents})
	if err != nil {
		t.Fatal(err)
	}
	defer load.Stop()
	loadStart := time.Now()
	kill := func(n int, why string) {
		t.Helper()
		b.Kill9()
		t.Logf("kill -9 #%d %s: %d events stored, %v into the load", n, why, load.Stats().Stored, time.Since(loadStart).Round(time.Millisecond))
		b.Restart()
	}

	poll.Eventually(t, time.Minute, "8% of the load stored", func() bool { return load.Stats().Stored >= bcEvents*8/100 })
	kill(1, "before the failure")

	poll.Eventually(t, time.Minute, "30% of the load stored", func() bool { return load.Stats().Stored >= bcEvents*30/100 })
	dStream := natsjs.CellStream("d")
	st, err := js.Stream(ctx, dStream)
	if err != nil {
		t.Fatal(err)
	}
	sc := st.CachedInfo().Config
	subjects := sc.Subjects
	sc.Subjects = []string{"parked.d.prices"}
	if _, err := js.UpdateStream(ctx, sc); err != nil {
		t.Fatal(err)
	}
	failStart := time.Now()
	t.Logf("cell d failing from %v into the load (%d events stored): stream %s no longer takes %v",
		failStart.Sub(loadStart).Round(time.Millisecond), load.Stats().Stored, dStream, subjects)
	poll.Eventually(t, time.Minute, "the bridge reporting d's target failing", func() bool {
		v, err := b.Metric(ctx, bridge.MetricTargetFailing, map[string]string{"target": "cell.d.prices"})
		return err == nil && v == 1
	})
	// The failure lasts bcFailFor (load shape, not synchronisation); the
	// lagging gauge is read until it shows copies or the failure ends.
	var lagging float64
	for time.Now().Before(failStart.Add(bcFailFor)) {
		if v, err := b.Metric(ctx, bridge.MetricBroadcastLagging, map[string]string{"cell": "d"}); err == nil && v > 0 {
			lagging = v
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Until(failStart.Add(bcFailFor)))
	sc.Subjects = subjects
	// The failure ends when the server applies the update, before its
	// answer reaches this test: retried copies can be stored meanwhile.
	failEnd := time.Now()
	if _, err := js.UpdateStream(ctx, sc); err != nil {
		t.Fatal(err)
	}
	dAtEnd := streamCount(ctx, js, dStream)
	t.Logf("cell d back after %v (%d events stored; %.0f copies lagging for d, %d in its stream)",
		failEnd.Sub(failStart).Round(time.Millisecond), load.Stats().Stored, lagging, dAtEnd)
	if lagging == 0 {
		t.Error("no copy lagged for the failing cell")
	}

	poll.Eventually(t, time.Minute, "d's backlog draining", func() bool { return streamCount(ctx, js, dStream) >= dAtEnd+1000 })
	kill(2, fmt.Sprintf("while d's backlog drains (%d in its stream)", streamCount(ctx, js, dStream)))

	if err := load.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	sent := load.Sent()
	poll.Eventually(t, 2*time.Minute, "every cell holding every event", func() bool {
		for _, c := range cells {
			if streamCount(ctx, js, natsjs.CellStream(c)) < uint64(len(sent)) {
				return false
			}
		}
		return true
	})
	if err := b.Term(); err != nil {
		t.Fatalf("SIGTERM: %v\n%s", err, b.LogTail(30))
	}
	res, err := VerifyCopies(ctx, js, "PRICES", cellStreams(cells...), sent, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	requireExactlyOnce(t, res)

	// The healthy cells did not wait for d: every event the source stored
	// during the failure (but its last 3s, time for the copy to get
	// there) is in each healthy cell before the failure ended.
	stored := map[string]time.Time{}
	for _, m := range mustRead(t, ctx, js, "PRICES") {
		if md, err := m.Metadata(); err == nil {
			stored[m.Headers().Get(jetstream.MsgIDHeader)] = md.Timestamp
		}
	}
	for _, c := range cells {
		var window, after []time.Duration
		late := 0
		for _, m := range mustRead(t, ctx, js, natsjs.CellStream(c)) {
			a, err := tally.FromMsg(c, natsjs.CellStream(c), m)
			if err != nil {
				continue
			}
			src, ok := stored[a.MsgID]
			if !ok || src.Before(failStart) || !src.Before(failEnd) {
				continue
			}
			window = append(window, a.Stored.Sub(src))
			if a.Stored.After(failEnd) {
				after = append(after, a.Stored.Sub(src))
				// Stored in the failure's first half and in a healthy cell
				// only after it ended: waited for d (half the failure is a
				// margin no healthy copy needs; a copy that waited for d
				// would wait the whole failure).
				if src.Before(failEnd.Add(-bcFailFor / 2)) {
					late++
				}
			}
		}
		p50, p99, maxL := quantiles(window)
		t.Logf("cell %s: %d events stored during the failure: copy latency p50 %v p99 %v max %v; %d copies stored after it ended",
			c, len(window), p50, p99, maxL, len(after))
		switch {
		case len(window) == 0:
			t.Errorf("cell %s: no event stored during the failure", c)
		case c == "d" && len(after) != len(window):
			t.Errorf("cell d: %d of %d copies of the failure's events stored before it ended", len(window)-len(after), len(window))
		case c != "d" && late > 0:
			t.Errorf("cell %s: %d copies of events stored during the failure waited until d was back", c, late)
		}
	}
	t.Logf("done in %v", time.Since(begin).Round(time.Millisecond))
}

func mustRead(t *testing.T, ctx context.Context, js jetstream.JetStream, stream string) []jetstream.Msg {
	t.Helper()
	msgs, err := readStream(ctx, js, stream)
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

// quantiles returns p50, p99 and the maximum of ds.
func quantiles(ds []time.Duration) (p50, p99, maxD time.Duration) {
	if len(ds) == 0 {
		return 0, 0, 0
	}
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	at := func(q float64) time.Duration { return s[min(len(s)-1, int(q*float64(len(s))))] }
	return at(0.5), at(0.99), s[len(s)-1]
}

// syncRules is the rule set of the bridge in cell from: its stream
// SYNC_<FROM> holds what the cell's producers write ("sync.<from>.local",
// Cell-Origin <from>) and the copies the other cell's bridge brings
// ("sync.<from>.in"); the rule broadcasts both to the other cell, excluding
// the origin.
func syncRules(from, to string) string {
	return fmt.Sprintf(`kind: CellMap
version: 1
shards: 2
cells:
  - {name: a, failover: b, shards: ["0"]}
  - {name: b, failover: a, shards: ["1"]}
---
kind: TopicRule
name: sync-%[1]s
source: {broker: nats, stream: SYNC_%[3]s, subject: "sync.%[1]s.>"}
key: {header: X-Key}
target: {broker: nats, subject: "sync.{cell}.in", cells: [%[2]s], excludeOrigin: true}
dlq: {broker: nats, subject: dlq.sync}
`, from, to, strings.ToUpper(from))
}

// TestBroadcastTwoWaySync: two cells, each with one stream holding its own
// producers' events and the other cell's copies, and one bridge each that
// broadcasts its stream to the other cell with excludeOrigin. Each event
// arrives once in the other cell, and nothing loops back: the copies a
// bridge reads from its own stream came from the other cell and are
// skipped (counted as origin).
func TestBroadcastTwoWaySync(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t, 2*time.Minute)
	for name, subj := range map[string]string{"SYNC_A": "sync.a.>", "SYNC_B": "sync.b.>", "DLQ": "dlq.>"} {
		if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: name, Subjects: []string{subj}, Storage: jetstream.FileStorage,
			Duplicates: 2 * time.Minute}); err != nil {
			t.Fatal(err)
		}
	}
	const events = 1500
	bridges := map[string]*Bridge{}
	loads := map[string]*Load{}
	for _, p := range [][2]string{{"a", "b"}, {"b", "a"}} {
		from, to := p[0], p[1]
		rules, table := writeRules(t, filepath.Join(t.TempDir(), "rules-"+from), syncRules(from, to))
		// Two deployments (one per direction), each with its own rules.
		cfg := WriteConfig(t, "", Config{Rules: rules, URLs: []string{srv.URL}, Pipeline: "{retry: {initial: 20ms, max: 300ms}}",
			Extra: "deployment: {name: sync-" + from + "}\n"})
		bridges[from] = StartBridge(t, BridgeOptions{Name: "bridge-" + from, Config: cfg})
		bridges[from].WaitReady()
		l, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("sync-" + from), Keys: Keys(50), Rate: 1500, Events: events,
			Subject: "sync." + from + ".local", Run: "sync-" + from, Header: map[string]string{router.OriginHeader: from}})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Stop()
		loads[from] = l
	}
	for _, l := range loads {
		if err := l.Wait(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// Each bridge forwards its cell's events and skips the copies it reads
	// back; once both counts are complete, nothing else can move.
	for from, b := range bridges {
		rule := "sync-" + from
		poll.Eventually(t, time.Minute, rule+" forwarded its cell's events and skipped the other's copies", func() bool {
			fwd, err1 := b.Metric(ctx, bridge.MetricMessages, map[string]string{"rule": rule, "outcome": bridge.OutcomeForwarded})
			skip, err2 := b.Metric(ctx, bridge.MetricMessages, map[string]string{"rule": rule, "outcome": bridge.OutcomeSkipped})
			return err1 == nil && err2 == nil && fwd == events && skip == events
		})
	}
	for from, b := range bridges {
		other := map[string]string{"a": "b", "b": "a"}[from]
		if v, err := b.Metric(ctx, bridge.MetricBroadcastSkipped, map[string]string{"cell": other, "reason": router.SkipOrigin}); err != nil || v != events {
			t.Errorf("bridge %s: skipped as origin %v (%v), want %d", from, v, err, events)
		}
		if err := b.Term(); err != nil {
			t.Fatalf("SIGTERM bridge %s: %v", from, err)
		}
	}
	for _, s := range []string{"SYNC_A", "SYNC_B"} {
		if n := streamCount(ctx, js, s); n != 2*events {
			t.Errorf("%s holds %d messages, want %d: its producers' and one copy of each of the other cell's", s, n, 2*events)
		}
	}
	if n := streamCount(ctx, js, "DLQ"); n != 0 {
		t.Errorf("DLQ holds %d messages", n)
	}
	for _, p := range [][2]string{{"a", "b"}, {"b", "a"}} {
		from, to := p[0], p[1]
		inbound := "sync." + to + ".in"
		res, err := VerifyCopies(ctx, js, "SYNC_"+strings.ToUpper(from), map[string]string{to: "SYNC_" + strings.ToUpper(to)},
			loads[from].Sent(), func(_ string, a *tally.Arrival) bool { return a.Subject == inbound }, 0)
		if err != nil {
			t.Fatal(err)
		}
		requireExactlyOnce(t, res)
	}
}

// TestBroadcastReplay: cell c is down while 1,000 events are broadcast, so
// a and b get them and c misses them, counted in /status with the time of
// the first missed event. `cellbridge replay` from that time fills c with
// exactly those events while c is still marked down; then c is marked
// active, 500 more events reach all three cells, and a second replay of the
// same range stores nothing (the same idempotency keys).
func TestBroadcastReplay(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	cells := []string{"a", "b", "c"}
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t, 2*time.Minute)
	dir := filepath.Join(t.TempDir(), "rules")
	rules, table := writeRules(t, dir, broadcastRules(1, cells, "c"))
	if err := natsjs.EnsureStreams(ctx, js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: []string{srv.URL}, Dedupe: "{store: jetstream, bucket: replay-dedupe}",
		Pipeline: "{retry: {initial: 20ms, max: 300ms}}"})
	b := StartBridge(t, BridgeOptions{Name: "bridge", Config: cfg})
	b.WaitReady()

	first, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("prices"), Keys: Keys(50), Rate: 2000, Events: 1000, Run: "first"})
	if err != nil {
		t.Fatal(err)
	}
	defer first.Stop()
	if err := first.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	var missed bridge.MissedCopies
	poll.Eventually(t, time.Minute, "c's 1,000 missed copies in /status", func() bool {
		st, err := b.Status(ctx)
		if err != nil {
			return false
		}
		for _, r := range st.Rules {
			for _, c := range r.Broadcast {
				if r.Rule == "prices" && c.Cell == "c" {
					missed = c.Missed
				}
			}
		}
		return missed.Count == 1000
	})
	if v, err := b.Metric(ctx, bridge.MetricBroadcastSkipped, map[string]string{"cell": "c", "reason": router.SkipDown}); err != nil || v != 1000 {
		t.Fatalf("skipped down for c: %v (%v)", v, err)
	}
	if n := streamCount(ctx, js, natsjs.CellStream("c")); n != 0 || !missed.Ongoing {
		t.Fatalf("c holds %d copies while down; missed %+v", n, missed)
	}
	t.Logf("/status: c missed %d copies, first %s (%s), last %s", missed.Count, missed.First.Format(time.RFC3339Nano),
		missed.FirstSourceID, missed.Last.Format(time.RFC3339Nano))

	replay := func() string {
		t.Helper()
		cmd := exec.CommandContext(ctx, BridgeBinary(t), "replay", "-config", cfg, "-rule", "prices", "-cell", "c",
			"-from-time", missed.First.Format(time.RFC3339Nano), "-to-time", missed.Last.Format(time.RFC3339Nano))
		// The summary is the last line on stdout; the log (stderr) may
		// end with a line written while the connections close.
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cellbridge replay: %v\n%s%s", err, out, stderr.Bytes())
		}
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		t.Logf("cellbridge replay: %s", lines[len(lines)-1])
		return lines[len(lines)-1]
	}
	if out := replay(); !strings.Contains(out, "1000 messages read") || !strings.Contains(out, "copies published 1000") {
		t.Fatalf("replay output: %s", out)
	}
	if n := streamCount(ctx, js, natsjs.CellStream("c")); n != 1000 {
		t.Fatalf("c holds %d copies after the replay, want 1000", n)
	}

	_, table = writeRules(t, dir, broadcastRules(2, cells))
	poll.Eventually(t, time.Minute, "rules version 2 loaded", func() bool {
		st, err := b.Status(ctx)
		return err == nil && st.RulesVersion == 2
	})
	second, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("prices"), Keys: Keys(50), Rate: 2000, Events: 500, Run: "second"})
	if err != nil {
		t.Fatal(err)
	}
	defer second.Stop()
	if err := second.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, time.Minute, "every cell holding both loads", func() bool {
		for _, c := range cells {
			if streamCount(ctx, js, natsjs.CellStream(c)) < 1500 {
				return false
			}
		}
		return true
	})
	if out := replay(); !strings.Contains(out, "copies published 0, already in the dedupe store 1000") {
		t.Fatalf("second replay output: %s", out)
	}
	if err := b.Term(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	// Each load's sequence numbers count from 1 per key: each is checked
	// on its own, and c must hold every replayed copy before the first
	// copy the bridge sent it after the switch (order per key).
	for _, l := range []*Load{first, second} {
		run := l.Sent()[0].ID[:strings.IndexByte(l.Sent()[0].ID, '-')]
		res, err := VerifyCopies(ctx, js, "PRICES", cellStreams(cells...), l.Sent(),
			func(_ string, a *tally.Arrival) bool { return a.Run == run }, 0)
		if err != nil {
			t.Fatal(err)
		}
		requireExactlyOnce(t, res)
	}
	var lastFirst, firstSecond uint64
	for _, m := range mustRead(t, ctx, js, natsjs.CellStream("c")) {
		a, err := tally.FromMsg("c", natsjs.CellStream("c"), m)
		switch {
		case err != nil:
		case a.Run == "first":
			lastFirst = max(lastFirst, a.StreamSeq)
		case firstSecond == 0:
			firstSecond = a.StreamSeq
		}
	}
	if lastFirst == 0 || firstSecond == 0 || lastFirst > firstSecond {
		t.Errorf("cell c: the replayed copies end at sequence %d, the bridge's own start at %d", lastFirst, firstSecond)
	}
}
