package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/jspub"
)

const (
	defaultMaxPending = 4096
	// DefaultAckTimeout is SinkConfig.AckTimeout's default: long enough for
	// a stream leader election to finish, short enough that a publish lost
	// with its server holds its key for seconds, not half a minute.
	DefaultAckTimeout = 3 * time.Second
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
	// MaxPending caps the publishes per broker whose done has not returned
	// yet; PublishAsync blocks at the cap. Default 4096 (enough to keep a
	// 2-core broker busy; more only adds memory), at most
	// jspub.MaxPendingLimit (1<<20). Each broker holds a table of
	// MaxPending slots of about 64 bytes.
	MaxPending int
	// AckTimeout fails a publish whose ack has not arrived this long after
	// PublishAsync sent it, with an error wrapping
	// jetstream.ErrAsyncPublishTimeout (the message may or may not be
	// stored; the bridge retries and the target's duplicate window absorbs
	// a repeat). Without it a lost ack would hold its message, and a pending
	// slot, forever. One goroutine per broker sweeps the slot table every
	// AckTimeout/4 (within 100ms..1s, never more than AckTimeout), so the
	// failure comes between AckTimeout and AckTimeout plus three sweeps, and no
	// timer is armed per publish. Default DefaultAckTimeout (3s); negative
	// turns it off. It must stay below the dedupe store's ReserveTTL (the
	// reservation must outlive the publish it covers).
	AckTimeout time.Duration
	// AckTimeouts sets AckTimeout per broker name; brokers not in it use
	// AckTimeout.
	AckTimeouts map[string]time.Duration
}

// Sink publishes to JetStream streams on one or more brokers; it implements
// bridge.Sink. It publishes with core NATS and reads the acks itself: one
// reply subscription per broker, whose callback calls done, so no goroutine
// runs per message and none is woken per message beyond the client's
// subscription goroutine. Completion order is the order the acks arrive,
// not publish order. PublishAsync is safe for concurrent use. Close stops
// the Sink's goroutines and subscriptions; the JetStream contexts and their
// connections stay the caller's, because the source and the dedupe store
// usually share them.
type Sink struct {
	brokers map[string]*publisher
	// js and timeouts serve DuplicateWindow (window.go), per broker.
	js       map[string]jetstream.JetStream
	timeouts map[string]time.Duration
	// closed is set first by Close: PublishAsync fails fast without
	// touching a broker (each broker's pipe, stopped under its mutex, is
	// what makes "not closed, take a slot" atomic with respect to Close).
	closed    atomic.Bool
	closeOnce sync.Once
}

var _ bridge.Sink = (*Sink)(nil)

// NewSink returns a Sink publishing to conns, keyed by broker name (the
// Target.Broker values the router renders). It publishes on each context's
// connection (js.Conn()) and subscribes there to a fresh inbox for the acks;
// the contexts' own async-publish settings do not apply. Several names may
// share one connection. log is unused today and kept for parity with the
// other constructors.
func NewSink(conns map[string]jetstream.JetStream, cfg SinkConfig, log *slog.Logger) (*Sink, error) {
	_ = log
	if len(conns) == 0 {
		return nil, errors.New("natsjs: sink: no brokers")
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = defaultMaxPending
	}
	if cfg.MaxPending > jspub.MaxPendingLimit {
		return nil, fmt.Errorf("natsjs: sink: MaxPending %d over %d", cfg.MaxPending, jspub.MaxPendingLimit)
	}
	if cfg.AckTimeout == 0 {
		cfg.AckTimeout = DefaultAckTimeout
	}
	for name, js := range conns {
		if js == nil || js.Conn() == nil {
			return nil, fmt.Errorf("natsjs: sink: broker %q: nil JetStream", name)
		}
	}
	s := &Sink{brokers: make(map[string]*publisher, len(conns)), js: conns, timeouts: map[string]time.Duration{}}
	for name, js := range conns {
		ackTimeout := cfg.AckTimeout
		if d, ok := cfg.AckTimeouts[name]; ok && d != 0 {
			ackTimeout = d
		}
		s.timeouts[name] = ackTimeout
		p, err := newPublisher(name, js.Conn(), cfg.MaxPending, ackTimeout)
		if err != nil {
			for _, p := range s.brokers {
				_ = p.pipe.Close(context.Background()) // nothing was sent: returns at once
			}
			return nil, err
		}
		s.brokers[name] = p
	}
	return s, nil
}

