package bridge

import (
	"context"
	"testing"

	"github.com/cellbridge/cellbridge/dedupe"
)

// reloadingStore stores a new rules table while a Reserve is in flight, as
// a reload landing during a remote store's round trip would.
type reloadingStore struct {
	dedupe.Store
	during func()
}

// Local reports false, as for the remote store it stands for.
func (s *reloadingStore) Local() bool { return false }

func (s *reloadingStore) Reserve(ctx context.Context, key string) (dedupe.Outcome, error) {
	if f := s.during; f != nil {
		s.during = nil
		f()
	}
	return s.Store.Reserve(ctx, key)
}

// A message routed under version n must not be published after version
// n+1, which blocks its shard, was loaded during its reservation: it is
// parked instead, and forwarded to the new owner once unblocked.
func TestReloadDuringReserveDecidesAgain(t *testing.T) {
	store := &reloadingStore{Store: dedupe.NewMemory(dedupe.MemoryConfig{})}
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), nil, store)
	store.during = func() { e.hold.Store(table(t, rulesDoc(2, `"20-20"`, 0))) }

	m, a := msg("t", keyFor(20, 1), "{}")
	if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the message parked under version 2", func() bool { return e.p.Status().Held == 1 })
	if got := e.sink.published(); len(got) != 0 {
		t.Fatalf("published under the old table after the block was loaded: %+v", got)
	}

	// Unblock and move shard 20 to rz01: the held message goes there.
	e.hold.Store(table(t, rulesDoc(3, "", 20)))
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	got := e.sink.published()
	if len(got) != 1 || got[0].Subject != "cell.rz01.t" || got[0].Header[HeaderRulesVersion][0] != "3" {
		t.Fatalf("published %+v, want one copy to cell.rz01.t stamped version 3", got)
	}
}

// Status.PublishingVersion names the version of a copy still being
// published after a reload, and clears once its result is in: what a cell
// switch waits for before the blocked rules count as in force.
func TestPublishingVersion(t *testing.T) {
	sink := newTestSink()
	sink.block = make(chan struct{})
	e := newEnv(t, Config{}, rulesDoc(1, "", 0), sink, nil)
	if v := e.p.Status().PublishingVersion; v != 0 {
		t.Fatalf("idle: publishing version %d, want 0", v)
	}
	m, a := msg("t", keyFor(20, 1), "{}")
	if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the publish under version 1 counted", func() bool { return e.p.Status().PublishingVersion == 1 })
	e.hold.Store(table(t, rulesDoc(2, `"20-20"`, 0)))
	if st := e.p.Status(); st.RulesVersion != 2 || st.PublishingVersion != 1 {
		t.Fatalf("after the reload: running %d, publishing %d; want 2 and 1", st.RulesVersion, st.PublishingVersion)
	}
	close(sink.block)
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	eventually(t, "nothing publishing", func() bool { return e.p.Status().PublishingVersion == 0 })
}
