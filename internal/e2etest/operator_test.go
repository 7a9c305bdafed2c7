//go:build unix

package e2etest

import (
	"bufio"
	"bytes"
	"context"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/internal/rulesdir"
	"github.com/cellbridge/cellbridge/router"
)

// cli runs the cellbridge binary with args within timeout and returns its
// standard output, its standard error and its exit code.
func cli(t *testing.T, timeout time.Duration, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, BridgeBinary(t), args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok || ctx.Err() != nil {
			t.Fatalf("cellbridge %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
		}
		code = ee.ExitCode()
	}
	return out.String(), errb.String(), code
}

// copyRules copies the example rules into a new directory, with the
// CellMap edited by e (zero: unchanged), and returns it and its table.
func copyRules(t *testing.T, e rulesdir.CellMapEdit) (string, *router.Table) {
	t.Helper()
	src, _ := exampleTable(t)
	files, err := rulesdir.ReadRuleFiles(src)
	if err != nil {
		t.Fatal(err)
	}
	if e.Version != 0 || e.Owner != nil || e.Blocked != nil {
		if files, err = rulesdir.EditCellMap(files, e); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	rd, err := rulesdir.OpenRulesDir(dir)
	if err == nil {
		err = rd.Apply(files)
	}
	if err != nil {
		t.Fatal(err)
	}
	return dir, loadTable(t, dir)
}

// The documented path from nothing: a separate nats-server without any
// stream, `cellbridge streams` (the plan), `cellbridge streams -apply`,
// `cellbridge run`, and events routed exactly once.
func TestOperatorPathFromNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	c := natstest.StartCluster(t, 1)
	rules, table := exampleTable(t)
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: c.URLs(), Dedupe: "{store: jetstream}"})

	out, errOut, code := cli(t, 30*time.Second, "streams", "-config", cfg)
	if code != 0 || !strings.Contains(out, "create  stream ORDERS") || !strings.Contains(out, "run with -apply") {
		t.Fatalf("streams (plan): exit %d\n%s%s", code, out, errOut)
	}
	t.Logf("cellbridge streams:\n%s", out)
	if out, errOut, code = cli(t, 30*time.Second, "streams", "-apply", "-config", cfg); code != 0 || !strings.Contains(out, "applied: 9 create") {
		t.Fatalf("streams -apply: exit %d\n%s%s", code, out, errOut)
	}
	if out, errOut, code = cli(t, 30*time.Second, "streams", "-config", cfg); code != 0 || !strings.Contains(out, "plan: 9 ok") {
		t.Fatalf("streams after -apply: exit %d\n%s%s", code, out, errOut)
	}

	b := StartBridge(t, BridgeOptions{Name: "replica", Config: cfg})
	b.WaitReady()
	_, js := c.Connect(t)
	ctx := testCtx(t, 2*time.Minute)
	load, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("orders"), Keys: Keys(300), Rate: 1000, Events: 2000})
	if err != nil {
		t.Fatal(err)
	}
	defer load.Stop()
	if err := load.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	sent := load.Sent()
	if !pollFor(30*time.Second, func() bool { n, err := Arrived(ctx, js, table); return err == nil && n >= uint64(len(sent)) }) {
		t.Fatalf("not every event arrived within 30s")
	}
	v, err := Verify(ctx, js, table, "orders", sent, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("result: %v", v.Result)
	if !v.ExactlyOnce() || v.Arrived != len(sent) {
		t.Fatalf("exactly-once violated:\n%s", strings.Join(v.Problems(20), "\n"))
	}
}

