package rmq

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
)

// barrierFunc answers barriers as the test says: the client's answer, an
// error code's parse error, or no answer at all.
type barrierFunc func(mq *primitive.MessageQueue) error

func (f barrierFunc) OffsetForTimestamp(mq *primitive.MessageQueue, _ int64) (int64, error) {
	return 0, f(mq)
}

// An answered barrier confirms the sends behind it, an error code
// included; without an answer they wait for their half message's
// check-back, here answered by another replica (recorded in the store).
func TestConfirmer(t *testing.T) {
	store := dedupe.NewMemory(dedupe.MemoryConfig{TTL: time.Minute, ReserveTTL: time.Minute})
	defer store.Close(context.Background())
	l := &txListener{store: store, log: testLog(t), timeout: time.Second}
	results := make(chan error, 4)
	done := func(_ *job, err error) { results <- err }
	l.waits = newTxWaits(time.Minute, l, testLog(t), done)
	defer l.waits.close()
	answers := map[string]error{
		"broker-a": nil,
		"broker-b": &strconv.NumError{Func: "ParseInt", Num: "", Err: strconv.ErrSyntax}, // an error code: no offset
		"broker-c": context.DeadlineExceeded,                                             // no answer
	}
	c := newConfirmer(barrierFunc(func(mq *primitive.MessageQueue) error { return answers[mq.BrokerName] }), l.waits, testLog(t), done)
	defer c.close()
	tgt := &target{name: "rmq-test"}
	for _, name := range []string{"broker-a", "broker-b", "broker-c"} {
		j := &job{ctx: context.Background(), t: tgt, m: outgoing("t", "id-"+name)}
		c.add(j, &errEnded{ref: slotRef{"id-" + name, 0}, mq: primitive.MessageQueue{Topic: "t", BrokerName: name}})
	}
	for range 2 {
		if err := <-results; err != nil {
			t.Fatalf("answered barrier: %v, want nil", err)
		}
	}
	select {
	case err := <-results:
		t.Fatalf("unanswered barrier resolved its send at once: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	// Another replica answered the check-back of id-broker-c's half message.
	if err := store.Commit(context.Background(), resolvedKey("id-broker-c", 0)); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-results:
		if !errors.Is(err, bridge.ErrDuplicate) {
			t.Fatalf("unanswered barrier, then the check-back: %v, want ErrDuplicate", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the send behind an unanswered barrier was not resolved after its check-back")
	}
}
