package bridge

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

// A broker that failed is reported on /readyz only while messages still
// wait for it: after a failover moves its shards to another broker and the
// retried message is confirmed there, the dead broker gets no more publishes,
// and must not keep the bridge unready for good.
func TestReadinessRecoversWhenFailingBrokerIsNoLongerUsed(t *testing.T) {
	doc := func(v, split int) string {
		return strings.Replace(rulesDoc(v, "", split),
			`target: {broker: nats, subject: "cell.{cell}.t"}`, `target: {broker: "{cell}", subject: "cell.{cell}.t"}`, 1)
	}
	dead, alive := newTestSink(), newTestSink()
	dead.fail = func(*Outgoing, int) error { return errors.New("connection refused") }
	e := newEnvSinks(t, Config{AckWait: 40 * time.Millisecond, Retry: RetryConfig{Initial: time.Millisecond, Max: 5 * time.Millisecond}},
		doc(1, 50), map[string]*testSink{"rz00": dead, "rz01": alive, "nats": alive}, nil)
	p := e.p
	m, a := msg("t", keyFor(20, 1), "{}") // shard 20: rz00 under version 1
	_ = p.Handle(context.Background(), m, a.ack)
	eventually(t, "rz00 reported failing", func() bool {
		_, why := p.Health().Ready()
		return strings.Contains(why, "publishing to broker rz00 subject cell.rz00.t keeps failing")
	})
	e.hold.Store(table(t, doc(2, 10))) // failover: shard 20 moves to rz01
	if err := a.result(t); err != nil {
		t.Fatal(err)
	}
	if got := alive.published(); len(got) != 1 || got[0].Subject != "cell.rz01.t" {
		t.Fatalf("published to rz01: %+v", got)
	}
	eventually(t, "ready once nothing waits for rz00", func() bool {
		ok, _ := p.Health().Ready()
		return ok
	})
}
