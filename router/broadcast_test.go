package router

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// bcastRules has four cells in two cities and a broadcast rule; tests
// derive variants by replacing text. Line numbers are referred to.
const bcastRules = `kind: CellMap
version: 5
shards: 10
cells:
  - {name: hz0, city: hz, failover: hz1, shards: ["0-2"]}
  - {name: hz1, city: hz, failover: hz0, shards: ["3-5"]}
  - {name: sh0, city: sh, failover: sh1, shards: ["6-7"]}
  - {name: sh1, city: sh, failover: sh0, shards: ["8-9"]}
---
kind: TopicRule
name: prices
source: {broker: nats, stream: PRICES, subject: "prices.>"}
key: {json: sku}
target: {broker: nats, subject: "cell.{cell}.prices", cells: all}
dlq: {broker: nats, subject: dlq.prices}
`

func bcastVariant(t testing.TB, pairs ...string) string {
	t.Helper()
	s := bcastRules
	for i := 0; i+1 < len(pairs); i += 2 {
		if !strings.Contains(s, pairs[i]) {
			t.Fatalf("variant: %q not in the broadcast rules", pairs[i])
		}
		s = strings.Replace(s, pairs[i], pairs[i+1], 1)
	}
	return s
}

func cellNames(cs []BroadcastCell) string {
	var out []string
	for _, c := range cs {
		s := c.Cell + "=" + c.Target.Subject
		if c.Skip != "" {
			s += "(" + c.Skip + ")"
		}
		out = append(out, s)
	}
	return strings.Join(out, " ")
}

// TestBroadcastSelection resolves each form of target.cells, a down cell
// and an origin, and checks the decision's cells and copies.
func TestBroadcastSelection(t *testing.T) {
	for _, tc := range []struct {
		name, cells string
		down        bool
		origin      string
		want        string // every selected cell, with skips
		copies      string
	}{
		{name: "all", cells: "all",
			want:   "hz0=cell.hz0.prices hz1=cell.hz1.prices sh0=cell.sh0.prices sh1=cell.sh1.prices",
			copies: "hz0=cell.hz0.prices hz1=cell.hz1.prices sh0=cell.sh0.prices sh1=cell.sh1.prices"},
		{name: "list in CellMap order", cells: "[sh1, hz0]",
			want: "hz0=cell.hz0.prices sh1=cell.sh1.prices", copies: "hz0=cell.hz0.prices sh1=cell.sh1.prices"},
		{name: "city", cells: "{city: sh}",
			want: "sh0=cell.sh0.prices sh1=cell.sh1.prices", copies: "sh0=cell.sh0.prices sh1=cell.sh1.prices"},
		{name: "down cell skipped", cells: "{city: hz}", down: true,
			want: "hz0=cell.hz0.prices hz1=cell.hz1.prices(down)", copies: "hz0=cell.hz0.prices"},
		{name: "origin skipped", cells: "all", origin: "hz1",
			want:   "hz0=cell.hz0.prices hz1=cell.hz1.prices sh0=cell.sh0.prices sh1=cell.sh1.prices",
			copies: "hz0=cell.hz0.prices sh0=cell.sh0.prices sh1=cell.sh1.prices"},
		{name: "origin not selected", cells: "{city: sh}", origin: "hz1",
			want: "sh0=cell.sh0.prices sh1=cell.sh1.prices", copies: "sh0=cell.sh0.prices sh1=cell.sh1.prices"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pairs := []string{"cells: all}", "cells: " + tc.cells + ", excludeOrigin: true}"}
			if tc.down {
				pairs = append(pairs, "{name: hz1, city: hz,", "{name: hz1, city: hz, state: down,", "city: hz, failover: hz1", "city: hz, failover: sh0")
			}
			tb := mustParse(t, bcastVariant(t, pairs...))
			m := &Message{Body: []byte(`{"sku":"A-1"}`), Header: map[string][]string{}}
			if tc.origin != "" {
				m.Header[OriginHeader] = []string{tc.origin}
			}
			d := tb.Route("prices", m)
			if d.Reason != ReasonBroadcast || d.Key != "A-1" || d.Shard != -1 || d.Cell != "" || !d.Target.IsZero() || d.Version != 5 || d.Origin != tc.origin {
				t.Fatalf("decision %+v", d)
			}
			if got := cellNames(d.Cells); got != tc.want {
				t.Errorf("cells %s\nwant  %s", got, tc.want)
			}
			if got := cellNames(d.Copies()); got != tc.copies {
				t.Errorf("copies %s\nwant   %s", got, tc.copies)
			}
			if r := tb.Rule("prices"); r.Broadcast == nil || r.Broadcast.String() != tc.cells || !r.ExcludeOrigin {
				t.Errorf("rule broadcast %v, excludeOrigin %v", r.Broadcast, r.ExcludeOrigin)
			}
		})
	}
}

