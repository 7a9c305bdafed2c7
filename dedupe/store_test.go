package dedupe

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Every store runs the conformance suite with these windows. They are in
// whole seconds because JetStream's per-message TTL has second granularity.
const (
	suiteReserveTTL = time.Second
	suiteTTL        = 3 * time.Second
)

// harness makes stores for testStore.
type harness struct {
	// open returns a fresh, empty store with the given windows, closed
	// when the test ends.
	open func(t *testing.T, ttl, reserveTTL time.Duration) Store
	// tick lets time pass between two polls: a fake clock step for the
	// memory store, a short wait for a server-backed one.
	tick func()
	// now reads the clock the store's windows are measured on.
	now func() time.Time
}

// eventually polls cond, calling h.tick between attempts, until it holds or
// 20 s of wall time pass.
func (h harness) eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		h.tick()
	}
}

func mustReserve(t *testing.T, s Store, key string, want Outcome) {
	t.Helper()
	got, err := s.Reserve(context.Background(), key)
	if err != nil {
		t.Fatalf("Reserve(%q): %v", key, err)
	}
	if got != want {
		t.Fatalf("Reserve(%q) = %v, want %v", key, got, want)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// oddKeys are keys that stress the KV encoding: empty, separators and
// wildcards of NATS subjects, the escape byte, non-UTF-8, and pairs that a
// careless escaping would map onto each other.
var oddKeys = []string{
	"", " ", ".", "..", "a.b", "a=2Eb", "=", "==", "=H", "*", ">", "a.*.>", "\x00", "\xff\xfe",
	"ORDERS:1234", "orders/1234", "Ünïcødé-键", "a b\tc\r\n", "A", "a", "$KV.x", "_INBOX.x",
	strings.Repeat("k", 300), strings.Repeat("é", 600), strings.Repeat("x", 10_000),
	strings.Repeat("x", 10_000) + "y",
}

// testStore is the conformance suite every Store implementation passes.
func testStore(t *testing.T, h harness) {
	ctx := context.Background()

	t.Run("lifecycle", func(t *testing.T) {
		type step struct {
			op   string // reserve, commit, release
			key  string
			want Outcome // for reserve
		}
		cases := []struct {
			name  string
			steps []step
		}{
			{"first reserve wins", []step{{"reserve", "k", Reserved}, {"reserve", "k", InFlight}, {"reserve", "k", InFlight}}},
			{"commit makes duplicate", []step{{"reserve", "k", Reserved}, {"commit", "k", 0}, {"reserve", "k", Duplicate}}},
			{"release frees the key", []step{{"reserve", "k", Reserved}, {"release", "k", 0}, {"reserve", "k", Reserved}, {"reserve", "k", InFlight}}},
			{"release never undoes a commit", []step{{"reserve", "k", Reserved}, {"commit", "k", 0}, {"release", "k", 0}, {"reserve", "k", Duplicate}}},
			{"commit without reservation", []step{{"commit", "k", 0}, {"reserve", "k", Duplicate}}},
			{"release of unknown key", []step{{"release", "k", 0}, {"reserve", "k", Reserved}}},
			{"double commit", []step{{"reserve", "k", Reserved}, {"commit", "k", 0}, {"commit", "k", 0}, {"reserve", "k", Duplicate}}},
			{"release twice then reserve", []step{{"reserve", "k", Reserved}, {"release", "k", 0}, {"release", "k", 0}, {"reserve", "k", Reserved}, {"commit", "k", 0}, {"reserve", "k", Duplicate}}},
			{"keys are independent", []step{{"reserve", "a", Reserved}, {"commit", "a", 0}, {"reserve", "A", Reserved}, {"reserve", "b", Reserved}, {"reserve", "a", Duplicate}}},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				s := h.open(t, suiteTTL, suiteReserveTTL)
				for i, st := range tc.steps {
					switch st.op {
					case "reserve":
						got, err := s.Reserve(ctx, st.key)
						if err != nil || got != st.want {
							t.Fatalf("step %d: Reserve(%q) = %v, %v; want %v", i, st.key, got, err, st.want)
						}
					case "commit":
						if err := s.Commit(ctx, st.key); err != nil {
							t.Fatalf("step %d: Commit(%q): %v", i, st.key, err)
						}
					case "release":
						if err := s.Release(ctx, st.key); err != nil {
							t.Fatalf("step %d: Release(%q): %v", i, st.key, err)
						}
					}
				}
			})
		}
	})

	t.Run("odd keys are distinct", func(t *testing.T) {
		s := h.open(t, suiteTTL, suiteReserveTTL)
		for _, k := range oddKeys {
			mustReserve(t, s, k, Reserved)
		}
		for i, k := range oddKeys {
			if i%2 == 0 {
				must(t, s.Commit(ctx, k))
			}
		}
		for i, k := range oddKeys {
			want := InFlight
			if i%2 == 0 {
				want = Duplicate
			}
			mustReserve(t, s, k, want)
		}
		for i, k := range oddKeys {
			if i%2 == 1 {
				must(t, s.Release(ctx, k))
				mustReserve(t, s, k, Reserved)
			}
		}
	})

	t.Run("reservation expires", func(t *testing.T) {
		s := h.open(t, suiteTTL, suiteReserveTTL)
		mustReserve(t, s, "crashed", Reserved)
		mustReserve(t, s, "crashed", InFlight)
		h.eventually(t, "reservation to expire", func() bool {
			o, err := s.Reserve(ctx, "crashed")
			must(t, err)
			if o == Duplicate {
				t.Fatal("an expired reservation reads as Duplicate")
			}
			return o == Reserved
		})
		mustReserve(t, s, "crashed", InFlight)
	})

	t.Run("commit outlives the reservation window and then expires", func(t *testing.T) {
		s := h.open(t, suiteTTL, suiteReserveTTL)
		mustReserve(t, s, "done", Reserved)
		must(t, s.Commit(ctx, "done"))
		start := h.now()
		var seen time.Duration // how much store time passed while Duplicate held
		h.eventually(t, "commit to expire", func() bool {
			o, err := s.Reserve(ctx, "done")
			must(t, err)
			switch o {
			case Duplicate:
				seen = h.now().Sub(start)
				return false
			case Reserved:
				return true
			}
			t.Fatalf("committed key read as %v", o)
			return false
		})
		// Generous bound: the server's expiry has second granularity, but a
		// commit must clearly outlive ReserveTTL.
		if seen < 2*suiteReserveTTL {
			t.Fatalf("commit read as Duplicate for only %v, want about %v", seen, suiteTTL)
		}
	})

	t.Run("concurrent reserve has one winner", func(t *testing.T) {
		s := h.open(t, time.Hour, 30*time.Minute) // no expiry mid-test, however slow the machine
		const workers, keys = 32, 50
		var reserved [keys]atomic.Int32
		parallel(t, workers, func(w int) error {
			for k := 0; k < keys; k++ {
				key := fmt.Sprintf("same-%d", (k+w)%keys)
				o, err := s.Reserve(ctx, key)
				if err != nil {
					return err
				}
				switch o {
				case Reserved:
					reserved[(k+w)%keys].Add(1)
				case InFlight:
				default:
					return fmt.Errorf("Reserve(%q) = %v", key, o)
				}
			}
			return nil
		})
		expectOnce(t, "same-%d reserved", reserved[:])
	})

	t.Run("concurrent full cycles", func(t *testing.T) {
		// Workers race through reserve → commit | release on shared keys;
		// every key must end committed exactly once as seen by winners.
		s := h.open(t, time.Hour, 30*time.Minute) // no expiry mid-test, however slow the machine
		const workers, keys = 16, 40
		var commits [keys]atomic.Int32
		parallel(t, workers, func(w int) error {
			for k := 0; k < keys; k++ {
				i := (k*7 + w) % keys
				key := fmt.Sprintf("cycle-%d", i)
				for {
					o, err := s.Reserve(ctx, key)
					if err != nil {
						return err
					}
					if o == Duplicate {
						break
					}
					if o == InFlight {
						continue // the holder commits or releases soon
					}
					// A failed "publish" for odd workers: release and retry.
					if w%2 == 1 {
						if err := s.Release(ctx, key); err != nil {
							return err
						}
						continue
					}
					commits[i].Add(1)
					if err := s.Commit(ctx, key); err != nil {
						return err
					}
					break
				}
			}
			return nil
		})
		expectOnce(t, "cycle-%d committed by a winner", commits[:])
	})

	t.Run("closed", func(t *testing.T) {
		s := h.open(t, suiteTTL, suiteReserveTTL)
		must(t, s.Close(ctx))
		if _, err := s.Reserve(ctx, "k"); !errors.Is(err, ErrClosed) {
			t.Errorf("Reserve after Close: %v, want ErrClosed", err)
		}
		if err := s.Commit(ctx, "k"); !errors.Is(err, ErrClosed) {
			t.Errorf("Commit after Close: %v, want ErrClosed", err)
		}
		if err := s.Release(ctx, "k"); !errors.Is(err, ErrClosed) {
			t.Errorf("Release after Close: %v, want ErrClosed", err)
		}
		if err := s.Close(ctx); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

// parallel runs f(0..n-1) in n goroutines and fails t with their errors.
func parallel(t *testing.T, n int, f func(w int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for w := 0; w < n; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := f(w); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		t.FailNow()
	}
}

// expectOnce checks that every counter is 1; what formats the key index.
func expectOnce(t *testing.T, what string, counts []atomic.Int32) {
	t.Helper()
	for i := range counts {
		if n := counts[i].Load(); n != 1 {
			t.Errorf(what+" %d times, want once", i, n)
		}
	}
}
