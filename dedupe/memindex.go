package dedupe

// memIndex finds a key's slab slot in one Memory shard. It is an
// open-addressing hash table with linear probing whose slots are plain
// integers: 32 bits of the key's hash (the fingerprint) and the slab index.
// Being pointer-free, the garbage collector never scans it, and a lookup
// of a new key (the bridge's common case) reads one or two cache lines of
// slots and nothing else; only a slot whose fingerprint matches sends the
// lookup to the shard's keys to compare the full key. A fingerprint match
// alone never counts as a hit: a false hit would report a new message as a
// Duplicate and lose it.
//
// A key's home slot is the top bits of its fingerprint, so the index can
// find the home of any slot from the slot alone: growth rehashes without
// reading the slab, and deletion shifts the following run of slots back
// (no tombstones, so lookups never slow down with churn).
//
// The zero memIndex is closed: every method but init must not be called.
// Not safe for concurrent use: the shard's mutex guards it.
type memIndex struct {
	slots []uint64 // fingerprint<<32 | slab index+1; 0 = empty
	shift uint     // 32 - log2(len(slots)): home = fingerprint >> shift
	n     int      // occupied slots
}

// memMinSlots is the smallest table; a power of two.
const memMinSlots = 8

// init makes an empty index with room for keys keys before it grows.
func (x *memIndex) init(keys int) {
	size := memMinSlots
	for size < 2*keys { // at most half full, see full
		size *= 2
	}
	x.make(size)
}

func (x *memIndex) make(size int) {
	x.slots = make([]uint64, size)
	x.shift = 32
	for s := size; s > 1; s >>= 1 {
		x.shift--
	}
	x.n = 0
}

func (x *memIndex) mask() uint32 { return uint32(len(x.slots) - 1) }

func (x *memIndex) home(fp uint32) uint32 { return fp >> x.shift }

// find returns the slab slot holding key (hashed to fp) and the position of
// its index slot, or nilIdx and the empty position where key would go.
func (x *memIndex) find(fp uint32, key string, keys []string) (int32, uint32) {
	mask := x.mask()
	for p := x.home(fp); ; p = (p + 1) & mask {
		v := x.slots[p]
		if v == 0 {
			return nilIdx, p
		}
		if uint32(v>>32) == fp {
			if i := int32(uint32(v)) - 1; keys[i] == key {
				return i, p
			}
		}
	}
}

// vacant returns the first empty position on fp's probe path: where a key
// known to be absent goes.
func (x *memIndex) vacant(fp uint32) uint32 {
	mask := x.mask()
	p := x.home(fp)
	for x.slots[p] != 0 {
		p = (p + 1) & mask
	}
	return p
}

// set fills the empty position p (from find or vacant, with no change to the
// index since) with slab slot i of a key hashed to fp.
func (x *memIndex) set(p, fp uint32, i int32) {
	x.slots[p] = uint64(fp)<<32 | uint64(uint32(i+1))
	x.n++
}

// full reports whether one more key would fill the table beyond half: with
// linear probing the expected probe length of a miss grows as 1/(1-load)²,
// and half full keeps it around two slots, within a cache line.
func (x *memIndex) full() bool { return 2*(x.n+1) > len(x.slots) }

// grow doubles the table, rehashing from the slots alone. Positions from
// earlier finds are invalid afterwards.
func (x *memIndex) grow() {
	old := x.slots
	x.make(2 * len(old))
	for _, v := range old {
		if v != 0 {
			x.slots[x.vacant(uint32(v>>32))] = v
			x.n++
		}
	}
}

// remove deletes the slot of slab slot i, whose key hashed to fp. The slot
// must be present. Positions from earlier finds are invalid afterwards.
func (x *memIndex) remove(fp uint32, i int32) {
	want := uint64(fp)<<32 | uint64(uint32(i+1))
	mask := x.mask()
	for p := x.home(fp); ; p = (p + 1) & mask {
		switch x.slots[p] {
		case want:
			x.removeAt(p)
			return
		case 0:
			panic("dedupe: memory index lost a key") // a bug here, never the caller's
		}
	}
}

// removeAt empties position p and moves later slots of the same probe run
// back into the gap, so that every key stays reachable from its home
// without passing an empty slot. A slot at q may move to the gap at p only
// if its home is not cyclically within (p, q]: then p lies on its probe
// path.
func (x *memIndex) removeAt(p uint32) {
	mask := x.mask()
	for q := (p + 1) & mask; ; q = (q + 1) & mask {
		v := x.slots[q]
		if v == 0 {
			break
		}
		if (q-x.home(uint32(v>>32)))&mask >= (q-p)&mask {
			x.slots[p] = v
			p = q
		}
	}
	x.slots[p] = 0
	x.n--
}