// A replica refuses to start on rules with a lower version than its
// deployment has run, and says how to roll back.
func TestReplicaRefusesLowerVersion(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	c := natstest.StartCluster(t, 1)
	dir, _ := copyRules(t, rulesdir.CellMapEdit{Version: 3})
	cfg := WriteConfig(t, "", Config{Rules: dir, URLs: c.URLs(), Dedupe: "{store: jetstream}"})
	if out, errOut, code := cli(t, 30*time.Second, "streams", "-apply", "-config", cfg); code != 0 {
		t.Fatalf("streams -apply: exit %d\n%s%s", code, out, errOut)
	}
	b := StartBridge(t, BridgeOptions{Name: "replica", Config: cfg})
	b.WaitReady()
	if err := b.Term(); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}

	files, err := rulesdir.ReadRuleFiles(dir)
	if err == nil {
		files, err = rulesdir.EditCellMap(files, rulesdir.CellMapEdit{Version: 2})
	}
	if err == nil {
		var rd *rulesdir.RulesDir
		if rd, err = rulesdir.OpenRulesDir(dir); err == nil {
			err = rd.Apply(files)
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, errOut, code := cli(t, time.Minute, "run", "-config", cfg, "-http", "127.0.0.1:0")
	t.Logf("run on version 2 after version 3: exit %d after %v\n%s", code, time.Since(start).Round(time.Millisecond), errOut)
	if code != 1 || !strings.Contains(errOut, "rules version 2 is lower than version 3, which deployment cellbridge-dedupe has already run") ||
		!strings.Contains(errOut, "to roll back, write the old content as version 4") {
		t.Fatalf("want exit 1 naming both versions and the way back; exit %d\n%s%s", code, out, errOut)
	}
}

// switchMoving is the range the switch test moves, from rz00 to rz10.
var switchMoving = router.Range{From: 22, To: 32}

// `cellbridge switch` under load with two replicas whose rules directories
// are updated 3 s apart, as kubelets sync a ConfigMap at different
// moments: the replica that forwards the rule is the late one. After the
// block is in force nothing of the moving shards reaches their old cell;
// nothing is lost or duplicated.
func TestSwitchTwoReplicasLateRules(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	begin := time.Now()
	c := natstest.StartCluster(t, 1)
	dirA, t0 := copyRules(t, rulesdir.CellMapEdit{})
	dirB, _ := copyRules(t, rulesdir.CellMapEdit{})
	owners := rulesdir.Owners(t0)
	for s := switchMoving.From; s <= switchMoving.To; s++ {
		owners[s] = "rz10"
	}
	newDir, tn := copyRules(t, rulesdir.CellMapEdit{Version: 3, Owner: owners, Blocked: []router.Range{}})
	dir := t.TempDir()
	for _, d := range []string{"a", "b"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cfgA := WriteConfig(t, filepath.Join(dir, "a"), Config{Rules: dirA, URLs: c.URLs(), Dedupe: "{store: jetstream}"})
	cfgB := WriteConfig(t, filepath.Join(dir, "b"), Config{Rules: dirB, URLs: c.URLs(), Dedupe: "{store: jetstream}"})
	if out, errOut, code := cli(t, 30*time.Second, "streams", "-apply", "-config", cfgA); code != 0 {
		t.Fatalf("streams -apply: exit %d\n%s%s", code, out, errOut)
	}
	a := StartBridge(t, BridgeOptions{Name: "replica-a", Config: cfgA, Dir: dir})
	b := StartBridge(t, BridgeOptions{Name: "replica-b", Config: cfgB, Dir: dir})
	a.WaitReady()
	b.WaitReady()

	_, js := c.Connect(t)
	ctx := testCtx(t, 3*time.Minute)
	load, err := StartLoad(LoadConfig{JetStream: js, Rule: t0.Rule("orders"), Keys: Keys(400), Rate: 600, Events: 600 * 60})
	if err != nil {
		t.Fatal(err)
	}
	defer load.Stop()
	// The rule's messages go through one replica at a time (ordered
	// source): that one sees every rules change 3 s late.
	var active, other *Bridge
	poll.Eventually(t, 30*time.Second, "one replica forwarding orders", func() bool {
		for _, x := range [][2]*Bridge{{a, b}, {b, a}} {
			if n, err := x[0].Metric(ctx, bridge.MetricForwarded, map[string]string{"rule": "orders"}); err == nil && n >= 300 {
				active, other = x[0], x[1]
				return true
			}
		}
		return false
	})
	oldDir, lateDir := dirA, dirB
	cfgOld := cfgA
	if active == a {
		oldDir, lateDir, cfgOld = dirB, dirA, cfgB
	}
	t.Logf("%s forwards orders and sees each change 3s late; %s sees it at once", filepath.Base(active.Log), filepath.Base(other.Log))
	stopMirror := mirrorLate(t, oldDir, lateDir, 3*time.Second)
	defer stopMirror()

	// The switch, as an operator runs it; each output line timestamped.
	var lines []stamped
	var mu sync.Mutex
	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(sctx, BridgeBinary(t), "switch", "-config", cfgOld, "-wait-cmd", "sleep 1", "-timeout", "60s", oldDir, newDir)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	switchStart := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		mu.Lock()
		lines = append(lines, stamped{at: time.Now(), line: sc.Text()})
		mu.Unlock()
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("cellbridge switch: %v\n%s\n%s", err, joinLines(lines), errb.String())
	}
	t.Logf("cellbridge switch (%v):\n%s", time.Since(switchStart).Round(time.Millisecond), joinLines(lines))
	written, inForce := at(lines, "step 1: wrote"), at(lines, "the block is in force")
	if written.IsZero() || inForce.IsZero() || at(lines, "switch done").IsZero() {
		t.Fatalf("the switch did not report every step")
	}
	if wait := inForce.Sub(written); wait < 3*time.Second {
		t.Errorf("the block counted as in force %v after it was written, before the late replica saw it (3s)", wait)
	}
	time.Sleep(time.Second) // load under the new rules too
	if err := load.Finish(ctx); err != nil {
		t.Fatal(err)
	}
	sent := load.Sent()
	if !pollFor(60*time.Second, func() bool { n, err := Arrived(ctx, js, t0); return err == nil && n >= uint64(len(sent)) }) {
		t.Errorf("not every event arrived within 60s")
	}
	blockFiles, err := rulesdir.ReadRuleFiles(newDir)
	if err != nil {
		t.Fatal(err)
	}
	blockFiles, err = rulesdir.EditCellMap(blockFiles, rulesdir.CellMapEdit{Version: 2, Owner: rulesdir.Owners(t0), Blocked: []router.Range{switchMoving}})
	if err != nil {
		t.Fatal(err)
	}
	t2, err := rulesdir.LoadFiles(t.TempDir(), blockFiles)
	if err != nil {
		t.Fatal(err)
	}
	tables := map[int64]*router.Table{1: t0, 2: t2, 3: tn}
	v, err := VerifyVersions(ctx, js, tables, "orders", sent, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("result: %v", v.Result)
	if !v.ExactlyOnce() || v.Arrived != len(sent) {
		t.Errorf("exactly-once violated (%d of %d arrived):\n%s", v.Arrived, len(sent), strings.Join(v.Problems(20), "\n"))
	}
	var oldAfter, underBlock, moved int
	for _, x := range v.Arrivals {
		if sh := t0.Resolve("orders", x.Key).Shard; sh < switchMoving.From || sh > switchMoving.To {
			continue
		}
		moved++
		if x.Cell == "rz00" && x.Stored.After(inForce) {
			oldAfter++
		}
		if x.Version == 2 {
			underBlock++
		}
	}
	t.Logf("events of the moving shards: %d; in rz00 after the block was in force: %d; forwarded under the blocking version: %d",
		moved, oldAfter, underBlock)
	if oldAfter != 0 || underBlock != 0 {
		t.Errorf("moving shards reached a cell while blocked: %d in their old cell after the block, %d stamped with the blocking version", oldAfter, underBlock)
	}
	t.Logf("test ran %v", time.Since(begin).Round(time.Millisecond))
}

type stamped struct {
	at   time.Time
	line string
}

func joinLines(ls []stamped) string {
	var b strings.Builder
	for _, l := range ls {
		b.WriteString(l.at.Format("15:04:05.000 ") + l.line + "\n")
	}
	return b.String()
}

// at is when the first line containing s was printed (zero: never).
func at(ls []stamped, s string) time.Time {
	for _, l := range ls {
		if strings.Contains(l.line, s) {
			return l.at
		}
	}
	return time.Time{}
}

// mirrorLate copies every change of from's rule files to to, delay after
// it appeared, until stopped.
func mirrorLate(t *testing.T, from, to string, delay time.Duration) (stop func()) {
	t.Helper()
	rd, err := rulesdir.OpenRulesDir(to)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		last := fingerprint(from)
		for {
			select {
			case <-done:
				return
			case <-time.After(50 * time.Millisecond):
			}
			fp := fingerprint(from)
			if fp == last || fp == "" {
				continue
			}
			last = fp
			files, err := rulesdir.ReadRuleFiles(from)
			if err != nil {
				continue
			}
			select {
			case <-done:
				return
			case <-time.After(delay):
			}
			if err := rd.Apply(files); err != nil {
				t.Errorf("mirror: %v", err)
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

// fingerprint identifies the rule files of dir ("" when unreadable).
func fingerprint(dir string) string {
	files, err := rulesdir.ReadRuleFiles(dir)
	if err != nil {
		return ""
	}
	var b strings.Builder
	for _, name := range slices.Sorted(maps.Keys(files)) {
		b.WriteString(name + "\x00")
		b.Write(files[name])
	}
	return b.String()
}

// Before it consumes anything the bridge lists every missing stream and
// every duplicate window too short, naming the rule and the subject;
// `run -check` does the same without starting. Once running, a publish
// that finds no stream says so in the log and on /readyz.
func TestPreflightListsEveryProblem(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	c := natstest.StartCluster(t, 1)
	rules, table := exampleTable(t)
	_, js := c.Connect(t)
	ctx := testCtx(t, 2*time.Minute)
	// One cell stream, with a window shorter than the default
	// configuration needs (reserveTTL 30s + ackWait 30s + retry.max 1s).
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "CELL_RZ00", Subjects: []string{"cell.rz00.>"}, Duplicates: 30 * time.Second}); err != nil {
		t.Fatal(err)
	}
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: c.URLs(), Dedupe: "{store: jetstream}"})
	want := []string{
		"rule orders: source on broker nats: stream ORDERS does not exist",
		"rule payments: source on broker nats: stream PAYMENTS does not exist",
		"rule orders: dead-letter target subject dlq.orders on broker nats: no stream captures it",
		"rule payments: dead-letter target subject dlq.payments on broker nats: no stream captures it",
		"rule orders: target subject cell.rz00.orders (cell rz00) on broker nats: stream CELL_RZ00 drops repeats only within 30s, less than the 1m1s the configuration needs",
		"rule payments: target subject cell.rz00.payments (cell rz00) on broker nats: stream CELL_RZ00 drops repeats only within 30s",
	}
	for _, r := range []string{"orders", "payments"} {
		for _, cell := range []string{"rz01", "rz10", "gz00"} {
			want = append(want, "rule "+r+": target subject cell."+cell+"."+r+" (cell "+cell+") on broker nats: no stream captures it")
		}
	}
	check := func(what, out string) {
		t.Helper()
		if !strings.Contains(out, "12 problems with the streams the rules need") {
			t.Errorf("%s: no count of 12 problems:\n%s", what, out)
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: missing %q", what, w)
			}
		}
	}
	out, errOut, code := cli(t, 30*time.Second, "run", "-check", "-config", cfg)
	if code != 1 {
		t.Fatalf("run -check: exit %d, want 1\n%s%s", code, out, errOut)
	}
	check("run -check", errOut)
	t.Logf("run -check:\n%s", errOut)
	out, errOut, code = cli(t, time.Minute, "run", "-config", cfg, "-http", "127.0.0.1:0")
	if code != 1 {
		t.Fatalf("run: exit %d, want 1\n%s%s", code, out, errOut)
	}
	check("run", errOut)
	if _, err := js.Stream(ctx, "KV_cellbridge-dedupe"); err == nil {
		t.Errorf("the bridge opened its dedupe store although the preflight failed")
	}

	// Everything in place, then a cell stream goes away under the running
	// bridge.
	if out, errOut, code := cli(t, 30*time.Second, "streams", "-apply", "-config", cfg); code != 0 {
		t.Fatalf("streams -apply: exit %d\n%s%s", code, out, errOut)
	}
	b := StartBridge(t, BridgeOptions{Name: "replica", Config: cfg})
	b.WaitReady()
	if err := js.DeleteStream(ctx, "CELL_RZ01"); err != nil {
		t.Fatal(err)
	}
	load, err := StartLoad(LoadConfig{JetStream: js, Rule: table.Rule("orders"), Keys: Keys(100), Rate: 200, Events: 200})
	if err != nil {
		t.Fatal(err)
	}
	defer load.Stop()
	var why string
	poll.Eventually(t, 30*time.Second, "/readyz naming the missing stream", func() bool {
		ok, body, err := b.Ready(ctx)
		why = body
		return err == nil && !ok && strings.Contains(body, "no stream captures the subject")
	})
	t.Logf("/readyz: %s", why)
	if !strings.Contains(why, `subject "cell.rz01.orders"`) || !strings.Contains(b.LogTail(200), "no stream captures the subject") {
		t.Errorf("the subject or the log line is missing:\n%s", b.LogTail(20))
	}
	if out, errOut, code := cli(t, 30*time.Second, "streams", "-apply", "-config", cfg); code != 0 || !strings.Contains(out, "create  stream CELL_RZ01") {
		t.Fatalf("streams -apply: exit %d\n%s%s", code, out, errOut)
	}
	if err := load.Finish(ctx); err != nil {
		t.Fatal(err)
	}
	b.WaitReady()
}
