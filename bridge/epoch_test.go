package bridge

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
)

// An ordered takeover: the old owner's epoch is revoked while the first
// message of a key is being published and two more wait behind it. The
// waiting ones must not be published and settle with ErrRevoked; the
// publishing one completes. The new owner's re-read of all three then
// forwards exactly the two missing ones, in order, after the first.
func TestEpochRevokedStopsUnpublished(t *testing.T) {
	for _, tc := range []struct {
		name  string
		store func() dedupe.Store
	}{
		{"local store", func() dedupe.Store { return dedupe.NewMemory(dedupe.MemoryConfig{}) }},
		{"remote store", func() dedupe.Store { return wrapStore{dedupe.NewMemory(dedupe.MemoryConfig{})} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newTestSink()
			s.block = make(chan struct{})
			key := keyFor(7, 1)
			s.blockOf = key
			e := newEnv(t, Config{}, rulesDoc(1, "", 0), s, tc.store())

			old := &Epoch{}
			var ids []string
			var acks []*ackRec
			for i := range 3 {
				m, a := msg("t", key, fmt.Sprintf("m%d", i))
				m.SourceID = fmt.Sprintf("T:%d", i+1) // what a re-read delivers again
				m.Epoch = old
				ids = append(ids, m.SourceID)
				acks = append(acks, a)
				if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
					t.Fatal(err)
				}
			}
			eventually(t, "first message publishing", func() bool {
				s.mu.Lock()
				defer s.mu.Unlock()
				return s.pending[key] == 1
			})
			old.Revoke()
			close(s.block) // the in-flight publish is confirmed after the revoke
			if err := acks[0].result(t); err != nil {
				t.Fatalf("message being published when revoked: %v, want ack", err)
			}
			for i := 1; i < 3; i++ {
				if err := acks[i].result(t); !errors.Is(err, ErrRevoked) {
					t.Fatalf("queued message %d: %v, want ErrRevoked", i, err)
				}
			}
			if got := len(s.published()); got != 1 {
				t.Fatalf("%d published after the revoke, want only the one in flight", got)
			}
			if n := counter(t, e, "t", OutcomeRevoked); n != 2 {
				t.Fatalf("revoked counter %v, want 2", n)
			}

			// The new owner re-reads from the ack floor.
			next := &Epoch{}
			for i := range 3 {
				m, a := msg("t", key, fmt.Sprintf("m%d", i))
				m.SourceID = ids[i]
				m.Epoch = next
				if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
					t.Fatal(err)
				}
				if err := a.result(t); err != nil {
					t.Fatalf("re-read %d: %v", i, err)
				}
			}
			got := s.published()
			if len(got) != 3 {
				t.Fatalf("published %d in all, want 3 (one each)", len(got))
			}
			for i, g := range got {
				if want := fmt.Sprintf("m%d", i); g.Body != want {
					t.Fatalf("published #%d is %s, want %s", i, g.Body, want)
				}
			}
		})
	}
}

// A parked message whose epoch is revoked leaves the park queue at the next
// recheck (settled with ErrRevoked, never published), gets no more
// heartbeats, and frees its MaxHeld room; a live parked one stays parked and
// keeps getting heartbeats.
func TestEpochRevokedWhileParked(t *testing.T) {
	s := newTestSink()
	e := newEnv(t, Config{AckWait: 40 * time.Millisecond, HeldRecheck: 20 * time.Millisecond},
		rulesDoc(1, `"40-44"`, 0), s, nil)
	live, old := &Epoch{}, &Epoch{}
	m1, a1 := msg("t", keyFor(41, 1), "live")
	m1.Epoch = live
	m2, a2 := msg("t", keyFor(42, 2), "revoked")
	m2.Epoch = old
	for _, x := range []struct {
		m *Message
		a *ackRec
	}{{m1, a1}, {m2, a2}} {
		if err := e.p.Handle(context.Background(), x.m, x.a.ack); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "both parked", func() bool { return e.p.heldN.Load() == 2 })
	old.Revoke()
	beatsAtRevoke := a2.beats()
	if err := a2.result(t); !errors.Is(err, ErrRevoked) {
		t.Fatalf("revoked parked message settled with %v", err)
	}
	eventually(t, "held count back to the live one", func() bool { return e.p.heldN.Load() == 1 })
	beats := a1.beats()
	eventually(t, "heartbeats for the live parked message", func() bool { return a1.beats() >= beats+2 })
	if n := a2.beats(); n > beatsAtRevoke+1 {
		t.Fatalf("revoked message got %d heartbeats after the revoke", n-beatsAtRevoke)
	}
	if a1.isSettled() || len(s.published()) != 0 {
		t.Fatal("a held message was settled or published")
	}
}
