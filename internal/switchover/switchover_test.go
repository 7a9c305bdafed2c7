package switchover

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/deployment"
	"github.com/cellbridge/cellbridge/internal/syncbuf"
	"github.com/cellbridge/cellbridge/router"
)

// rules is a small rule set: 10 shards, a0 owns 0-4 and a1 5-9; tests
// derive the new rules from it by replacing text.
const rules = `kind: CellMap
version: 3
shards: 10
cells:
  - {name: a0, shards: ["0-4"]}
  - {name: a1, shards: ["5-9"]}
pins:
  - {key: "12345", cell: a1}
---
kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>"}
key: {json: user.id}
shard: {func: digits, from: -1}
target: {broker: nats, subject: "cell.{cell}.orders"}
dlq: {broker: nats, subject: dlq.orders}
`

func variant(t *testing.T, pairs ...string) string {
	t.Helper()
	s := rules
	for i := 0; i+1 < len(pairs); i += 2 {
		if !strings.Contains(s, pairs[i]) {
			t.Fatalf("variant: %q not in the rules", pairs[i])
		}
		s = strings.Replace(s, pairs[i], pairs[i+1], 1)
	}
	return s
}

func writeRules(t *testing.T, dir, src string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "rules.yaml"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir
}

// statusOf is what a replica running the rules in dir publishes.
func statusOf(dir string) (bridge.Status, error) {
	tb, err := router.Load(dir)
	if err != nil {
		return bridge.Status{}, err
	}
	st := bridge.Status{RulesVersion: tb.Version(), RulesLoaded: true, Ready: true}
	for _, r := range tb.Blocked() {
		st.Blocked = append(st.Blocked, r.String())
	}
	return st, nil
}

// replicas is a deployment whose replicas run the rules in dir (the
// directory an apply command copies to).
type replicas struct {
	dir string
	ids []string
}

func (f *replicas) Replicas(context.Context) ([]deployment.Record, error) {
	st, err := statusOf(f.dir)
	if err != nil {
		return nil, err
	}
	var out []deployment.Record
	for _, id := range f.ids {
		out = append(out, deployment.Record{Status: st, Replica: id})
	}
	return out, nil
}

func (f *replicas) Highest(ctx context.Context) (int64, error) {
	recs, err := f.Replicas(ctx)
	if err != nil || len(recs) == 0 {
		return 0, err
	}
	return recs[0].RulesVersion, nil
}

func (f *replicas) Describe() string { return "test replicas" }

func blockedOf(t *testing.T, dir string) string {
	t.Helper()
	tb, err := router.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	return router.DiffReport{Block: tb.Blocked()}.BlockedList()
}

