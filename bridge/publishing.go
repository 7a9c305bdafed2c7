package bridge

import (
	"slices"
	"sync"
	"sync/atomic"
)

// pubGen counts the forwards being published (sent to the sink, result not
// yet handled) that were decided under one rules version.
type pubGen struct {
	version int64
	n       atomic.Int64
}

// publishing counts forwards being published per rules version, so that
// Status can say whether a copy decided under an older table may still
// land: a cell switch waits for that before the blocked rules count as in
// force (docs/switching.md). The common case, a publish under the newest
// version, costs one atomic load and one atomic add at each end.
type publishing struct {
	cur  atomic.Pointer[pubGen] // the newest version seen
	mu   sync.Mutex
	gens []*pubGen // sorted by version; drained older ones are dropped by oldest
}

// begin counts a publish decided under version v.
func (pp *publishing) begin(v int64) *pubGen {
	if g := pp.cur.Load(); g != nil && g.version == v {
		g.n.Add(1)
		return g
	}
	pp.mu.Lock()
	defer pp.mu.Unlock()
	i, found := slices.BinarySearchFunc(pp.gens, v, func(g *pubGen, v int64) int {
		switch {
		case g.version < v:
			return -1
		case g.version > v:
			return 1
		}
		return 0
	})
	if !found {
		pp.gens = slices.Insert(pp.gens, i, &pubGen{version: v})
	}
	g := pp.gens[i]
	g.n.Add(1)
	if c := pp.cur.Load(); c == nil || v > c.version {
		pp.cur.Store(g)
	}
	return g
}

// oldest returns the lowest rules version with a publish in flight, 0 when
// none, and forgets drained versions older than the newest.
func (pp *publishing) oldest() int64 {
	pp.mu.Lock()
	defer pp.mu.Unlock()
	cur := pp.cur.Load()
	var low int64
	keep := pp.gens[:0]
	for _, g := range pp.gens {
		n := g.n.Load()
		if n > 0 && low == 0 {
			low = g.version
		}
		if n > 0 || g == cur {
			keep = append(keep, g)
		}
	}
	clear(pp.gens[len(keep):])
	pp.gens = keep
	return low
}

// endPublish stops counting t's publish; it is idempotent.
func (t *task) endPublish() {
	if t.pub != nil {
		t.pub.n.Add(-1)
		t.pub = nil
	}
}
