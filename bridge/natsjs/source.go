package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/router"
)

// SourceConfig describes the durable pull consumer behind one topic rule.
type SourceConfig struct {
	// Rule is the topic rule name, copied into every bridge.Message.
	Rule string
	// Broker is the broker name; with Stream it makes Message.Source
	// ("<broker>/<stream>").
	Broker string
	// Stream is the source stream; Subject, when set, filters it.
	Stream  string
	Subject string
	// Durable is the consumer name, the rule's group: replicas sharing it
	// share the work.
	Durable string
	// MaxAckPending caps messages delivered but not yet acked. It must
	// exceed the bridge's in-flight limit plus FetchBatch, and leave room
	// for held messages, which stay pending while they wait to be
	// redelivered. Default 20000.
	MaxAckPending int
	// AckWait is how long the server waits for an ack before redelivering.
	// Default 30s.
	AckWait time.Duration
	// FetchBatch is how many messages the client keeps requested and
	// buffered (PullMaxMessages); it asks for more when half are used.
	// Default 1024.
	FetchBatch int
	// Backlog, when set, receives the consumer's pending count (messages
	// not yet delivered) every BacklogInterval while Run runs (from a
	// consumer info request; skipped when that fails). It is called from
	// one goroutine and must not block.
	Backlog func(n uint64)
	// BacklogInterval defaults to 2s.
	BacklogInterval time.Duration
}

func (c *SourceConfig) defaults() error {
	switch {
	case c.Stream == "":
		return errors.New("natsjs: source: stream is empty")
	case c.Durable == "":
		return fmt.Errorf("natsjs: source %s: durable (the rule's group) is empty", c.Stream)
	}
	if c.MaxAckPending <= 0 {
		c.MaxAckPending = 20000
	}
	if c.AckWait <= 0 {
		c.AckWait = 30 * time.Second
	}
	if c.FetchBatch <= 0 {
		c.FetchBatch = 1024
	}
	if c.BacklogInterval <= 0 {
		c.BacklogInterval = 2 * time.Second
	}
	return nil
}

// Source consumes one stream through a durable pull consumer; it implements
// bridge.Source. Run may be called once at a time; Close stops it.
type Source struct {
	js     jetstream.JetStream
	cfg    SourceConfig
	log    *slog.Logger
	source string // Message.Source

	mu   sync.Mutex
	cons jetstream.Consumer

	stop    chan struct{} // closed by Close
	stopped sync.Once
	runDone chan struct{} // non-nil while Run runs; closed when it returns (guarded by mu)

	// ackFloor is the consumer's ack floor (stream sequence) as last seen
	// by monitor; a consumer lost while running is recreated above it.
	ackFloor atomic.Uint64
}

var _ bridge.Source = (*Source)(nil)

// NewSource creates the durable consumer, or updates it to cfg (explicit
// acks, unlimited deliveries, filter, AckWait, MaxAckPending). It fails when
// the stream does not exist or the server refuses the configuration.
func NewSource(ctx context.Context, js jetstream.JetStream, cfg SourceConfig, log *slog.Logger) (*Source, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Source{
		js:     js,
		cfg:    cfg,
		log:    log.With("rule", cfg.Rule, "stream", cfg.Stream, "consumer", cfg.Durable),
		source: cfg.Broker + "/" + cfg.Stream,
		stop:   make(chan struct{}),
	}
	if _, err := s.ensureConsumer(ctx, 0); err != nil {
		return nil, err
	}
	return s, nil
}

// ensureConsumer creates or updates the durable. Where it starts is kept
// from an existing consumer (the server refuses to change it, and an
// operator may have created the durable with DeliverNew to skip history);
// a new one starts at the stream's first message, or after floor when the
// consumer vanished while running, so that its history is not replayed.
func (s *Source) ensureConsumer(ctx context.Context, floor uint64) (jetstream.Consumer, error) {
	cfg := jetstream.ConsumerConfig{
		Durable:     s.cfg.Durable,
		Description: "cellbridge rule " + s.cfg.Rule,
		AckPolicy:   jetstream.AckExplicitPolicy,
		// Held messages are negatively acknowledged again and again until
		// their shard is unblocked, and sink outages are retried, so a
		// delivery limit would eventually drop good messages.
		MaxDeliver:    -1,
		FilterSubject: s.cfg.Subject,
		AckWait:       s.cfg.AckWait,
		MaxAckPending: s.cfg.MaxAckPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
	}
	if old, err := s.js.Consumer(ctx, s.cfg.Stream, s.cfg.Durable); err == nil {
		oc := old.CachedInfo().Config
		cfg.DeliverPolicy, cfg.OptStartSeq, cfg.OptStartTime = oc.DeliverPolicy, oc.OptStartSeq, oc.OptStartTime
	} else if floor > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, floor+1
	}
	cons, err := s.js.CreateOrUpdateConsumer(ctx, s.cfg.Stream, cfg)
	if err != nil {
		return nil, fmt.Errorf("natsjs: source %s: consumer %s: %w", s.cfg.Stream, s.cfg.Durable, err)
	}
	s.mu.Lock()
	s.cons = cons
	s.mu.Unlock()
	return cons, nil
}

