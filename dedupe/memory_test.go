package dedupe

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a manually advanced clock for the memory store.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestMemoryConformance(t *testing.T) {
	clock := newFakeClock()
	testStore(t, harness{
		open: func(t *testing.T, ttl, reserveTTL time.Duration) Store {
			m := NewMemory(MemoryConfig{Size: 10_000, TTL: ttl, ReserveTTL: reserveTTL, Now: clock.Now})
			t.Cleanup(func() { _ = m.Close(context.Background()) })
			return m
		},
		tick: func() { clock.Advance(100 * time.Millisecond) },
		now:  clock.Now,
	})
}

func TestMemoryWindows(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	m := NewMemory(MemoryConfig{Size: 100, TTL: time.Minute, ReserveTTL: 10 * time.Second, Now: clock.Now})
	mustReserve(t, m, "r", Reserved)
	mustReserve(t, m, "c", Reserved)
	must(t, m.Commit(ctx, "c"))

	clock.Advance(10*time.Second - time.Nanosecond)
	mustReserve(t, m, "r", InFlight)
	clock.Advance(time.Nanosecond)
	mustReserve(t, m, "r", Reserved) // expired exactly at ReserveTTL

	clock.Advance(50*time.Second - time.Nanosecond)
	mustReserve(t, m, "c", Duplicate) // commit lasts TTL from Commit, not ReserveTTL
	clock.Advance(time.Nanosecond)
	mustReserve(t, m, "c", Reserved)
}

func TestMemoryEviction(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	// 64 shards of 2 entries each.
	m := NewMemory(MemoryConfig{Size: 2 * memShards, TTL: time.Hour, ReserveTTL: time.Hour, Now: clock.Now})
	const n = 10_000
	for i := 0; i < n; i++ {
		k := fmt.Sprint("key-", i)
		mustReserve(t, m, k, Reserved)
		must(t, m.Commit(ctx, k))
	}
	if got := m.Len(); got != 2*memShards {
		t.Fatalf("Len = %d, want the bound %d", got, 2*memShards)
	}
	if got := m.Evictions(); got != n-2*memShards {
		t.Fatalf("Evictions = %d, want %d", got, n-2*memShards)
	}
	// The most recent key of some shard is kept; the first ones are gone:
	// an evicted key can be reserved (and forwarded) again.
	mustReserve(t, m, fmt.Sprint("key-", n-1), Duplicate)
	mustReserve(t, m, "key-0", Reserved)
}

func TestMemoryEvictsLeastRecentlyUsed(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	m := NewMemory(MemoryConfig{Size: memShards, TTL: time.Hour, ReserveTTL: time.Hour, Now: clock.Now})
	// One entry per shard: find three keys of one shard.
	s0 := m.shard("k0")
	keys := []string{"k0"}
	for i := 1; len(keys) < 3; i++ {
		if k := fmt.Sprint("k", i); m.shard(k) == s0 {
			keys = append(keys, k)
		}
	}
	m2 := NewMemory(MemoryConfig{Size: 2 * memShards, TTL: time.Hour, ReserveTTL: time.Hour, Now: clock.Now})
	m2.seed = m.seed // same shard layout as m
	a, b, c := keys[0], keys[1], keys[2]
	must(t, m2.Commit(ctx, a))
	must(t, m2.Commit(ctx, b))
	mustReserve(t, m2, a, Duplicate) // touch a: b is now least recently used
	must(t, m2.Commit(ctx, c))       // evicts b
	mustReserve(t, m2, a, Duplicate)
	mustReserve(t, m2, c, Duplicate)
	mustReserve(t, m2, b, Reserved)
}

func TestMemoryExpiredEntriesAreNotEvictions(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	m := NewMemory(MemoryConfig{Size: memShards, TTL: time.Second, ReserveTTL: time.Second, Now: clock.Now})
	for i := 0; i < 1000; i++ {
		must(t, m.Commit(ctx, fmt.Sprint("k", i)))
		clock.Advance(2 * time.Second)
	}
	if got := m.Evictions(); got != 0 {
		t.Fatalf("Evictions = %d, want 0 (only expired keys were replaced)", got)
	}
}

