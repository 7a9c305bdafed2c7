package natsjs

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/jspub"
)

// publisher is one broker's asynchronous JetStream publisher: a jspub.Pipe
// on the broker's connection whose token is the bridge's done callback, so
// a publish allocates nothing for its bookkeeping. The pipe keeps the slot
// table, matches the PubAcks, enforces the ack timeout and fails publishes
// while the connection is down; publisher turns each outcome into what done
// is documented to receive (see Sink.PublishAsync).
type publisher struct {
	name string
	pipe *jspub.Pipe[func(error)]
}

func newPublisher(name string, nc *nats.Conn, maxPending int, ackTimeout time.Duration) (*publisher, error) {
	p := &publisher{name: name}
	pipe, err := jspub.New(nc, jspub.Config{MaxPending: maxPending, Timeout: ackTimeout}, p.complete)
	if err != nil {
		return nil, fmt.Errorf("natsjs: sink: broker %q: %w", name, err)
	}
	p.pipe = pipe
	return p, nil
}

// publish implements PublishAsync for this broker (see Sink.PublishAsync).
func (p *publisher) publish(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	setMsgID(m, m.MsgID)
	p.pipe.Send(ctx, m.Target.Subject, nats.Header(m.Header), m.Body, done)
}

// complete is the pipe's completion: it reads the PubAck, or names the
// failure, and calls done.
func (p *publisher) complete(done func(error), subject string, reply *nats.Msg, err error) {
	if err == nil {
		var ack jspub.Ack
		if ack, err = jspub.ReadAck(reply); err == nil {
			if ack.Duplicate {
				done(&DuplicateError{Broker: p.name, Stream: string(ack.Stream), Seq: ack.Seq})
				return
			}
			done(nil)
			return
		}
	}
	done(p.describe(subject, err))
}

// describe names the broker and subject in a failed publish's error, and
// adds the sentinels the Sink documents: jetstream.ErrAsyncPublishTimeout
// for an ack timeout, ErrClosed for a publish the Sink's closing refused or
// cut short.
func (p *publisher) describe(subject string, err error) error {
	var also error
	switch {
	case errors.Is(err, jspub.ErrTimeout):
		also = jetstream.ErrAsyncPublishTimeout
	case errors.Is(err, jspub.ErrClosed):
		also = ErrClosed
	}
	if also != nil {
		return fmt.Errorf("natsjs: publish to broker %q subject %q: %w (%w)", p.name, subject, err, also)
	}
	if errors.Is(err, jspub.ErrNoStream) {
		return fmt.Errorf("natsjs: publish to broker %q subject %q: no stream captures the subject, or its stream has no leader (create it: cellbridge streams -apply): %w", p.name, subject, err)
	}
	return fmt.Errorf("natsjs: publish to broker %q subject %q: %w", p.name, subject, err)
}
