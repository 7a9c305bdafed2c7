package bridge

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
)

// A target whose publishes fail and succeed by turns (a stream leader
// election) keeps /readyz at 503 without flapping; once only successes
// come, it is ready again within recoverHold plus a sample.
func TestReadinessDoesNotFlapWhileTargetFailsIntermittently(t *testing.T) {
	s := newTestSink()
	var n, flaky atomic.Int64
	flaky.Store(1)
	s.fail = func(o *Outgoing, attempt int) error {
		if flaky.Load() == 1 && n.Add(1)%2 == 0 {
			return errors.New("no response from stream")
		}
		return nil
	}
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 5 * time.Millisecond}}, rulesDoc(1, "", 0), s, nil)
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // a steady trickle of messages over many keys
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
			}
			m, a := msg("t", keyFor(i%50, i), "{}")
			_ = e.p.Handle(context.Background(), m, a.ack)
		}
	}()
	eventually(t, "target reported failing", func() bool { ok, _ := e.p.Health().Ready(); return !ok })
	for range 12 { // 3s sampled every 250ms, as the check does
		if ok, why := e.p.Health().Ready(); ok {
			t.Fatalf("ready while the target still fails half of its publishes: %s", why)
		}
		time.Sleep(250 * time.Millisecond)
	}
	flaky.Store(0)
	recoveredAt := time.Now()
	eventually(t, "ready after the target recovered", func() bool { ok, _ := e.p.Health().Ready(); return ok })
	t.Logf("ready %v after the last failure", time.Since(recoveredAt).Round(10*time.Millisecond))
	close(stop)
	<-done
	if v := value(e.p.met.TargetFailing.WithLabelValues("nats", "cell.rz00.t")); v != 0 {
		t.Fatalf("cellbridge_target_failing still %v", v)
	}
}

// A publish that never confirms (a hung target) shows as stall age, and
// /readyz fails with the rule and the age once it passes stallTimeout;
// parked messages do not count.
func TestReadinessReportsStall(t *testing.T) {
	s := newTestSink()
	s.block = make(chan struct{})
	e := newEnv(t, Config{StallTimeout: 200 * time.Millisecond, HeldRecheck: 20 * time.Millisecond},
		rulesDoc(1, `"40-44"`, 0), s, nil)
	parked, pa := msg("t", keyFor(41, 1), "{}")
	_ = e.p.Handle(context.Background(), parked, pa.ack)
	eventually(t, "parked", func() bool { return e.p.heldN.Load() == 1 })
	time.Sleep(400 * time.Millisecond) // older than stallTimeout, but parked
	e.p.updateGauges()
	if ok, why := e.p.Health().Ready(); !ok {
		t.Fatalf("a parked message made the bridge unready: %s", why)
	}
	m, a := msg("t", keyFor(7, 2), "{}") // its publish never confirms
	_ = e.p.Handle(context.Background(), m, a.ack)
	eventually(t, "stall reported", func() bool {
		ok, why := e.p.Health().Ready()
		return !ok && strings.Contains(why, "rule t: the oldest message accepted") && strings.Contains(why, "stallTimeout 200ms")
	})
	if v := value(e.p.met.StallAge.WithLabelValues("t")); v < 0.2 {
		t.Fatalf("cellbridge_stall_age_seconds %v, want at least the stall timeout", v)
	}
	close(s.block)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ready once the message settled", func() bool { ok, _ := e.p.Health().Ready(); return ok })
}

// A source that reports it cannot deliver makes the bridge unready with the
// rule named, and ready again when it clears.
func TestReadinessSourceFailing(t *testing.T) {
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), nil, nil)
	h := e.p.Health()
	h.SourceFailing("t", errors.New("no heartbeat from the server for 2s"))
	ok, why := h.Ready()
	if ok || !strings.Contains(why, "source of rule t: no heartbeat from the server for 2s") {
		t.Fatalf("ready=%v why=%q", ok, why)
	}
	if v := value(e.p.met.SourceFailing.WithLabelValues("t")); v != 1 {
		t.Fatalf("cellbridge_source_failing %v", v)
	}
	h.SourceFailing("t", nil)
	if ok, why := h.Ready(); !ok {
		t.Fatalf("still unready: %s", why)
	}
}

// A source failure that says nothing waits to be delivered (an idle
// consumer without a leader) is shown in cellbridge_source_failing but
// leaves the bridge ready; the same failure without it does not.
func TestReadinessIgnoresSourceFailureWithNothingPending(t *testing.T) {
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), nil, nil)
	h := e.p.Health()
	if ok, why := h.Ready(); !ok {
		t.Fatalf("not ready at the start: %s", why)
	}
	h.SourceFailing("t", fmt.Errorf("standby probe: no responders (%w)", ErrNothingPending))
	if ok, why := h.Ready(); !ok {
		t.Fatalf("an idle source's failure made the bridge unready: %s", why)
	}
	if v := value(e.p.met.SourceFailing.WithLabelValues("t")); v != 1 {
		t.Fatalf("cellbridge_source_failing %v, want 1", v)
	}
	h.SourceFailing("t", errors.New("standby probe: no responders"))
	if ok, why := h.Ready(); ok || !strings.Contains(why, "source of rule t: standby probe: no responders") {
		t.Fatalf("a source with work that cannot deliver: ready=%v why=%q", ok, why)
	}
}

// A replica whose messages leave while the dedupe store fails (their epoch
// revoked: the source went to another replica) has no Reserve left to
// succeed with; the store's failure clears once none waits for it, as a
// target's does, instead of keeping the bridge unready until it forwards
// again.
func TestReadinessStoreFailureClearsWhenNoMessageWaits(t *testing.T) {
	st := &flakyStore{Store: dedupe.NewMemory(dedupe.MemoryConfig{})}
	st.reserveErrs.Store(1 << 30) // fails for good
	e := newEnv(t, Config{Retry: RetryConfig{Initial: time.Millisecond, Max: 20 * time.Millisecond}}, rulesDoc(1, "", 0), nil, st)
	ep := &Epoch{}
	m, a := msg("t", keyFor(20, 1), "{}")
	m.Epoch = ep
	_ = e.p.Handle(context.Background(), m, a.ack)
	eventually(t, "the store reported failing", func() bool {
		ok, why := e.p.Health().Ready()
		return !ok && strings.Contains(why, "dedupe store keeps failing")
	})
	ep.Revoke()
	if err := a.result(t); !errors.Is(err, ErrRevoked) {
		t.Fatalf("settled with %v, want ErrRevoked", err)
	}
	eventually(t, "ready once no message waits for the store", func() bool { ok, _ := e.p.Health().Ready(); return ok })
}
