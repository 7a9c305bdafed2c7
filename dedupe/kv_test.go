package dedupe

import (
	"context"
	"fmt"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

var bucketSeq atomic.Int64

// newBucket returns a bucket name no other test uses.
func newBucket() string { return fmt.Sprint("dedupe-test-", bucketSeq.Add(1)) }

func openKV(t *testing.T, js jetstream.JetStream, cfg KVConfig) *KV {
	t.Helper()
	kv, err := NewJetStream(context.Background(), js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kv.Close(context.Background()) })
	return kv
}

func suiteKVConfig(bucket string) KVConfig {
	return KVConfig{Bucket: bucket, TTL: suiteTTL, ReserveTTL: suiteReserveTTL}
}

func TestKVConformance(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	testStore(t, harness{
		open: func(t *testing.T) Store { return openKV(t, js, suiteKVConfig(newBucket())) },
		tick: func() { time.Sleep(50 * time.Millisecond) }, // poll interval against the server's clock
		now:  time.Now,
	})
}

// TestKVTwoReplicas runs two stores on two connections over one bucket, as
// two bridge replicas do.
func TestKVTwoReplicas(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	bucket := newBucket()
	_, jsA := srv.Connect(t)
	_, jsB := srv.Connect(t)
	a := openKV(t, jsA, suiteKVConfig(bucket))
	b := openKV(t, jsB, suiteKVConfig(bucket))

	t.Run("reservation is seen by the other replica", func(t *testing.T) {
		mustReserve(t, a, "k1", Reserved)
		mustReserve(t, b, "k1", InFlight)
		must(t, b.Release(ctx, "k1")) // not b's: a no-op
		mustReserve(t, b, "k1", InFlight)
		must(t, a.Commit(ctx, "k1"))
		mustReserve(t, b, "k1", Duplicate)
		must(t, b.Release(ctx, "k1")) // never undoes a commit
		mustReserve(t, a, "k1", Duplicate)
	})

	t.Run("release lets the other replica in", func(t *testing.T) {
		mustReserve(t, a, "k2", Reserved)
		must(t, a.Release(ctx, "k2"))
		mustReserve(t, b, "k2", Reserved)
		mustReserve(t, a, "k2", InFlight)
	})

	t.Run("a crashed replica's reservation expires", func(t *testing.T) {
		ncC, jsC := srv.Connect(t)
		c := openKV(t, jsC, suiteKVConfig(bucket))
		mustReserve(t, c, "k3", Reserved)
		ncC.Close() // crash: no Release, no Commit
		mustReserve(t, a, "k3", InFlight)
		h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }}
		h.eventually(t, "the crashed reservation to expire", func() bool {
			o, err := a.Reserve(ctx, "k3")
			must(t, err)
			return o == Reserved
		})
		mustReserve(t, b, "k3", InFlight)
	})

	t.Run("concurrent reserve across replicas has one winner", func(t *testing.T) {
		const workers, keys = 32, 40
		var won [keys]atomic.Int32
		stores := []Store{a, b}
		parallel(t, workers, func(w int) error {
			s := stores[w%2]
			for k := 0; k < keys; k++ {
				i := (k + w) % keys
				o, err := s.Reserve(ctx, fmt.Sprint("race-", i))
				if err != nil {
					return err
				}
				if o == Reserved {
					won[i].Add(1)
				}
			}
			return nil
		})
		expectOnce(t, "race-%d reserved", won[:])
	})
}

// TestKVServerRestart checks that the bucket's state survives a server
// restart (file storage) and that a store keeps working across the
// client's reconnect.
func TestKVServerRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	srv := natstest.StartDir(t, dir)
	port := srv.Addr().(*net.TCPAddr).Port
	_, js := srv.Connect(t, nats.ReconnectWait(50*time.Millisecond), nats.MaxReconnects(-1))
	cfg := KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 30 * time.Minute}
	kv := openKV(t, js, cfg)
	mustReserve(t, kv, "committed", Reserved)
	must(t, kv.Commit(ctx, "committed"))
	mustReserve(t, kv, "reserved", Reserved)

	srv.Shutdown()
	srv.WaitForShutdown()
	srv2 := natstest.StartDir(t, dir, func(o *server.Options) { o.Port = port })

	h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }}
	h.eventually(t, "the store to work after the reconnect", func() bool {
		o, err := kv.Reserve(ctx, "committed")
		return err == nil && o == Duplicate
	})
	mustReserve(t, kv, "reserved", InFlight)
	mustReserve(t, kv, "new", Reserved)

	// A replica started after the restart opens the existing bucket.
	_, js2 := srv2.Connect(t)
	kv2 := openKV(t, js2, cfg)
	mustReserve(t, kv2, "committed", Duplicate)
	mustReserve(t, kv2, "reserved", InFlight)
	mustReserve(t, kv2, "new", InFlight)
}
