package router

import (
	"bytes"
	"encoding/json"
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
		if r.BlockedList() != `["3-4"]` {
			t.Fatalf("block %s", r.BlockedList())
		}
		if len(r.Pins) != 1 || r.Pins[0] != (PinChange{Key: "12345", From: "a1", To: "a0"}) {
			t.Fatalf("pins %+v", r.Pins)
		}
		var b bytes.Buffer
		if err := r.WriteText(&b); err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{
			"rules version 3 → 5, 10 shards",
			"a0     → a1      3-4                     2 shards   20.0%",
			"12345: a1 → a0",
			"1. apply the OLD rules with version 4 and\n       blocked: [\"3-4\"]",
			"3. apply the NEW rules with version 5 or higher",
		} {
			if !strings.Contains(b.String(), want) {
				t.Errorf("missing %q in:\n%s", want, b.String())
			}
		}
		js, err := json.Marshal(r)
		if err != nil || !strings.Contains(string(js), `"ranges":["3-4"]`) || !strings.Contains(string(js), `"block":["3-4"]`) {
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
		r := Diff(v3, mustParse(t, variant(t, "version: 3", "version: 4", "func: mod", "func: fnv1a")))
		if !r.Changed() || len(r.Moves) != 0 || !strings.Contains(strings.Join(r.Other, "\n"), "topic rule pay changed") {
			t.Fatalf("%+v", r)
		}
	})
}
