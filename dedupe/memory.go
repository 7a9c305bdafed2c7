package dedupe

import (
	"context"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

// MemoryConfig configures NewMemory. Zero or negative fields take the
// defaults.
type MemoryConfig struct {
	// Size bounds the number of keys kept (reservations and commits
	// together), rounded up to a multiple of 64 (the shards); the least
	// recently used key of a shard is evicted beyond it. Default
	// DefaultSize.
	Size int
	// TTL is how long a committed key is remembered. Default DefaultTTL.
	TTL time.Duration
	// ReserveTTL is how long a reservation lives without Commit or
	// Release. Default DefaultReserveTTL.
	ReserveTTL time.Duration
	// Now, when set, replaces the monotonic clock (tests, simulations). It
	// must be safe for concurrent use.
	Now func() time.Time
}

// memShards spreads keys over independent locks so that hundreds of
// goroutines rarely wait for each other; a power of two so the shard is a
// mask of the hash.
const memShards = 64

// Memory is a bounded in-process Store: 64 shards, each a hash index (see
// memIndex) into a slab of entries linked in LRU order. A key is hashed once:
// the hash picks the shard and the index slot. After warm-up, Reserve,
// Commit and Release allocate nothing: entries are reused from the slab.
//
// A Memory store only deduplicates what passes through this process, and
// only for keys it still holds: a key evicted before its TTL (more than Size
// keys within the window) may be reserved and forwarded again. Size it for
// the peak rate times TTL. The JetStream sink's Nats-Msg-Id duplicate window
// still drops such a repeat within that window.
//
// It keeps the key strings it is given, without copying them (Go strings
// never change). Safe for concurrent use. Close makes every later call
// return ErrClosed.
type Memory struct {
	ttl, reserveTTL int64
	clock           func() time.Time
	base            time.Time
	seed            maphash.Seed
	closed          atomic.Bool
	evictions       atomic.Uint64
	shards          [memShards]memShard
}

var (
	_ Store       = (*Memory)(nil)
	_ HandleStore = (*Memory)(nil)
)

const (
	stateReserved uint8 = iota + 1
	stateCommitted
)

// nilIdx marks the end of a list.
const nilIdx int32 = -1

// memEntry is a slab slot's state. Its key is in the shard's keys, at the
// same index: without it the entry is pointer-free and 32 bytes (half a cache
// line), and the garbage collector, which runs often in a busy bridge, scans
// 16 bytes a key instead of the whole entry.
type memEntry struct {
	expires    int64  // on the store's clock, nanoseconds
	prev, next int32  // LRU links (slab indices); next also links the free list
	gen        uint32 // bumped whenever the slot gets a new key or is freed (Handle)
	fp         uint32 // the key's fingerprint, so eviction finds its index slot without hashing
	state      uint8
}

type memShard struct {
	mu         sync.Mutex
	index      memIndex // slots nil once closed
	slab       []memEntry
	keys       []string // keys[i] is slab[i]'s key ("" when free)
	head, tail int32    // most and least recently used
	free       int32    // free list of slab slots (released keys)
	limit      int
	// pad rounds a shard up to two cache lines, so that no two shards'
	// locks share one.
	_ [8]byte
}

// NewMemory returns an empty Memory store. It starts no goroutines: expiry is
// checked when a key is looked up, and expired entries are reused first
// because they sit at the cold end of the LRU list.
func NewMemory(cfg MemoryConfig) *Memory {
	if cfg.Size <= 0 {
		cfg.Size = DefaultSize
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.ReserveTTL <= 0 {
		cfg.ReserveTTL = DefaultReserveTTL
	}
	m := &Memory{
		ttl:        int64(cfg.TTL),
		reserveTTL: int64(cfg.ReserveTTL),
		clock:      cfg.Now,
		seed:       maphash.MakeSeed(),
	}
	if m.clock != nil {
		m.base = m.clock()
	} else {
		m.base = time.Now()
	}
	limit := (cfg.Size + memShards - 1) / memShards
	for i := range m.shards {
		s := &m.shards[i]
		// Pre-sized for the first keys so warm-up does not rehash a
		// small index many times; not for the whole limit, which most
		// deployments never reach.
		n := min(limit, memPresize)
		s.index.init(n)
		s.slab = make([]memEntry, 0, n)
		s.keys = make([]string, 0, n)
		s.head, s.tail, s.free = nilIdx, nilIdx, nilIdx
		s.limit = limit
	}
	return m
}

// now reads the monotonic clock (time.Since keeps wall-clock jumps from
// expiring keys early or late).
func (m *Memory) now() int64 {
	if m.clock != nil {
		return int64(m.clock().Sub(m.base))
	}
	return int64(time.Since(m.base))
}

// memPresize is how many keys each shard's index and slab have room for
// before they first grow.
const memPresize = 4096

// hash returns key's shard and its fingerprint within the shard's index:
// disjoint bits of one hash, so the fingerprints of one shard's keys are as
// varied as the hash.
func (m *Memory) hash(key string) (shard int, fp uint32) {
	h := maphash.String(m.seed, key)
	return int(h & (memShards - 1)), uint32(h >> 32)
}

func (m *Memory) shardIndex(key string) int {
	si, _ := m.hash(key)
	return si
}

func (m *Memory) shard(key string) *memShard {
	return &m.shards[m.shardIndex(key)]
}

// lockShard locks and returns key's shard, with its index and key's
// fingerprint in it; s is nil (and nothing is locked) once the store is
// closed (see lockAt).
func (m *Memory) lockShard(key string) (s *memShard, si int, fp uint32) {
	si, fp = m.hash(key)
	return m.lockAt(si), si, fp
}

// lockAt locks and returns shard si; nil (and nothing is locked) once the
// store is closed, also when it was closed while lockAt waited for the
// lock.
func (m *Memory) lockAt(si int) *memShard {
	if m.closed.Load() {
		return nil
	}
	s := &m.shards[si]
	s.mu.Lock()
	if s.index.slots == nil {
		s.mu.Unlock()
		return nil
	}
	return s
}

// commitAt marks slot i of s committed until now+TTL; s is locked.
func (m *Memory) commitAt(s *memShard, i int32, now int64) {
	e := &s.slab[i]
	e.state = stateCommitted
	e.expires = now + m.ttl
	s.moveToFront(i)
}

// Local reports true: a Memory store never waits on I/O.
func (m *Memory) Local() bool { return true }

// Reserve implements Store. It never blocks on I/O; ctx is not consulted.
func (m *Memory) Reserve(ctx context.Context, key string) (Outcome, error) {
	o, _, err := m.ReserveHandle(ctx, key)
	return o, err
}

// ReserveHandle implements HandleStore: Reserve, plus the slot of the key
// for CommitHandle.
func (m *Memory) ReserveHandle(_ context.Context, key string) (Outcome, Handle, error) {
	now := m.now()
	s, si, fp := m.lockShard(key)
	if s == nil {
		return 0, Handle{}, ErrClosed
	}
	i, p := s.index.find(fp, key, s.keys)
	if i != nilIdx {
		e := &s.slab[i]
		out := Reserved
		if e.expires > now {
			out = InFlight
			if e.state == stateCommitted {
				out = Duplicate
			}
		} else {
			// A new reservation of the key: a Handle of the expired
			// one no longer names it (ReleaseHandle).
			e.state = stateReserved
			e.expires = now + m.reserveTTL
			if e.gen++; e.gen == 0 {
				e.gen = 1 // 0 is the zero Handle's: it would match any reservation
			}
		}
		h := Handle{shard: uint32(si), idx: i, gen: e.gen}
		s.moveToFront(i)
		s.mu.Unlock()
		return out, h, nil
	}
	i, evicted := s.insert(key, fp, p, stateReserved, now+m.reserveTTL, now)
	if evicted {
		m.evictions.Add(1)
	}
	h := Handle{shard: uint32(si), idx: i, gen: s.slab[i].gen}
	s.mu.Unlock()
	return Reserved, h, nil
}

// CommitHandle implements HandleStore: Commit(key), without looking key up
// when h still names its slot (the slot's generation and key match); else
// it falls back to the lookup. The result is the same as Commit's either way.
func (m *Memory) CommitHandle(ctx context.Context, key string, h Handle) error {
	if h.gen == 0 || h.shard >= memShards {
		return m.Commit(ctx, key)
	}
	now := m.now()
	s := m.lockAt(int(h.shard))
	if s == nil {
		return ErrClosed
	}
	if int(h.idx) < len(s.slab) {
		// A free slot (state 0) is never the key's, even when its
		// generation has wrapped round to h's and key is "", which is
		// what a free slot's key reads as.
		if e := &s.slab[h.idx]; e.gen == h.gen && e.state != 0 && s.keys[h.idx] == key {
			m.commitAt(s, h.idx, now)
			s.mu.Unlock()
			return nil
		}
	}
	s.mu.Unlock()
	return m.Commit(ctx, key)
}

// Commit implements Store. A key that is not present (evicted, expired, or
// never reserved) is inserted as committed.
func (m *Memory) Commit(_ context.Context, key string) error {
	now := m.now()
	s, _, fp := m.lockShard(key)
	if s == nil {
		return ErrClosed
	}
	i, p := s.index.find(fp, key, s.keys)
	if i != nilIdx {
		m.commitAt(s, i, now)
		s.mu.Unlock()
		return nil
	}
	if _, evicted := s.insert(key, fp, p, stateCommitted, now+m.ttl, now); evicted {
		m.evictions.Add(1)
	}
	s.mu.Unlock()
	return nil
}

// Release implements Store. Only a reservation is removed; a committed key
// stays committed. Release cannot tell one reservation of a key from a later
// one taken after the first expired; ReleaseHandle can.
func (m *Memory) Release(_ context.Context, key string) error {
	s, _, fp := m.lockShard(key)
	if s == nil {
		return ErrClosed
	}
	if i, p := s.index.find(fp, key, s.keys); i != nilIdx && s.slab[i].state == stateReserved {
		s.free1(i, p)
	}
	s.mu.Unlock()
	return nil
}

// ReleaseHandle implements HandleStore: the key's reservation is dropped
// only while it is the one h names (same slot, generation and key). A zero
// Handle falls back to Release.
func (m *Memory) ReleaseHandle(ctx context.Context, key string, h Handle) error {
	if h.gen == 0 {
		return m.Release(ctx, key)
	}
	s, si, fp := m.lockShard(key)
	if s == nil {
		return ErrClosed
	}
	if i, p := s.index.find(fp, key, s.keys); i != nilIdx && uint32(si) == h.shard && i == h.idx &&
		s.slab[i].gen == h.gen && s.slab[i].state == stateReserved {
		s.free1(i, p)
	}
	s.mu.Unlock()
	return nil
}

// free1 removes slot i (at index position p) and puts it on the free list;
// its generation moves on. The caller holds s.mu.
func (s *memShard) free1(i int32, p uint32) {
	s.index.removeAt(p)
	s.unlink(i)
	s.slab[i] = memEntry{next: s.free, gen: s.slab[i].gen + 1}
	s.keys[i] = "" // not kept alive by a free slot
	s.free = i
}

// Close drops every key; later calls return ErrClosed. It never fails.
func (m *Memory) Close(context.Context) error {
	m.closed.Store(true)
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.Lock()
		s.index, s.slab, s.keys = memIndex{}, nil, nil
		s.head, s.tail, s.free = nilIdx, nilIdx, nilIdx
		s.mu.Unlock()
	}
	return nil
}

// Len returns the number of keys held, expired ones included until reused.
func (m *Memory) Len() int {
	n := 0
	for i := range m.shards {
		s := &m.shards[i]
		s.mu.Lock()
		n += s.index.n
		s.mu.Unlock()
	}
	return n
}

// Evictions returns how many unexpired keys were dropped to stay within
// Size since the store was made. Each one weakens deduplication for its key
// (see Memory); a growing count means Size is too small for rate × TTL.
func (m *Memory) Evictions() uint64 { return m.evictions.Load() }

// insert adds key (absent, hashed to fp; p is the empty index position
// find returned for it), reusing a free slot, growing the slab up to the
// limit, or recycling the least recently used entry. It returns the slot and
// reports whether an unexpired entry was evicted. The slot's generation
// moves on, so a Handle to its previous key no longer matches. The caller
// holds s.mu.
func (s *memShard) insert(key string, fp, p uint32, state uint8, expires, now int64) (i int32, evicted bool) {
	moved := false // p no longer valid
	switch {
	case s.free != nilIdx:
		i = s.free
		s.free = s.slab[i].next
	case len(s.slab) < s.limit:
		s.slab = append(s.slab, memEntry{})
		s.keys = append(s.keys, "")
		i = int32(len(s.slab) - 1)
	default:
		i = s.tail
		evicted = s.slab[i].expires > now
		s.index.remove(s.slab[i].fp, i)
		s.unlink(i)
		moved = true
	}
	if s.index.full() {
		s.index.grow()
		moved = true
	}
	if moved {
		p = s.index.vacant(fp)
	}
	gen := s.slab[i].gen + 1
	if gen == 0 { // 0 is the zero Handle's: never a live generation
		gen = 1
	}
	s.slab[i] = memEntry{expires: expires, state: state, prev: nilIdx, next: nilIdx, gen: gen, fp: fp}
	s.keys[i] = key
	s.index.set(p, fp, i)
	s.pushFront(i)
	return i, evicted
}

func (s *memShard) pushFront(i int32) {
	e := &s.slab[i]
	e.prev, e.next = nilIdx, s.head
	if s.head != nilIdx {
		s.slab[s.head].prev = i
	}
	s.head = i
	if s.tail == nilIdx {
		s.tail = i
	}
}

func (s *memShard) unlink(i int32) {
	e := &s.slab[i]
	if e.prev != nilIdx {
		s.slab[e.prev].next = e.next
	} else {
		s.head = e.next
	}
	if e.next != nilIdx {
		s.slab[e.next].prev = e.prev
	} else {
		s.tail = e.prev
	}
	e.prev, e.next = nilIdx, nilIdx
}

func (s *memShard) moveToFront(i int32) {
	if s.head == i {
		return
	}
	s.unlink(i)
	s.pushFront(i)
}