func TestMemoryZeroAllocs(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryConfig{Size: 4096, TTL: time.Minute, ReserveTTL: time.Second})
	keys := make([]string, 16_384) // 4× the size: steady eviction
	for i := range keys {
		keys[i] = fmt.Sprintf("ORDERS:%d", i)
	}
	i := 0
	cycle := func() {
		k := keys[i%len(keys)]
		i++
		if _, err := m.Reserve(ctx, k); err != nil {
			t.Fatal(err)
		}
		if err := m.Commit(ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	for range 2 * len(keys) { // warm-up: slabs and maps at full size
		cycle()
	}
	if a := testing.AllocsPerRun(10_000, cycle); a > 0.01 {
		t.Fatalf("Reserve+Commit allocates %.3f times per call, want 0", a)
	}
}

func TestMemoryDefaults(t *testing.T) {
	m := NewMemory(MemoryConfig{})
	if m.ttl != int64(DefaultTTL) || m.reserveTTL != int64(DefaultReserveTTL) {
		t.Fatalf("defaults: ttl %v reserveTTL %v", time.Duration(m.ttl), time.Duration(m.reserveTTL))
	}
	if got := m.shards[0].limit * memShards; got < DefaultSize {
		t.Fatalf("capacity %d < DefaultSize", got)
	}
}

// checkInvariants walks every shard: the LRU list and the free list
// together hold each slab slot once, and the index points at live entries.
func checkInvariants(t *testing.T, m *Memory) {
	t.Helper()
	for si := range m.shards {
		s := &m.shards[si]
		s.mu.Lock()
		seen := make(map[int32]bool)
		prev := nilIdx
		for i := s.head; i != nilIdx; i = s.slab[i].next {
			if seen[i] || s.slab[i].prev != prev {
				s.mu.Unlock()
				t.Fatalf("shard %d: LRU list broken at slot %d", si, i)
			}
			seen[i] = true
			e, key := &s.slab[i], s.keys[i]
			if hs, fp := m.hash(key); hs != si || fp != e.fp {
				s.mu.Unlock()
				t.Fatalf("shard %d: slot %d holds %q of shard %d, fingerprint %x (want %x)", si, i, key, hs, e.fp, fp)
			}
			if j, _ := s.index.find(e.fp, key, s.keys); j != i {
				s.mu.Unlock()
				t.Fatalf("shard %d: slot %d not indexed (found %d)", si, i, j)
			}
			prev = i
		}
		if err := checkIndex(&s.index, s.slab); err != nil {
			s.mu.Unlock()
			t.Fatalf("shard %d: %v", si, err)
		}
		if s.tail != prev || len(seen) != s.index.n {
			s.mu.Unlock()
			t.Fatalf("shard %d: tail %d (want %d), %d listed vs %d indexed", si, s.tail, prev, len(seen), s.index.n)
		}
		for i := s.free; i != nilIdx; i = s.slab[i].next {
			if seen[i] {
				s.mu.Unlock()
				t.Fatalf("shard %d: slot %d both free and in use", si, i)
			}
			seen[i] = true
			if s.keys[i] != "" {
				s.mu.Unlock()
				t.Fatalf("shard %d: free slot %d keeps key %q", si, i, s.keys[i])
			}
		}
		if len(seen) != len(s.slab) || len(s.keys) != len(s.slab) || len(s.slab) > s.limit {
			s.mu.Unlock()
			t.Fatalf("shard %d: %d slots accounted for, slab %d, limit %d", si, len(seen), len(s.slab), s.limit)
		}
		s.mu.Unlock()
	}
}

// TestMemoryStress hammers a small store from many goroutines (eviction,
// expiry, release and reuse of slots all at once) under -race, then checks
// its internal lists.
func TestMemoryStress(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	m := NewMemory(MemoryConfig{Size: 4 * memShards, TTL: time.Second, ReserveTTL: 300 * time.Millisecond, Now: clock.Now})
	parallel(t, 16, func(w int) error {
		for i := 0; i < 3000; i++ {
			k := fmt.Sprint("k", (i*31+w*7)%1000)
			switch i % 4 {
			case 0, 1:
				if _, err := m.Reserve(ctx, k); err != nil {
					return err
				}
			case 2:
				if err := m.Commit(ctx, k); err != nil {
					return err
				}
			case 3:
				if err := m.Release(ctx, k); err != nil {
					return err
				}
			}
			if w == 0 && i%50 == 0 {
				clock.Advance(100 * time.Millisecond)
			}
		}
		return nil
	})
	checkInvariants(t, m)
}

// memModel is the reference the store is checked against: the contract of
// doc.go, plus Memory's LRU bound, written as plainly as possible (maps, and
// a linear scan for the least recently used key of a shard).
type memModel struct {
	ttl, rttl time.Duration
	limit     int
	shard     func(key string) int
	shards    [memShards]map[string]*modelEntry
	stamp     uint64 // LRU clock: bumped on every use
	evictions uint64
}

type modelEntry struct {
	committed bool
	expires   time.Time
	used      uint64
}

func newMemModel(m *Memory, size int, ttl, rttl time.Duration) *memModel {
	md := &memModel{ttl: ttl, rttl: rttl, limit: (size + memShards - 1) / memShards, shard: m.shardIndex}
	for i := range md.shards {
		md.shards[i] = map[string]*modelEntry{}
	}
	return md
}

func (md *memModel) len() int {
	n := 0
	for _, s := range md.shards {
		n += len(s)
	}
	return n
}

func (md *memModel) use(e *modelEntry) {
	md.stamp++
	e.used = md.stamp
}

// put sets key's state, inserting it (and evicting its shard's least
// recently used key when the shard is full) when absent.
func (md *memModel) put(key string, committed bool, expires, now time.Time) {
	s := md.shards[md.shard(key)]
	e, ok := s[key]
	if !ok {
		if len(s) >= md.limit {
			var lru string
			for k, o := range s {
				if lru == "" || o.used < s[lru].used {
					lru = k
				}
			}
			if s[lru].expires.After(now) {
				md.evictions++
			}
			delete(s, lru)
		}
		e = &modelEntry{}
		s[key] = e
	}
	e.committed, e.expires = committed, expires
	md.use(e)
}

func (md *memModel) reserve(key string, now time.Time) Outcome {
	e, ok := md.shards[md.shard(key)][key]
	if ok && e.expires.After(now) {
		md.use(e)
		if e.committed {
			return Duplicate
		}
		return InFlight
	}
	md.put(key, false, now.Add(md.rttl), now)
	return Reserved
}

func (md *memModel) commit(key string, now time.Time) { md.put(key, true, now.Add(md.ttl), now) }

func (md *memModel) release(key string) {
	s := md.shards[md.shard(key)]
	if e, ok := s[key]; ok && !e.committed {
		delete(s, key)
	}
}

// memOp is one step of a model run: op selects the call, arg the key (or
// the time that passes).
type memOp struct {
	op  uint8
	arg uint32
}

const memOps = 8

// runMemModel applies ops to a fresh store of the given size and to the
// model, failing at the first outcome, Len or Evictions that differ, and
// checking the store's internal structure every check steps and at the end.
// Handles are kept per key and used both rightly and wrongly (another key's,
// possibly stale): CommitHandle must always act exactly like Commit.
func runMemModel(t *testing.T, size int, ops []memOp, check int) {
	t.Helper()
	ctx := context.Background()
	clock := newFakeClock()
	const ttl, rttl = 10 * time.Second, 3 * time.Second
	m := NewMemory(MemoryConfig{Size: size, TTL: ttl, ReserveTTL: rttl, Now: clock.Now})
	defer m.Close(ctx)
	md := newMemModel(m, size, ttl, rttl)
	handles := map[string]Handle{}
	var last Handle // most recent handle of any key
	for n, o := range ops {
		key := "k" + strconv.FormatUint(uint64(o.arg), 10)
		now := clock.Now()
		switch o.op % memOps {
		case 0:
			want := md.reserve(key, now)
			if got, err := m.Reserve(ctx, key); err != nil || got != want {
				t.Fatalf("op %d: Reserve(%s) = %v, %v; model says %v", n, key, got, err, want)
			}
		case 1:
			want := md.reserve(key, now)
			got, h, err := m.ReserveHandle(ctx, key)
			if err != nil || got != want {
				t.Fatalf("op %d: ReserveHandle(%s) = %v, %v; model says %v", n, key, got, err, want)
			}
			handles[key], last = h, h
		case 2:
			md.commit(key, now)
			must(t, m.Commit(ctx, key))
		case 3:
			md.commit(key, now)
			must(t, m.CommitHandle(ctx, key, handles[key]))
		case 4: // someone else's handle, or a stale one of the same slot
			md.commit(key, now)
			must(t, m.CommitHandle(ctx, key, last))
		case 5:
			md.release(key)
			must(t, m.Release(ctx, key))
		case 6:
			clock.Advance(time.Duration(o.arg%64) * 100 * time.Millisecond)
		case 7:
			clock.Advance(time.Duration(o.arg%4) * time.Second)
		}
		// The key's shard holds what the model's does (cheaper than Len
		// after every step: one lock, not 64).
		si := m.shardIndex(key)
		s := &m.shards[si]
		s.mu.Lock()
		got := s.index.n
		s.mu.Unlock()
		if want := len(md.shards[si]); got != want {
			t.Fatalf("op %d: shard %d holds %d keys, model %d", n, si, got, want)
		}
		if got, want := m.Evictions(), md.evictions; got != want {
			t.Fatalf("op %d: Evictions = %d, model says %d", n, got, want)
		}
		if check > 0 && n%check == 0 {
			checkInvariants(t, m)
		}
	}
	if got, want := m.Len(), md.len(); got != want {
		t.Fatalf("Len = %d, model has %d", got, want)
	}
	checkInvariants(t, m)
}

// TestMemoryModel checks long random operation sequences against the
// model: small stores where every shard evicts all the time, and a large
// one whose indexes grow several times over.
func TestMemoryModel(t *testing.T) {
	for _, tc := range []struct {
		name       string
		size, keys int
		ops, check int
	}{
		{"tiny", memShards, 4 * memShards, 100_000, 1000},
		{"small", 8 * memShards, 20 * memShards, 200_000, 5000},
		{"growing", 3 * memShards * memPresize, 4 * memShards * memPresize, 300_000, 100_000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(uint64(tc.size), uint64(tc.ops)))
			ops := make([]memOp, tc.ops)
			for i := range ops {
				// Mostly reserves and commits, as in the bridge; fewer
				// releases and clock steps.
				op := uint8(rng.IntN(memOps + 4))
				if op >= memOps {
					op -= memOps // 0..3 twice as often
				}
				ops[i] = memOp{op: op, arg: uint32(rng.IntN(tc.keys))}
			}
			runMemModel(t, tc.size, ops, tc.check)
		})
	}
}

