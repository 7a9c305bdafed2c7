package bridge

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

const benchRules = `kind: CellMap
version: 1
shards: 100
cells:
  - {name: rz00, state: active, failover: rz01, shards: ["0-49"]}
  - {name: rz01, state: active, failover: rz00, shards: ["50-99"]}
---
kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>"}
key: {json: user.id}
shard: {func: digits, from: -3, to: -1}
target: {broker: nats, subject: "cell.{cell}.orders"}
onMissingKey: dlq
dlq: {broker: nats, subject: dlq.orders}
`

// chanSink confirms every publish from one goroutine, like a broker client's
// ack reader, at zero broker cost; it bounds pending publishes like a real
// async publisher does.
type chanSink struct {
	ch   chan func(error)
	quit chan struct{}
	done chan struct{}
}

func newChanSink(pending int) *chanSink {
	s := &chanSink{ch: make(chan func(error), pending), quit: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		for {
			select {
			case f := <-s.ch:
				f(nil)
			case <-s.quit:
				return
			}
		}
	}()
	return s
}

func (s *chanSink) PublishAsync(ctx context.Context, m *Outgoing, done func(error)) {
	select {
	case s.ch <- done:
	case <-ctx.Done():
		done(ctx.Err())
	}
}

func (s *chanSink) Close(ctx context.Context) error {
	close(s.quit)
	<-s.done
	return nil
}

// cpuMeter sums the process's CPU time over start/stop intervals.
type cpuMeter struct {
	total time.Duration
	at    time.Duration
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (c *cpuMeter) start() { c.at = processCPU() }
func (c *cpuMeter) stop() {
	if c.at != 0 {
		c.total += processCPU() - c.at
		c.at = 0
	}
}

// BenchmarkPipeline measures the bridge's own cost per forwarded message:
// JSON key extraction, routing, in-memory dedupe reserve+commit, headers,
// metrics, lane bookkeeping, ack — with a sink and source that cost nothing.
// Building the source messages is excluded from time and allocations.
func BenchmarkPipeline(b *testing.B) {
	b.Run("bare-pipe", func(b *testing.B) { benchPipeline(b, bareStore{}) })
	b.Run("memory-store", func(b *testing.B) { benchPipeline(b, nil) })
	b.Run("worker-pool", func(b *testing.B) {
		benchPipeline(b, wrapStore{dedupe.NewMemory(dedupe.MemoryConfig{})})
	})
}

// BenchmarkPipelineBroadcast is BenchmarkPipeline's memory-store run with
// the rule broadcasting each message to four cells: per op, one source
// message and its four copies.
func BenchmarkPipelineBroadcast(b *testing.B) {
	rules := strings.Replace(benchRules, "cells:\n", "cells:\n  - {name: rz10, state: active, failover: rz11, shards: []}\n  - {name: rz11, state: active, failover: rz10, shards: []}\n", 1)
	rules = strings.Replace(rules, "shard: {func: digits, from: -3, to: -1}\n", "", 1)
	rules = strings.Replace(rules, `target: {broker: nats, subject: "cell.{cell}.orders"}`, `target: {broker: nats, subject: "cell.{cell}.orders", cells: all}`, 1)
	// The sink holds as many publishes as the bridge configuration gives
	// it (maxInFlight + maxLagging): four copies of 1024 messages fill
	// 4096 in-flight slots, more than the routed run's 4000.
	benchPipelineRules(b, nil, rules, 4096+10000)
}

func benchPipeline(b *testing.B, store dedupe.Store) { benchPipelineRules(b, store, benchRules, 4000) }

func benchPipelineRules(b *testing.B, store dedupe.Store, rules string, pending int) {
	tbl, err := router.Parse("bench.yaml", []byte(rules))
	if err != nil {
		b.Fatal(err)
	}
	if store == nil {
		store = dedupe.NewMemory(dedupe.MemoryConfig{})
	}
	sink := newChanSink(pending)
	p, err := New(Config{}, Deps{
		Rules: router.NewHolder(tbl), Dedupe: store, Sinks: StaticSinks(map[string]Sink{"nats": sink}),
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	var acked atomic.Int64
	var wg sync.WaitGroup
	ack := func(ctx context.Context, err error) error {
		if err == nil {
			acked.Add(1)
		}
		wg.Done()
		return nil
	}
	const batch = 1 << 14
	msgs := make([]Message, batch)
	now := time.Now()
	build := func(base int) {
		for i := range msgs {
			n := base + i
			id := strconv.Itoa(n)
			msgs[i] = Message{
				Message: router.Message{Subject: "orders.created",
					Body: []byte(fmt.Sprintf(`{"order":"o-%d","user":{"id":20880000%08d},"amount":1299,"currency":"CNY"}`, n, n%99991*7))},
				Rule: "orders", SourceID: "ORDERS:" + id, Source: "nats/ORDERS", Time: now, Deliveries: 1,
			}
		}
	}
	ctx := context.Background()
	handle := p.Handle
	if _, bare := store.(bareStore); bare {
		// The reference: what a hand-written pipe does per message on the
		// client side (publish with the source id, ack on confirm), through
		// the same sink, with no routing, dedupe, lanes or metrics.
		handle = func(ctx context.Context, m *Message, ack Ack) error {
			out := &Outgoing{Target: router.Target{Broker: "nats", Subject: "cell.rz00.orders"}, MsgID: m.SourceID, Header: m.Header, Body: m.Body}
			sink.PublishAsync(ctx, out, func(err error) { ack(ctx, err) })
			return nil
		}
	}
	b.ReportAllocs()
	var cpu cpuMeter
	b.ResetTimer()
	cpu.start()
	for done := 0; done < b.N; {
		b.StopTimer()
		cpu.stop()
		build(done)
		cpu.start()
		b.StartTimer()
		wg.Add(min(batch, b.N-done))
		for i := 0; i < batch && done < b.N; i++ {
			if err := handle(ctx, &msgs[i], ack); err != nil {
				b.Fatal(err)
			}
			done++
		}
		wg.Wait()
	}
	b.StopTimer()
	cpu.stop()
	if _, bare := store.(bareStore); bare {
		acked.Store(int64(b.N))
	}
	// CPU time of the whole process per message: unlike ns/op it does not
	// depend on what else runs on the machine.
	b.ReportMetric(float64(cpu.total.Nanoseconds())/float64(b.N), "cpu-ns/op")
	if _, bare := store.(bareStore); bare {
		// nothing went through the pipeline
	} else if got := value(p.met.Messages.WithLabelValues("orders", OutcomeForwarded)); got != float64(b.N) {
		b.Fatalf("forwarded %v of %d", got, b.N)
	}
	_ = p.Close(ctx)
	_ = sink.Close(ctx)
	_ = store.Close(ctx)
}

// bareStore marks the bare-pipe reference run.
type bareStore struct{ dedupe.Store }

func (bareStore) Close(context.Context) error { return nil }

// Local: the bare pipe keeps nothing outside the process.
func (bareStore) Local() bool { return true }