// PublishAsync implements bridge.Sink. Nats-Msg-Id is set to m.MsgID in
// m.Header itself and the source's other Nats-* (JetStream control) headers
// are removed from it (bridge.Outgoing allows a sink both; a nil map is
// replaced by a new one); nothing else in m is changed or copied,
// and m is not used after PublishAsync returns. PublishAsync blocks while
// MaxPending publishes to the target broker are unresolved, until ctx is
// done (done gets ctx's error) or Close starts (done gets ErrClosed).
//
// done is called exactly once: on the broker's ack subscription goroutine
// (the result), on its sweep goroutine (AckTimeout, or the connection
// dropped: the ack is lost with it, so the publish fails with an error
// wrapping nats.ErrDisconnected or nats.ErrConnectionClosed), on a Close
// whose ctx ended, or before PublishAsync returns for failures found before
// or while sending (unknown broker, ctx, closed, the connection down — the
// message is then not handed to the client, see jspub — or a client error).
// Results: nil when the stream stored the message; *DuplicateError when it
// dropped it as a repeat; an error wrapping jetstream.ErrNoStreamResponse
// (and nats.ErrNoResponders) when no stream captures the subject; one
// wrapping the server's *jetstream.APIError when the stream refused it.
// Failures found by the Sink itself also wrap jspub.ErrNotSent (the message
// cannot be stored) or jspub.ErrNoReply (it may be). done must not block,
// and must not call PublishAsync on the same Sink: the goroutine running it
// frees the slot only after it returns.
func (s *Sink) PublishAsync(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	if s.closed.Load() {
		done(ErrClosed)
		return
	}
	p := s.brokers[m.Target.Broker]
	if p == nil {
		done(fmt.Errorf("%w %q (subject %q)", ErrUnknownBroker, m.Target.Broker, m.Target.Subject))
		return
	}
	p.publish(ctx, m, done)
}

// setMsgID makes m.Header say Nats-Msg-Id = id, in place: no copy of the
// map per message. It reuses the Cell-Msg-Id value slice when that holds the
// same id, so the common case allocates nothing.
//
// It also removes every other header named Nats-*: those are JetStream's
// control headers (Nats-Expected-Stream, Nats-Expected-Last-Sequence,
// Nats-Rollup, Nats-TTL, Nats-Batch-*, Nats-Trace-*, ...). A producer sets
// them for the source stream; carried over, the target stream would act on
// them: refuse every copy (an expected stream or sequence that is the
// source's, so the message would be retried for ever and block its key),
// purge the subject, expire the copy or trace it. Only the sink's own
// Nats-Msg-Id is meant for the target.
func setMsgID(m *bridge.Outgoing, id string) {
	h := m.Header
	for k := range h {
		if len(k) > len(natsHeaderPrefix) && k[:len(natsHeaderPrefix)] == natsHeaderPrefix && k != jetstream.MsgIDHeader {
			delete(h, k)
		}
	}
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

// natsHeaderPrefix starts the names of the headers JetStream acts on.
const natsHeaderPrefix = "Nats-"

// Close stops accepting publishes (blocked and later PublishAsync calls get
// ErrClosed), waits until every accepted publish has been resolved and its
// done has returned, then stops the Sink's goroutines and drops its ack
// subscriptions. If ctx ends first, the publishes still waiting for their
// ack are resolved with an error wrapping ErrClosed (they may or may not be
// stored; one still inside the client's PublishMsg is resolved as soon as
// that returns) and Close returns an error wrapping ctx's error; when none
// was left to cut short it returns nil. It does not close the connections.
// Close is idempotent and safe for concurrent use.
func (s *Sink) Close(ctx context.Context) error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		// Every broker refuses new publishes before any is waited for.
		for _, p := range s.brokers {
			p.pipe.Stop()
		}
	})
	var errs []error
	for _, p := range s.brokers {
		if err := p.pipe.Close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("natsjs: sink close: broker %q: %w", p.name, err))
		}
	}
	return errors.Join(errs...)
}
