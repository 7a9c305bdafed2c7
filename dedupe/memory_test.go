package dedupe

import (
	"context"
	"fmt"
	"sync"
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
			if j, ok := s.index[s.slab[i].key]; !ok || j != i {
				s.mu.Unlock()
				t.Fatalf("shard %d: slot %d not indexed", si, i)
			}
			prev = i
		}
		if s.tail != prev || len(seen) != len(s.index) {
			s.mu.Unlock()
			t.Fatalf("shard %d: tail %d (want %d), %d listed vs %d indexed", si, s.tail, prev, len(seen), len(s.index))
		}
		for i := s.free; i != nilIdx; i = s.slab[i].next {
			if seen[i] {
				s.mu.Unlock()
				t.Fatalf("shard %d: slot %d both free and in use", si, i)
			}
			seen[i] = true
		}
		if len(seen) != len(s.slab) || len(s.slab) > s.limit {
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

// FuzzMemoryModel runs random operation sequences against the store and
// against a plain map model; with Size large enough never to evict, every
// outcome must agree.
func FuzzMemoryModel(f *testing.F) {
	f.Add([]byte{0, 0, 1, 0, 2, 0, 3, 0, 0, 0, 4, 9, 0, 0})
	f.Add([]byte{0, 1, 4, 20, 0, 1, 1, 1, 2, 1, 0, 1, 4, 255, 0, 1})
	f.Fuzz(func(t *testing.T, ops []byte) {
		ctx := context.Background()
		clock := newFakeClock()
		const ttl, rttl = 10 * time.Second, 3 * time.Second
		m := NewMemory(MemoryConfig{Size: 1 << 12, TTL: ttl, ReserveTTL: rttl, Now: clock.Now})
		type state struct {
			committed bool
			expires   time.Time
		}
		model := map[string]state{}
		for len(ops) >= 2 {
			op, arg := ops[0]%5, ops[1]
			ops = ops[2:]
			key := fmt.Sprint("k", arg%8)
			now := clock.Now()
			st, ok := model[key]
			live := ok && now.Before(st.expires)
			switch op {
			case 0: // reserve
				want := Reserved
				if live {
					want = InFlight
					if st.committed {
						want = Duplicate
					}
				} else {
					model[key] = state{expires: now.Add(rttl)}
				}
				if got, err := m.Reserve(ctx, key); err != nil || got != want {
					t.Fatalf("Reserve(%s) = %v, %v; model says %v", key, got, err, want)
				}
			case 1: // commit
				model[key] = state{committed: true, expires: now.Add(ttl)}
				must(t, m.Commit(ctx, key))
			case 2: // release
				if ok && !st.committed {
					delete(model, key)
				}
				must(t, m.Release(ctx, key))
			case 3: // a second passes
				clock.Advance(time.Second)
			case 4: // arg × 100ms pass
				clock.Advance(time.Duration(arg) * 100 * time.Millisecond)
			}
		}
		checkInvariants(t, m)
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