// FuzzMemoryModel runs operation sequences from the fuzzer against the
// model. The first byte picks the size (1 to 4 keys per shard), each
// following pair an operation and its key (one of 256: several per shard,
// so shards evict).
func FuzzMemoryModel(f *testing.F) {
	f.Add([]byte{0, 0, 0, 1, 0, 2, 0, 3, 0, 0, 0, 4, 9, 0, 0})
	f.Add([]byte{1, 0, 1, 4, 20, 0, 1, 1, 1, 2, 1, 0, 1, 4, 255, 0, 1})
	f.Add([]byte{3, 1, 7, 3, 7, 5, 7, 1, 7, 4, 9, 6, 40, 0, 7, 2, 7})
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) == 0 {
			return
		}
		size := (1 + int(b[0]%4)) * memShards
		var ops []memOp
		for b = b[1:]; len(b) >= 2; b = b[2:] {
			ops = append(ops, memOp{op: b[0], arg: uint32(b[1])})
		}
		runMemModel(t, size, ops, 0)
	})
}

// CommitHandle commits through the remembered slot, and a handle whose slot
// went to another key (released, then reused) is never applied to that key:
// it falls back to committing its own key by lookup.
func TestMemoryCommitHandle(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryConfig{Size: 64}) // one slot per shard
	o, h, err := m.ReserveHandle(ctx, "a")
	if err != nil || o != Reserved {
		t.Fatalf("reserve a = %v, %v", o, err)
	}
	if err := m.CommitHandle(ctx, "a", h); err != nil {
		t.Fatal(err)
	}
	if o, _ := m.Reserve(ctx, "a"); o != Duplicate {
		t.Fatalf("after CommitHandle: %v, want duplicate", o)
	}

	// A stale handle: "b" released, its slot reused by a key of the same shard.
	_, hb, _ := m.ReserveHandle(ctx, "b")
	if err := m.Release(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	other := ""
	for i := 0; other == ""; i++ {
		if k := fmt.Sprint("k", i); m.shardIndex(k) == m.shardIndex("b") {
			other = k
		}
	}
	if o, _ := m.Reserve(ctx, other); o != Reserved {
		t.Fatalf("reserve %s = %v", other, o)
	}
	if err := m.CommitHandle(ctx, "b", hb); err != nil {
		t.Fatal(err)
	}
	if o, _ := m.Reserve(ctx, "b"); o != Duplicate {
		t.Fatalf("b after stale CommitHandle: %v, want duplicate", o)
	}
	// b's commit took b's one-slot shard back from the other key, which
	// must not have been committed on the way.
	if o, _ := m.Reserve(ctx, other); o == Duplicate {
		t.Fatalf("%s was committed through b's stale handle", other)
	}
	if err := m.CommitHandle(ctx, "z", Handle{}); err != nil { // zero handle: plain Commit
		t.Fatal(err)
	}
	if o, _ := m.Reserve(ctx, "z"); o != Duplicate {
		t.Fatalf("z = %v", o)
	}
}

