package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"github.com/tidwall/gjson"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
)

// The RocketMQ comparison runs through the in-process broker of
// internal/rmqtest (real wire protocol, driven by the real
// rocketmq-client-go): R-A is a bare consume → produce loop, R-B cellbridge
// with the memory dedupe store. Same method as the NATS variants: events
// pre-published to topic "orders", timing until the cell topics hold N,
// every message verified.

func rmqCellTopic(cell string) string { return "cell_" + cell + "_orders" }

func init() {
	// The client logs every rebalance and pull at info level.
	rmq.SetLogger(slog.New(slog.DiscardHandler))
}

func runRMQChild(spec childSpec) (*childResult, error) {
	table, err := loadCellTable(spec.Rules)
	if err != nil {
		return nil, err
	}
	ctx := context.Background()
	b := rmqtest.New(rmqtest.Options{MaxSuspend: time.Second})
	if err := b.Start(ctx); err != nil {
		return nil, err
	}
	defer func() { _ = b.Close(context.Background()) }()
	if err := b.CreateTopic("orders", 4); err != nil {
		return nil, err
	}
	for _, c := range table.cells {
		if err := b.CreateTopic(rmqCellTopic(c), 4); err != nil {
			return nil, err
		}
	}
	ns := b.NameServerAddr()
	evs := genEvents(spec.N, spec.Seed)
	if err := rmqPrePublish(ctx, ns, evs); err != nil {
		return nil, err
	}
	runtime.GC()
	resetPeakRSS()
	count := func() int {
		n := 0
		for _, c := range table.cells {
			for _, o := range b.QueueOffsets(rmqCellTopic(c)) {
				n += int(o)
			}
		}
		return n
	}
	e := &env{table: table, spec: spec, tune: parseTune(spec.Tune)}
	stopProf, err := startCPUProfile(spec.CPUProfile)
	if err != nil {
		return nil, err
	}
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	cpu0 := cpuTime()
	vctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	var verr error
	wg.Add(1)
	t0 := time.Now()
	go func() {
		defer wg.Done()
		switch spec.Variant {
		case "R-A":
			verr = runRMQPipe(vctx, e, ns)
		default:
			verr = runRMQBridge(vctx, e, ns)
		}
	}()
	deadline := time.Now().Add(time.Duration(spec.N/500+60) * time.Second)
	n := 0
	for {
		n = count()
		if n >= spec.N || time.Now().After(deadline) {
			break
		}
		time.Sleep(pollEvery)
	}
	t1 := time.Now()
	cpu1 := cpuTime()
	stopProf()
	runtime.ReadMemStats(&ms1)
	peak := readPeakRSSMB()
	time.Sleep(300 * time.Millisecond)
	cancel()
	wg.Wait()
	if verr != nil && !errors.Is(verr, context.Canceled) {
		return nil, fmt.Errorf("variant %s: %w", spec.Variant, verr)
	}
	res := &childResult{Variant: spec.Variant, N: spec.N, Seconds: t1.Sub(t0).Seconds(), PeakRSSMB: peak,
		Mallocs: ms1.Mallocs - ms0.Mallocs, HeapBytes: ms1.TotalAlloc - ms0.TotalAlloc, Settings: e.settings,
		CPUus: float64(cpu1-cpu0) / 1e3 / float64(max(n, 1))}
	res.MsgsPerS = float64(n) / res.Seconds
	// Verify: every order exactly once, each in its cell's topic.
	tl := newTally(table, res, spec.N)
	for _, c := range table.cells {
		for _, m := range b.Messages(rmqCellTopic(c)) {
			tl.add(c, m.Body)
		}
	}
	notes := tl.notes("cell topics")
	res.Verified = len(notes) == 0
	res.VerifyNote = strings.Join(notes, "; ")
	return res, nil
}

// rmqPrePublish stores the events in topic "orders" from 32 concurrent
// synchronous senders (the client has no pipelined send).
func rmqPrePublish(ctx context.Context, ns string, evs []event) error {
	p, err := producer.NewDefaultProducer(
		producer.WithNsResolver(primitive.NewPassthroughResolver([]string{ns})),
		producer.WithGroupName("bench-producer"),
		producer.WithInstanceName(fmt.Sprintf("bench-pre-%d", os.Getpid())),
	)
	if err != nil {
		return err
	}
	if err := p.Start(); err != nil {
		return err
	}
	defer func() { _ = p.Shutdown() }()
	var wg sync.WaitGroup
	errc := make(chan error, 1)
	const senders = 32
	for w := 0; w < senders; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := w; i < len(evs); i += senders {
				m := primitive.NewMessage("orders", evs[i].body)
				m.WithKeys([]string{evs[i].id})
				if err := sendRetrying(ctx, p, m); err != nil {
					select {
					case errc <- fmt.Errorf("pre-publish: %w", err):
					default:
					}
					return
				}
			}
		}(w)
	}
	wg.Wait()
	select {
	case err := <-errc:
		return err
	default:
		return nil
	}
}