// TestBroadcastDecision: without excludeOrigin the origin header is not
// read; a missing key dead-letters; the JSON names every cell, the skips
// and why; the shared cells are not modified by Copies or JSON.
func TestBroadcastDecision(t *testing.T) {
	tb := mustParse(t, bcastVariant(t, "{name: sh1, city: sh,", "{name: sh1, city: sh, state: down,", "city: sh, failover: sh1", "city: sh, failover: hz0"))
	m := &Message{Body: []byte(`{"sku":"A-1"}`), Header: map[string][]string{OriginHeader: {"hz0"}}}
	if d := tb.Route("prices", m); d.Origin != "" || len(d.Copies()) != 3 {
		t.Fatalf("origin read without excludeOrigin: %+v", d)
	}
	if d := tb.Route("prices", &Message{Body: []byte(`{}`)}); d.Reason != ReasonDLQ || d.Cause != CauseMissingKey || d.Target.Subject != "dlq.prices" {
		t.Fatalf("missing key: %+v", d)
	}
	if d := tb.Resolve("prices", ""); d.Reason != ReasonDLQ || d.Target.Subject != "dlq.prices" {
		t.Fatalf("empty key: %+v", d)
	}

	tb = mustParse(t, bcastVariant(t, "{name: sh1, city: sh,", "{name: sh1, city: sh, state: down,", "city: sh, failover: sh1", "city: sh, failover: hz0", "cells: all}", "cells: all, excludeOrigin: true}"))
	d := tb.Route("prices", m)
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"topic":"prices","key":"A-1","shard":-1,"target":{"broker":""},"version":5,"reason":"broadcast",` +
		`"explain":"broadcast (cells all) to 3 cells: hz0, hz1, sh0; skipped (down: missed, replay when back): sh1; no copy to hz0, where the event came from (excludeOrigin)",` +
		`"cells":[{"cell":"hz0","target":{"broker":"nats","subject":"cell.hz0.prices"},"skip":"origin"},` +
		`{"cell":"hz1","target":{"broker":"nats","subject":"cell.hz1.prices"}},` +
		`{"cell":"sh0","target":{"broker":"nats","subject":"cell.sh0.prices"}},` +
		`{"cell":"sh1","target":{"broker":"nats","subject":"cell.sh1.prices"},"skip":"down"}],"origin":"hz0"}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	if d.Cells[0].Skip != "" || strings.Contains(d.Explain, "came from") {
		t.Fatalf("JSON encoding modified the shared decision: %+v", d)
	}
	var back Decision
	if err := json.Unmarshal(b, &back); err != nil || back.Reason != ReasonBroadcast || len(back.Cells) != 4 || back.Cells[0].Skip != SkipOrigin {
		t.Fatalf("decoded %+v, %v", back, err)
	}
}

// TestBroadcastResolveDoesNotAllocate: a broadcast decision carries the
// rules version's precomputed cells; reading the origin allocates nothing.
func TestBroadcastResolveDoesNotAllocate(t *testing.T) {
	tb := mustParse(t, bcastVariant(t, "key: {json: sku}", "key: {header: X-Sku}", "cells: all}", "cells: all, excludeOrigin: true}"))
	m := &Message{Header: map[string][]string{"X-Sku": {"A-1"}, OriginHeader: {"hz1"}}}
	if n := testing.AllocsPerRun(100, func() { tb.Resolve("prices", "A-1") }); n != 0 {
		t.Errorf("Resolve allocates %v times", n)
	}
	if n := testing.AllocsPerRun(100, func() { tb.Route("prices", m) }); n != 0 {
		t.Errorf("Route allocates %v times", n)
	}
	if d := tb.Route("prices", m); d.Origin != "hz1" || len(d.Cells) != 4 {
		t.Fatalf("decision %+v", d)
	}
}

