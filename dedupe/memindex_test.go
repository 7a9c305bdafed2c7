package dedupe

import (
	"fmt"
	"math/rand/v2"
	"strconv"
	"testing"
)

// checkIndex verifies the index's own invariants against the slab: the
// count, the load bound, each slot naming a slab entry with its fingerprint
// (once), and every slot reachable from its home without passing an empty
// slot (what find relies on, and what deletion must preserve).
func checkIndex(x *memIndex, slab []memEntry) error {
	mask := x.mask()
	n := 0
	seen := make([]bool, len(slab))
	for p, v := range x.slots {
		if v == 0 {
			continue
		}
		n++
		fp, i := uint32(v>>32), int32(uint32(v))-1
		if i < 0 || int(i) >= len(slab) || seen[i] {
			return fmt.Errorf("slot %d names slab entry %d (slab %d, seen %v)", p, i, len(slab), seen[i])
		}
		seen[i] = true
		if slab[i].fp != fp {
			return fmt.Errorf("slot %d: fingerprint %x, entry %d has %x", p, fp, i, slab[i].fp)
		}
		for q := x.home(fp); q != uint32(p); q = (q + 1) & mask {
			if x.slots[q] == 0 {
				return fmt.Errorf("slot %d (home %d) is behind the empty slot %d", p, x.home(fp), q)
			}
		}
	}
	if n != x.n || 2*n > len(x.slots) {
		return fmt.Errorf("%d slots used, count %d, table %d", n, x.n, len(x.slots))
	}
	return nil
}

// TestMemIndexCollisions drives the index directly with fingerprints from a
// tiny set, so that most keys share a fingerprint (and a home) with others,
// probe runs are long and wrap around the table's end: lookups must still
// tell keys apart by the full key, and deletion must keep every key
// reachable. A plain map is the reference.
func TestMemIndexCollisions(t *testing.T) {
	fps := []uint32{0, 1, 0x7fffffff, 0x80000000, 0xfffffffe, 0xffffffff}
	rng := rand.New(rand.NewPCG(1, 2))
	var x memIndex
	x.init(4)
	var slab []memEntry
	var keys []string
	var free []int32
	model := map[string]int32{}
	for step := range 20_000 {
		n := rng.IntN(300)
		key, fp := "k"+strconv.Itoa(n), fps[n%len(fps)] // same key, same fingerprint
		i, p := x.find(fp, key, keys)
		if want, ok := model[key]; ok != (i != nilIdx) || ok && want != i {
			t.Fatalf("step %d: find(%s) = %d, model %d (present %v)", step, key, i, want, ok)
		}
		switch {
		case i != nilIdx && rng.IntN(2) == 0:
			x.removeAt(p)
			slab[i], keys[i] = memEntry{}, ""
			free = append(free, i)
			delete(model, key)
		case i != nilIdx: // remove by slab index, as eviction does
			x.remove(fp, i)
			slab[i], keys[i] = memEntry{}, ""
			free = append(free, i)
			delete(model, key)
		default:
			if x.full() {
				x.grow()
				p = x.vacant(fp)
			}
			if n := len(free); n > 0 {
				i, free = free[n-1], free[:n-1]
			} else {
				i = int32(len(slab))
				slab = append(slab, memEntry{})
				keys = append(keys, "")
			}
			slab[i], keys[i] = memEntry{fp: fp}, key
			x.set(p, fp, i)
			model[key] = i
		}
		if err := checkIndex(&x, slab); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
	}
	if len(x.slots) < 256 {
		t.Fatalf("table of %d slots: never grew", len(x.slots))
	}
}
