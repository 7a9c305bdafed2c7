package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/drill"
)

// drillTestConfig is a modest load for the race detector on two cores:
// ~1000 events/s for ~12s.
func drillTestConfig(t *testing.T) drill.Config {
	return drill.Config{
		Rate: 1000, KeysPerShard: 2,
		Before: 1500 * time.Millisecond, Blocked: 2500 * time.Millisecond, After: 1500 * time.Millisecond,
		Settle: 30 * time.Second, Progress: testWriter{t}, TempDir: t.TempDir(),
	}
}

// testWriter sends progress lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// checkDrillReport asserts every guarantee the drill checks, and that each
// check had something to check (a drill that moved nothing proves nothing).
func checkDrillReport(t *testing.T, rep *drill.Report, v0 int64) {
	t.Helper()
	var text bytes.Buffer
	_ = rep.WriteText(&text)
	t.Logf("drill report:\n%s", text.String())
	for _, kind := range []string{
		drill.KindBlockedForwarded, drill.KindLost, drill.KindDuplicate, drill.KindMsgID, drill.KindOrder,
		drill.KindWrongCell, drill.KindOthersStalled, drill.KindHeldNotGrowing, drill.KindHeldOutside,
		drill.KindNotDrained, drill.KindDownCell, drill.KindLowerAccepted, drill.KindDLQ,
		drill.KindFailoverBlocks, drill.KindUnknownVersion, drill.KindCollect,
	} {
		if n := rep.Count(kind); n > 0 {
			t.Errorf("%d violations of %s", n, kind)
		}
	}
	if !rep.OK() {
		t.Fatalf("violations: %+v", rep.Violations)
	}
	if !strings.Contains(text.String(), "violations: none") {
		t.Error("the report does not say 'violations: none'")
	}
	if rep.Published < 3000 || rep.Arrived != rep.Published {
		t.Errorf("published %d, arrived %d", rep.Published, rep.Arrived)
	}
	// Four versions: start, blocked, new owners, failover.
	if len(rep.Phases) != 4 {
		t.Fatalf("phases: %d, want 4", len(rep.Phases))
	}
	for i, p := range rep.Phases {
		if p.Version != v0+int64(i) {
			t.Errorf("phase %d (%s): version %d, want %d", i, p.Name, p.Version, v0+int64(i))
		}
	}
	sw := rep.Switch
	if sw.HeldMax == 0 || sw.HeldAtUnblock <= sw.HeldFirst || sw.HeldEvents == 0 || sw.Drained.IsZero() {
		t.Errorf("switch: held %d → %d (max %d), %d held events, drained %v", sw.HeldFirst, sw.HeldAtUnblock, sw.HeldMax, sw.HeldEvents, sw.Drained)
	}
	if len(sw.HeldRanges) != 1 || sw.HeldRanges[0].Shards != sw.Range {
		t.Errorf("held ranges in /status %+v, want exactly %s", sw.HeldRanges, sw.Range)
	}
	if sw.OthersArrived == 0 || sw.ForwardedWhileBlocked == 0 {
		t.Errorf("other shards while blocked: %d arrived, forwarded grew %d", sw.OthersArrived, sw.ForwardedWhileBlocked)
	}
	// While blocked, the old owner got events of its other shards, and the
	// new owner got nothing of the range (checked by the drill per event);
	// after the switch the new owner has the range.
	blocked := rep.Phases[1]
	if blocked.PerCell[sw.From] == 0 || blocked.PerCell[sw.To] == 0 {
		t.Errorf("blocked version per cell %v", blocked.PerCell)
	}
	fo := rep.Failover
	if rep.Phases[3].PerCell[fo.Down] != 0 {
		t.Errorf("failover version sent %d events to the down cell %s", rep.Phases[3].PerCell[fo.Down], fo.Down)
	}
	if rep.Phases[3].PerCell[fo.To] == 0 || len(fo.Moves) == 0 || !fo.Moves[0].Failover {
		t.Errorf("failover: %+v, per cell %v", fo, rep.Phases[3].PerCell)
	}
	if len(fo.FailoverFixes) == 0 {
		t.Errorf("failover: no other cell's failover was fixed; the example rules have one pointing at %s", fo.Down)
	}
	if rep.Refused.RunningAfter != v0+2 || rep.Refused.FailuresAfter <= rep.Refused.FailuresBefore {
		t.Errorf("lower version: %+v", rep.Refused)
	}
	if rep.KeysMoved == 0 {
		t.Error("no key moved cell: the order check across the switch checked nothing")
	}
	if rep.Reorderings != 0 || rep.ReorderedKeys != 0 || !strings.Contains(text.String(), "per-key reorderings: 0 in 0 keys") {
		t.Errorf("reorderings %d in %d keys", rep.Reorderings, rep.ReorderedKeys)
	}
}

