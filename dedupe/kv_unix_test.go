//go:build unix

package dedupe

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/cellbridge/cellbridge/internal/jspub"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
)

// TestKVReserveLostReply injects lost replies with a real server: the
// server process is frozen (SIGSTOP) while two Reserve calls of the key are
// sent, so both fail with jspub.ErrNoReply after the request timeout, and
// continued afterwards, when it stores the first of the two writes (the
// second is refused: the key exists). The next Reserve of this store takes
// its own reservation over at once instead of waiting ReserveTTL; another
// store (a second replica) sees it as InFlight, and the reservation still
// behaves as one: Commit makes it a Duplicate for both.
func TestKVReserveLostReply(t *testing.T) {
	c := natstest.StartCluster(t, 1)
	ncA, jsA := c.Connect(t, nats.Name("replica-a"))
	_, jsB := c.Connect(t, nats.Name("replica-b"))
	bucket := newBucket()
	// ReserveTTL an hour: a Reserved answer within the test can only be
	// the take-over, never an expiry.
	cfg := KVConfig{Bucket: bucket, TTL: 2 * time.Hour, ReserveTTL: time.Hour, Timeout: 300 * time.Millisecond}
	a := openKV(t, jsA, cfg)
	b := openKV(t, jsB, cfg)
	ctx := context.Background()

	c.Stop(0)
	// SIGSTOP takes effect a moment later: wait until a ping goes
	// unanswered, so that both Reserves meet the frozen server.
	poll.Eventually(t, 10*time.Second, "the server frozen", func() bool { return ncA.FlushTimeout(100*time.Millisecond) != nil })
	for i := range 2 {
		_, err := a.Reserve(ctx, "k")
		if !errors.Is(err, jspub.ErrNoReply) {
			c.Cont(0)
			t.Fatalf("Reserve %d against a frozen server: err = %v, want a lost reply", i, err)
		}
	}
	c.Cont(0)
	// The continued server reads what waited on a's connection in order:
	// the first write (stored), the second call's read. A ping behind them
	// comes back once both are done; only then may the other replica touch
	// the key (its requests come on another connection, which the server
	// may read first).
	if err := ncA.FlushTimeout(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	mustReserve(t, b, "k", InFlight)
	start := time.Now()
	mustReserve(t, a, "k", Reserved)
	if took := time.Since(start); took > 2*time.Second {
		t.Errorf("the take-over took %v", took)
	}
	// Taken over once: a second Reserve of the same store is a concurrent
	// attempt, InFlight like the other replica's.
	mustReserve(t, a, "k", InFlight)
	mustReserve(t, b, "k", InFlight)
	must(t, a.Commit(ctx, "k"))
	mustReserve(t, a, "k", Duplicate)
	mustReserve(t, b, "k", Duplicate)

	// A reservation of this store that was answered is never taken over:
	// another call of the same store gets InFlight.
	mustReserve(t, a, "k2", Reserved)
	mustReserve(t, a, "k2", InFlight)
}

// TestKVOwedWrites injects failed Commits and Releases with a real server
// (frozen with SIGSTOP while they are sent, so they time out): each would
// leave a reservation that blocks the key for every replica until
// ReserveTTL (an hour here). The store writes them again in the background
// once the server answers: the other replica's Reserve sees the commit
// (Duplicate) and the released key (Reserved) within seconds. Meanwhile the
// failing store answers its own Reserve of the committed key without the
// bucket (Duplicate), and takes over a reservation it owes a release for
// (Reserved), which the other replica then sees as InFlight.
func TestKVOwedWrites(t *testing.T) {
	c := natstest.StartCluster(t, 1)
	ncA, jsA := c.Connect(t, nats.Name("replica-a"))
	_, jsB := c.Connect(t, nats.Name("replica-b"))
	cfg := KVConfig{Bucket: newBucket(), TTL: 2 * time.Hour, ReserveTTL: time.Hour, Timeout: 300 * time.Millisecond}
	a := openKV(t, jsA, cfg)
	b := openKV(t, jsB, cfg)
	ctx := context.Background()

	mustReserve(t, a, "published", Reserved)
	mustReserve(t, a, "failed", Reserved)
	mustReserve(t, a, "retried", Reserved)
	c.Stop(0)
	poll.Eventually(t, 10*time.Second, "the server frozen", func() bool { return ncA.FlushTimeout(100*time.Millisecond) != nil })
	if err := a.Commit(ctx, "published"); !errors.Is(err, jspub.ErrNoReply) {
		c.Cont(0)
		t.Fatalf("Commit against a frozen server: err = %v, want a lost reply", err)
	}
	for _, k := range []string{"failed", "retried"} {
		if err := a.Release(ctx, k); err == nil {
			c.Cont(0)
			t.Fatalf("Release of %s against a frozen server succeeded", k)
		}
	}
	// Answered without the bucket (it is still frozen).
	mustReserve(t, a, "published", Duplicate)
	c.Cont(0)
	// The caller's retry of "retried" takes its reservation over (or, when
	// the background release is purging it at that moment, is InFlight
	// once and reserves anew after it): Reserved within seconds, not after
	// ReserveTTL.
	poll.Eventually(t, 10*time.Second, "the released reservation reserved again by its store", func() bool {
		o, err := a.Reserve(ctx, "retried")
		return err == nil && o == Reserved
	})
	mustReserve(t, b, "retried", InFlight)

	start := time.Now()
	poll.Eventually(t, 10*time.Second, "the owed commit written", func() bool {
		o, err := b.Reserve(ctx, "published")
		return err == nil && o == Duplicate
	})
	poll.Eventually(t, 10*time.Second, "the owed release written", func() bool {
		o, err := b.Reserve(ctx, "failed")
		return err == nil && o == Reserved
	})
	t.Logf("owed commit and release written %v after the server answered again", time.Since(start).Round(time.Millisecond))
	mustReserve(t, a, "failed", InFlight) // b's reservation now
	mustReserve(t, a, "published", Duplicate)
	mustReserve(t, b, "retried", InFlight) // still a's
}

// TestKVLostReservationReleased: a Reserve whose reply is lost (the server
// frozen while it is sent) leaves a reservation nobody holds. The store
// that wrote it leaves it to its own Reserve for lostGrace (ReserveTTL/10,
// 2s here; TestKVReserveLostReply takes it over within that time), then
// releases it, so that another replica gets the key within seconds instead
// of after ReserveTTL (20s here).
func TestKVLostReservationReleased(t *testing.T) {
	c := natstest.StartCluster(t, 1)
	ncA, jsA := c.Connect(t, nats.Name("replica-a"))
	_, jsB := c.Connect(t, nats.Name("replica-b"))
	cfg := KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 20 * time.Second, Timeout: 300 * time.Millisecond}
	a := openKV(t, jsA, cfg)
	b := openKV(t, jsB, cfg)
	ctx := context.Background()

	c.Stop(0)
	poll.Eventually(t, 10*time.Second, "the server frozen", func() bool { return ncA.FlushTimeout(100*time.Millisecond) != nil })
	if _, err := a.Reserve(ctx, "k"); !errors.Is(err, jspub.ErrNoReply) {
		c.Cont(0)
		t.Fatalf("Reserve against a frozen server: err = %v, want a lost reply", err)
	}
	lost := time.Now()
	c.Cont(0)
	if err := ncA.FlushTimeout(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	mustReserve(t, b, "k", InFlight) // the lost write was stored
	poll.Eventually(t, 10*time.Second, "the lost reservation released", func() bool {
		o, err := b.Reserve(ctx, "k")
		return err == nil && o == Reserved
	})
	t.Logf("the other store reserved the key %v after the lost reply", time.Since(lost).Round(time.Millisecond))
	mustReserve(t, a, "k", InFlight) // b holds it now; a's lost value is gone
}
