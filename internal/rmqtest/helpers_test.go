package rmqtest

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"github.com/apache/rocketmq-client-go/v2/rlog"

	"github.com/cellbridge/cellbridge/internal/poll"
)

func init() {
	// The client logs at Info to stderr by default; tests only want its errors.
	rlog.SetLogLevel("error")
}

var instanceSeq atomic.Int64

// instance returns a process-unique instance name: the client pools clients by IP@InstanceName.
func instance(t testing.TB) string {
	return fmt.Sprintf("%s-%d", t.Name(), instanceSeq.Add(1))
}

func startBroker(t testing.TB, opts Options) *Broker {
	t.Helper()
	if testing.Verbose() && opts.Logf == nil {
		opts.Logf = func(f string, a ...any) { t.Logf("broker: "+f, a...) }
	}
	// rmqtesting.StartTB, inlined: rmqtesting imports this package.
	b := New(opts)
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("rmqtest: start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("rmqtest: close: %v", err)
		}
	})
	return b
}

func newProducer(t testing.TB, b *Broker, group string, opts ...producer.Option) *producerHandle {
	t.Helper()
	name := instance(t)
	all := append([]producer.Option{
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
		producer.WithGroupName(group),
		producer.WithInstanceName(name),
		producer.WithRetry(2),
	}, opts...)
	p, err := producer.NewDefaultProducer(all...)
	if err != nil {
		t.Fatalf("new producer: %v", err)
	}
	if err := p.Start(); err != nil {
		t.Fatalf("start producer: %v", err)
	}
	h := &producerHandle{Producer: p, name: name}
	t.Cleanup(func() { h.shutdown() })
	return h
}

type producerHandle struct {
	Producer interface {
		SendSync(ctx context.Context, msgs ...*primitive.Message) (*primitive.SendResult, error)
		Shutdown() error
	}
	name string
	once sync.Once
}

func (p *producerHandle) send(t testing.TB, msgs ...*primitive.Message) *primitive.SendResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := p.Producer.SendSync(ctx, msgs...)
	if err != nil {
		t.Fatalf("send: %v", err)
	}
	if res.Status != primitive.SendOK {
		t.Fatalf("send status %v", res.Status)
	}
	return res
}

func (p *producerHandle) shutdown() { p.once.Do(func() { _ = p.Producer.Shutdown() }) }

// received collects consumed messages.
type received struct {
	mu   sync.Mutex
	msgs []*primitive.MessageExt
	// fail decides per message whether to ask for a retry (nil: always succeed).
	fail func(*primitive.MessageExt) bool
}

func (r *received) handle(_ context.Context, msgs ...*primitive.MessageExt) (consumer.ConsumeResult, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, m := range msgs {
		if r.fail != nil && r.fail(m) {
			return consumer.ConsumeRetryLater, nil
		}
	}
	r.msgs = append(r.msgs, msgs...)
	return consumer.ConsumeSuccess, nil
}

func (r *received) snapshot() []*primitive.MessageExt {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]*primitive.MessageExt(nil), r.msgs...)
}

func (r *received) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.msgs)
}

type consumerHandle struct {
	c interface {
		Shutdown() error
	}
	b    *Broker
	name string
	once sync.Once
}

// shutdown stops the consumer once no rebalance is in flight: the client reads its "closed" flag
// without synchronization in requests a rebalance makes, so a Shutdown racing a rebalance (started
// by Start or by a membership notification) trips the race detector inside the client.
func (c *consumerHandle) shutdown() {
	c.once.Do(func() {
		quiesce(c.b)
		_ = c.c.Shutdown()
	})
}

// quiesce waits (up to 5s) until the requests a rebalance makes (consumer list, offset queries)
// have stopped for 150ms.
func quiesce(b *Broker) {
	activity := func() int64 {
		return b.Requests(reqGetConsumerListByGroup) + b.Requests(reqQueryConsumerOffset) + b.Requests(reqGetMaxOffset)
	}
	deadline := time.Now().Add(5 * time.Second)
	last, since := activity(), time.Now()
	for time.Now().Before(deadline) && time.Since(since) < 150*time.Millisecond {
		time.Sleep(10 * time.Millisecond)
		if n := activity(); n != last {
			last, since = n, time.Now()
		}
	}
}

func newConsumer(t testing.TB, b *Broker, group, topic, expr string, r *received, opts ...consumer.Option) *consumerHandle {
	t.Helper()
	name := instance(t)
	all := append([]consumer.Option{
		consumer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
		consumer.WithGroupName(group),
		consumer.WithInstance(name),
		consumer.WithConsumerModel(consumer.Clustering),
	}, opts...)
	c, err := consumer.NewPushConsumer(all...)
	if err != nil {
		t.Fatalf("new consumer: %v", err)
	}
	if err := c.Subscribe(topic, consumer.MessageSelector{Type: consumer.TAG, Expression: expr}, r.handle); err != nil {
		t.Fatalf("subscribe: %v", err)
	}
	if err := c.Start(); err != nil {
		t.Fatalf("start consumer: %v", err)
	}
	h := &consumerHandle{c: c, b: b, name: name}
	t.Cleanup(h.shutdown)
	return h
}

// eventually polls cond until it holds or the deadline passes.
var eventually = poll.Eventually