// BenchmarkMemoryBridge models the bridge's use of the store: every message
// reserves a key never seen before, and commits it through its handle once
// the sink confirmed, here memBenchLag operations later (about the
// pipeline's in-flight window), so the entry has gone cold by then.
// "fill" starts empty with the default Size and never evicts (a replica's
// first TTL window); "steady" runs past a smaller Size, so each insert also
// evicts the least recently used key. Two goroutines, like a busy bridge.
func BenchmarkMemoryBridge(b *testing.B) {
	b.Run("fill", func(b *testing.B) {
		keys := benchKeys("fill:", b.N)
		benchBridge(b, NewMemory(MemoryConfig{}), func(n int) string { return keys[n] })
	})
	b.Run("steady", func(b *testing.B) {
		const size = 1 << 18
		m := NewMemory(MemoryConfig{Size: size})
		// A ring four times the size: a key is long evicted when it comes
		// round again, so every Reserve is a miss, as with fresh keys.
		keys := benchKeys("steady:", 4*size)
		for i := range 2 * size { // warm-up: slab full, evicting
			k := keys[2*size+i]
			_, _ = m.Reserve(context.Background(), k)
			_ = m.Commit(context.Background(), k)
		}
		benchBridge(b, m, func(n int) string { return keys[n%len(keys)] })
	})
}