// TestReplayInto builds the replay table: one rule, one cell, down or not.
func TestReplayInto(t *testing.T) {
	tb := mustParse(t, bcastVariant(t, "{name: sh1, city: sh,", "{name: sh1, city: sh, state: down,", "city: sh, failover: sh1", "city: sh, failover: hz0", "cells: all}", "cells: all, excludeOrigin: true}"))
	rt, err := tb.ReplayInto("prices", "sh1")
	if err != nil {
		t.Fatal(err)
	}
	m := &Message{Body: []byte(`{"sku":"A-1"}`), Header: map[string][]string{OriginHeader: {"hz0"}}}
	d := rt.Route("prices", m)
	if got := cellNames(d.Copies()); got != "sh1=cell.sh1.prices" || d.Version != 5 || len(rt.Rules()) != 1 || d.Origin != "hz0" {
		t.Fatalf("replay decision %+v (copies %s)", d, got)
	}
	if got := cellNames(tb.Route("prices", m).Copies()); got != "hz1=cell.hz1.prices sh0=cell.sh0.prices" {
		t.Fatalf("the original table changed: %s", got)
	}
	for _, tc := range []struct{ rule, cell, want string }{
		{"nope", "sh1", `no topic rule "nope"`},
		{"prices", "xx", `topic rule prices does not broadcast to cell "xx" (target.cells: all)`},
	} {
		if _, err := tb.ReplayInto(tc.rule, tc.cell); err == nil || err.Error() != tc.want {
			t.Errorf("ReplayInto(%s, %s): %v, want %s", tc.rule, tc.cell, err, tc.want)
		}
	}
	routed := mustParse(t, baseRules)
	if _, err := routed.ReplayInto("orders", "a0"); err == nil || !strings.Contains(err.Error(), "does not broadcast") {
		t.Errorf("routed rule: %v", err)
	}
}

