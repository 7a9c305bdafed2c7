package natsjs

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

// TestSurvivesServerRestart runs a Source and a Sink on connections made by
// Connect across a restart of their server: the source keeps consuming on
// the same Run, every publish is resolved (none hangs), and republishing the
// failed ones leaves each message stored exactly once.
func TestSurvivesServerRestart(t *testing.T) {
	srv := natstest.Start(t)
	nc, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	js, err := NewJetStream(nc, JetStreamConfig{AckTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	createStream(t, js, "ORDERS", "orders.>")
	createStream(t, js, "CELL_RZ00", "cell.rz00.>")
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})
	c := &collector{settle: func(g got) { _ = g.ack(context.Background(), nil) }}
	run(t, newSource(t, js, SourceConfig{}), c.handle)

	publish(t, js, "orders.x", "before", nil)
	eventually(t, 10*time.Second, "delivered before the restart", func() bool { return len(c.of("before")) == 1 })

	const n = 300
	res := newResult()
	msgs := make([]*bridge.Outgoing, n)
	for i := range n {
		msgs[i] = out("nats", "cell.rz00.o", fmt.Sprint("k", i), "x")
	}
	for i := range n / 2 {
		sink.PublishAsync(testCtx(t), msgs[i], res.done(i))
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	// Published while the server is down: buffered by the client.
	for i := n / 2; i < n; i++ {
		sink.PublishAsync(testCtx(t), msgs[i], res.done(i))
	}
	srv2 := srv.Restart(t)
	eventually(t, 30*time.Second, "every publish resolved", func() bool { return res.count() == n })

	failed := 0
	for i := range n {
		if res.err(i) == nil {
			continue
		}
		failed++
		err := bridge.Publish(testCtx(t), sink, msgs[i])
		for err != nil && !errors.Is(err, bridge.ErrDuplicate) {
			time.Sleep(50 * time.Millisecond) // JetStream may still be recovering its streams
			err = bridge.Publish(testCtx(t), sink, msgs[i])
		}
	}
	_, js2 := srv2.Connect(t)
	st, err := js2.Stream(testCtx(t), "CELL_RZ00")
	if err != nil {
		t.Fatal(err)
	}
	if got := streamMsgs(t, st); got != n {
		t.Fatalf("stream holds %d messages, want %d (%d publishes had failed and were repeated)", got, n, failed)
	}
	t.Logf("%d of %d publishes failed across the restart and were repeated", failed, n)

	publish(t, js2, "orders.x", "after", nil)
	eventually(t, 30*time.Second, "delivered after the restart on the same Run", func() bool { return len(c.of("after")) == 1 })
}
