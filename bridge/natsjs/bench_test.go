package natsjs

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

// Benchmarks run against an embedded server by default. Allocation counts
// are per process, so they then include the server's own; point
// CELLBRIDGE_BENCH_NATS_URL at an external nats-server (-js) to count the
// adapter and client alone. Each benchmark uses fresh stream names.

var benchSeq atomic.Int64

func benchServer(b *testing.B) (*nats.Conn, string) {
	b.Helper()
	url := os.Getenv("CELLBRIDGE_BENCH_NATS_URL")
	if url == "" {
		url = natstest.Start(b).URL
	}
	nc, err := nats.Connect(url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(nc.Close)
	return nc, fmt.Sprint(os.Getpid(), "_", benchSeq.Add(1))
}

func benchStream(b *testing.B, js jetstream.JetStream, name string, subjects ...string) {
	b.Helper()
	createStream(b, js, name, subjects...)
	b.Cleanup(func() { _ = js.DeleteStream(context.Background(), name) })
}

// reportRate adds msgs/s and the process CPU per message (cpu-ns/msg; only
// the client's when the server is external) since start.
func reportRate(b *testing.B, start time.Time, cpu time.Duration) {
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
	if used := processCPU() - cpu; used > 0 {
		b.ReportMetric(float64(used.Nanoseconds())/float64(b.N), "cpu-ns/msg")
	}
}

// body is a ~100-byte JSON event like the ones the bridge routes.
var body = []byte(`{"order":123456,"user":{"id":"2088000000012345"},"amount":4200,"currency":"CNY","ts":1764000000}`)

// BenchmarkSinkPublish publishes b.N messages through the Sink with the
// headers the pipeline sets and waits for every ack. "idset" is the header
// map already carrying Nats-Msg-Id (sent as is); "setid" lacks it, so the
// Sink adds it in place; "pending1024" has a smaller slot table.
// BenchmarkRawPublish is the reference.
func BenchmarkSinkPublish(b *testing.B) {
	for _, v := range []struct {
		name    string
		idSet   bool
		pending int
	}{
		{"idset", true, 4096},
		{"setid", false, 4096},
		{"pending1024", true, 1024},
	} {
		b.Run(v.name, func(b *testing.B) {
			nc, id := benchServer(b)
			js, err := NewJetStream(nc, JetStreamConfig{MaxPending: v.pending})
			if err != nil {
				b.Fatal(err)
			}
			stream := "BENCH_SINK_" + id
			subject := "bench.sink." + id
			benchStream(b, js, stream, subject)
			sink, err := NewSink(map[string]jetstream.JetStream{"nats": js}, SinkConfig{MaxPending: v.pending}, quiet)
			if err != nil {
				b.Fatal(err)
			}
			defer sink.Close(context.Background())
			msgs := make([]bridge.Outgoing, b.N)
			for i := range msgs {
				key := fmt.Sprintf("ORDERS:%d", i)
				h := map[string][]string{
					"Cell-Msg-Id": {key}, "Cell-Name": {"rz00"}, "Cell-Shard": {"34"},
					"Cell-Rules-Version": {"1"}, "Cell-Source": {"nats/ORDERS"}, "Cell-Hops": {"1"},
				}
				if v.idSet {
					h["Nats-Msg-Id"] = h["Cell-Msg-Id"]
				}
				msgs[i] = bridge.Outgoing{Target: router.Target{Broker: "nats", Subject: subject}, MsgID: key, Header: h, Body: body}
			}
			var wg sync.WaitGroup
			var failed atomic.Int64
			wg.Add(b.N)
			done := func(err error) {
				if err != nil {
					failed.Add(1)
				}
				wg.Done()
			}
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			start, cpu := time.Now(), processCPU()
			for i := range msgs {
				sink.PublishAsync(ctx, &msgs[i], done)
			}
			wg.Wait()
			reportRate(b, start, cpu)
			b.StopTimer()
			if n := failed.Load(); n > 0 {
				b.Fatalf("%d publishes failed", n)
			}
		})
	}
}

// BenchmarkSourceConsume consumes and acks b.N stored messages through the
// Source, per FetchBatch: "batch" unordered (the handler runs in the client
// library's callback), "ordered" (standby probe, reset, then the callback
// queues each delivery for the goroutine that runs the handler);
// "rawconsume" and "rawmessages" are the same loop on the bare jetstream
// Consume callback and Messages iterator, the references for the adapter's
// own cost (and the reason the Source uses Consume).
func BenchmarkSourceConsume(b *testing.B) {
	for _, v := range []struct {
		name     string
		batch    int
		raw      string // "": the Source; "consume" or "messages": the bare API
		ordering Ordering
	}{
		{"batch256", 256, "", Unordered},
		{"batch1024", 1024, "", Unordered},
		{"batch4096", 4096, "", Unordered},
		{"ordered256", 256, "", Ordered},
		{"ordered1024", 1024, "", Ordered},
		{"ordered4096", 4096, "", Ordered},
		{"rawconsume1024", 1024, "consume", ""},
		{"rawmessages1024", 1024, "messages", ""},
	} {
		b.Run(v.name, func(b *testing.B) {
			nc, id := benchServer(b)
			js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096))
			if err != nil {
				b.Fatal(err)
			}
			stream := "BENCH_SRC_" + id
			subject := "bench.src." + id
			benchStream(b, js, stream, subject)
			for i := range b.N {
				m := &nats.Msg{Subject: subject, Data: body, Header: nats.Header{"Nats-Msg-Id": {fmt.Sprint("o-", i)}}}
				if _, err := js.PublishMsgAsync(m, jetstream.WithStallWait(time.Minute)); err != nil {
					b.Fatal(err)
				}
			}
			select {
			case <-js.PublishAsyncComplete():
			case <-time.After(time.Minute):
				b.Fatal("publishing the input timed out")
			}
			var n atomic.Int64
			all := make(chan struct{})
			count := func() {
				if n.Add(1) == int64(b.N) {
					close(all)
				}
			}
			cfg := SourceConfig{Rule: "orders", Broker: "nats", Stream: stream, Subject: subject, Durable: "bench",
				FetchBatch: v.batch, MaxAckPending: 4 * (4096 + v.batch), Ordering: v.ordering}
			b.ReportAllocs()
			b.ResetTimer()
			start, cpu := time.Now(), processCPU()
			if v.raw != "" {
				cons, err := js.CreateOrUpdateConsumer(context.Background(), stream, jetstream.ConsumerConfig{
					Durable: "bench", AckPolicy: jetstream.AckExplicitPolicy, MaxAckPending: cfg.MaxAckPending,
				})
				if err != nil {
					b.Fatal(err)
				}
				if v.raw == "consume" {
					cc, err := cons.Consume(func(m jetstream.Msg) {
						_ = m.Ack()
						count()
					}, jetstream.PullMaxMessages(v.batch))
					if err != nil {
						b.Fatal(err)
					}
					<-all
					cc.Stop()
					<-cc.Closed()
				} else {
					it, err := cons.Messages(jetstream.PullMaxMessages(v.batch))
					if err != nil {
						b.Fatal(err)
					}
					for range b.N {
						m, err := it.Next()
						if err != nil {
							b.Fatal(err)
						}
						_ = m.Ack()
					}
					it.Stop()
				}
			} else {
				src, err := NewSource(context.Background(), js, cfg, quiet)
				if err != nil {
					b.Fatal(err)
				}
				ctx, cancel := context.WithCancel(context.Background())
				errc := make(chan error, 1)
				go func() {
					errc <- src.Run(ctx, func(ctx context.Context, m *bridge.Message, ack bridge.Ack) error {
						_ = ack(ctx, nil)
						count()
						return nil
					})
				}()
				<-all
				cancel()
				if err := <-errc; err != nil {
					b.Fatal(err)
				}
				_ = src.Close(context.Background())
			}
			reportRate(b, start, cpu)
		})
	}
}

