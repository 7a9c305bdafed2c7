package bridge

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

// takerStore is a remote-like store whose Reserve answers InFlight for
// its first inFlight calls (another holder's reservation). Its TakeOver
// replaces that reservation, or, while selfHeld is positive, answers
// InFlight as for a reservation of its own held by another caller.
type takerStore struct {
	dedupe.Store
	inFlight, selfHeld atomic.Int64
	takes              atomic.Int64
	// revoke, when set, is revoked by the first Reserve (the epoch ends
	// while the key is found reserved).
	revoke *Epoch
}

func (s *takerStore) Local() bool { return false }

func (s *takerStore) Reserve(ctx context.Context, key string) (dedupe.Outcome, error) {
	if s.revoke != nil {
		s.revoke.Revoke()
	}
	if s.inFlight.Add(-1) >= 0 {
		return dedupe.InFlight, nil
	}
	return s.Store.Reserve(ctx, key)
}

func (s *takerStore) TakeOver(ctx context.Context, key string) (dedupe.Outcome, bool, error) {
	s.takes.Add(1)
	if s.selfHeld.Add(-1) >= 0 {
		return dedupe.InFlight, false, nil
	}
	s.inFlight.Store(0)
	o, err := s.Store.Reserve(ctx, key)
	return o, o == dedupe.Reserved, err
}

func (s *takerStore) TakeOverWindow() time.Duration { return time.Minute }

// windowSink is a test sink whose targets drop repeats within window, as a
// JetStream stream does.
type windowSink struct {
	*testSink
	window time.Duration
}

func (w windowSink) DuplicateWindow(context.Context, router.Target) (time.Duration, error) {
	return w.window, nil
}

// TestTakeOverPreviousOwnersReservation: a message of an ordered epoch
// whose key another holder reserved takes the reservation over at once
// when its target drops repeats for at least the store's TakeOverWindow;
// without an epoch, to a target without a window or with a shorter one, it
// waits (retries) as before; a TakeOver that answers InFlight is followed
// by a retry's backoff, not by another TakeOver at once; a revoked epoch's
// message is not published at all (docs/guarantees.md, section 8, T1).
func TestTakeOverPreviousOwnersReservation(t *testing.T) {
	for _, tc := range []struct {
		name              string
		epoch, revoked    bool
		revokedInReserve  bool
		window            time.Duration // 0: a sink without DuplicateWindow
		selfHeld          int64
		takes, retried    float64
		published, metric int
	}{
		{name: "ordered epoch, target with a window", epoch: true, window: 2 * time.Minute, takes: 1, published: 1, metric: 1},
		{name: "no epoch (ordering: none)", window: 2 * time.Minute, retried: 3, published: 1},
		{name: "target without a window", epoch: true, retried: 3, published: 1},
		{name: "window shorter than TakeOverWindow", epoch: true, window: 30 * time.Second, retried: 3, published: 1},
		// Each TakeOver answering InFlight costs a retry; the Reserve
		// after it finds the key reserved again and takes it over.
		{name: "TakeOver answers InFlight", epoch: true, window: 2 * time.Minute, selfHeld: 2, takes: 3, retried: 2, published: 1, metric: 1},
		{name: "revoked epoch", epoch: true, revoked: true, window: 2 * time.Minute},
		{name: "epoch revoked while the key is reserved", epoch: true, revokedInReserve: true, window: 2 * time.Minute, retried: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := &takerStore{Store: dedupe.NewMemory(dedupe.MemoryConfig{})}
			st.inFlight.Store(3)
			st.selfHeld.Store(tc.selfHeld)
			sink := newTestSink()
			var s Sink = sink
			if tc.window > 0 {
				s = windowSink{sink, tc.window}
			}
			e := newEnvSink(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, rulesDoc(1, "", 0), s, st)
			m, a := msg("t", keyFor(20, 1), "{}")
			if tc.epoch {
				m.Epoch = &Epoch{}
				if tc.revoked {
					m.Epoch.Revoke()
				}
				if tc.revokedInReserve {
					st.revoke = m.Epoch
				}
			}
			_ = e.p.Handle(context.Background(), m, a.ack)
			err := a.result(t)
			switch {
			case (tc.revoked || tc.revokedInReserve) && !errors.Is(err, ErrRevoked):
				t.Fatalf("settled with %v, want ErrRevoked", err)
			case !tc.revoked && !tc.revokedInReserve && err != nil:
				t.Fatal(err)
			}
			if n := len(sink.published()); n != tc.published {
				t.Errorf("published %d, want %d", n, tc.published)
			}
			if n := float64(st.takes.Load()); n != tc.takes {
				t.Errorf("TakeOver called %v times, want %v", n, tc.takes)
			}
			if r := counter(t, e, "t", OutcomeRetried); r != tc.retried {
				t.Errorf("retried %v, want %v", r, tc.retried)
			}
			if n := value(e.p.met.DedupeTakeovers.WithLabelValues("t")); n != float64(tc.metric) {
				t.Errorf("%s %v, want %d", MetricDedupeTakeovers, n, tc.metric)
			}
		})
	}
}

// flakyWindowSink is a windowSink whose lookups fail while failing is set.
type flakyWindowSink struct {
	windowSink
	failing *atomic.Bool
}

func (w flakyWindowSink) DuplicateWindow(ctx context.Context, tg router.Target) (time.Duration, error) {
	if w.failing.Load() {
		return 0, errors.New("stream info: timeout")
	}
	return w.windowSink.DuplicateWindow(ctx, tg)
}

// TestWindowUnknownAfterFailedLookup: a window lookup that fails leaves
// the target's window unknown, not at the last one seen (the stream may
// have been shortened or made again since): takeovers, which rely on it,
// wait until a lookup answers again.
func TestWindowUnknownAfterFailedLookup(t *testing.T) {
	var failing atomic.Bool
	sink := flakyWindowSink{windowSink{newTestSink(), 2 * time.Minute}, &failing}
	st := &takerStore{Store: dedupe.NewMemory(dedupe.MemoryConfig{})}
	e := newEnvSink(t, Config{}, rulesDoc(1, "", 0), sink, st)
	ss := e.p.target(router.Target{Broker: "nats", Subject: "cell.a.t"})
	if ss == nil {
		t.Fatal("no target state")
	}
	e.p.lookupProto(ss, time.Now().UnixNano())
	if w := ss.proto.window.Load(); w != int64(2*time.Minute) {
		t.Fatalf("window %v after a good lookup", time.Duration(w))
	}
	failing.Store(true)
	e.p.lookupProto(ss, time.Now().UnixNano())
	if w := ss.proto.window.Load(); w != 0 {
		t.Fatalf("window %v after a failed lookup, want 0 (unknown)", time.Duration(w))
	}
	m, _ := msg("t", keyFor(20, 1), "{}")
	m.Epoch = &Epoch{}
	tk := &task{}
	tk.m = m
	if e.p.mayTakeOver(tk, ss) {
		t.Fatal("takeover allowed on a window no longer known")
	}
}