// Run consumes until ctx is cancelled or Close is called and returns nil
// then; it returns an error only when it cannot go on (Run already running,
// the connection closed for good). Each message is passed to h on a single
// goroutine, in stream order; h may block for back-pressure. When Run
// returns it has stopped fetching; messages it fetched but h did not take
// are not acked and come back after AckWait, and acks of messages h did take
// keep working as long as the connection is open. If the consumer disappears
// (deleted by an operator) Run creates it again, starting after the last ack
// floor it saw (redelivering what was in flight, which deduplication drops),
// and goes on.
func (s *Source) Run(ctx context.Context, h bridge.Handler) error {
	s.mu.Lock()
	if s.runDone != nil {
		s.mu.Unlock()
		return fmt.Errorf("natsjs: source %s: Run already running", s.cfg.Stream)
	}
	select {
	case <-s.stop:
		s.mu.Unlock()
		return nil
	default:
	}
	done := make(chan struct{})
	s.runDone = done
	cons := s.cons
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.runDone = nil
		s.mu.Unlock()
		close(done)
	}()
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	wg.Go(func() {
		select {
		case <-s.stop:
			cancel()
		case <-ctx.Done():
		}
	})
	wg.Go(func() { s.monitor(ctx) })

	delay := reconnectMin
	for {
		cc, err := cons.Consume(func(msg jetstream.Msg) { s.deliver(ctx, msg, h) },
			jetstream.PullMaxMessages(s.cfg.FetchBatch),
			jetstream.PullExpiry(pullExpiry),
			jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
				if ctx.Err() == nil {
					s.log.Warn("nats consume error", "err", err)
				}
			}))
		if err == nil {
			select {
			case <-ctx.Done():
				cc.Stop()
				<-cc.Closed()
				return nil
			case <-cc.Closed():
				// The library stopped consuming on its own: consumer
				// deleted or connection closed.
			}
		}
		if s.js.Conn().IsClosed() {
			return fmt.Errorf("natsjs: source %s: %w", s.cfg.Stream, nats.ErrConnectionClosed)
		}
		s.log.Warn("nats consume stopped, recreating consumer", "err", err, "retry_in", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
		delay = min(2*delay, reconnectMax)
		if c, err := s.ensureConsumer(ctx, s.ackFloor.Load()); err == nil {
			cons, delay = c, reconnectMin
		}
	}
}

// pullExpiry bounds how long one pull request waits on the server. The
// client's pull accounting can get out of step with the server's after the
// consumer sat at MaxAckPending (the server holds no request while the
// client believes it does); the client notices only when a request expires
// or its heartbeats (every pullExpiry/2) stop, so the library's 30s default
// would stall such a consumer for up to a minute. One request per 5s on an
// idle consumer costs nothing.
const pullExpiry = 5 * time.Second

// delivery carries one message and its Ack so that both take one
// allocation and the Ack closure captures a single pointer.
type delivery struct {
	m   bridge.Message
	msg jetstream.Msg
}

func (s *Source) deliver(ctx context.Context, msg jetstream.Msg, h bridge.Handler) {
	meta, ok := parseAck(msg.Reply())
	if !ok {
		// Not a JetStream delivery: nothing to ack and nothing to route.
		s.log.Warn("nats message without JetStream metadata", "subject", msg.Subject(), "reply", msg.Reply())
		return
	}
	d := &delivery{msg: msg}
	hdr := msg.Headers()
	d.m = bridge.Message{
		Message:    router.Message{Subject: msg.Subject(), Header: hdr, Body: msg.Data()},
		Rule:       s.cfg.Rule,
		SourceID:   sourceID(hdr, &meta),
		Source:     s.source,
		Time:       time.Unix(0, meta.timestamp),
		Deliveries: int(meta.delivered),
	}
	// An error means ctx is done: the message stays unacked and is
	// redelivered after AckWait (to this or another replica).
	_ = h(ctx, &d.m, d.ack)
}

// sourceID is the producer's Nats-Msg-Id when it set one (it already
// identifies the event across the producer's own retries), else the
// message's place in the stream.
func sourceID(h nats.Header, meta *ackMeta) string {
	if v := h[jetstream.MsgIDHeader]; len(v) > 0 && v[0] != "" {
		return v[0]
	}
	return meta.stream + ":" + meta.streamSeq
}

// ack maps the bridge's outcome onto JetStream. Acks are fire-and-forget
// (no AckSync): if one is lost the message comes back after AckWait and is
// dropped as a duplicate by the dedupe store and the target's Nats-Msg-Id
// window, so a round trip per message would buy nothing.
func (d *delivery) ack(_ context.Context, err error) error {
	var aerr error
	if err == nil {
		aerr = d.msg.Ack()
	} else if errors.Is(err, bridge.ErrInProgress) {
		aerr = d.msg.InProgress()
	} else if delay, ok := bridge.HoldDelay(err); ok {
		aerr = d.msg.NakWithDelay(delay)
	} else {
		aerr = d.msg.Nak()
	}
	if aerr != nil {
		return fmt.Errorf("natsjs: settle %s (%v): %w", d.m.SourceID, err, aerr)
	}
	return nil
}

// monitor asks the server for the consumer's state every BacklogInterval:
// NumPending feeds Backlog, and the ack floor is remembered for recreating
// a lost consumer. One request per interval is nothing next to the acks.
func (s *Source) monitor(ctx context.Context) {
	t := time.NewTicker(s.cfg.BacklogInterval)
	defer t.Stop()
	for {
		s.mu.Lock()
		cons := s.cons
		s.mu.Unlock()
		ictx, cancel := context.WithTimeout(ctx, s.cfg.BacklogInterval)
		info, err := cons.Info(ictx)
		cancel()
		if err == nil {
			s.ackFloor.Store(info.AckFloor.Stream)
			if s.cfg.Backlog != nil {
				s.cfg.Backlog(info.NumPending)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Close stops a running Run and waits for it to return (within ctx). The
// Source holds nothing else: the consumer stays on the server for the next
// start, and the JetStream context is the caller's.
func (s *Source) Close(ctx context.Context) error {
	s.stopped.Do(func() { close(s.stop) })
	s.mu.Lock()
	done := s.runDone
	s.mu.Unlock()
	if done == nil {
		return nil
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("natsjs: source %s close: %w", s.cfg.Stream, ctx.Err())
	}
}