// sendRetrying sends m, retrying for up to about 2s. A fresh producer that
// many goroutines share can briefly know a topic's queues but not yet its
// broker's address ("route info not found"); pre-publishing is not timed, so
// it simply tries again.
func sendRetrying(ctx context.Context, p interface {
	SendSync(context.Context, ...*primitive.Message) (*primitive.SendResult, error)
}, m *primitive.Message) error {
	var err error
	for range 40 {
		if _, err = p.SendSync(ctx, m); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(50 * time.Millisecond):
		}
	}
	return err
}

// runRMQPipe is the bare loop: a push consumer whose callback computes the
// cell inline and sends each message synchronously to the cell topic (Keys =
// the source message id, the idempotency key), returning ConsumeSuccess
// after all sends of the batch succeeded. Tuning: goroutines=N
// (ConsumeGoroutineNums, default 128), batch=N (ConsumeMessageBatchMaxSize,
// default 4), pull=N (PullBatchSize, default 128); the defaults were the
// best of 32/1/4 per batch and 64/128/256 goroutines tried. cellhdrs=1
// sends what cellbridge's copy carries besides the body (an experiment
// that separates the cost of the bigger message from cellbridge's own):
// the six Cell-* properties and the source's keys plus the idempotency
// key.
func runRMQPipe(ctx context.Context, e *env, ns string) error {
	gor := e.tuneInt("goroutines", 128)
	batch := e.tuneInt("batch", 4)
	pull := e.tuneInt("pull", 128)
	cellHdrs := e.tuneInt("cellhdrs", 0) == 1
	e.settings = fmt.Sprintf("push consumer ConsumeGoroutineNums=%d ConsumeMessageBatchMaxSize=%d PullBatchSize=%d; SendSync per message", gor, batch, pull)
	if cellHdrs {
		e.settings += " cellhdrs=1"
	}
	res := primitive.NewPassthroughResolver([]string{ns})
	p, err := producer.NewDefaultProducer(producer.WithNsResolver(res), producer.WithGroupName("bench-pipe"),
		producer.WithInstanceName(fmt.Sprintf("bench-pipe-p-%d", os.Getpid())))
	if err != nil {
		return err
	}
	if err := p.Start(); err != nil {
		return err
	}
	defer func() { _ = p.Shutdown() }()
	c, err := consumer.NewPushConsumer(consumer.WithNsResolver(res), consumer.WithGroupName("bench-pipe"),
		consumer.WithInstance(fmt.Sprintf("bench-pipe-c-%d", os.Getpid())),
		consumer.WithConsumeFromWhere(consumer.ConsumeFromFirstOffset),
		consumer.WithConsumeGoroutineNums(gor), consumer.WithConsumeMessageBatchMaxSize(batch),
		consumer.WithPullBatchSize(int32(pull)))
	if err != nil {
		return err
	}
	err = c.Subscribe("orders", consumer.MessageSelector{}, func(cctx context.Context, msgs ...*primitive.MessageExt) (consumer.ConsumeResult, error) {
		for _, m := range msgs {
			id := gjson.GetBytes(m.Body, "user.id")
			sh, ok := shardOf([]byte(id.Str))
			if !ok {
				continue // no usable key: dropped (the pipe has no DLQ)
			}
			cell := e.table.byShard[sh]
			out := primitive.NewMessage(rmqCellTopic(cell), m.Body)
			if cellHdrs {
				out.WithKeys([]string{m.GetKeys(), m.MsgId})
				out.WithProperty(bridge.HeaderMsgID, m.MsgId)
				out.WithProperty(bridge.HeaderCell, cell)
				out.WithProperty(bridge.HeaderShard, strconv.Itoa(sh))
				out.WithProperty(bridge.HeaderRulesVersion, "1")
				out.WithProperty(bridge.HeaderSource, "rmq/orders")
				out.WithProperty(bridge.HeaderHops, "1")
			} else {
				out.WithKeys([]string{m.MsgId})
			}
			if _, err := p.SendSync(ctx, out); err != nil {
				return consumer.ConsumeRetryLater, nil
			}
		}
		return consumer.ConsumeSuccess, nil
	})
	if err != nil {
		return err
	}
	if err := c.Start(); err != nil {
		return err
	}
	<-ctx.Done()
	return c.Shutdown()
}

// runRMQBridge is cellbridge with the RocketMQ source and sink and the
// memory dedupe store: the bridge of `cellbridge run` (package internal/app)
// with a configuration naming the in-process broker as broker rmq.
func runRMQBridge(ctx context.Context, e *env, ns string) error {
	rules, err := filepath.Abs(e.spec.Rules)
	if err != nil {
		return err
	}
	a, err := startBridge(ctx, e, rules, fmt.Sprintf("brokers:\n  rmq: {type: rocketmq, nameservers: [%q], instancePrefix: bench}\ndedupe: {store: memory}\n", ns))
	if err != nil {
		return err
	}
	eff := a.Pipeline.Config()
	e.settings = fmt.Sprintf("rmq source (client's pull batch), rmq sink (64 send workers), maxInFlight=%d workers=%d, memory dedupe",
		eff.MaxInFlight, eff.Workers)
	return runUntilDone(ctx, []*app.App{a})
}
