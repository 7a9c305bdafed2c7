package dedupe

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// benchCycle is the bridge's hot path for one new message: Reserve, then
// Commit after the (omitted) publish. Keys never repeat, like fresh source
// messages, so the store keeps inserting and, past its size, evicting.
//
// keys is a ring of distinct keys made before the timer starts, so that
// allocations reported are the store's own; with a ring several times the
// store's size a key has almost always been evicted (Memory) before it comes
// round again. nil keys: fresh keys are made, one allocation per op that
// belongs to the caller.
func benchCycle(b *testing.B, s Store, keys []string) { benchCycleP(b, s, keys, 64) }

func benchCycleP(b *testing.B, s Store, keys []string, par int) {
	ctx := context.Background()
	var seq atomic.Uint64
	prefix := "ORDERS:" + strconv.FormatInt(time.Now().UnixNano(), 36) + ":"
	b.ReportAllocs()
	b.SetParallelism(par)
	cpu := startCPU(b)
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
			// Fresh keys must be Reserved. A ring key normally has been
			// evicted when it comes round again, but a goroutine that was
			// descheduled long enough may find it still there.
			if o != Reserved && keys == nil {
				b.Fatalf("Reserve(%q) = %v", key, o)
			}
			if err := s.Commit(ctx, key); err != nil {
				b.Fatal(err)
			}
		}
	})
	cpu.stop()
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

// BenchmarkKV runs the bridge's hot path (Reserve, Commit on fresh keys)
// against an embedded server, p × GOMAXPROCS goroutines sharing one
// connection: p=1 shows the round-trip bound, p=64 the pipelined rate.
func BenchmarkKV(b *testing.B) {
	for _, bc := range []struct {
		name    string
		storage jetstream.StorageType
		par     int
	}{
		{"file/p=1", jetstream.FileStorage, 1},
		{"file/p=8", jetstream.FileStorage, 8},
		{"file/p=64", jetstream.FileStorage, 64},
		{"memory/p=64", jetstream.MemoryStorage, 64},
	} {
		b.Run(bc.name, func(b *testing.B) {
			kv, _ := benchKV(b, KVConfig{Bucket: "bench", Storage: bc.storage})
			benchCycleP(b, kv, nil, bc.par)
		})
	}
}

// BenchmarkKVLibrary is the same protocol written with nats.go's KeyValue
// API (Create with a key TTL, then Put), for comparison with KV's own
// pipelined publishes.
func BenchmarkKVLibrary(b *testing.B) {
	ctx := context.Background()
	srv := natstest.Start(b)
	_, js := srv.Connect(b)
	bucket, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "bench", TTL: DefaultTTL, LimitMarkerTTL: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	benchCycle(b, libraryStore{bucket}, nil)
}

type libraryStore struct{ kv jetstream.KeyValue }

func (s libraryStore) Local() bool { return false }

func (s libraryStore) Reserve(ctx context.Context, key string) (Outcome, error) {
	_, err := s.kv.Create(ctx, EncodeKey(key), []byte("r"), jetstream.KeyTTL(DefaultReserveTTL))
	return Reserved, err
}

func (s libraryStore) Commit(ctx context.Context, key string) error {
	_, err := s.kv.Put(ctx, EncodeKey(key), []byte("c"))
	return err
}
func (libraryStore) Release(context.Context, string) error { return nil }
func (libraryStore) Close(context.Context) error           { return nil }

// BenchmarkJetStreamPublish is the floor: one awaited publish per op to a
// plain stream through nats.go (two such per message is KV's cost).
func BenchmarkJetStreamPublish(b *testing.B) {
	ctx := context.Background()
	srv := natstest.Start(b)
	_, js := srv.Connect(b)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "BENCH", Subjects: []string{"bench.>"}}); err != nil {
		b.Fatal(err)
	}
	data := []byte("c")
	b.ReportAllocs()
	b.SetParallelism(64)
	cpu := startCPU(b)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := js.Publish(ctx, "bench.x", data); err != nil {
				b.Fatal(err)
			}
		}
	})
	cpu.stop()
}

// BenchmarkKVDuplicate is the redelivery path: Reserve on committed keys
// (a refused create, then a direct get).
func BenchmarkKVDuplicate(b *testing.B) {
	ctx := context.Background()
	kv, _ := benchKV(b, KVConfig{Bucket: "bench"})
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = "ORDERS:" + strconv.Itoa(i)
		if err := kv.Commit(ctx, keys[i]); err != nil {
			b.Fatal(err)
		}
	}
	var n atomic.Uint64
	b.ReportAllocs()
	b.SetParallelism(64)
	cpu := startCPU(b)
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if o, err := kv.Reserve(ctx, keys[n.Add(1)&1023]); o != Duplicate || err != nil {
				b.Fatal(o, err)
			}
		}
	})
	cpu.stop()
}

