package rmqtest

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
)

// The pull consumer (Poll/ACK) uses the same requests with the subscription carried in each pull.
func TestPullConsumer(t *testing.T) {
	b := startBroker(t, Options{})
	const topic, group = "polled", "cg-polled"
	if err := b.CreateTopic(topic, 2); err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, b, "pg-polled")
	sendN(t, p, topic, "want", 6, "A")
	sendN(t, p, topic, "skip", 4, "B")

	pc, err := consumer.NewPullConsumer(
		consumer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
		consumer.WithGroupName(group),
		consumer.WithInstance(instance(t)),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := pc.Subscribe(topic, consumer.MessageSelector{Type: consumer.TAG, Expression: "A"}); err != nil {
		t.Fatal(err)
	}
	if err := pc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		quiesce(b)
		_ = pc.Shutdown()
	})
	got := map[string]bool{}
	deadline := time.Now().Add(15 * time.Second)
	for len(got) < 6 && time.Now().Before(deadline) {
		cr, err := pc.Poll(context.Background(), time.Second)
		if errors.Is(err, consumer.ErrNoNewMsg) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range cr.GetMsgList() {
			if m.GetTags() != "A" {
				t.Fatalf("unmatched message %q", m.Body)
			}
			got[string(m.Body)] = true
		}
		pc.ACK(context.Background(), cr, consumer.ConsumeSuccess)
	}
	if len(got) != 6 {
		t.Fatalf("polled %d of 6 messages: %v", len(got), got)
	}
}
