package router

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

func TestDiff(t *testing.T) {
	v3 := mustParse(t, baseRules)
	t.Run("no changes", func(t *testing.T) {
		r := Diff(v3, mustParse(t, variant(t, "version: 3", "version: 4")))
		if r.Changed() || len(r.Block) != 0 {
			t.Fatalf("%+v", r)
		}
		var b bytes.Buffer
		if err := r.WriteText(&b); err != nil || !strings.Contains(b.String(), "no changes") {
			t.Fatalf("%v %s", err, b.String())
		}
	})
	t.Run("planned move", func(t *testing.T) {
		v5 := mustParse(t, variant(t, "version: 3", "version: 5", `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`,
			`{key: "12345", cell: a1}`, `{key: "12345", cell: a0}`))
		r := Diff(v3, v5)
		if len(r.Moves) != 1 || r.Moves[0].From != "a0" || r.Moves[0].To != "a1" || r.Moves[0].Count != 2 ||
			r.Moves[0].Share != 0.2 || r.Moves[0].Failover || r.Moved != 2 {
			t.Fatalf("moves %+v", r.Moves)
		}
		// The pinned key 12345 is in shard 5 under both rules: held too.
		if r.BlockedList() != `["3-5"]` {
			t.Fatalf("block %s", r.BlockedList())
		}
		if len(r.Pins) != 1 || !reflect.DeepEqual(r.Pins[0], PinChange{Key: "12345", From: "a1", To: "a0", Shards: []int{5}}) {
			t.Fatalf("pins %+v", r.Pins)
		}
		var b bytes.Buffer
		if err := r.WriteText(&b); err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{
			"rules version 3 → 5, 10 shards",
			"a0     → a1      3-4                     2 shards   20.0%",
			"12345: a1 → a0  (shard 5 blocked)",
			"1. apply the OLD rules with version 4 and\n       blocked: [\"3-5\"]",
			"note: pinned key 12345 changes cell: blocked holds its shard 5 too",
			"3. apply the NEW rules with version 5 or higher",
		} {
			if !strings.Contains(b.String(), want) {
				t.Errorf("missing %q in:\n%s", want, b.String())
			}
		}
		js, err := json.Marshal(r)
		if err != nil || !strings.Contains(string(js), `"ranges":["3-4"]`) || !strings.Contains(string(js), `"block":["3-5"]`) {
			t.Fatalf("json %s %v", js, err)
		}
	})
	t.Run("step 1 applied", func(t *testing.T) {
		v4 := mustParse(t, variant(t, "version: 3", "version: 4", "blocked: []", `blocked: ["3-4"]`))
		v5 := mustParse(t, variant(t, "version: 3", "version: 5", `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`))
		r := Diff(v4, v5)
		if len(r.Moves) != 1 || !r.Moves[0].AlreadyBlocked || !strings.Contains(strings.Join(r.Other, "\n"), "blocked [3-4] → []") {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("disaster failover", func(t *testing.T) {
		down := mustParse(t, variant(t, "version: 3", "version: 4", "{name: a0, state: active", "{name: a0, state: down",
			"failover: a0, shards", "failover: gz00, shards"))
		r := Diff(v3, down)
		if len(r.Moves) != 1 || !r.Moves[0].Failover || r.Moves[0].Count != 5 || len(r.Block) != 0 {
			t.Fatalf("%+v", r)
		}
		other := strings.Join(r.Other, "\n")
		if !strings.Contains(other, "cell a0: state active → down") || !strings.Contains(other, "cell a1: failover a0 → gz00") {
			t.Fatalf("other %q", other)
		}
		// Coming back from a failover is a planned move: it must be blocked.
		back := Diff(down, mustParse(t, variant(t, "version: 3", "version: 6")))
		if len(back.Moves) != 1 || back.Moves[0].Failover || back.BlockedList() != `["0-4"]` {
			t.Fatalf("%+v", back)
		}
	})
	t.Run("resharded", func(t *testing.T) {
		r := Diff(v3, mustParse(t, variant(t, "version: 3", "version: 4", "shards: 10", "shards: 20",
			`"5-9"`, `"5-19"`, "shard: {func: digits, from: -1}", "shard: {func: digits, from: -2}")))
		if !r.Resharded || r.BlockedList() != `["0-9"]` {
			t.Fatalf("%+v", r)
		}
	})
	t.Run("rules and global", func(t *testing.T) {
		r := Diff(v3, mustParse(t, variant(t, "version: 3", "version: 4", "global: gz00", "global: a1",
			`target: {broker: nats, subject: "cell.{cell}.pay"}`, `target: {broker: nats, subject: "cells.{cell}.pay"}`)))
		other := strings.Join(r.Other, "\n")
		if !r.Changed() || len(r.Moves) != 0 || len(r.Block) != 0 || len(r.Rekeyed) != 0 ||
			!strings.Contains(other, "topic rule pay changed") || !strings.Contains(other, "global cell gz00 → a1") {
			t.Fatalf("%+v", r)
		}
	})
}

// broadcastRule is a broadcast topic rule to append to baseRules.
const broadcastRule = `---
kind: TopicRule
name: prices
source: {broker: nats, stream: PRICES, subject: "prices.>"}
key: {json: sku}
target: {broker: nats, subject: "cell.{cell}.prices", cells: all}
dlq: {broker: nats, subject: dlq.prices}
`

// TestDiffBlocksKeyMoves: a change that moves keys without moving a
// shard's owner — a new key or shard function, a pin added, removed or
// retargeted — blocks the shards those keys are in (every shard for a new
// function), so that a switch holds them while their data moves.
func TestDiffBlocksKeyMoves(t *testing.T) {
	v3 := mustParse(t, baseRules+broadcastRule)
	cases := []struct {
		name    string
		next    string
		rekeyed []string
		block   string
		text    []string // substrings of WriteText
	}{
		{"shard function", variant(t, "version: 3", "version: 4", "func: mod", "func: fnv1a"), []string{"pay"}, `["0-9"]`,
			[]string{"topic rule pay: key or shard function changes", `blocked: ["0-9"]`, "note: every shard is blocked (key or shard function of pay changes)"}},
		{"digits position", variant(t, "version: 3", "version: 4", "from: -1}", "from: -2}"), []string{"orders"}, `["0-9"]`,
			[]string{"topic rule orders: key or shard function changes", `blocked: ["0-9"]`}},
		{"key", variant(t, "version: 3", "version: 4", "key: {json: user.id}", "key: {json: account.id}"), []string{"orders"}, `["0-9"]`,
			[]string{`blocked: ["0-9"]`}},
		{"key and a move", variant(t, "version: 3", "version: 4", "key: {header: X-User-Id}", "key: {header: X-Account}", `"0-4"`, `"0-2"`, `"5-9"`, `"3-9"`), []string{"pay"}, `["0-9"]`,
			[]string{"a0     → a1      3-4", `blocked: ["0-9"]`}},
		{"broadcast key", variant(t, "version: 3", "version: 4") + strings.Replace(broadcastRule, "{json: sku}", "{json: id}", 1), nil, `[]`,
			[]string{"topic rule prices changed", "nothing to block"}},
		{"pin added", variant(t, "version: 3", "version: 4", `  - {key: "12345", cell: a1}`, "  - {key: \"12345\", cell: a1}\n  - {key: \"777\", cell: a0}"), nil, `["7"]`,
			[]string{"777: added → a0  (shard 7 blocked)", `blocked: ["7"]`}},
		// 12345 is in shard 5, which a1 serves: its pin to a1 moves nothing,
		// and neither does removing it.
		{"pin removed", variant(t, "version: 3", "version: 4", `  - {key: "12345", cell: a1}`, ""), nil, `[]`,
			[]string{"12345: removed (was a1)  (the key's cell stays, or no rule routes it: blocks no shard)", "nothing to block"}},
		{"pin retargeted", variant(t, "version: 3", "version: 4", `{key: "12345", cell: a1}`, `{key: "12345", cell: a0}`), nil, `["5"]`,
			[]string{"12345: a1 → a0  (shard 5 blocked)", `blocked: ["5"]`}},
		{"pin replaced", variant(t, "version: 3", "version: 4", `{key: "12345", cell: a1}`, `{key: "12", cell: a1}`), nil, `["2"]`,
			[]string{"12: added → a1  (shard 2 blocked)", "12345: removed (was a1)  (the key's cell stays"}},
		{"pin no rule routes", variant(t, "version: 3", "version: 4", `{key: "12345", cell: a1}`, `{key: "abc", cell: a1}`), nil, `[]`,
			[]string{"abc: added → a1  (the key's cell stays, or no rule routes it: blocks no shard)"}},
		{"pin added where its shard goes", variant(t, "version: 3", "version: 4", `  - {key: "12345", cell: a1}`, "  - {key: \"12345\", cell: a1}\n  - {key: \"9\", cell: a1}"), nil, `[]`,
			[]string{"9: added → a1  (the key's cell stays"}},
		{"pin failover", variant(t, "version: 3", "version: 4", "{name: a1, state: active", "{name: a1, state: down", "failover: a1, shards", "failover: gz00, shards"), nil, `[]`,
			[]string{"12345: a1 → a0  (failover: a1 is down; nothing to block)", "nothing to block"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := Diff(v3, mustParse(t, c.next))
			if !reflect.DeepEqual(r.Rekeyed, c.rekeyed) || r.BlockedList() != c.block {
				t.Fatalf("rekeyed %v block %s, want %v %s (%+v)", r.Rekeyed, r.BlockedList(), c.rekeyed, c.block, r)
			}
			var b bytes.Buffer
			if err := r.WriteText(&b); err != nil {
				t.Fatal(err)
			}
			for _, w := range c.text {
				if !strings.Contains(b.String(), w) {
					t.Errorf("missing %q in:\n%s", w, b.String())
				}
			}
			if len(r.Block) > 0 && strings.Contains(b.String(), "nothing to block") {
				t.Errorf("says nothing to block:\n%s", b.String())
			}
			if len(r.Rekeyed) > 0 && strings.Contains(b.String(), "no shard changes cell") {
				t.Errorf("says no shard changes cell:\n%s", b.String())
			}
		})
	}
}

// Removing a pin that sent its key elsewhere than its shard's cell moves
// the key back: its shard is blocked.
func TestDiffPinRemovedMovesKey(t *testing.T) {
	prev := mustParse(t, variant(t, `{key: "12345", cell: a1}`, `{key: "12345", cell: a0}`))
	next := mustParse(t, variant(t, "version: 3", "version: 4", `  - {key: "12345", cell: a1}`, ""))
	r := Diff(prev, next)
	if r.BlockedList() != `["5"]` || len(r.Pins) != 1 || !reflect.DeepEqual(r.Pins[0].Shards, []int{5}) {
		t.Fatalf("block %s, pins %+v; want shard 5 blocked", r.BlockedList(), r.Pins)
	}
}

// A rule renamed together with a new key reads the same events: its keys
// change cell, so every shard is blocked, as for a key change in place.
func TestDiffRenamedRuleWithNewKey(t *testing.T) {
	prev := mustParse(t, baseRules)
	next := mustParse(t, variant(t, "version: 3", "version: 4", "name: orders", "name: orders-v2", "key: {json: user.id}", "key: {json: account.id}"))
	r := Diff(prev, next)
	if !reflect.DeepEqual(r.Rekeyed, []string{"orders-v2"}) || r.BlockedList() != `["0-9"]` {
		t.Fatalf("rekeyed %v, block %s; want orders-v2 and every shard", r.Rekeyed, r.BlockedList())
	}
	// Renamed with the same key and shard function: nothing moves.
	same := Diff(prev, mustParse(t, variant(t, "version: 3", "version: 4", "name: orders", "name: orders-v2")))
	if len(same.Rekeyed) != 0 || same.BlockedList() != "[]" {
		t.Fatalf("plain rename: rekeyed %v, block %s", same.Rekeyed, same.BlockedList())
	}
}
