package dedupe

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/jspub"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

func mustCheck(t *testing.T, s Checker, key string, want Outcome) {
	t.Helper()
	got, err := s.Check(context.Background(), key)
	if err != nil {
		t.Fatalf("Check(%q): %v", key, err)
	}
	if got != want {
		t.Fatalf("Check(%q) = %v, want %v", key, got, want)
	}
}

// bucketMsgs is the number of messages in the bucket's stream.
func bucketMsgs(t *testing.T, js jetstream.JetStream, bucket string) uint64 {
	t.Helper()
	st, err := js.Stream(context.Background(), "KV_"+bucket)
	must(t, err)
	info, err := st.Info(context.Background())
	must(t, err)
	return info.State.Msgs
}

// TestKVCheck is the check-then-commit protocol against the reservation
// protocol's states, on two stores over one bucket (two replicas).
func TestKVCheck(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	_, jsA := srv.Connect(t)
	_, jsB := srv.Connect(t)

	t.Run("states", func(t *testing.T) {
		bucket := newBucket()
		a := openKV(t, jsA, suiteKVConfig(bucket))
		b := openKV(t, jsB, suiteKVConfig(bucket))
		mustCheck(t, a, "new", Reserved)
		mustCheck(t, a, "new", Reserved) // nothing was recorded
		if n := bucketMsgs(t, jsA, bucket); n != 0 {
			t.Fatalf("Check wrote %d messages, want none", n)
		}
		must(t, a.Commit(ctx, "new"))
		mustCheck(t, a, "new", Duplicate)
		mustCheck(t, b, "new", Duplicate)
		mustReserve(t, b, "new", Duplicate)

		mustReserve(t, b, "held", Reserved) // a reservation of another target's protocol
		mustCheck(t, a, "held", InFlight)
		mustCheck(t, b, "held", InFlight) // this store's own, too
		must(t, b.Release(ctx, "held"))
		mustCheck(t, a, "held", Reserved) // a purge marker reads as free
		mustReserve(t, a, "held", Reserved)
		must(t, a.Commit(ctx, "held"))
		mustCheck(t, b, "held", Duplicate)
	})

	t.Run("a reservation expires, a commit expires", func(t *testing.T) {
		h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }, now: time.Now}
		a := openKV(t, jsA, suiteKVConfig(newBucket()))
		mustReserve(t, a, "crashed", Reserved)
		h.eventually(t, "the reservation to expire", func() bool {
			o, err := a.Check(ctx, "crashed")
			must(t, err)
			return o == Reserved
		})
		must(t, a.Commit(ctx, "done"))
		h.eventually(t, "the commit to expire", func() bool {
			o, err := a.Check(ctx, "done")
			must(t, err)
			return o == Reserved
		})
	})

	t.Run("odd keys in one batch", func(t *testing.T) {
		bucket := newBucket()
		a := openKV(t, jsA, suiteKVConfig(bucket))
		b := openKV(t, jsB, suiteKVConfig(bucket))
		for i, k := range oddKeys {
			switch i % 3 {
			case 0:
				must(t, a.Commit(ctx, k))
			case 1:
				mustReserve(t, a, k, Reserved)
			}
		}
		// Every key at once and each twice, so that batches hold many
		// keys, repeats among them, found and absent ones interleaved.
		want := []Outcome{Duplicate, InFlight, Reserved}
		parallel(t, 2*len(oddKeys), func(w int) error {
			i := w % len(oddKeys)
			o, err := b.Check(ctx, oddKeys[i])
			if err != nil {
				return fmt.Errorf("Check(key %d): %w", i, err)
			}
			if o != want[i%3] {
				return fmt.Errorf("Check(key %d) = %v, want %v", i, o, want[i%3])
			}
			return nil
		})
	})

	t.Run("concurrent check and commit", func(t *testing.T) {
		// Workers of two replicas race through check → "publish" → commit
		// on shared keys: every key is published at least once and is a
		// Duplicate for every replica afterwards; the copies of racing
		// attempts are what the target's window drops.
		bucket := newBucket()
		stores := []*KV{
			openKV(t, jsA, KVConfig{Bucket: bucket, TTL: time.Hour, ReserveTTL: 30 * time.Minute}),
			openKV(t, jsB, KVConfig{Bucket: bucket, TTL: time.Hour, ReserveTTL: 30 * time.Minute}),
		}
		const workers, keys = 16, 300
		var published [keys]atomic.Int32
		parallel(t, workers, func(w int) error {
			s := stores[w%2]
			for k := range keys {
				i := (k*7 + w) % keys
				key := fmt.Sprint("cycle-", i)
				o, err := s.Check(ctx, key)
				if err != nil {
					return err
				}
				switch o {
				case Duplicate:
					continue
				case Reserved:
					published[i].Add(1)
					if err := s.Commit(ctx, key); err != nil {
						return err
					}
				default:
					return fmt.Errorf("Check(%q) = %v", key, o)
				}
			}
			return nil
		})
		var copies int32
		for i := range published {
			n := published[i].Load()
			if n == 0 {
				t.Errorf("cycle-%d never published", i)
			}
			copies += n - 1
			for _, s := range stores {
				mustCheck(t, s, fmt.Sprint("cycle-", i), Duplicate)
			}
		}
		t.Logf("%d keys, %d copies published by racing attempts", keys, copies)
	})

	t.Run("unanswered", func(t *testing.T) {
		// The stream stops answering direct gets (a swallowing responder
		// takes its place) and the leader is not asked (the wait before
		// asking it is the whole timeout; TestKVCheckDirectGetUnanswered
		// has it asked): Check fails within the timeout, with an error
		// that says the read may be answered late, and the store goes on.
		nc, js := srv.Connect(t)
		bucket := newBucket()
		a := openKV(t, js, KVConfig{Bucket: bucket, TTL: time.Hour, ReserveTTL: 30 * time.Minute, Timeout: time.Second})
		a.directWait = a.check.timeout
		must(t, a.Commit(ctx, "done"))
		swallowed, serve := swallowDirectGets(t, nc, js, bucket, "$JS.API.DIRECT.GET.KV_%s")
		start := time.Now()
		if _, err := a.Check(ctx, "done"); !errors.Is(err, jspub.ErrNoReply) {
			t.Fatalf("Check without an answer: %v, want an error wrapping jspub.ErrNoReply", err)
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Fatalf("Check failed after %v, want about the 1s timeout", took)
		}
		if swallowed.Load() == 0 {
			t.Fatal("no batch direct get was made: the test tests nothing")
		}
		serve()
		h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }, now: time.Now}
		h.eventually(t, "Check to answer again", func() bool {
			o, err := a.Check(ctx, "done")
			return err == nil && o == Duplicate
		})
	})

	t.Run("refused batch", func(t *testing.T) {
		// A stream that answers with a status the batch cannot use (here:
		// a responder that refuses every request) fails the Checks of the
		// batch, naming the status.
		nc, js := srv.Connect(t)
		bucket := newBucket()
		a := openKV(t, js, suiteKVConfig(bucket))
		interceptDirectGets(t, nc, js, bucket, "$JS.API.DIRECT.GET.KV_%s", func(m *nats.Msg) {
			r := nats.NewMsg(m.Reply)
			r.Header.Set("Status", "408")
			r.Header.Set("Description", "Bad Request")
			_ = m.RespondMsg(r)
		})
		if _, err := a.Check(ctx, "k"); !errors.Is(err, errBatchStatus) {
			t.Fatalf("Check refused: %v, want errBatchStatus", err)
		}
	})

	t.Run("owed commit", func(t *testing.T) {
		// A commit that failed is owed and written in the background;
		// meanwhile Check answers Duplicate without the bucket.
		a := openKV(t, jsA, suiteKVConfig(newBucket()))
		a.owed.owe(a.subject("k"), owedCommit, time.Hour, 0)
		mustCheck(t, a, "k", Duplicate)
	})

	t.Run("closed", func(t *testing.T) {
		a, err := NewJetStream(ctx, jsA, suiteKVConfig(newBucket()))
		must(t, err)
		must(t, a.Close(ctx))
		if _, err := a.Check(ctx, "k"); !errors.Is(err, ErrClosed) {
			t.Fatalf("Check after Close: %v, want ErrClosed", err)
		}
		if w := a.CheckWindow(); w != suiteReserveTTL {
			t.Fatalf("CheckWindow = %v, want ReserveTTL %v", w, suiteReserveTTL)
		}
	})
}

