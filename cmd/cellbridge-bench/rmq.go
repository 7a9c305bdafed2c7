package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"
	"github.com/tidwall/gjson"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/rmq"
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
