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
// its first inFlight calls (another holder's reservation) and whose
// TakeOver takes that reservation: it counts the calls.
type takerStore struct {
	dedupe.Store
	inFlight atomic.Int64
	takes    atomic.Int64
}

func (s *takerStore) Local() bool { return false }

func (s *takerStore) Reserve(ctx context.Context, key string) (dedupe.Outcome, error) {
	if s.inFlight.Add(-1) >= 0 {
		return dedupe.InFlight, nil
	}
	return s.Store.Reserve(ctx, key)
}

func (s *takerStore) TakeOver(ctx context.Context, key string) (dedupe.Outcome, error) {
	s.takes.Add(1)
	s.inFlight.Store(0)
	return s.Store.Reserve(ctx, key)
}

// windowSink is a test sink whose targets drop repeats within a window,
// as a JetStream stream does.
type windowSink struct{ *testSink }

func (windowSink) DuplicateWindow(context.Context, router.Target) (time.Duration, error) {
	return 2 * time.Minute, nil
}

// TestTakeOverPreviousOwnersReservation: a message of an ordered epoch
// whose key another holder reserved takes the reservation over at once
// when its target drops repeats; without an epoch, or to a target without
// a window, it waits (retries) as before; a revoked epoch's message is not
// published at all (docs/guarantees.md, section 8, T1).
func TestTakeOverPreviousOwnersReservation(t *testing.T) {
	for _, tc := range []struct {
		name              string
		epoch, window     bool
		revoked           bool
		takes, retried    float64
		published, metric int
	}{
		{name: "ordered epoch, target with a window", epoch: true, window: true, takes: 1, published: 1, metric: 1},
		{name: "no epoch (ordering: none)", window: true, retried: 3, published: 1},
		{name: "target without a window", epoch: true, retried: 3, published: 1},
		{name: "revoked epoch", epoch: true, window: true, revoked: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := &takerStore{Store: dedupe.NewMemory(dedupe.MemoryConfig{})}
			st.inFlight.Store(3)
			sink := newTestSink()
			var s Sink = sink
			if tc.window {
				s = windowSink{sink}
			}
			e := newEnvSink(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, rulesDoc(1, "", 0), s, st)
			m, a := msg("t", keyFor(20, 1), "{}")
			if tc.epoch {
				m.Epoch = &Epoch{}
				if tc.revoked {
					m.Epoch.Revoke()
				}
			}
			_ = e.p.Handle(context.Background(), m, a.ack)
			err := a.result(t)
			switch {
			case tc.revoked && !errors.Is(err, ErrRevoked):
				t.Fatalf("settled with %v, want ErrRevoked", err)
			case !tc.revoked && err != nil:
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