// TestBroadcastValidation has one case per check of a broadcast rule.
func TestBroadcastValidation(t *testing.T) {
	if p := problemsOf(t, bcastRules); p != nil {
		t.Fatalf("broadcast rules invalid:\n%s", strings.Join(p, "\n"))
	}
	cases := []struct {
		name string
		src  string
		want []string
	}{
		{"unknown word", bcastVariant(t, "cells: all}", "cells: every}"),
			[]string{`t.yaml:14: target.cells: unknown value "every": write all, a list of cells such as [rz00, rz01] or a selector such as {city: hz}`}},
		{"null", bcastVariant(t, "cells: all}", "cells: ~}"),
			[]string{"t.yaml:14: target.cells: empty: write all, a list of cells or a selector such as {city: hz}"}},
		{"empty list", bcastVariant(t, "cells: all}", "cells: []}"), []string{"t.yaml:14: target.cells: empty list"}},
		{"unknown cell", bcastVariant(t, "cells: all}", "cells: [hz0, hz9]}"), []string{`t.yaml:14: target.cells[1]: unknown cell "hz9"`}},
		{"cell twice", bcastVariant(t, "cells: all}", "cells: [hz0, sh0, hz0]}"), []string{"t.yaml:14: target.cells[2]: cell hz0 listed twice (first at target.cells[0])"}},
		{"list item not a name", bcastVariant(t, "cells: all}", "cells: [hz0, {a: b}]}"), []string{"t.yaml:14: target.cells[1]: must be a string, not a mapping"}},
		{"unknown city", bcastVariant(t, "cells: all}", "cells: {city: bj}}"), []string{`t.yaml:14: target.cells.city: no cell of the CellMap has city "bj" (cities: hz, sh)`}},
		{"selector without city", bcastVariant(t, "cells: all}", "cells: {}}"), []string{"t.yaml:14: target.cells: a selector needs city"}},
		{"unknown selector field", bcastVariant(t, "cells: all}", "cells: {zone: a}}"), []string{"t.yaml:14: target.cells.zone: unknown field (known: city)"}},
		{"no cities", bcastVariant(t, "cells: all}", "cells: {city: hz}}", "city: hz, failover: hz1", "failover: hz1", "city: hz, failover: hz0", "failover: hz0", "city: sh, failover: sh1", "failover: sh1", "city: sh, failover: sh0", "failover: sh0"),
			[]string{`target.cells.city: no cell of the CellMap has city "hz" (no cell names a city: set cells[].city)`}},
		{"shard", bcastVariant(t, "key: {json: sku}", "key: {json: sku}\nshard: {func: mod}"), []string{"t.yaml:14: shard: a broadcast rule (target.cells) sends every event to every selected cell and computes no shard: remove shard"}},
		{"onMissingKey global", bcastVariant(t, "dlq: {broker: nats, subject: dlq.prices}", "onMissingKey: global"), []string{"t.yaml:15: onMissingKey: global does not apply to a broadcast rule"}},
		{"dlq missing", bcastVariant(t, "dlq: {broker: nats, subject: dlq.prices}\n", ""), []string{"dlq: missing: required when onMissingKey is dlq"}},
		{"shard placeholder", bcastVariant(t, `"cell.{cell}.prices"`, `"cell.{cell}.{shard}"`), []string{"t.yaml:14: target.subject: {shard} cannot be rendered for a broadcast rule (target.cells): it computes no shard"}},
		{"same target for every cell", bcastVariant(t, `"cell.{cell}.prices"`, `"all.prices"`), []string{"t.yaml:14: target: renders to nats:all.prices for both hz0 and hz1: a broadcast target needs {cell} in broker, subject or topic"}},
		{"loop on a selected cell", bcastVariant(t, `"cell.{cell}.prices"`, `"prices.{cell}"`), []string{`t.yaml:14: target.subject: "prices.{cell}" for cell hz0 is matched by the source subject filter "prices.>"`}},
		{"no loop on an unselected cell", bcastVariant(t, `"cell.{cell}.prices"`, `"{cell}.prices"`, `subject: "prices.>"`, `subject: "hz0.>"`, "cells: all}", "cells: {city: sh}}"), nil},
		{"excludeOrigin on a routed rule", strings.Replace(baseRules, `target: {broker: nats, subject: "cell.{cell}.orders"}`, `target: {broker: nats, subject: "cell.{cell}.orders", excludeOrigin: true}`, 1),
			[]string{"t.yaml:18: target.excludeOrigin: applies to broadcast targets only (with target.cells)"}},
		{"cells in dlq", bcastVariant(t, "dlq: {broker: nats, subject: dlq.prices}", "dlq: {broker: nats, subject: dlq.prices, cells: all, excludeOrigin: true}"),
			[]string{"t.yaml:15: dlq.cells: only a target broadcasts", "t.yaml:15: dlq.excludeOrigin: only a target broadcasts"}},
		{"excludeOrigin not a bool", bcastVariant(t, "cells: all}", "cells: all, excludeOrigin: yes}"), []string{"target.excludeOrigin: must be true or false"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := problemsOf(t, c.src)
			if c.want == nil {
				if got != nil {
					t.Fatalf("problems:\n%s", strings.Join(got, "\n"))
				}
				return
			}
			if got == nil {
				t.Fatalf("no problems, want %q", c.want)
			}
			all := strings.Join(got, "\n")
			for _, w := range c.want {
				if !strings.Contains(all, w) {
					t.Errorf("missing %q in:\n%s", w, all)
				}
			}
		})
	}
}

// TestBroadcastDiff names a change of the cells a rule broadcasts to.
func TestBroadcastDiff(t *testing.T) {
	prev := mustParse(t, bcastRules)
	next := mustParse(t, bcastVariant(t, "version: 5", "version: 6", "{name: sh1, city: sh,", "{name: sh1, city: sh, state: down,", "city: sh, failover: sh1", "city: sh, failover: hz0"))
	r := Diff(prev, next)
	want := []string{"cell sh0: failover sh1 → hz0", "cell sh1: state active → down", "topic rule prices broadcasts to [hz0, hz1, sh0, sh1] → [hz0, hz1, sh0]"}
	if !reflect.DeepEqual(r.Other, want) {
		t.Fatalf("other %q, want %q", r.Other, want)
	}
	sel := mustParse(t, bcastVariant(t, "version: 5", "version: 6", "cells: all}", "cells: {city: hz}}"))
	if r := Diff(prev, sel); !strings.Contains(strings.Join(r.Other, "\n"), "topic rule prices changed") {
		t.Fatalf("selector change not reported: %q", r.Other)
	}
}
