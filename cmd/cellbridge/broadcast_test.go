package main

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/router"
)

const cliBroadcastRules = `kind: CellMap
version: 4
shards: 3
cells:
  - {name: a, city: hz, failover: b, shards: ["0"]}
  - {name: b, city: hz, failover: a, shards: ["1"]}
  - {name: c, city: sh, state: down, failover: a, shards: ["2"]}
---
kind: TopicRule
name: prices
source: {broker: nats, stream: PRICES, subject: "prices.>"}
key: {header: X-Sku}
target: {broker: nats, subject: "cell.{cell}.prices", cells: all, excludeOrigin: true}
dlq: {broker: nats, subject: dlq.prices}
---
kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>"}
key: {header: X-User}
shard: {func: mod}
target: {broker: nats, subject: "cell.{cell}.orders"}
dlq: {broker: nats, subject: dlq.orders}
`

// `cellbridge route` explains a broadcast: every selected cell with its
// target, and which get no copy and why (down; the origin, from -origin
// with -key or the Cell-Origin header of a message).
func TestCLIRouteBroadcast(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "rules.yaml", cliBroadcastRules)
	for _, args := range [][]string{
		{"-key", "sku-1", "-origin", "a"},
		{"-header", "X-Sku=sku-1", "-header", router.OriginHeader + "=a"},
	} {
		code, out, errOut := runCLI(t, append([]string{"route", "-rules", dir, "-topic", "prices"}, args...)...)
		if code != exitOK {
			t.Fatalf("%v: exit %d: %s", args, code, errOut)
		}
		var d router.Decision
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
		var cells []string
		for _, c := range d.Cells {
			cells = append(cells, c.Cell+":"+c.Skip+":"+c.Target.Subject)
		}
		if d.Reason != router.ReasonBroadcast || d.Key != "sku-1" || d.Origin != "a" ||
			strings.Join(cells, " ") != "a:origin:cell.a.prices b::cell.b.prices c:down:cell.c.prices" ||
			!strings.Contains(d.Explain, "to 2 cells: a, b; skipped (down: missed, replay when back): c; no copy to a") {
			t.Errorf("%v: decision %s", args, out)
		}
	}
	if code, _, errOut := runCLI(t, "route", "-rules", dir, "-topic", "prices", "-header", "X-Sku=1", "-origin", "a"); code != exitUsage ||
		!strings.Contains(errOut, "-origin goes with -key") {
		t.Errorf("-origin with a message: exit %d %q", code, errOut)
	}
}

// `cellbridge replay` refuses what it cannot do before it connects.
func TestCLIReplayUsage(t *testing.T) {
	dir, rules := t.TempDir(), t.TempDir()
	writeFile(t, rules, "rules.yaml", cliBroadcastRules)
	cfg := writeFile(t, dir, "config.yaml", "rules: "+rules+"\nbrokers:\n  nats: {type: nats, url: \"nats://127.0.0.1:1\"}\ndedupe: {store: memory}\n")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"-rule", "prices", "-cell", "c", "-from-seq", "1"}, exitUsage, "-config is required"},
		{[]string{"-config", cfg, "-cell", "c", "-from-seq", "1"}, exitUsage, "-rule and -cell are required"},
		{[]string{"-config", cfg, "-rule", "prices", "-cell", "c"}, exitUsage, "exactly one of -from-seq and -from-time"},
		{[]string{"-config", cfg, "-rule", "prices", "-cell", "c", "-from-seq", "1", "-from-time", "2026-01-01T00:00:00Z"}, exitUsage, "exactly one of"},
		{[]string{"-config", cfg, "-rule", "prices", "-cell", "c", "-from-seq", "1", "-to-seq", "3", "-to-time", "2026-01-01T00:00:00Z"}, exitUsage, "at most one of"},
		{[]string{"-config", cfg, "-rule", "prices", "-cell", "c", "-from-time", "yesterday"}, exitUsage, "-from-time: want an RFC 3339 time"},
		{[]string{"-config", cfg, "-rule", "orders", "-cell", "c", "-from-seq", "1"}, exitError, "topic rule orders does not broadcast"},
		{[]string{"-config", cfg, "-rule", "nope", "-cell", "c", "-from-seq", "1"}, exitError, `no topic rule "nope" (known: orders, prices)`},
		{[]string{"-config", cfg, "-rule", "prices", "-cell", "x", "-from-seq", "1"}, exitError, `topic rule prices does not broadcast to cell "x"`},
		{[]string{"-config", cfg, "-rule", "prices", "-cell", "c", "-from-seq", "1", "extra"}, exitUsage, "unexpected arguments"},
	} {
		code, _, errOut := runCLI(t, append([]string{"replay"}, tc.args...)...)
		if code != tc.code || !strings.Contains(errOut, tc.want) {
			t.Errorf("%v: exit %d %q, want %d with %q", tc.args, code, errOut, tc.code, tc.want)
		}
	}
}

// `cellbridge status` lists the cells of broadcast rules with what a down
// cell missed and the replay that sends it.
func TestStatusBroadcast(t *testing.T) {
	first := time.Date(2026, 3, 1, 10, 0, 0, 0, time.UTC)
	st := bridge.Status{RulesLoaded: true, Ready: true, RulesVersion: 4, Lagging: 3, MaxLagging: 10000, Rules: []bridge.RuleStatus{{
		Rule: "prices", Broadcast: []bridge.CellCopies{
			{Cell: "a", Pending: 2},
			{Cell: "c", Missed: bridge.MissedCopies{Count: 12, First: first, Last: first.Add(time.Minute), Ongoing: true}},
			{Cell: "d", Pending: 3, Lagging: 3},
		}}}}
	var b bytes.Buffer
	writeStatus(&b, "http://x", st, time.Now())
	out := b.String()
	for _, want := range []string{
		"lagging 3 of 10000",
		"broadcast copies per cell:",
		"prices  a  2 pending  0 lagging  none missed",
		"prices  c  0 pending  0 lagging  12 missed (down, missing since 2026-03-01T10:00:00Z to 2026-03-01T10:01:00Z): cellbridge replay -rule prices -cell c -from-time 2026-03-01T10:00:00Z",
		"prices  d  3 pending  3 lagging",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
}

// status and switch read the deployment's registry where the replicas
// write it: not on a broker the bridge never connects to (one named nats
// that neither the rules nor the dedupe store use), where they would find
// no replica and say so as if none ran.
func TestCLIStatusRegistryBrokerUnused(t *testing.T) {
	dir, rules := t.TempDir(), t.TempDir()
	writeFile(t, rules, "rules.yaml", strings.ReplaceAll(cliBroadcastRules, "broker: nats", "broker: east"))
	cfg := writeFile(t, dir, "config.yaml", "rules: "+rules+"\nbrokers:\n  nats: {type: nats, url: \"nats://127.0.0.1:1\"}\n  east: {type: nats, url: \"nats://127.0.0.1:1\"}\ndedupe: {store: memory}\n")
	code, _, errOut := runCLI(t, "status", "-config", cfg)
	if code != exitError || !strings.Contains(errOut, "publish no registry: neither its rules") || !strings.Contains(errOut, "use broker nats; name the replicas with -addr") {
		t.Errorf("status: exit %d %q", code, errOut)
	}
}