// TestSwitchBlocksKeyMoves: a switch blocks what router.Diff says moves
// keys without moving a shard's owner: the shard of a pin that changes
// cell, and every shard when a rule's key or shard function changes.
func TestSwitchBlocksKeyMoves(t *testing.T) {
	for _, tc := range []struct {
		name  string
		next  func(t *testing.T) string
		block string // blocked by the blocking rules
		out   []string
	}{
		{"owner move", func(t *testing.T) string { return variant(t, `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`) }, `["3-4"]`,
			[]string{"moves a0 → a1: shards 3-4 (2)"}},
		{"pin retargeted", func(t *testing.T) string { return variant(t, `{key: "12345", cell: a1}`, `{key: "12345", cell: a0}`) }, `["5"]`,
			[]string{"pin 12345: a1 → a0 (blocks shard 5)"}},
		{"pin added", func(t *testing.T) string {
			return variant(t, `  - {key: "12345", cell: a1}`, "  - {key: \"12345\", cell: a1}\n  - {key: \"8\", cell: a0}")
		}, `["8"]`, []string{"pin 8: (none) → a0 (blocks shard 8)"}},
		// 12345's shard 5 goes to a1 before and after: its pin moves
		// nothing, and removing it blocks nothing more than the move.
		{"pin removed and a move", func(t *testing.T) string {
			return variant(t, "pins:\n  - {key: \"12345\", cell: a1}\n", "", `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`)
		}, `["3-4"]`, []string{"pin 12345: a1 → (none) (blocks nothing: the key's cell stays, or no rule routes it)"}},
		// 33's shard 3 moves a0 → a1; a pin added keeps 33 on a0, where
		// it was: the pin blocks nothing, the move blocks 3-4.
		{"pin that keeps its key while its shard moves", func(t *testing.T) string {
			return variant(t, `{key: "12345", cell: a1}`, `{key: "33", cell: a0}`, `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`)
		}, `["3-4"]`, []string{"moves a0 → a1: shards 3-4 (2)"}},
		{"shard function", func(t *testing.T) string { return variant(t, "from: -1}", "from: -2}") }, `["0-9"]`,
			[]string{"topic rule orders: its key or shard function changes"}},
		{"key", func(t *testing.T) string { return variant(t, "key: {json: user.id}", "key: {header: X-User}") }, `["0-9"]`,
			[]string{"topic rule orders: its key or shard function changes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			old := writeRules(t, filepath.Join(dir, "old"), rules)
			next := writeRules(t, filepath.Join(dir, "new"), tc.next(t))
			var out syncbuf.Buffer
			var blocked string
			rep, err := Run(context.Background(), Config{
				Old: old, New: next, Deployment: &replicas{dir: old, ids: []string{"r1"}},
				Poll: 5 * time.Millisecond, Timeout: 5 * time.Second, Out: &out, TempDir: dir,
				OnStep: func(st Step) {
					if st == StepBlockInForce {
						blocked = blockedOf(t, old)
					}
				},
			})
			if err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			if got := blockedList(rep.Block); got != tc.block || blocked != tc.block {
				t.Fatalf("report blocks %s, the block in force %s; want %s\n%s", got, blocked, tc.block, out.String())
			}
			if rep.FinalVersion != 5 || blockedOf(t, old) != "[]" {
				t.Fatalf("final version %d, blocked %s\n%s", rep.FinalVersion, blockedOf(t, old), out.String())
			}
			for _, w := range tc.out {
				if !strings.Contains(out.String(), w) {
					t.Errorf("missing %q in:\n%s", w, out.String())
				}
			}
		})
	}
}

// TestSwitchResumeReapplies: a switch stopped by a failing apply command
// left Old written; run again, it runs the apply command again when no
// replica runs the written version yet (and not when one does).
func TestSwitchResumeReapplies(t *testing.T) {
	for _, tc := range []struct {
		name string
		// first is the apply command of the first run (%[1]s: Old's
		// file, %[2]s: the deployed directory, %[3]s: a scratch file).
		first   string
		firstV  int64 // the version the replicas run after the first run
		second  string
		resumed string // in the second run's output; "" for none
	}{
		{"failed at step 1", `exit 3`, 3, `cp "%[1]s" "%[2]s/"`, "holds version 4 but no replica runs it yet: running the apply command again"},
		{"failed at step 3", `[ -e "%[3]s" ] && exit 3; touch "%[3]s"; cp "%[1]s" "%[2]s/"`, 4, `cp "%[1]s" "%[2]s/"`,
			"holds version 5 but no replica runs it yet: running the apply command again"},
		{"failed after applying", `cp "%[1]s" "%[2]s/"; [ -e "%[3]s" ] && exit 3; touch "%[3]s"`, 5, `exit 4`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			old := writeRules(t, filepath.Join(dir, "old"), rules)
			next := writeRules(t, filepath.Join(dir, "new"), variant(t, `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`))
			deployed := writeRules(t, filepath.Join(dir, "deployed"), rules)
			cmd := func(f string) string {
				return fmt.Sprintf(f, filepath.Join(old, "rules.yaml"), deployed, filepath.Join(dir, "mark"))
			}
			run := func(apply string) (*Report, string, error) {
				var out syncbuf.Buffer
				rep, err := Run(context.Background(), Config{
					Old: old, New: next, Deployment: &replicas{dir: deployed, ids: []string{"r1", "r2"}}, ApplyCmd: cmd(apply),
					Poll: 5 * time.Millisecond, Timeout: 2 * time.Second, Out: &out, TempDir: dir,
				})
				return rep, out.String(), err
			}
			if _, out, err := run(tc.first); err == nil || !strings.Contains(err.Error(), "the apply command failed") {
				t.Fatalf("first run: %v\n%s", err, out)
			}
			if st, _ := statusOf(deployed); st.RulesVersion != tc.firstV {
				t.Fatalf("after the first run the replicas run %d, want %d", st.RulesVersion, tc.firstV)
			}
			rep, out, err := run(tc.second)
			if err != nil {
				t.Fatalf("second run: %v\n%s", err, out)
			}
			if tc.resumed != "" && !strings.Contains(out, tc.resumed) || tc.resumed == "" && strings.Contains(out, "resuming: ") {
				t.Errorf("second run, want %q:\n%s", tc.resumed, out)
			}
			if st, _ := statusOf(deployed); st.RulesVersion != 5 || len(st.Blocked) != 0 || !reflect.DeepEqual(rep.Replicas, []string{"r1", "r2"}) {
				t.Fatalf("the replicas run %d blocking %v, report %v\n%s", st.RulesVersion, st.Blocked, rep.Replicas, out)
			}
		})
	}
}

