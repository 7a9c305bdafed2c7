package router_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/cellbridge/cellbridge/internal/rulesdir"
	"github.com/cellbridge/cellbridge/router"
)

const cellMapV3 = `kind: CellMap
version: 3
shards: 10
cells:
  - {name: a0, shards: ["0-4"]}
  - {name: a1, shards: ["5-9"]}
`

const ordersRule = `kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>"}
key: {json: user.id}
shard: {func: digits, from: -1}
target: {broker: nats, subject: "cell.{cell}.orders"}
dlq: {broker: nats, subject: dlq.orders}
`

// TestLoadReadsOneConsistentSet: a ConfigMap `..data` swap between the
// reads of two rule files must not give a table made of old and new files.
func TestLoadReadsOneConsistentSet(t *testing.T) {
	v3 := map[string][]byte{"cellmap.yaml": []byte(cellMapV3), "rules.yaml": []byte(ordersRule)}
	v4 := map[string][]byte{
		"cellmap.yaml": []byte(strings.Replace(cellMapV3, "version: 3", "version: 4", 1)),
		"rules.yaml":   []byte(strings.Replace(ordersRule, "name: orders", "name: orders2", 1)),
	}
	for _, tc := range []struct {
		name string
		// swaps says after which reads of cellmap.yaml (1-based) the
		// directory is swapped to the other version.
		swaps   func(n int) bool
		version int64  // of the loaded table; 0: an error
		rule    string // the rule the table holds
		err     string
	}{
		{"swap after the first file", func(n int) bool { return n == 1 }, 4, "orders2", ""},
		{"swap twice", func(n int) bool { return n <= 2 }, 3, "orders", ""},
		{"swap on every read", func(int) bool { return true }, 0, "", "the rule files changed every time they were read (6 times)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "rules")
			rd, err := rulesdir.NewConfigMapDir(dir, v3)
			if err != nil {
				t.Fatal(err)
			}
			cur, n := 3, 0
			router.SetReadHook(func(path string) {
				if filepath.Base(path) != "cellmap.yaml" {
					return
				}
				n++
				if !tc.swaps(n) {
					return
				}
				next := v4
				if cur == 4 {
					next = v3
				}
				cur = 7 - cur
				if err := rd.Apply(next); err != nil {
					t.Error(err)
				}
			})
			defer router.SetReadHook(nil)
			tb, err := router.Load(dir)
			if tc.version == 0 {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tb.Version() != tc.version || tb.Rule(tc.rule) == nil || len(tb.Rules()) != 1 {
				t.Fatalf("loaded version %d with rules %v; want version %d with rule %s only (a torn read)", tb.Version(), names(tb), tc.version, tc.rule)
			}
		})
	}
}

func names(tb *router.Table) []string {
	var out []string
	for _, r := range tb.Rules() {
		out = append(out, r.Name)
	}
	return out
}
