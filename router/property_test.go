package router

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
)

// genCellMap generates a random valid CellMap: shards split into random
// ranges over random cells, some cells down (each with a live failover),
// random pins and blocked ranges. Shards use func mod, so key "s" is in
// shard s.
func genCellMap(rnd *rand.Rand) string {
	shards := 1 + rnd.IntN(300)
	ncells := 1 + rnd.IntN(6)
	names := make([]string, ncells)
	for i := range names {
		names[i] = fmt.Sprintf("c%d", i)
	}
	// A cell is down only if another, live cell can take over.
	down := make([]bool, ncells)
	live := []int{0}
	for i := 1; i < ncells; i++ {
		if rnd.IntN(3) == 0 {
			down[i] = true
		} else {
			live = append(live, i)
		}
	}
	owned := make([][]string, ncells)
	for s := 0; s < shards; {
		n := 1 + rnd.IntN(max(1, shards/3))
		e := min(shards, s+n) - 1
		c := rnd.IntN(ncells)
		owned[c] = append(owned[c], strconv.Quote(Range{s, e}.String()))
		s = e + 1
	}
	var b strings.Builder
	fmt.Fprintf(&b, "kind: CellMap\nversion: %d\nshards: %d\nglobal: c0\ncells:\n", 1+rnd.IntN(1000), shards)
	for i, n := range names {
		state, failover := "active", ""
		if down[i] {
			state = "down"
		}
		// A down cell always fails over to a live one (cell 0 is always
		// live); an active cell sometimes names a live failover.
		if f := live[rnd.IntN(len(live))]; f != i && (down[i] || rnd.IntN(2) == 0) {
			failover = names[f]
		}
		fmt.Fprintf(&b, "  - {name: %s, state: %s", n, state)
		if failover != "" {
			fmt.Fprintf(&b, ", failover: %s", failover)
		}
		fmt.Fprintf(&b, ", shards: [%s]}\n", strings.Join(owned[i], ", "))
	}
	b.WriteString("pins:\n")
	seen := map[int]bool{}
	for i := rnd.IntN(4); i > 0; i-- { // none at all leaves `pins:` null, which means no pins
		if k := rnd.IntN(shards * 3); !seen[k] {
			seen[k] = true
			fmt.Fprintf(&b, "  - {key: \"%d\", cell: %s}\n", k, names[rnd.IntN(ncells)])
		}
	}
	b.WriteString("blocked: [")
	if rnd.IntN(2) == 0 {
		s := rnd.IntN(shards)
		fmt.Fprintf(&b, "%q", Range{s, min(shards-1, s+rnd.IntN(5))}.String())
	}
	b.WriteString("]\n---\nkind: TopicRule\nname: t\nsource: {broker: nats, stream: S, subject: \"in.>\"}\n" +
		"key: {header: K}\nshard: {func: mod}\ntarget: {broker: nats, subject: \"cell.{cell}\"}\nonMissingKey: global\n")
	return b.String()
}

// TestPropertyEveryShardLive: in any valid map, every shard resolves to a
// cell that is not down (or is held when blocked), and owner decisions name
// the map's owner.
func TestPropertyEveryShardLive(t *testing.T) {
	for seed := uint64(0); seed < 300; seed++ {
		rnd := rand.New(rand.NewPCG(seed, 7))
		src := genCellMap(rnd)
		tb, err := Parse("gen.yaml", []byte(src))
		if err != nil {
			t.Fatalf("seed %d: generated map invalid: %v\n%s", seed, err, src)
		}
		checkTable(t, tb)
		for s := 0; s < tb.Shards(); s++ {
			key := strconv.Itoa(s)
			d := tb.Resolve("t", key)
			checkDecision(t, tb, "t", d)
			if d.Shard != s {
				t.Fatalf("seed %d: key %s in shard %d", seed, key, d.Shard)
			}
			if (d.Reason == ReasonHeld) != tb.IsBlocked(s) {
				t.Fatalf("seed %d: shard %d blocked %v but reason %s", seed, s, tb.IsBlocked(s), d.Reason)
			}
		}
	}
}
