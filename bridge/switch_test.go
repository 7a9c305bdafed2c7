package bridge

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/router"
)

// Rules change (blocks, owner moves) while four producers push messages of
// keys in every shard range and the sink delays and fails at random: every
// message is forwarded exactly once, per key in order, never under a table
// that blocked its shard, always to the cell that table named.
func TestSwitchUnderLoad(t *testing.T) {
	s := newTestSink()
	s.delay = 200 * time.Microsecond
	s.fail = func(o *Outgoing, attempt int) error {
		if attempt == 1 && rand.IntN(20) == 0 {
			return errors.New("injected")
		}
		return nil
	}
	e := newEnv(t, Config{MaxInFlight: 128, Lanes: 64, HeldRecheck: 5 * time.Millisecond,
		Retry: RetryConfig{Initial: time.Millisecond, Max: 2 * time.Millisecond}}, rulesDoc(1, "", 50), s, nil)
	type step struct {
		blocked string
		split   int
	}
	steps := []step{{`"40-49"`, 50}, {"", 40}, {`"0-9", "90-99"`, 40}, {`"0-9"`, 40}, {"", 10}, {`"10-39"`, 10}, {"", 40}}
	tables := map[int64]*router.Table{1: e.hold.Load()}
	for i, st := range steps {
		tables[int64(i+2)] = table(t, rulesDoc(i+2, st.blocked, st.split))
	}
	const producers, keysPer, perKey = 4, 10, 30
	var acks sync.Map
	var wg sync.WaitGroup
	for pr := range producers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range keysPer * perKey {
				k := pr*keysPer + i%keysPer
				key := keyFor((k*37)%100, k) // spread over all shards
				m, a := msg("t", key, strconv.Itoa(i/keysPer))
				acks.Store(m.SourceID, a)
				if err := e.p.Handle(context.Background(), m, a.ack); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	for v := int64(2); v <= int64(len(steps)+1); v++ {
		time.Sleep(3 * time.Millisecond) // load shape, not synchronisation
		e.hold.Store(tables[v])
	}
	wg.Wait()
	n := 0
	acks.Range(func(_, v any) bool {
		n++
		if err := v.(*ackRec).result(t); err != nil {
			t.Errorf("ack %v", err)
		}
		return true
	})
	got := s.published()
	if len(got) != n {
		t.Fatalf("published %d of %d", len(got), n)
	}
	seen := map[string]bool{}
	next := map[string]int{}
	for _, g := range got {
		if seen[g.MsgID] {
			t.Fatalf("%s published twice", g.MsgID)
		}
		seen[g.MsgID] = true
		key := g.Header["X-User-Id"][0]
		i, _ := strconv.Atoi(g.Body)
		if i != next[key] {
			t.Fatalf("key %s: message %d arrived, want %d", key, i, next[key])
		}
		next[key]++
		v, _ := strconv.ParseInt(g.Header[HeaderRulesVersion][0], 10, 64)
		d := tables[v].Resolve("t", key)
		if d.Reason == router.ReasonHeld {
			t.Fatalf("key %s (shard %d) forwarded under version %d, which blocks it", key, d.Shard, v)
		}
		if want := fmt.Sprintf("cell.%s.t", d.Cell); g.Subject != want {
			t.Fatalf("key %s forwarded to %s under version %d, owner says %s", key, g.Subject, v, want)
		}
	}
	if st := e.p.Status(); st.Held != 0 || st.InFlight != 0 {
		t.Fatalf("left over: %+v", st)
	}
}
