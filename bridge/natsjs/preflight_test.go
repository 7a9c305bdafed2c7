package natsjs

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/retry"
)

// TestPreflightRetriesUntilJetStreamAnswers: with a Retry policy the
// preflight's requests are retried (each attempt bounded, each failure
// reported) while the JetStream API does not answer, as during a meta
// leader election, and the check completes once it answers; without one it
// fails after a single attempt.
func TestPreflightRetriesUntilJetStreamAnswers(t *testing.T) {
	table := testTable(t)
	// The streams exist in the store the server enables JetStream from.
	prep := natstest.Start(t)
	_, pjs := prep.Connect(t)
	if err := EnsureStreams(testCtx(t), pjs, table, StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	prep.Shutdown()
	prep.WaitForShutdown()
	srv := natstest.Start(t, func(o *server.Options) { o.JetStream = false })
	nc, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := Preflight(ctx, js, table, PreflightOptions{MinWindow: time.Minute}); err == nil {
		t.Fatal("preflight without JetStream and without a retry policy: no error")
	}

	var failed atomic.Int32
	pol := &retry.Policy{Broker: "nats", Conn: nc, Timeout: 200 * time.Millisecond, Initial: 50 * time.Millisecond, Max: 200 * time.Millisecond,
		Report: func(*retry.AttemptError) { failed.Add(1) }}
	done := make(chan error, 1)
	go func() {
		probs, err := Preflight(ctx, js, table, PreflightOptions{MinWindow: time.Minute, Retry: pol})
		if err == nil && len(probs) != 0 {
			err = errors.New(probs[0].String())
		}
		done <- err
	}()
	eventually(t, 10*time.Second, "two failed attempts reported", func() bool { return failed.Load() >= 2 })
	if err := srv.EnableJetStream(&server.JetStreamConfig{StoreDir: prep.StoreDir}); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("preflight once JetStream answers: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("preflight still retrying after JetStream answers")
	}
	t.Logf("%d failed attempts before JetStream answered", failed.Load())
}
