package rmq

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func init() {
	level := slog.LevelError + 4 // the crashed producers of the check-back test log errors by design
	if os.Getenv("RMQ_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	SetLogger(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level})))
}

func testLog(t testing.TB) *slog.Logger {
	if testing.Verbose() {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func startBroker(t testing.TB, opts rmqtest.Options) *rmqtest.Broker {
	t.Helper()
	if opts.MaxSuspend == 0 {
		opts.MaxSuspend = time.Second // shutdowns do not wait long for held pulls
	}
	return rmqtesting.StartTB(t, opts)
}

func brokerConfig(b *rmqtest.Broker) BrokerConfig {
	return BrokerConfig{Name: "rmq-test", NameServers: []string{b.NameServerAddr()}, InstancePrefix: "test"}
}

// send stores messages through a plain producer of the test.
func send(t testing.TB, b *rmqtest.Broker, msgs ...*primitive.Message) {
	t.Helper()
	p, err := producer.NewDefaultProducer(
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{b.NameServerAddr()})),
		producer.WithGroupName("test-producer"),
		producer.WithInstanceName(brokerConfig(b).instanceName("test")),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = p.Shutdown() }()
	for _, m := range msgs {
		res, err := p.SendSync(context.Background(), m)
		if err != nil || res.Status != primitive.SendOK {
			t.Fatalf("send: %v %v", res, err)
		}
	}
}

// got is one message the test handler received, with its ack.
type got struct {
	m   *bridge.Message
	ack bridge.Ack
}

// recorder is a bridge.Handler that records messages; decide, when set,
// settles each at once (return false to keep it unsettled).
type recorder struct {
	mu     sync.Mutex
	msgs   []got
	decide func(m *bridge.Message) (error, bool)
	signal chan struct{}
}

func newRecorder(decide func(m *bridge.Message) (error, bool)) *recorder {
	return &recorder{decide: decide, signal: make(chan struct{}, 1)}
}

func (r *recorder) handle(ctx context.Context, m *bridge.Message, ack bridge.Ack) error {
	r.mu.Lock()
	r.msgs = append(r.msgs, got{m, ack})
	r.mu.Unlock()
	select {
	case r.signal <- struct{}{}:
	default:
	}
	if r.decide != nil {
		if err, settle := r.decide(m); settle {
			_ = ack(ctx, err)
		}
	}
	return nil
}

func (r *recorder) snapshot() []got {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]got(nil), r.msgs...)
}

// waitFor polls cond until it holds or the deadline passes.
var waitFor = poll.Eventually

// runSource runs src until the returned stop is called; stop also closes
// src and reports Run's error.
func runSource(t testing.TB, b *rmqtest.Broker, src *Source, h bridge.Handler) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- src.Run(ctx, h) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			quiesce(b)
			cancel()
			if err := <-errc; err != nil {
				t.Errorf("Run: %v", err)
			}
			cctx, ccancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer ccancel()
			if err := src.Close(cctx); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

func msg(topic, body string, props ...string) *primitive.Message {
	m := primitive.NewMessage(topic, []byte(body))
	for i := 0; i+1 < len(props); i += 2 {
		m.WithProperty(props[i], props[i+1])
	}
	return m
}

func bodies(gs []got) []string {
	out := make([]string, len(gs))
	for i, g := range gs {
		out[i] = string(g.m.Body)
	}
	return out
}

func seqBody(i int) string { return fmt.Sprintf("m%03d", i) }

// quiesce waits (up to 5s) until the broker saw no rebalance traffic for
// 150ms: the client's Shutdown races with a running rebalance (see
// rmqtest's package docs), so consumers are shut down once rebalances
// settled.
func quiesce(b *rmqtest.Broker) {
	const getConsumerList, queryOffset = 38, 14
	activity := func() int64 { return b.Requests(getConsumerList) + b.Requests(queryOffset) }
	deadline := time.Now().Add(5 * time.Second)
	last, since := activity(), time.Now()
	for time.Now().Before(deadline) && time.Since(since) < 150*time.Millisecond {
		time.Sleep(10 * time.Millisecond)
		if n := activity(); n != last {
			last, since = n, time.Now()
		}
	}
}
