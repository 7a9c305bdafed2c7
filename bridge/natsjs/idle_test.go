package natsjs

import (
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
)

// A source is idle only after answers showing nothing pending span the
// window with no delivery since; a busy answer, a delivery or a message
// stored for it ends that, and a failure reported meanwhile follows:
// wrapped in bridge.ErrNothingPending while idle, plain otherwise.
func TestIdlenessWrapsFailuresOfIdleSources(t *testing.T) {
	var got []error
	var idle idleness
	idle.window = 2 * time.Second
	f := failState{report: func(err error) { got = append(got, err) }, idle: idle.idle}
	zero := &jetstream.ConsumerInfo{Delivered: jetstream.SequenceInfo{Stream: 7}}
	busy := &jetstream.ConsumerInfo{NumAckPending: 1, Delivered: jetstream.SequenceInfo{Stream: 8}}
	at := time.Unix(1000, 0)

	idle.answered(at, busy)
	idle.answered(at.Add(time.Second), zero)
	idle.answered(at.Add(2*time.Second), zero)
	if idle.idle() {
		t.Fatal("idle after answers spanning 1s, window 2s")
	}
	idle.answered(at.Add(3*time.Second), zero)
	if !idle.idle() {
		t.Fatal("not idle after answers spanning the window")
	}
	if d := idle.delivered.Load(); d != 7 {
		t.Fatalf("delivered %d, want 7", d)
	}

	f.set(errors.New("standby probe: no responders"))
	if len(got) != 1 || !errors.Is(got[0], bridge.ErrNothingPending) {
		t.Fatalf("reports %v: want one wrapping ErrNothingPending", got)
	}
	f.recheck()
	if len(got) != 1 {
		t.Fatalf("recheck without a change reported again: %v", got)
	}

	// A message stored for the rule: the failure holds readiness.
	idle.stored.Store(true)
	f.recheck()
	if len(got) != 2 || errors.Is(got[1], bridge.ErrNothingPending) || got[1].Error() != "standby probe: no responders" {
		t.Fatalf("reports %v: want the plain failure second", got)
	}
	// The next answer is authoritative again: nothing pending.
	idle.answered(at.Add(4*time.Second), zero)
	f.recheck()
	if len(got) != 3 || !errors.Is(got[2], bridge.ErrNothingPending) {
		t.Fatalf("reports %v: want the idle failure third", got)
	}
	// A delivery ends idleness at once, before any answer.
	idle.delivery()
	if idle.idle() {
		t.Fatal("idle after a delivery")
	}
	// The answer after the delivery counts as busy: the window starts
	// with the next one.
	idle.answered(at.Add(5*time.Second), zero)
	idle.answered(at.Add(6*time.Second), zero)
	if idle.idle() {
		t.Fatal("idle right after the answer that saw the delivery")
	}
	idle.answered(at.Add(8*time.Second), zero)
	if !idle.idle() {
		t.Fatal("not idle after answers spanning the window again")
	}
	idle.answered(at.Add(9*time.Second), busy)
	if idle.idle() {
		t.Fatal("idle after an answer with a message unacknowledged")
	}
	f.clear()
	if len(got) != 4 || got[3] != nil {
		t.Fatalf("reports %v: want nil last", got)
	}
}
