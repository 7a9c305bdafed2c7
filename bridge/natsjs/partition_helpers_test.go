package natsjs

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/router"
)

// floorPartition is the smallest Partition the partitioned source can
// drive in tests: a durable pull consumer that resets to its ack floor at
// the start of every Run (the ordered takeover) and counts the deliveries
// the handler has not settled, for Release. It does not pin: in these
// tests the leases alone keep one replica on a partition, and a replica
// that vanishes has its connection closed, so it cannot pull any more.
type floorPartition struct {
	js   jetstream.JetStream
	spec PartitionSpec
	cons jetstream.Consumer

	mu      sync.Mutex
	epoch   *bridge.Epoch
	open    int
	settled chan struct{} // closed and replaced whenever open drops
	state   string
	resets  int

	released func(error)       // when set, told every graceful Release's result
	running  func(active bool) // when set, told when Run starts and stops consuming
}

// floorPartitions is a PartitionFactory of floorPartitions on js; made
// records every partition made, when it is not nil.
func floorPartitions(js jetstream.JetStream, made func(*floorPartition)) PartitionFactory {
	return func(ctx context.Context, spec PartitionSpec) (Partition, error) {
		cons, err := js.CreateOrUpdateConsumer(ctx, spec.Stream, jetstream.ConsumerConfig{
			Durable:       spec.Durable,
			FilterSubject: spec.Filter,
			AckPolicy:     jetstream.AckExplicitPolicy,
			MaxDeliver:    -1,
			AckWait:       30 * time.Second,
			MaxAckPending: 1000,
		})
		if err != nil {
			return nil, err
		}
		p := &floorPartition{js: js, spec: spec, cons: cons, settled: make(chan struct{}), state: "standby"}
		if made != nil {
			made(p)
		}
		return p, nil
	}
}

func (p *floorPartition) Run(ctx context.Context, h bridge.Handler) error {
	var err error
	for range 3 {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		_, err = p.js.ResetConsumer(rctx, p.spec.Stream, p.spec.Durable)
		cancel()
		if err == nil || ctx.Err() != nil {
			break
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reset %s: %w", p.spec.Durable, err)
	}
	ep := &bridge.Epoch{}
	p.mu.Lock()
	p.epoch, p.state = ep, "active"
	p.resets++
	p.mu.Unlock()
	if p.running != nil {
		p.running(true)
		defer p.running(false)
	}
	cc, err := p.cons.Consume(func(msg jetstream.Msg) { p.deliver(ctx, ep, msg, h) },
		jetstream.PullMaxMessages(64), jetstream.PullExpiry(time.Second))
	if err != nil {
		return err
	}
	<-ctx.Done()
	cc.Stop()
	<-cc.Closed()
	p.mu.Lock()
	p.state = "stopped"
	p.mu.Unlock()
	return nil
}

func (p *floorPartition) deliver(ctx context.Context, ep *bridge.Epoch, msg jetstream.Msg, h bridge.Handler) {
	meta, ok := parseAck(msg.Reply())
	if !ok {
		return
	}
	subj := msg.Subject()
	for range p.spec.StripTokens {
		_, subj, _ = strings.Cut(subj, ".")
	}
	hdr := msg.Headers()
	m := &bridge.Message{
		Message:    router.Message{Subject: subj, Header: hdr, Body: msg.Data()},
		Rule:       p.spec.Rule,
		SourceID:   sourceID(hdr, &meta),
		Source:     p.spec.Broker + "/" + p.spec.Stream,
		Time:       time.Unix(0, meta.timestamp),
		Deliveries: int(meta.delivered),
		Epoch:      ep,
	}
	p.mu.Lock()
	p.open++
	p.mu.Unlock()
	var once sync.Once
	_ = h(ctx, m, func(_ context.Context, err error) error {
		var aerr error
		switch {
		case errors.Is(err, bridge.ErrInProgress):
			return msg.InProgress()
		case err == nil:
			aerr = msg.Ack()
		case errors.Is(err, bridge.ErrRevoked):
			// The next owner resets the consumer and re-reads it.
		default:
			aerr = msg.Nak()
		}
		once.Do(func() {
			p.mu.Lock()
			p.open--
			close(p.settled)
			p.settled = make(chan struct{})
			p.mu.Unlock()
		})
		return aerr
	})
}

// Release waits for the open deliveries; when ctx ends first it revokes
// the epoch (a lost lease: ctx is done from the start).
func (p *floorPartition) Release(ctx context.Context) error {
	lost := ctx.Err() != nil
	err := p.drain(ctx)
	if err != nil {
		p.mu.Lock()
		if p.epoch != nil {
			p.epoch.Revoke()
		}
		p.mu.Unlock()
	}
	if p.released != nil && !lost {
		p.released(err)
	}
	return err
}

func (p *floorPartition) drain(ctx context.Context) error {
	for {
		p.mu.Lock()
		open, settled := p.open, p.settled
		p.mu.Unlock()
		if open == 0 {
			return nil
		}
		select {
		case <-settled:
		case <-ctx.Done():
			return fmt.Errorf("%d deliveries unsettled: %w", open, ctx.Err())
		}
	}
}

func (p *floorPartition) State() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.state
}
