package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
)

const defaultMaxPending = 4096

var (
	// ErrClosed is passed to done for publishes started after Close, and
	// for publishes whose ack had not arrived when Close's ctx expired
	// (those may or may not be stored).
	ErrClosed = errors.New("natsjs: sink closed")
	// ErrUnknownBroker is passed to done when the target names a broker the
	// Sink was not given.
	ErrUnknownBroker = errors.New("natsjs: unknown target broker")
)

// DuplicateError is what done receives when the target stream dropped the
// message as a repeat of an earlier one with the same Nats-Msg-Id inside its
// duplicate window. It wraps bridge.ErrDuplicate: the message is stored (by
// the earlier publish), so the bridge treats it as confirmed.
type DuplicateError struct {
	Broker string
	Stream string
	// Seq is the stream sequence the server reports for the duplicate.
	Seq uint64
}

func (e *DuplicateError) Error() string {
	return fmt.Sprintf("natsjs: broker %q stream %s: duplicate of seq %d", e.Broker, e.Stream, e.Seq)
}

// Unwrap makes errors.Is(err, bridge.ErrDuplicate) hold.
func (e *DuplicateError) Unwrap() error { return bridge.ErrDuplicate }

// SinkConfig tunes a Sink.
type SinkConfig struct {
	// MaxPending caps the publishes per broker whose ack has not been
	// delivered to done yet; PublishAsync blocks at the cap. Default 4096
	// (enough to keep a 2-core broker busy; more only adds memory).
	MaxPending int
}

// Sink publishes to JetStream streams on one or more brokers; it implements
// bridge.Sink. Each broker gets one completion goroutine that waits for the
// publish acks in publish order and calls done, so there is no goroutine per
// message. PublishAsync is safe for concurrent use. Close stops the Sink's
// goroutines; the JetStream contexts and their connections stay the
// caller's, because the source and the dedupe store usually share them.
type Sink struct {
	brokers map[string]*brokerSink

	// mu makes "check closed, take a slot, publish, enqueue" atomic with
	// respect to Close, so nothing is enqueued after the queues are closed.
	mu        sync.RWMutex
	closed    bool
	closing   chan struct{} // closed first by Close: wakes blocked publishers
	abort     chan struct{} // closed when Close's ctx expires: stop waiting for acks
	closeOnce sync.Once
	abortOnce sync.Once
}

var _ bridge.Sink = (*Sink)(nil)

type brokerSink struct {
	name   string
	js     jetstream.JetStream
	slots  chan struct{} // counting semaphore: one token per unresolved publish
	queue  chan pending  // publish order; capacity == slots, so sends never block
	exited chan struct{}
}

// pending is one publish awaiting its ack.
type pending struct {
	fut  jetstream.PubAckFuture
	done func(error)
}

// NewSink returns a Sink publishing to conns, keyed by broker name (the
// Target.Broker values the router renders). Create each JetStream context
// with NewJetStream so its own pending limit is not lower than MaxPending.
// log is unused today and kept for parity with the other constructors.
func NewSink(conns map[string]jetstream.JetStream, cfg SinkConfig, log *slog.Logger) (*Sink, error) {
	_ = log
	if len(conns) == 0 {
		return nil, errors.New("natsjs: sink: no brokers")
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = defaultMaxPending
	}
	s := &Sink{
		brokers: make(map[string]*brokerSink, len(conns)),
		closing: make(chan struct{}),
		abort:   make(chan struct{}),
	}
	for name, js := range conns {
		if js == nil {
			return nil, fmt.Errorf("natsjs: sink: broker %q: nil JetStream", name)
		}
	}
	for name, js := range conns {
		b := &brokerSink{
			name:   name,
			js:     js,
			slots:  make(chan struct{}, cfg.MaxPending),
			queue:  make(chan pending, cfg.MaxPending),
			exited: make(chan struct{}),
		}
		s.brokers[name] = b
		go s.complete(b)
	}
	return s, nil
}

