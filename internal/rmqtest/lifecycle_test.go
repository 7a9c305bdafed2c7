package rmqtest

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
)

func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	b := New(Options{})
	if err := b.Restart(ctx); err == nil {
		t.Fatal("Restart before Start succeeded")
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx); err == nil {
		t.Fatal("second Start succeeded")
	}
	if err := b.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := b.Start(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Start after Close: %v", err)
	}
	if err := b.Restart(ctx); !errors.Is(err, ErrClosed) {
		t.Fatalf("Restart after Close: %v", err)
	}
	if err := b.CreateTopic("x", 2); err != nil {
		t.Fatal(err)
	}
	if err := b.CreateTopic("x", 1); err == nil {
		t.Fatal("shrinking a topic succeeded")
	}
	if got := b.QueueOffsets("x"); len(got) != 2 {
		t.Fatalf("queue offsets %v", got)
	}
	// Close without Start.
	if err := New(Options{}).Close(ctx); err != nil {
		t.Fatal(err)
	}
}

func BenchmarkSendReceive(b *testing.B) {
	br := startBroker(b, Options{})
	const topic = "bench"
	if err := br.CreateTopic(topic, 4); err != nil {
		b.Fatal(err)
	}
	p := newProducer(b, br, "pg-bench")
	var r received
	newConsumer(b, br, "cg-bench", topic, "*", &r)
	b.ResetTimer()
	const batch = 32
	for i := 0; i < b.N; i += batch {
		msgs := make([]*primitive.Message, 0, batch)
		for j := 0; j < batch && i+j < b.N; j++ {
			m := primitive.NewMessage(topic, []byte(fmt.Sprintf("m-%d", i+j)))
			m.WithKeys([]string{fmt.Sprint(i + j)})
			msgs = append(msgs, m)
		}
		p.send(b, msgs...)
	}
	eventually(b, time.Minute, "all consumed", func() bool { return r.count() >= b.N })
}