// silentUntil serves /status of the rules in dir once up is set; before,
// it drops every connection without an answer.
func silentUntil(dir string, up *atomic.Bool) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !up.Load() {
			if c, _, err := w.(http.Hijacker).Hijack(); err == nil {
				_ = c.Close()
			}
			return
		}
		st, err := statusOf(dir)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = writeJSON(w, st)
	})
}

// TestSwitchWaitsForSilentReplica: with -addr, a named replica that does
// not answer holds each step until it answers (it may still run the old
// rules), or fails the step when the timeout ends, naming it.
func TestSwitchWaitsForSilentReplica(t *testing.T) {
	defer http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	for _, tc := range []struct {
		name    string
		upAfter time.Duration // 0: never
		timeout time.Duration
	}{
		{"answers later", 300 * time.Millisecond, 10 * time.Second},
		{"never answers", 0, time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			old := writeRules(t, filepath.Join(dir, "old"), rules)
			next := writeRules(t, filepath.Join(dir, "new"), variant(t, `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`))
			var always atomic.Bool
			always.Store(true)
			r1 := httptest.NewServer(silentUntil(old, &always))
			defer r1.Close()
			var up atomic.Bool
			r2 := httptest.NewServer(silentUntil(old, &up))
			defer r2.Close()
			var mu sync.Mutex
			var upAt, inForce time.Time
			var out syncbuf.Buffer
			rep, err := Run(context.Background(), Config{
				Old: old, New: next, Deployment: &deployment.HTTP{URLs: []string{r1.URL, r2.URL}},
				Poll: 10 * time.Millisecond, Timeout: tc.timeout, Out: &out, TempDir: dir,
				OnStep: func(st Step) {
					if st != StepBlockWritten {
						return
					}
					if tc.upAfter > 0 {
						time.AfterFunc(tc.upAfter, func() {
							mu.Lock()
							upAt = time.Now()
							mu.Unlock()
							up.Store(true)
						})
					}
				},
			})
			if rep != nil {
				inForce = rep.BlockInForce
			}
			if tc.upAfter == 0 {
				want := "waiting for:\n  " + r2.URL + ": no answer: "
				if err == nil || !strings.Contains(err.Error(), "not within 1s: every replica to run version 4") || !strings.Contains(err.Error(), want) {
					t.Fatalf("err %v, want the timeout naming %q\n%s", err, want, out.String())
				}
				if !strings.Contains(out.String(), "note: "+r2.URL+": no answer: ") {
					t.Errorf("no note of the silent replica at the start:\n%s", out.String())
				}
				return
			}
			if err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			mu.Lock()
			defer mu.Unlock()
			if upAt.IsZero() || inForce.Before(upAt) {
				t.Fatalf("the block was in force at %v, before the silent replica answered at %v\n%s", inForce, upAt, out.String())
			}
			if !reflect.DeepEqual(rep.Replicas, slices.Sorted(slices.Values([]string{r1.URL, r2.URL}))) {
				t.Fatalf("replicas %v\n%s", rep.Replicas, out.String())
			}
		})
	}
}

func writeJSON(w http.ResponseWriter, v any) error { return json.NewEncoder(w).Encode(v) }
