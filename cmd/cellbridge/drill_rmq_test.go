package main

import (
	"bytes"
	"context"
	"fmt"
	"hash/fnv"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/drill"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
	"github.com/cellbridge/cellbridge/router"
)

// rmqPublisher publishes drill events to a RocketMQ topic. Each key always
// goes through the same worker (a synchronous send at a time) and, by the
// hash queue selector on the key, to the same queue, so the source holds
// every key's events in order.
type rmqPublisher struct {
	send    func(ctx context.Context, m *primitive.Message) (*primitive.SendResult, error)
	jobs    []chan rmqJob
	wg      sync.WaitGroup
	pending drill.Pending
}

type rmqJob struct {
	e    *drill.Event
	done func(string, error)
}

var _ drill.Publisher = (*rmqPublisher)(nil)

func newRMQPublisher(t *testing.T, nameserver string) *rmqPublisher {
	p, err := producer.NewDefaultProducer(
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{nameserver})),
		producer.WithGroupName("drill-source-producer"),
		producer.WithInstanceName(fmt.Sprintf("drill-producer-%d-%d", os.Getpid(), rmqInstance.Add(1))),
		producer.WithQueueSelector(producer.NewHashQueueSelector()),
		producer.WithRetry(2),
	)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	rp := &rmqPublisher{send: func(ctx context.Context, m *primitive.Message) (*primitive.SendResult, error) {
		return p.SendSync(ctx, m)
	}}
	for range 32 {
		ch := make(chan rmqJob, 256)
		rp.jobs = append(rp.jobs, ch)
		rp.wg.Go(func() {
			for j := range ch {
				rp.sendOne(j)
			}
		})
	}
	t.Cleanup(func() {
		for _, ch := range rp.jobs {
			close(ch)
		}
		rp.wg.Wait()
		_ = p.Shutdown()
	})
	return rp
}

func (p *rmqPublisher) sendOne(j rmqJob) {
	defer p.pending.Add(-1)
	m := primitive.NewMessage(j.e.Subject, j.e.Body)
	for k, v := range j.e.Header {
		m.WithProperty(k, v[0])
	}
	m.WithShardingKey(j.e.Key)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := p.send(ctx, m)
	switch {
	case err != nil:
		j.done("", err)
	case res.Status != primitive.SendOK:
		j.done("", fmt.Errorf("send status %d", res.Status))
	default:
		j.done(res.MsgID, nil) // the unique message id: the bridge's Cell-Msg-Id for it
	}
}

func (p *rmqPublisher) PublishAsync(ctx context.Context, e *drill.Event, done func(string, error)) error {
	h := fnv.New32a()
	_, _ = h.Write([]byte(e.Key))
	p.pending.Add(1)
	select {
	case p.jobs[h.Sum32()%uint32(len(p.jobs))] <- rmqJob{e, done}:
		return nil
	case <-ctx.Done():
		p.pending.Add(-1)
		return ctx.Err()
	}
}

func (p *rmqPublisher) Flush(ctx context.Context) error { return p.pending.Wait(ctx) }

// TestDrillRocketMQToNATS runs the drill with a RocketMQ source (the
// in-process test broker, driven by the real client) and NATS cell streams,
// through the same app construction as `cellbridge run` with a config that
// names both brokers.
func TestDrillRocketMQToNATS(t *testing.T) {
	env := newRMQEnv(t, rmqtest.Options{}, ordersRule("rmq", "nats"))
	if err := env.b.CreateTopic("orders", 4); err != nil {
		t.Fatal(err)
	}
	_, js := env.nats.Connect(t)
	table, err := router.Load(env.rules)
	if err != nil {
		t.Fatal(err)
	}
	ensureStreams(t, js, table)
	data := t.TempDir()
	// rules: is required with brokers; the drill copies them into a
	// ConfigMap-style directory and runs the bridge on that copy.
	cfg := writeFile(t, t.TempDir(), "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
  rmq: {type: rocketmq, nameservers: [%q], instancePrefix: drill}
dedupe: {store: jetstream, bucket: drill}
http: {listen: "127.0.0.1:0"}
`, env.rules, env.nats.URL, env.b.NameServerAddr()))
	var stderr bytes.Buffer
	o, err := prepareDrill(&runFlags{config: cfg, rules: env.rules, data: filepath.Join(data, "nats")}, data, &stderr)
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr.String())
	}
	dc := drillTestConfig(t)
	dc.Rate = 600 // the RocketMQ producer under the race detector is slower than JetStream's
	dc.Move, dc.To, dc.Down = "22-32", "rz10", "rz10"
	dc.JetStream = js
	rep, err := drillApp(testCtx(t, 2*time.Minute), o, data, func(app.Info) (drill.Config, func(), error) {
		// Only now: the bridge has routed the client's process-wide
		// logging (rmq.SetLogger) before this client starts.
		dc.Publisher = newRMQPublisher(t, env.b.NameServerAddr())
		return dc, nil, nil
	})
	if err != nil {
		t.Fatalf("drill: %v\nbridge log: %s", err, tail(readFileT(t, filepath.Join(data, "cellbridge.log")), 4000))
	}
	checkDrillReport(t, rep, 1)
}