// memBenchLag is how many operations pass between a key's Reserve and its
// Commit in BenchmarkMemoryBridge.
const memBenchLag = 4000

func benchKeys(prefix string, n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = prefix + strconv.Itoa(i)
	}
	return keys
}

func benchBridge(b *testing.B, m *Memory, key func(n int) string) {
	ctx := context.Background()
	defer m.Close(ctx)
	const workers = 2
	type pending struct {
		key string
		h   Handle
	}
	var seq atomic.Int64
	var wg sync.WaitGroup
	b.ReportAllocs()
	cpu := startCPU(b)
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ring := make([]pending, memBenchLag/workers)
			for j := 0; ; j++ {
				n := int(seq.Add(1)) - 1
				if n >= b.N {
					break
				}
				p := &ring[j%len(ring)]
				if p.key != "" {
					if err := m.CommitHandle(ctx, p.key, p.h); err != nil {
						b.Error(err)
						return
					}
				}
				k := key(n)
				o, h, err := m.ReserveHandle(ctx, k)
				if err != nil || o != Reserved {
					b.Errorf("ReserveHandle(%q) = %v, %v", k, o, err)
					return
				}
				*p = pending{k, h}
			}
		}()
	}
	wg.Wait()
	cpu.stop()
}

// A Handle whose slot was freed by Release is never applied to the free
// slot, even when the slot's generation has come round to the handle's
// again (2^32 reuses, set directly here) and the key is "" (what a free
// slot's key reads as): the commit must land on the key's own entry, and the
// free slot must stay off the LRU list.
func TestMemoryCommitHandleFreeSlot(t *testing.T) {
	ctx := context.Background()
	m := NewMemory(MemoryConfig{Size: 2 * memShards})
	o, h, err := m.ReserveHandle(ctx, "")
	if err != nil || o != Reserved {
		t.Fatalf("reserve \"\" = %v, %v", o, err)
	}
	must(t, m.Release(ctx, ""))
	s := &m.shards[h.shard]
	s.mu.Lock()
	s.slab[h.idx].gen = h.gen // the generation wrapped round to the handle's
	s.mu.Unlock()
	must(t, m.CommitHandle(ctx, "", h))
	mustReserve(t, m, "", Duplicate)
	checkInvariants(t, m)
}