// PublishAsync implements bridge.Sink. Nats-Msg-Id is set to m.MsgID; the
// header map is sent as is when it already holds that value (the pipeline
// sets it), else a copy with it is sent: m is never modified. m.Header and
// m.Body are not copied otherwise, so the caller must leave them alone until
// done has run. PublishAsync blocks while MaxPending publishes to the target
// broker are unresolved, until ctx is done (done gets ctx's error) or Close
// starts (done gets ErrClosed). done is called exactly once: on the broker's
// completion goroutine, or before PublishAsync returns for failures that
// happen before anything was sent (unknown broker, ctx, closed, a client
// error).
func (s *Sink) PublishAsync(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		done(ErrClosed)
		return
	}
	b := s.brokers[m.Target.Broker]
	if b == nil {
		done(fmt.Errorf("%w %q (subject %q)", ErrUnknownBroker, m.Target.Broker, m.Target.Subject))
		return
	}
	select {
	case b.slots <- struct{}{}:
	default:
		select {
		case b.slots <- struct{}{}:
		case <-ctx.Done():
			done(fmt.Errorf("natsjs: publish to broker %q: %w", b.name, ctx.Err()))
			return
		case <-s.closing:
			done(ErrClosed)
			return
		}
	}
	fut, err := b.js.PublishMsgAsync(&nats.Msg{Subject: m.Target.Subject, Header: withMsgID(m.Header, m.MsgID), Data: m.Body})
	if err != nil {
		<-b.slots
		done(fmt.Errorf("natsjs: publish to broker %q subject %q: %w", b.name, m.Target.Subject, err))
		return
	}
	b.queue <- pending{fut: fut, done: done}
}

// withMsgID returns h with Nats-Msg-Id = id: h itself when it already says
// so, else a shallow copy (the bridge's headers are not ours to change).
// The copy shares the Cell-Msg-Id value slice when it holds the same id.
func withMsgID(h map[string][]string, id string) nats.Header {
	if v := h[jetstream.MsgIDHeader]; len(v) == 1 && v[0] == id {
		return h
	}
	c := make(nats.Header, len(h)+1)
	maps.Copy(c, h)
	if v := h[bridge.HeaderMsgID]; len(v) == 1 && v[0] == id {
		c[jetstream.MsgIDHeader] = v
	} else {
		c[jetstream.MsgIDHeader] = []string{id}
	}
	return c
}

// complete resolves one broker's publishes in publish order. Waiting in order
// costs little: a stream acks its publishes in order, and different streams
// on one server answer within about the same time, so an ack that arrives
// before the head's waits only as long as the head takes.
func (s *Sink) complete(b *brokerSink) {
	defer close(b.exited)
	for p := range b.queue {
		p.done(s.wait(b, p.fut))
		<-b.slots
	}
}

func (s *Sink) wait(b *brokerSink, fut jetstream.PubAckFuture) error {
	select {
	case ack := <-fut.Ok():
		if ack.Duplicate {
			return &DuplicateError{Broker: b.name, Stream: ack.Stream, Seq: ack.Sequence}
		}
		return nil
	case err := <-fut.Err():
		return fmt.Errorf("natsjs: publish to broker %q subject %q: %w", b.name, fut.Msg().Subject, err)
	case <-s.abort:
		return fmt.Errorf("%w before the ack arrived (broker %q)", ErrClosed, b.name)
	}
}

// Close stops accepting publishes (blocked and later PublishAsync calls get
// ErrClosed), waits until every accepted publish has been resolved and its
// done called, then stops the Sink's goroutines. If ctx ends first, the
// publishes still waiting for their ack are resolved with ErrClosed (they
// may or may not be stored) and Close returns ctx's error. It does not close
// the connections. Close is idempotent and safe for concurrent use.
func (s *Sink) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		close(s.closing)
		s.mu.Lock()
		s.closed = true
		for _, b := range s.brokers {
			close(b.queue)
		}
		s.mu.Unlock()
	})
	var err error
	for _, b := range s.brokers {
		select {
		case <-b.exited:
		case <-ctx.Done():
			err = fmt.Errorf("natsjs: sink close: %w", ctx.Err())
			s.abortOnce.Do(func() { close(s.abort) })
			<-b.exited
		}
	}
	return err
}