// TestKVCheckAsync: CheckAsync and CommitAsync answer as Check and Commit
// do, through their callbacks.
func TestKVCheckAsync(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	a := openKV(t, js, suiteKVConfig(newBucket()))
	check := func(key string) (Outcome, error) {
		type res struct {
			o   Outcome
			err error
		}
		ch := make(chan res, 1)
		a.CheckAsync(ctx, key, func(o Outcome, err error) { ch <- res{o, err} })
		select {
		case r := <-ch:
			return r.o, r.err
		case <-time.After(10 * time.Second):
			t.Fatalf("CheckAsync(%q) never answered", key)
			return 0, nil
		}
	}
	commit := func(key string) error {
		ch := make(chan error, 1)
		a.CommitAsync(ctx, key, func(err error) { ch <- err })
		select {
		case err := <-ch:
			return err
		case <-time.After(10 * time.Second):
			t.Fatalf("CommitAsync(%q) never answered", key)
			return nil
		}
	}
	if o, err := check("k"); o != Reserved || err != nil {
		t.Fatalf("CheckAsync(new) = %v, %v; want reserved", o, err)
	}
	must(t, commit("k"))
	if o, err := check("k"); o != Duplicate || err != nil {
		t.Fatalf("CheckAsync(committed) = %v, %v; want duplicate", o, err)
	}
	mustReserve(t, a, "held", Reserved)
	if o, err := check("held"); o != InFlight || err != nil {
		t.Fatalf("CheckAsync(reserved) = %v, %v; want in_flight", o, err)
	}
	must(t, a.Close(ctx))
	if _, err := check("k"); !errors.Is(err, ErrClosed) {
		t.Fatalf("CheckAsync after Close: %v, want ErrClosed", err)
	}
	if err := commit("k"); !errors.Is(err, ErrClosed) {
		t.Fatalf("CommitAsync after Close: %v, want ErrClosed", err)
	}
}