// collidingKeys returns two different keys of one shard of m with the same
// fingerprint (a birthday search over one shard's 32-bit fingerprints:
// about 2^16 keys of that shard, 2^22 hashes).
func collidingKeys(m *Memory) (string, string) {
	seen := map[uint32]string{}
	for i := 0; ; i++ {
		k := "c" + strconv.Itoa(i)
		if si, fp := m.hash(k); si == 0 {
			if o, ok := seen[fp]; ok {
				return o, k
			}
			seen[fp] = k
		}
	}
}

// Two keys with one fingerprint in one shard are two entries: each is
// found by its full key, committing or releasing one leaves the other as it
// was, and evicting one keeps the other reachable.
func TestMemoryFingerprintCollision(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	m := NewMemory(MemoryConfig{Size: 2 * memShards, TTL: time.Hour, ReserveTTL: time.Hour, Now: clock.Now})
	a, b := collidingKeys(m)
	mustReserve(t, m, a, Reserved)
	mustReserve(t, m, b, Reserved) // not InFlight: a's entry is not b's
	must(t, m.Commit(ctx, a))
	mustReserve(t, m, b, InFlight) // not Duplicate: a's commit is not b's
	must(t, m.Release(ctx, b))
	mustReserve(t, m, a, Duplicate)
	mustReserve(t, m, b, Reserved)
	must(t, m.Release(ctx, a)) // a commit: no-op
	mustReserve(t, m, a, Duplicate)
	checkInvariants(t, m)

	// Shard 0 holds two keys: a third evicts the least recently used (b,
	// reserved before a was last touched), and a stays found behind it.
	c := ""
	for i := 0; c == ""; i++ {
		if k := "d" + strconv.Itoa(i); m.shardIndex(k) == 0 {
			c = k
		}
	}
	must(t, m.Commit(ctx, c))
	mustReserve(t, m, a, Duplicate)
	mustReserve(t, m, b, Reserved) // evicted, so reserved anew (evicting c)
	mustReserve(t, m, a, Duplicate)
	if got := m.Evictions(); got != 2 {
		t.Fatalf("Evictions = %d, want 2", got)
	}
	checkInvariants(t, m)
}

// TestMemoryReleaseHandleKeepsALaterReservation: an attempt whose
// reservation expired while it published, and that then failed, releases
// only its own reservation. The key's later reservation (another attempt,
// taken after the expiry) stays, so a third attempt sees InFlight and does
// not publish beside the second. Release by key alone would free it.
func TestMemoryReleaseHandleKeepsALaterReservation(t *testing.T) {
	ctx := context.Background()
	clock := newFakeClock()
	m := NewMemory(MemoryConfig{ReserveTTL: time.Second, Now: clock.Now})
	o, first, err := m.ReserveHandle(ctx, "k")
	if err != nil || o != Reserved {
		t.Fatalf("first reserve: %v %v", o, err)
	}
	clock.Advance(2 * time.Second) // the first attempt's reservation expires
	o, second, err := m.ReserveHandle(ctx, "k")
	if err != nil || o != Reserved {
		t.Fatalf("second reserve: %v %v", o, err)
	}
	if err := m.ReleaseHandle(ctx, "k", first); err != nil {
		t.Fatal(err)
	}
	if o, err := m.Reserve(ctx, "k"); err != nil || o != InFlight {
		t.Fatalf("after the first attempt's release: %v %v, want InFlight (the second attempt's reservation)", o, err)
	}
	if err := m.ReleaseHandle(ctx, "k", second); err != nil {
		t.Fatal(err)
	}
	if o, err := m.Reserve(ctx, "k"); err != nil || o != Reserved {
		t.Fatalf("after the second attempt's release: %v %v, want Reserved", o, err)
	}
	// A committed key is not released by a stale handle either.
	o, h, _ := m.ReserveHandle(ctx, "c")
	if o != Reserved {
		t.Fatalf("reserve c: %v", o)
	}
	if err := m.CommitHandle(ctx, "c", h); err != nil {
		t.Fatal(err)
	}
	_ = m.ReleaseHandle(ctx, "c", h)
	if o, _ := m.Reserve(ctx, "c"); o != Duplicate {
		t.Fatalf("committed key after a release by handle: %v, want Duplicate", o)
	}
}
