package dedupe

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// TestKVTakeOver: a crashed replica's reservation is replaced at once by
// TakeOver (not after ReserveTTL), exactly one of two concurrent takers
// wins, and every other state answers as Reserve does.
func TestKVTakeOver(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	bucket := newBucket()
	// ReserveTTL long enough that nothing in the test can expire.
	cfg := KVConfig{Bucket: bucket, TTL: time.Hour, ReserveTTL: 30 * time.Minute}
	_, jsA := srv.Connect(t)
	_, jsB := srv.Connect(t)
	a := openKV(t, jsA, cfg)
	b := openKV(t, jsB, cfg)

	t.Run("a crashed holder's reservation", func(t *testing.T) {
		ncC, jsC := srv.Connect(t)
		c := openKV(t, jsC, cfg)
		mustReserve(t, c, "k1", Reserved)
		ncC.Close() // kill -9: neither Commit nor Release
		mustReserve(t, a, "k1", InFlight)
		o, replaced, err := a.TakeOver(ctx, "k1")
		must(t, err)
		if o != Reserved || !replaced {
			t.Fatalf("TakeOver of a crashed holder's reservation: %v, replaced %v; want reserved, true", o, replaced)
		}
		// a holds it now, as after its own Reserve.
		mustReserve(t, b, "k1", InFlight)
		must(t, a.Commit(ctx, "k1"))
		mustReserve(t, b, "k1", Duplicate)
	})

	t.Run("the other states answer as Reserve", func(t *testing.T) {
		for _, tc := range []struct {
			name  string
			setup func(key string)
			want  Outcome
		}{
			{"absent", func(string) {}, Reserved},
			{"committed", func(k string) { mustReserve(t, b, k, Reserved); must(t, b.Commit(ctx, k)) }, Duplicate},
			{"released", func(k string) { mustReserve(t, b, k, Reserved); must(t, b.Release(ctx, k)) }, Reserved},
			// Its own reservation held by another of its callers: the
			// taker does not take from itself.
			{"ours", func(k string) { mustReserve(t, a, k, Reserved) }, InFlight},
		} {
			key := "state-" + tc.name
			tc.setup(key)
			o, replaced, err := a.TakeOver(ctx, key)
			must(t, err)
			if o != tc.want || replaced {
				t.Errorf("%s: TakeOver = %v, replaced %v; want %v, false", tc.name, o, replaced, tc.want)
			}
		}
	})

	t.Run("concurrent takers of one store, one winner", func(t *testing.T) {
		// The writes are conditional on the revision read: of the
		// callers that read the crashed holder's reservation, one
		// replaces it; the others find the winner's (this store's own)
		// and answer InFlight.
		const keys = 40
		ncC, jsC := srv.Connect(t)
		c := openKV(t, jsC, cfg)
		for i := range keys {
			mustReserve(t, c, fmt.Sprint("race-", i), Reserved)
		}
		ncC.Close()
		var won [keys]atomic.Int32
		parallel(t, 8, func(w int) error {
			for k := range keys {
				i := (k + w) % keys
				o, replaced, err := a.TakeOver(ctx, fmt.Sprint("race-", i))
				if err != nil {
					return err
				}
				if o == Reserved != replaced {
					return fmt.Errorf("race-%d: %v, replaced %v", i, o, replaced)
				}
				if o == Reserved {
					won[i].Add(1)
				}
			}
			return nil
		})
		expectOnce(t, "race-%d taken over", won[:])
	})

	t.Run("a live holder loses its reservation, not its commit", func(t *testing.T) {
		// TakeOver does not know whether the holder is alive (the bridge
		// calls it only where a copy from both is dropped by the
		// target): the holder's later Commit still records the key.
		mustReserve(t, b, "live", Reserved)
		o, replaced, err := a.TakeOver(ctx, "live")
		must(t, err)
		if o != Reserved || !replaced {
			t.Fatalf("TakeOver of b's reservation: %v, replaced %v; want reserved, true", o, replaced)
		}
		must(t, b.Release(ctx, "live")) // not b's any more: a no-op
		mustReserve(t, b, "live", InFlight)
		must(t, b.Commit(ctx, "live")) // b's copy was stored after all
		mustReserve(t, a, "live", Duplicate)
	})

	t.Run("window", func(t *testing.T) {
		if w := a.TakeOverWindow(); w != 2*cfg.ReserveTTL {
			t.Fatalf("TakeOverWindow %v, want twice ReserveTTL %v", w, cfg.ReserveTTL)
		}
	})

	t.Run("closed", func(t *testing.T) {
		_, jsD := srv.Connect(t)
		d := openKV(t, jsD, cfg)
		must(t, d.Close(ctx))
		if _, _, err := d.TakeOver(ctx, "k"); err == nil {
			t.Fatal("TakeOver after Close: no error")
		}
	})
}
