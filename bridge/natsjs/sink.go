package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
)

const (
	defaultMaxPending = 4096
	defaultAckTimeout = 30 * time.Second
)

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
	// AckTimeout fails a publish whose ack has not arrived this long after
	// PublishAsync sent it (the message may or may not be stored; the bridge
	// retries and the target's duplicate window absorbs a repeat). Without
	// it a lost ack would hold its message, and a pending slot, until the
	// connection drops. The completion goroutine checks it on the head of
	// its in-order queue with one reused timer, so it costs no timer per
	// publish. Default 30s; negative turns it off.
	AckTimeout time.Duration
}

// Sink publishes to JetStream streams on one or more brokers; it implements
// bridge.Sink. Each broker gets one completion goroutine that waits for the
// publish acks in publish order and calls done, so there is no goroutine per
// message. PublishAsync is safe for concurrent use. Close stops the Sink's
// goroutines; the JetStream contexts and their connections stay the
// caller's, because the source and the dedupe store usually share them.
type Sink struct {
	brokers    map[string]*brokerSink
	ackTimeout time.Duration // <= 0: none
	epoch      time.Time     // origin of pending.sent: a monotonic reading is half the cost of time.Now

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
	sent time.Duration // when it was handed to the client, on the Sink's monotonic clock (AckTimeout)
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
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = defaultAckTimeout
	}
	s := &Sink{
		brokers:    make(map[string]*brokerSink, len(conns)),
		ackTimeout: cfg.AckTimeout,
		epoch:      time.Now(),
		closing:    make(chan struct{}),
		abort:      make(chan struct{}),
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

// PublishAsync implements bridge.Sink. Nats-Msg-Id is set to m.MsgID in
// m.Header itself (bridge.Outgoing allows a sink its idempotency header; a
// nil map is replaced by a new one); nothing else in m is changed or copied,
// so the caller must leave m.Header and m.Body alone until done has run. PublishAsync blocks while MaxPending publishes to the target
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
	setMsgID(m, m.MsgID)
	var sent time.Duration
	if s.ackTimeout > 0 {
		sent = time.Since(s.epoch)
	}
	fut, err := b.js.PublishMsgAsync(&nats.Msg{Subject: m.Target.Subject, Header: m.Header, Data: m.Body})
	if err != nil {
		<-b.slots
		done(fmt.Errorf("natsjs: publish to broker %q subject %q: %w", b.name, m.Target.Subject, err))
		return
	}
	b.queue <- pending{fut: fut, done: done, sent: sent}
}

// setMsgID makes m.Header say Nats-Msg-Id = id, in place: no copy of the
// map per message. It reuses the Cell-Msg-Id value slice when that holds the
// same id, so the common case allocates nothing.
func setMsgID(m *bridge.Outgoing, id string) {
	h := m.Header
	if v := h[jetstream.MsgIDHeader]; len(v) == 1 && v[0] == id {
		return
	}
	if h == nil {
		h = make(map[string][]string, 1)
		m.Header = h
	}
	if v := h[bridge.HeaderMsgID]; len(v) == 1 && v[0] == id {
		h[jetstream.MsgIDHeader] = v
	} else {
		h[jetstream.MsgIDHeader] = []string{id}
	}
}

// complete resolves one broker's publishes in publish order. Waiting in order
// costs little: a stream acks its publishes in order, and different streams
// on one server answer within about the same time, so an ack that arrives
// before the head's waits only as long as the head takes.
//
// AckTimeout is enforced on the head of the queue only, with one timer per
// broker that stays armed across heads: publishes were sent in queue order,
// so no later publish is due before the head. When the timer fires for a
// head that is not due yet (it was armed for an earlier one), it is re-armed
// for the head's own deadline, so it fires at most about once per AckTimeout
// while acks flow.
func (s *Sink) complete(b *brokerSink) {
	defer close(b.exited)
	var dl deadline
	if s.ackTimeout > 0 {
		dl.t = time.NewTimer(time.Hour)
		dl.t.Stop()
		defer dl.t.Stop()
	}
	for p := range b.queue {
		p.done(s.wait(b, &p, &dl))
		<-b.slots
	}
}

// deadline is the completion goroutine's reused ack-timeout timer.
type deadline struct {
	t     *time.Timer // nil: no AckTimeout
	armed bool        // t runs (and has not been received from)
}

func (s *Sink) wait(b *brokerSink, p *pending, dl *deadline) error {
	fut := p.fut
	for {
		var timeout <-chan time.Time
		if dl.t != nil {
			if !dl.armed {
				dl.t.Reset(p.sent + s.ackTimeout - time.Since(s.epoch))
				dl.armed = true
			}
			timeout = dl.t.C
		}
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
		case <-timeout:
			dl.armed = false
			if time.Since(s.epoch)-p.sent >= s.ackTimeout {
				return fmt.Errorf("natsjs: publish to broker %q subject %q: no ack within %v: %w",
					b.name, fut.Msg().Subject, s.ackTimeout, jetstream.ErrAsyncPublishTimeout)
			}
		}
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