// TestDrillNATS runs the drill against the embedded default (NATS → NATS),
// built by the same code as `cellbridge drill`: a planned switch of 22-32
// from rz00 to rz10 in three steps, a lower version, and rz10 failing over to
// rz01 (gz00's failover rz10 must change to validate).
func TestDrillNATS(t *testing.T) {
	data := t.TempDir()
	dc := drillTestConfig(t)
	dc.Move, dc.To, dc.Down = "22-32", "rz10", "rz10"
	var stderr bytes.Buffer
	rep, err := runDrill(testCtx(t, 2*time.Minute), &runFlags{data: data + "/nats", http: "127.0.0.1:0", natsPort: -1}, data, dc, &stderr)
	if err != nil {
		t.Fatalf("drill: %v\n%s", err, stderr.String())
	}
	checkDrillReport(t, rep, 1)
	if rep.Switch.From != "rz00" || rep.Switch.To != "rz10" || rep.Failover.To != "rz01" {
		t.Errorf("switch %s → %s, failover → %s", rep.Switch.From, rep.Switch.To, rep.Failover.To)
	}
	if rep.Ordering != "ordered" {
		t.Errorf("the source's ordering as /status reports it: %q, want ordered", rep.Ordering)
	}
	if !rep.SourceAcked {
		t.Error("the drill did not see every delivery of the source acknowledged")
	}
	// Report JSON round-trips (the -json output).
	b, err := json.Marshal(rep)
	if err != nil || !bytes.Contains(b, []byte(`"violations":null`)) {
		t.Errorf("json: %v %s", err, b[:min(len(b), 200)])
	}
}

// TestDrillNATSPartitioned runs the drill on a partitioned rule: the
// example orders rule keyed by the subject's second token over four
// partitions, which the one replica of the drill owns. The events carry
// the key in their subject; nothing is lost, duplicated or reordered across
// the switch and the failover.
func TestDrillNATSPartitioned(t *testing.T) {
	data := t.TempDir()
	rules := exampleRules(t,
		`subject: "orders.>"        # consumer filter; must not match the targets (routing loop)`, `subject: "orders.*.>"
  partitions: 4`,
		"  json: user.id              # dotted path into the JSON body; numbers are taken verbatim", "  subjectToken: 2")
	cfg := writeFile(t, data, "config.yaml", "partitions: {leaseTTL: 2s}\nordering: {pinnedTTL: 2s}\n")
	dc := drillTestConfig(t)
	dc.Topic, dc.Move, dc.To, dc.Down = "orders", "22-32", "rz10", "rz10"
	var stderr bytes.Buffer
	rep, err := runDrill(testCtx(t, 2*time.Minute), &runFlags{data: data + "/nats", http: "127.0.0.1:0", natsPort: -1, rules: rules, config: cfg}, data, dc, &stderr)
	if err != nil {
		t.Fatalf("drill: %v\n%s", err, stderr.String())
	}
	checkDrillReport(t, rep, 1)
	if rep.Ordering != "ordered, 4 partitions" {
		t.Errorf("the source's ordering as /status reports it: %q", rep.Ordering)
	}
	if !rep.SourceAcked {
		t.Error("the drill did not see every delivery of the partitions acknowledged")
	}
}

