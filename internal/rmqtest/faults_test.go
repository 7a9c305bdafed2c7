package rmqtest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
)

func TestFailSends(t *testing.T) {
	b := startBroker(t, Options{})
	const topic = "fail"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, b, "pg-fail") // 2 retries: 3 attempts per SendSync

	// One failure with a code the client retries (14, service not available): the send succeeds.
	b.FailSends(1, 14)
	p.send(t, primitive.NewMessage(topic, []byte("retried")))
	if got := len(b.Messages(topic)); got != 1 {
		t.Fatalf("stored %d, want 1", got)
	}

	// More failures than attempts: the send fails and nothing is stored.
	b.FailSends(5, 1)
	_, err := p.Producer.SendSync(context.Background(), primitive.NewMessage(topic, []byte("lost")))
	if err == nil || !strings.Contains(err.Error(), "CODE: 1") {
		t.Fatalf("send error %v, want CODE: 1", err)
	}
	if got := len(b.Messages(topic)); got != 1 {
		t.Fatalf("stored %d, want 1", got)
	}
	// A code the client does not retry fails at once and uses one injected failure.
	b.FailSends(2, 10) // flush disk timeout is reported as a status, not an error
	res, err := p.Producer.SendSync(context.Background(), primitive.NewMessage(topic, []byte("x")))
	if err != nil || res.Status != primitive.SendFlushDiskTimeout {
		t.Fatalf("got %v %+v, want status flush-disk-timeout", err, res)
	}
	b.FailSends(0, 0)
	p.send(t, primitive.NewMessage(topic, []byte("ok")))
	if got := len(b.Messages(topic)); got != 2 {
		t.Fatalf("stored %d, want 2", got)
	}
}

func TestDelaySends(t *testing.T) {
	b := startBroker(t, Options{})
	const topic = "slow"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	fast := newProducer(t, b, "pg-slow", producer.WithSendMsgTimeout(100*time.Millisecond), producer.WithRetry(0))
	b.DelaySends(400 * time.Millisecond)
	if _, err := fast.Producer.SendSync(context.Background(), primitive.NewMessage(topic, []byte("late"))); err == nil {
		t.Fatal("send within timeout despite the delay")
	}
	// The delayed send is still stored when its delay ends (the client gave up, the broker did not):
	// exactly the duplicate-after-timeout case a bridge must tolerate.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := b.WaitMessages(ctx, topic, 1); err != nil {
		t.Fatal(err)
	}
	// A producer with the default timeout: the 100ms one would also time out whenever the machine is
	// slow to run the 50ms delay's goroutines (seen under -race).
	patient := newProducer(t, b, "pg-slow")
	b.DelaySends(50 * time.Millisecond)
	start := time.Now()
	patient.send(t, primitive.NewMessage(topic, []byte("delayed")))
	if time.Since(start) < 50*time.Millisecond {
		t.Fatal("send answered before the injected delay")
	}
	b.DelaySends(0)
}

func TestRestart(t *testing.T) {
	b := startBroker(t, Options{})
	const topic, group = "restart", "cg-restart"
	if err := b.CreateTopic(topic, 2); err != nil {
		t.Fatal(err)
	}
	ns, br := b.NameServerAddr(), b.BrokerAddr()
	p := newProducer(t, b, "pg-restart")
	var r received
	c := newConsumer(t, b, group, topic, "*", &r)
	sendN(t, p, topic, "before", 10, "")
	eventually(t, 10*time.Second, "10 before", func() bool { return r.count() >= 10 })
	// A committed offset of another group, set directly, must survive the restart.
	rc := dialRaw(t, b.BrokerAddr())
	rc.call(reqUpdateConsumerOffset, map[string]string{"consumerGroup": "cg-raw", "topic": topic, "queueId": "1", "commitOffset": "7"}, nil, serializeJSON)

	rctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := b.Restart(rctx); err != nil {
		t.Fatal(err)
	}
	if b.NameServerAddr() != ns || b.BrokerAddr() != br {
		t.Fatalf("addresses changed: %s %s -> %s %s", ns, br, b.NameServerAddr(), b.BrokerAddr())
	}
	if got := len(b.Messages(topic)); got != 10 {
		t.Fatalf("stored after restart: %d", got)
	}
	if off, ok := b.CommittedOffset("cg-raw", topic, 1); !ok || off != 7 {
		t.Fatalf("committed offset after restart %d %v, want 7", off, ok)
	}
	if m := b.Consumers(group); len(m) != 1 || !strings.Contains(m[0], c.name) {
		t.Fatalf("members kept over restart: %v", m)
	}
	// The producer's first attempt may hit the closed connection; its retries reconnect.
	eventually(t, 10*time.Second, "send after restart", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := p.Producer.SendSync(ctx, primitive.NewMessage(topic, []byte("after-0")))
		return err == nil
	})
	sendN(t, p, topic, "after-x", 5, "")
	eventually(t, 20*time.Second, "consumption resumes", func() bool {
		n := 0
		for body := range bodies(r.snapshot()) {
			if strings.HasPrefix(body, "after-") {
				n++
			}
		}
		return n >= 6
	})
}

func TestLongPollDoesNotSpin(t *testing.T) {
	b := startBroker(t, Options{})
	const topic = "quiet"
	if err := b.CreateTopic(topic, 4); err != nil {
		t.Fatal(err)
	}
	var r received
	newConsumer(t, b, "cg-quiet", topic, "*", &r)
	// Wait until the consumer holds a pull on each of its 4 queues and its retry queue.
	eventually(t, 10*time.Second, "pulls held", func() bool { return b.Requests(CodePullMessage) >= 5 })
	time.Sleep(200 * time.Millisecond) // let the initial round settle; not synchronization
	before := b.Requests(CodePullMessage)
	time.Sleep(time.Second)
	if d := b.Requests(CodePullMessage) - before; d > 5 {
		t.Fatalf("%d pulls in a quiet second: the long poll spins", d)
	}
	// A new message wakes the held pull: it arrives long before the 20s suspend time ends.
	p := newProducer(t, b, "pg-quiet")
	p.send(t, primitive.NewMessage(topic, []byte("wake")))
	eventually(t, 5*time.Second, "woken pull delivers", func() bool { return r.count() == 1 })
}

func TestLongPollHoldsPastUnmatched(t *testing.T) {
	b := startBroker(t, Options{})
	const topic = "quiet-tags"
	if err := b.CreateTopic(topic, 1); err != nil {
		t.Fatal(err)
	}
	p := newProducer(t, b, "pg-quiet-tags")
	var r received
	newConsumer(t, b, "cg-quiet-tags", topic, "A", &r)
	eventually(t, 10*time.Second, "pulls held", func() bool { return b.Requests(CodePullMessage) >= 2 })
	time.Sleep(200 * time.Millisecond) // let the initial round settle; not synchronization
	before := b.Requests(CodePullMessage)
	sendN(t, p, topic, "skip", 20, "B")
	if d := b.Requests(CodePullMessage) - before; d > 3 {
		t.Fatalf("%d pulls for 20 unmatched messages: held pulls were answered", d)
	}
	sendN(t, p, topic, "take", 1, "A")
	eventually(t, 5*time.Second, "matching message", func() bool { return r.count() == 1 })
	if got := string(r.snapshot()[0].Body); got != "take-0" {
		t.Fatalf("got %q", got)
	}
}