// TestKVCommitAsyncOwed: a CommitAsync whose write fails (the server is
// gone) is owed: the store's Check answers Duplicate without the bucket,
// and the commit lands once the server is back (another replica reads it).
func TestKVCommitAsyncOwed(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	srv := natstest.StartDir(t, dir)
	_, js := srv.Connect(t, nats.ReconnectWait(50*time.Millisecond), nats.MaxReconnects(-1))
	cfg := KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 30 * time.Minute, Timeout: time.Second}
	a := openKV(t, js, cfg)
	srv.Shutdown()
	srv.WaitForShutdown()
	ch := make(chan error, 1)
	a.CommitAsync(ctx, "k", func(err error) { ch <- err })
	select {
	case err := <-ch:
		if err == nil {
			t.Fatal("CommitAsync with the server gone succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("CommitAsync never answered")
	}
	mustCheck(t, a, "k", Duplicate) // owed: answered without a read
	srv2 := srv.Restart(t)
	_, js2 := srv2.Connect(t)
	b := openKV(t, js2, cfg)
	h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }}
	h.eventually(t, "the owed commit to land", func() bool {
		o, err := b.Check(ctx, "k")
		return err == nil && o == Duplicate
	})
}

// TestKVCheckDirectGetUnanswered makes every direct get of the bucket go
// unanswered (the stream stops serving them and a subscriber that never
// replies takes them, as a frozen replica would): a batch of Checks must
// then ask the stream's leader after Timeout/4 and answer as usual, as
// Reserve's lookup does, instead of failing every key of the batch after
// the request timeout.
func TestKVCheckDirectGetUnanswered(t *testing.T) {
	ctx := context.Background()
	a, swallowed := frozenDirectGets(t, "$JS.API.DIRECT.GET.KV_%s")

	mustCheck(t, a, "committed", Duplicate)
	mustCheck(t, a, "held", InFlight)
	mustCheck(t, a, "released", Reserved)
	mustCheck(t, a, "new", Reserved)
	// One batch of several keys, some asked twice.
	keys := []string{"committed", "held", "released", "new", "committed", "new"}
	want := []Outcome{Duplicate, InFlight, Reserved, Reserved, Duplicate, Reserved}
	type answer struct {
		i   int
		o   Outcome
		err error
	}
	answers := make(chan answer, len(keys))
	for i, k := range keys {
		a.CheckAsync(ctx, k, func(o Outcome, err error) { answers <- answer{i, o, err} })
	}
	for range keys {
		select {
		case r := <-answers:
			if r.err != nil || r.o != want[r.i] {
				t.Errorf("CheckAsync(%q) = %v, %v; want %v", keys[r.i], r.o, r.err, want[r.i])
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a CheckAsync was not answered within 10s")
		}
	}
	if swallowed.Load() == 0 {
		t.Fatal("no batched direct get was made: the test tests nothing")
	}
}