// TestStatusCommand runs `cellbridge status` against a bridge that holds
// messages of a blocked shard, in text and JSON, and against nothing.
func TestStatusCommand(t *testing.T) {
	env := newTestEnv(t)
	writeRules(t, env.rules, "cellmap.yaml", strings.Replace(readFileT(t, env.rules+"/cellmap.yaml"), "blocked: []", `blocked: ["34"]`, 1))
	cfg := writeFile(t, t.TempDir(), "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
dedupe: {store: memory}
http: {listen: "127.0.0.1:0"}
`, env.rules, env.url))
	b := startInProcess(t, cfg, nil)
	// 2088000000012345: shard 34 (blocked); 2088000000000105: shard 10.
	publishOne(t, env.js, orderMsg("orders.created", "2088000000012345", "st-1"))
	publishOne(t, env.js, orderMsg("orders.created", "2088000000012345", "st-2"))
	publishOne(t, env.js, orderMsg("orders.created", "2088000000000105", "st-3"))
	eventually(t, 20*time.Second, "two held in /status", func() bool { return b.info.Pipeline.Status().Held == 2 })

	code, out, errOut := runCLI(t, "status", "-addr", b.base)
	if code != 0 {
		t.Fatalf("status: exit %d\n%s%s", code, out, errOut)
	}
	for _, want := range []string{"rules version 1", "held 2 of", "orders", "shards 34", "2 held", "oldest "} {
		if !strings.Contains(out, want) {
			t.Errorf("status output lacks %q:\n%s", want, out)
		}
	}
	t.Logf("cellbridge status:\n%s", out)

	code, out, _ = runCLI(t, "status", "-json", "-addr", strings.TrimPrefix(b.base, "http://"))
	var st bridge.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.RulesVersion != 1 || st.Held != 2 {
		t.Errorf("status -json: exit %d, %+v\n%s", code, st, out)
	}

	// Without -addr: the deployment, from the replicas' records.
	eventually(t, 20*time.Second, "the deployment listing with the held messages", func() bool {
		code, out, errOut = runCLI(t, "status", "-config", cfg)
		return code == 0 && strings.Contains(out, "deployment cellbridge (KV bucket cellbridge-leases): 1 live replica(s); highest rules version run: 1") &&
			strings.Contains(out, "shards 34") && strings.Contains(out, "2 held")
	})
	t.Logf("cellbridge status -config:\n%s%s", out, errOut)

	code, _, errOut = runCLI(t, "status", "-addr", fmt.Sprintf("127.0.0.1:%d", freePort(t)))
	if code != exitError || !strings.Contains(errOut, "cannot reach the bridge") {
		t.Errorf("unreachable: exit %d, %q", code, errOut)
	}
}

func readFileT(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestDrillUsage(t *testing.T) {
	for _, args := range [][]string{{"drill", "-rate", "0"}, {"drill", "extra"}, {"status", "extra"}} {
		if code, _, errOut := runCLI(t, args...); code != exitUsage {
			t.Errorf("%v: exit %d, want %d (%s)", args, code, exitUsage, errOut)
		}
	}
	code, out, _ := runCLI(t, "drill", "-h")
	if code != exitOK || !strings.Contains(out, "LOWER version") || !strings.Contains(out, "-move") {
		t.Errorf("drill -h: exit %d\n%s", code, out)
	}
}

// TestStatusOutput renders a bridge that is not ready and holds two ranges,
// and a bridge that is still starting (503).
func TestStatusOutput(t *testing.T) {
	now := time.Now()
	st := bridge.Status{RulesVersion: 7, RulesLoaded: true, NotReady: "sink nats keeps failing\nrule orders: backlog without progress",
		InFlight: 3, MaxInFlight: 4096, Held: 12, MaxHeld: 10000,
		Rules: []bridge.RuleStatus{{Rule: "orders", InFlight: 3, Held: 12, HeldOldestAgeSeconds: 754, OldestUnackedAgeSeconds: 754, Backlog: 420,
			HeldRanges: []bridge.RangeHeld{{Shards: "40-44", From: 40, To: 44, Held: 10, OldestAgeSeconds: 754}, {Shards: "60", From: 60, To: 60, Held: 2, OldestAgeSeconds: 9.5}},
			Source: &bridge.SourceStatus{Rule: "orders", Ordering: "ordered", State: "active", Since: now.Add(-90 * time.Second),
				Pinned: new(true), PinID: "pin7", EpochStart: now.Add(-90 * time.Second), Takeovers: 2,
				LastTakeover: &bridge.SourceTakeover{At: now.Add(-90 * time.Second), UnownedSeconds: 4.5}}},
			{Rule: "events", Source: &bridge.SourceStatus{Rule: "events", Ordering: "ordered", State: "partitioned", Replica: "pod-a-x1",
				Partitions: 12, Members: []string{"pod-a-x1", "pod-b-y2"}, OwnedCount: 2, Takeovers: 5,
				Owned:        []bridge.OwnedPartition{{Partition: 3, State: "active", Consumer: "active"}, {Partition: 7, State: "draining", Consumer: "active"}},
				LastTakeover: &bridge.SourceTakeover{At: now.Add(-10 * time.Second), Partition: new(7), From: "pod-b-y2", How: "released"}}},
			{Rule: "payments", Source: &bridge.SourceStatus{Rule: "payments", Ordering: "ordered", State: "standby", Pinned: new(false)}}}}
	var starting atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if starting.Load() {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		_ = json.NewEncoder(w).Encode(st)
	}))
	defer srv.Close()
	code, out, errOut := runCLI(t, "status", "-addr", srv.URL)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	// The command renders ages against its own clock: its output is
	// checked for what does not depend on it, and the same status
	// rendered against the fixture's clock for every line.
	for _, want := range []string{"NOT READY, rules version 7", "shards 40-44", "owns 2 of 12", "payments  ordered      standby; takeovers 0"} {
		if !strings.Contains(out, want) {
			t.Errorf("cellbridge status output lacks %q:\n%s", want, out)
		}
	}
	var b strings.Builder
	writeStatus(&b, srv.URL, st, now)
	out = b.String()
	for _, want := range []string{"NOT READY, rules version 7", "not ready: sink nats keeps failing", "not ready: rule orders: backlog without progress",
		"held 12 of 10000", "420", "12m34s", "shards 40-44", "10 held", "shards 60", "oldest 9.5s",
		"orders    ordered      active since 1m30s ago; pin pin7; forwarding since 1m30s ago; takeovers 2 (last 1m30s ago, unowned 4.5s)",
		"events    partitioned  owns 2 of 12 (3 active, 7 draining/active); replica pod-a-x1, 2 members; takeovers 5 (last 10s ago, partition 7 from pod-b-y2, released)",
		"payments  ordered      standby; takeovers 0"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	starting.Store(true)
	code, _, errOut = runCLI(t, "status", "-addr", srv.URL)
	if code != exitError || !strings.Contains(errOut, "503") || !strings.Contains(errOut, "starting") {
		t.Errorf("starting: exit %d, %q", code, errOut)
	}
}