// BenchmarkRawPublish is the hand-written equivalent of the Sink: async
// publishes with 4096 in flight, one goroutine waiting for the futures in
// order.
func BenchmarkRawPublish(b *testing.B) {
	nc, id := benchServer(b)
	js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		b.Fatal(err)
	}
	stream := "BENCH_RAW_" + id
	subject := "bench.raw." + id
	benchStream(b, js, stream, subject)
	msgs := make([]*nats.Msg, b.N)
	for i := range msgs {
		key := fmt.Sprintf("ORDERS:%d", i)
		msgs[i] = &nats.Msg{Subject: subject, Data: body, Header: nats.Header{
			"Nats-Msg-Id": {key}, "Cell-Msg-Id": {key}, "Cell-Name": {"rz00"}, "Cell-Shard": {"34"},
			"Cell-Rules-Version": {"1"}, "Cell-Source": {"nats/ORDERS"}, "Cell-Hops": {"1"},
		}}
	}
	futs := make(chan jetstream.PubAckFuture, 4096)
	var failed atomic.Int64
	waited := make(chan struct{})
	b.ReportAllocs()
	b.ResetTimer()
	start, cpu := time.Now(), processCPU()
	go func() {
		defer close(waited)
		for f := range futs {
			select {
			case <-f.Ok():
			case <-f.Err():
				failed.Add(1)
			}
		}
	}()
	for _, m := range msgs {
		f, err := js.PublishMsgAsync(m, jetstream.WithStallWait(time.Minute))
		if err != nil {
			b.Fatal(err)
		}
		futs <- f
	}
	close(futs)
	<-waited
	reportRate(b, start, cpu)
	b.StopTimer()
	if n := failed.Load(); n > 0 {
		b.Fatalf("%d publishes failed", n)
	}
}
