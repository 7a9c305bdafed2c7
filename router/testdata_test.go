package router

import (
	"errors"
	"strings"
	"testing"
)

// baseRules is a small valid rule set; tests derive broken variants from it
// by replacing text, so that each case shows only what it changes. Line
// numbers are referred to by the tests.
const baseRules = `kind: CellMap
version: 3
shards: 10
global: gz00
cells:
  - {name: a0, state: active, failover: a1, shards: ["0-4"]}
  - {name: a1, state: active, failover: a0, shards: ["5-9"]}
  - {name: gz00}
pins:
  - {key: "12345", cell: a1}
blocked: []
---
kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>"}
key: {json: user.id}
shard: {func: digits, from: -1}
target: {broker: nats, subject: "cell.{cell}.orders"}
onMissingKey: dlq
dlq: {broker: nats, subject: dlq.orders}
---
kind: TopicRule
name: pay
source: {broker: nats, stream: PAY, subject: "pay.*"}
key: {header: X-User-Id}
shard: {func: mod}
target: {broker: nats, subject: "cell.{cell}.pay"}
onMissingKey: global
`

// variant returns baseRules with each old replaced by new (pairs); it fails
// the test when old is not found, so that cases cannot silently rot.
func variant(t testing.TB, pairs ...string) string {
	t.Helper()
	s := baseRules
	for i := 0; i+1 < len(pairs); i += 2 {
		if !strings.Contains(s, pairs[i]) {
			t.Fatalf("variant: %q not in base rules", pairs[i])
		}
		s = strings.Replace(s, pairs[i], pairs[i+1], 1)
	}
	return s
}

func mustParse(t testing.TB, src string) *Table {
	t.Helper()
	tb, err := Parse("t.yaml", []byte(src))
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return tb
}

func problemsOf(t testing.TB, src string) []string {
	t.Helper()
	_, err := Parse("t.yaml", []byte(src))
	if err == nil {
		return nil
	}
	var e *Errors
	if !errors.As(err, &e) {
		t.Fatalf("error is %T, not *Errors: %v", err, err)
	}
	out := make([]string, len(*e))
	for i, p := range *e {
		out[i] = p.String()
	}
	return out
}
