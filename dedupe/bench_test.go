package dedupe

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// benchCycle is the bridge's hot path for one new message: Reserve, then
// Commit after the (omitted) publish. Keys never repeat, like fresh source
// messages, so the store keeps inserting and, past its size, evicting.
//
// keys is a ring of distinct keys made before the timer starts, so that
// allocations reported are the store's own. With ring > 2 × store size each
// key has been evicted (Memory) before it comes round again; for stores
// that never evict, ring must exceed b.N (nil keys: fresh keys are made,
// one allocation per op that belongs to the caller).
func benchCycle(b *testing.B, s Store, keys []string) {
	ctx := context.Background()
	var seq atomic.Uint64
	prefix := "ORDERS:" + strconv.FormatInt(time.Now().UnixNano(), 36) + ":"
	b.ReportAllocs()
	b.SetParallelism(64)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			n := seq.Add(1)
			var key string
			if keys != nil {
				key = keys[n%uint64(len(keys))]
			} else {
				key = prefix + strconv.FormatUint(n, 10)
			}
			o, err := s.Reserve(ctx, key)
			if err != nil {
				b.Fatal(err)
			}
			if o != Reserved {
				b.Fatalf("Reserve(%q) = %v", key, o)
			}
			if err := s.Commit(ctx, key); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "msgs/s")
}

func BenchmarkMemory(b *testing.B) {
	m := NewMemory(MemoryConfig{Size: 1 << 16})
	defer m.Close(context.Background())
	// Warm up past the size so the benchmark measures steady state.
	for i := 0; i < 1<<17; i++ {
		k := "warm:" + strconv.Itoa(i)
		_, _ = m.Reserve(context.Background(), k)
		_ = m.Commit(context.Background(), k)
	}
	keys := make([]string, 1<<18)
	for i := range keys {
		keys[i] = "ORDERS:" + strconv.Itoa(i)
	}
	benchCycle(b, m, keys)
}

// BenchmarkMemoryDuplicate is the redelivery path: the key is committed.
func BenchmarkMemoryDuplicate(b *testing.B) {
	ctx := context.Background()
	m := NewMemory(MemoryConfig{Size: 1 << 16})
	defer m.Close(ctx)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = "ORDERS:" + strconv.Itoa(i)
		_ = m.Commit(ctx, keys[i])
	}
	b.ReportAllocs()
	b.SetParallelism(64)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if o, _ := m.Reserve(ctx, keys[i&1023]); o != Duplicate {
				b.Fatal(o)
			}
			i++
		}
	})
}