// cpuMeter reports, besides ns/op, the rate (msgs/s) and the process CPU
// time per op (cpu-ns/op: client and embedded server together). The CPU
// figure holds up better than wall time on a busy machine, and compares the
// cost of the variants directly.
type cpuMeter struct {
	b     *testing.B
	start time.Duration
}

func startCPU(b *testing.B) cpuMeter {
	b.ResetTimer()
	return cpuMeter{b: b, start: processCPU(b)}
}

func (m cpuMeter) stop() {
	m.b.StopTimer()
	used := processCPU(m.b) - m.start
	m.b.ReportMetric(float64(m.b.N)/m.b.Elapsed().Seconds(), "msgs/s")
	m.b.ReportMetric(float64(used.Nanoseconds())/float64(m.b.N), "cpu-ns/op")
}

func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkKVWrites compares what one new key costs the server in the
// bucket's requests, each awaited, on fresh keys (file storage, 64 ×
// GOMAXPROCS goroutines on the one pipelined connection): "create" is one
// conditional create with a per-message TTL (the reservation), "create+put"
// adds the overwrite with "c" (the commit: today's Reserve and Commit),
// "get+put" is a direct get of the (absent) key and then the overwrite, "get"
// and "put" are each alone.
func BenchmarkKVWrites(b *testing.B) {
	for _, name := range []string{"create", "create+put", "get+put", "get", "put", "check+put"} {
		b.Run(name, func(b *testing.B) {
			ctx := context.Background()
			kv, _ := benchKV(b, KVConfig{Bucket: "bench"})
			prefix := kv.prefix + "k" + strconv.FormatInt(time.Now().UnixNano(), 36) + "-"
			var seq atomic.Uint64
			b.ReportAllocs()
			b.SetParallelism(64)
			cpu := startCPU(b)
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					subj := prefix + strconv.FormatUint(seq.Add(1), 10)
					if name == "check+put" {
						key := subj[len(kv.prefix):]
						if o, err := kv.Check(ctx, key); err != nil || o != Reserved {
							b.Fatal(o, err)
						}
						if err := kv.Commit(ctx, key); err != nil {
							b.Fatal(err)
						}
						continue
					}
					if name == "create" || name == "create+put" {
						if _, err := kv.client.Publish(ctx, subj, kv.reserveHdr, kv.ours); err != nil {
							b.Fatal(err)
						}
					}
					if name == "get" || name == "get+put" {
						if st, _, _, err := kv.directGet(ctx, subj); err != nil || st != kvAbsent {
							b.Fatal(st, err)
						}
					}
					if name != "create" && name != "get" {
						if _, err := kv.client.Publish(ctx, subj, nil, committedVal); err != nil {
							b.Fatal(err)
						}
					}
				}
			})
			cpu.stop()
		})
	}
}

// BenchmarkKVBatchGet is "get+put" with the gets batched: one direct get
// of K absent keys (multi_last) per K keys, then each key's overwrite.
func BenchmarkKVBatchGet(b *testing.B) {
	for _, k := range []int{8, 32, 128} {
		b.Run("k="+strconv.Itoa(k), func(b *testing.B) {
			ctx := context.Background()
			kv, nc := benchKV(b, KVConfig{Bucket: "bench"})
			// Something in the bucket: an empty stream answers at once.
			if err := kv.Commit(ctx, "x"); err != nil {
				b.Fatal(err)
			}
			prefix := kv.prefix + "k" + strconv.FormatInt(time.Now().UnixNano(), 36) + "-"
			getSubj := "$JS.API.DIRECT.GET.KV_bench"
			var seq atomic.Uint64
			b.ReportAllocs()
			b.SetParallelism(max(1, 64*64/k/2))
			cpu := startCPU(b)
			b.RunParallel(func(pb *testing.PB) {
				subjs := make([]string, 0, k)
				flush := func() {
					req, _ := json.Marshal(map[string]any{"multi_last": subjs})
					m, err := nc.Request(getSubj, req, 5*time.Second)
					if err != nil || m.Header.Get("Status") != "404" {
						b.Fatal(err, m.Header)
					}
					var wg sync.WaitGroup
					for _, s := range subjs {
						wg.Go(func() {
							if _, err := kv.client.Publish(ctx, s, nil, committedVal); err != nil {
								b.Error(err)
							}
						})
					}
					wg.Wait()
					subjs = subjs[:0]
				}
				for pb.Next() {
					subjs = append(subjs, prefix+strconv.FormatUint(seq.Add(1), 10))
					if len(subjs) == k {
						flush()
					}
				}
				if len(subjs) > 0 {
					flush()
				}
			})
			cpu.stop()
		})
	}
}

// benchKV starts an embedded server and opens a store on it with cfg; both
// end with the benchmark. It returns the store and its connection.
func benchKV(b *testing.B, cfg KVConfig) (*KV, *nats.Conn) {
	b.Helper()
	srv := natstest.Start(b)
	nc, js := srv.Connect(b)
	kv, err := NewJetStream(context.Background(), js, cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = kv.Close(context.Background()) })
	return kv, nc
}
