package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/retry"
	"github.com/cellbridge/cellbridge/router"
)

// Ordering is a Source's ordering mode (SourceConfig.Ordering).
type Ordering string

const (
	// Ordered (the default): one replica at a time forwards the rule's
	// messages, and each new owner starts from the consumer's ack floor, so
	// per-key order survives replicas, crashes and reconnects. The durable
	// is a pinned priority group.
	Ordered Ordering = "ordered"
	// Unordered ("none" in the configuration): every replica pulls from the
	// shared durable at once, for throughput without order.
	Unordered Ordering = "none"
)

// Defaults and limits of the ordered mode.
const (
	// DefaultGroup is the priority group name of an ordered durable.
	DefaultGroup = "cellbridge"
	// DefaultPinnedTTL is how long the server keeps a silent replica's pin.
	DefaultPinnedTTL = 5 * time.Second
	// MinPinnedTTL is the shortest PinnedTTL accepted: the pull expiry that
	// renews the pin is at least 1s and must fit in it with room to spare.
	MinPinnedTTL = 2 * time.Second
	// DefaultRequestTimeout is SourceConfig.RequestTimeout's default.
	DefaultRequestTimeout = 2 * time.Second
	// DefaultStallLimit is SourceConfig.StallLimit's default: well above a
	// target's leader election or a burst of retries, and well below the
	// target's 2m duplicate window, which the messages re-read after the
	// hand-over must fall into (docs/guarantees.md, section 8).
	DefaultStallLimit = 30 * time.Second
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
	// share the work (Unordered) or take turns (Ordered).
	Durable string
	// Ordering is Ordered (also when empty) or Unordered. The durable is
	// switched in place to the configured mode, unless other clients pull
	// from it in the other mode: then the source waits (StateWaiting, a
	// warning per minute) until they are gone, and never switches it under
	// them, so that replicas of two configurations (or versions) do not
	// take the durable from each other during a rolling change.
	Ordering Ordering
	// CumulativeAcks (Ordered only) creates the durable with AckPolicy all
	// and acknowledges the settled prefix of each epoch's deliveries once
	// per batch instead of every message (cumack.go). A durable whose ack
	// policy differs is recreated at its ack floor when no other client
	// pulls from it, as a mode switch is (ensureConsumer).
	CumulativeAcks bool
	// Group is the ordered durable's priority group. Default DefaultGroup.
	Group string
	// PinnedTTL is how long the server keeps the pin of a replica that
	// stopped pulling (killed, cut off, paused) before another one may take
	// over. Default 5s, at least 2s. Takeover after a crash takes about
	// PinnedTTL.
	PinnedTTL time.Duration
	// MaxAckPending caps messages delivered but not yet acked. It must
	// exceed the bridge's in-flight limit plus FetchBatch, and leave room
	// for held messages, which stay pending while they wait to be
	// redelivered. Default 20000. In ordered mode it also bounds the
	// intake queue between the client library and the handler.
	MaxAckPending int
	// AckWait is how long the server waits for an ack before redelivering.
	// Default 30s.
	AckWait time.Duration
	// FetchBatch is how many messages the client keeps requested and
	// buffered (PullMaxMessages); it asks for more when half are used.
	// Default 2048 (bridge.Config.FetchBatch says why).
	FetchBatch int
	// RequestTimeout bounds each attempt of a JetStream API request the
	// source makes (consumer lookup and creation, reset, unpin, consumer
	// info); a failed attempt that is worth repeating (internal/retry) is
	// logged and retried with backoff where the source has time for it.
	// Default 2s.
	RequestTimeout time.Duration
	// OnRequestError, when set, receives every failed attempt of those
	// requests (an error naming the broker, server, request, attempt and the
	// wait before the next one), for metrics. It must not block.
	OnRequestError func(error)
	// OnFailing, when set, is told why the source cannot deliver now (err
	// non-nil: missed heartbeats, a failing consumer reset, a fence, consume
	// errors, a standby's consumer info unanswered) and, with nil, that it
	// can again (a delivery, an answered probe or consumer info, a new
	// epoch, or no consume error for a few heartbeats). Calls are made one
	// at a time, only on changes, and must not block; the bridge feeds them
	// into /readyz and cellbridge_source_failing.
	OnFailing func(err error)
	// ProbeWait is how long each standby probe (a pull for one message that
	// wins the pin when it is free) waits on the server. Default 1s.
	ProbeWait time.Duration
	// StripTokens removes that many leading subject tokens before a message
	// reaches the handler: a partitioned stream stores "n<N>.<p>.<subject>"
	// and the rule routes on <subject>. A subject with no more tokens than
	// that arrives as "" (the router then has no key to find and dead-
	// letters it).
	StripTokens int
	// Backlog, when set, receives the consumer's pending count (messages
	// not yet delivered) every BacklogInterval while Run runs (from a
	// consumer info request; skipped when that fails). It is called from
	// one goroutine and must not block. A replica that another one serves
	// reports 0: an ordered standby while another replica holds the pin,
	// and a replica waiting for the other ordering mode's clients; readiness
	// counts a backlog without progress against the replica reporting it.
	Backlog func(n uint64)
	// BacklogInterval defaults to 2s.
	BacklogInterval time.Duration
	// OnState, when set, receives the source's state after every change
	// (see Source.State), for metrics. It is called from the source's
	// goroutines, one change at a time, and must not block.
	OnState func(SourceState)
	// StallAge, when set, returns how long the oldest message of the rule
	// that this replica's pipeline accepted and has not settled (parked
	// ones excluded) has waited: bridge.Health.StallAge. An ordered Source
	// that has held the consumer for StallLimit while that age is at least
	// StallLimit cannot publish (its target or dedupe store is unreachable
	// from here) and keeps every other replica from forwarding the rule:
	// it fences its epoch, hands the consumer over (reset, unpin) and
	// waits PinnedTTL before it probes again. Each such fence in a row
	// doubles the limit (at most eight times StallLimit) until an epoch
	// runs StallLimit with an age under half of it, so replicas that all
	// cannot publish pass the consumer on less and less often. Called from
	// the run loop every pull expiry; it must be cheap and not block.
	// Partitioned rules do not use it (a partition's lease, not its pin,
	// decides who runs it).
	StallAge func() time.Duration
	// StallLimit is the stall age at which an ordered Source hands its
	// consumer over (see StallAge). Default DefaultStallLimit.
	StallLimit time.Duration
	// UnackedAge, when set with HandOverWindow, returns the age of the
	// oldest message of the rule that this replica's pipeline holds
	// unacknowledged, from when the source stored it or the pipeline
	// accepted it, whichever is earlier (bridge.Health.UnackedAge). A new
	// owner re-reads from the ack floor, so a hand-over re-forwards
	// messages whose first copies are up to that old.
	UnackedAge func() time.Duration
	// HandOverWindow is the shortest time within which the rule's targets
	// (or the dedupe store) are known to drop a repeated copy: the
	// configuration's guaranteed duplicate window. A stall hand-over whose
	// re-read would reach copies older than it, UnackedAge + PinnedTTL +
	// HandOverMargin at or above HandOverWindow, is withheld: the replica
	// keeps the consumer (its rule stalls, /readyz says so) rather than
	// let a standby store old copies a second time. Zero: no such check;
	// negative: no window protects a re-read, every stall hand-over is
	// withheld.
	HandOverWindow time.Duration
	// HandOverMargin is the time HandOverWindow must leave for the
	// re-read copies to reach their targets after the hand-over. Default
	// DefaultHandOverMargin.
	HandOverMargin time.Duration
}

// DefaultHandOverMargin is SourceConfig.HandOverMargin's default.
const DefaultHandOverMargin = 5 * time.Second

func (c *SourceConfig) defaults() error {
	switch {
	case c.Stream == "":
		return errors.New("natsjs: source: stream is empty")
	case c.Durable == "":
		return fmt.Errorf("natsjs: source %s: durable (the rule's group) is empty", c.Stream)
	case c.Ordering == "":
		c.Ordering = Ordered
	case c.Ordering != Ordered && c.Ordering != Unordered:
		return fmt.Errorf("natsjs: source %s: ordering %q: want %q or %q", c.Stream, c.Ordering, Ordered, Unordered)
	}
	if c.CumulativeAcks && c.Ordering != Ordered {
		return fmt.Errorf("natsjs: source %s: cumulative acks need ordering %q (replicas sharing an unordered durable each acknowledge their own messages)", c.Stream, Ordered)
	}
	if c.PinnedTTL == 0 {
		c.PinnedTTL = DefaultPinnedTTL
	}
	if c.Ordering == Ordered && c.PinnedTTL < MinPinnedTTL {
		return fmt.Errorf("natsjs: source %s: pinnedTTL %s is below the minimum %s", c.Stream, c.PinnedTTL, MinPinnedTTL)
	}
	if c.StripTokens < 0 {
		return fmt.Errorf("natsjs: source %s: stripTokens %d is negative", c.Stream, c.StripTokens)
	}
	if c.Group == "" {
		c.Group = DefaultGroup
	}
	if c.MaxAckPending <= 0 {
		c.MaxAckPending = 20000
	}
	if c.AckWait <= 0 {
		c.AckWait = 30 * time.Second
	}
	if c.FetchBatch <= 0 {
		c.FetchBatch = 2048
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
	if c.ProbeWait <= 0 {
		c.ProbeWait = time.Second
	}
	if c.BacklogInterval <= 0 {
		c.BacklogInterval = 2 * time.Second
	}
	if c.StallLimit <= 0 {
		c.StallLimit = DefaultStallLimit
	}
	if c.HandOverMargin <= 0 {
		c.HandOverMargin = DefaultHandOverMargin
	}
	return nil
}

// Source consumes one stream through a durable pull consumer; it implements
// bridge.Source. Run may be called once at a time; Release ends a run
// gracefully and Close stops the source for good.
type Source struct {
	js     jetstream.JetStream
	cfg    SourceConfig
	log    *slog.Logger
	source string // Message.Source
	// pol bounds, retries and reports the source's JetStream API requests;
	// quiet is the same for those repeated on a timer (logged at debug).
	pol, quiet *retry.Policy
	// failing is what the source reports through OnFailing; idle tells
	// it whether nothing waits to be delivered.
	failing failState
	idle    idleness
	// linkCheck is set while a check of the connection after missed
	// heartbeats runs (checkLink).
	linkCheck atomic.Bool
	// lastConsumeErr is when (UnixNano) the unordered Consume last
	// reported an error; a quiet period after it clears the failure.
	lastConsumeErr atomic.Int64
	// stopShared stops the unordered Consume running now (nil when none):
	// monitor stops it when the durable is not found, which the library
	// does not notice unless a pull was waiting when it was deleted.
	stopShared atomic.Pointer[func()]
	// expiry and heartbeat are the ordered mode's pull settings.
	expiry, heartbeat time.Duration

	mu   sync.Mutex
	cons jetstream.Consumer
	// conflict is set while the durable is in the other ordering mode and
	// in use (StateWaiting).
	conflict *ModeError
	st       SourceState
	// held is the epoch (and pin) left when an ordered Run returned;
	// Release waits for its deliveries and gives the pin up.
	held *epoch

	stop      chan struct{} // closed by Close
	stopped   sync.Once
	runDone   chan struct{}      // non-nil while Run runs; closed when it returns (guarded by mu)
	runCancel context.CancelFunc // ends the running Run (guarded by mu)

	// ackFloor is the consumer's ack floor (stream sequence) as last seen
	// by monitor; a consumer lost while running is recreated above it.
	ackFloor atomic.Uint64
	// active is the running epoch (ordered mode, Active) for monitor's pin
	// check; unpinnedAt is the time (UnixNano) of the last UNPINNED
	// advisory.
	active     atomic.Pointer[epoch]
	unpinnedAt atomic.Int64
	// probeAnswered is when (UnixNano) a standby probe last got an answer
	// from the server.
	probeAnswered atomic.Int64
}

var _ bridge.Source = (*Source)(nil)

// NewSource creates the durable consumer, or updates it to cfg (explicit
// acks, unlimited deliveries, filter, AckWait, MaxAckPending, and the
// priority group of the ordering mode). It fails when the stream does not
// exist, the server refuses the configuration, or the ordered mode's server
// is older than 2.14 (no consumer reset). A durable in the other ordering
// mode that other clients pull from is left alone: the Source is returned
// and waits in Run (StateWaiting).
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
		st: SourceState{Rule: cfg.Rule, Stream: cfg.Stream, Consumer: cfg.Durable, Ordering: cfg.Ordering,
			State: StateStopped, Since: time.Now()},
	}
	s.failing.report = cfg.OnFailing
	s.idle.window = idleWindowAnswers * cfg.BacklogInterval
	s.failing.idle = s.idle.idle
	s.pol = &retry.Policy{Broker: cfg.Broker, Conn: js.Conn(), Timeout: cfg.RequestTimeout, Log: s.log,
		Report: reportTo(cfg.OnRequestError)}
	q := *s.pol
	q.Quiet = true
	s.quiet = &q
	// The pull that renews the pin must come well inside PinnedTTL, or an
	// idle owner loses its pin between two pulls (the library's minimum
	// expiry is 1s, its heartbeat at most half the expiry).
	s.expiry = min(max(cfg.PinnedTTL/3, time.Second), 5*time.Second)
	s.heartbeat = s.expiry / 2
	if cfg.Ordering == Ordered {
		if err := checkServerVersion(js.Conn()); err != nil {
			return nil, fmt.Errorf("natsjs: source %s: consumer %s (rule %s): ordering %q %w; upgrade the servers or set the rule's source.ordering to %q",
				cfg.Stream, cfg.Durable, cfg.Rule, Ordered, err, Unordered)
		}
	}
	if _, err := s.ensureConsumer(ctx, 0); err != nil {
		var me *ModeError
		if !errors.As(err, &me) {
			return nil, err
		}
		s.log.Warn("nats consumer is in use in another mode or by another rule; waiting for its clients to stop", "err", err)
	}
	return s, nil
}

// checkServerVersion refuses servers without the consumer reset API
// (nats-server 2.14). A version it cannot parse passes: the first reset
// then reports what is missing.
func checkServerVersion(nc *nats.Conn) error {
	v := nc.ConnectedServerVersion()
	maj, rest, _ := strings.Cut(v, ".")
	minor, _, _ := strings.Cut(rest, ".")
	a, err1 := strconv.Atoi(maj)
	b, err2 := strconv.Atoi(minor)
	if err1 != nil || err2 != nil {
		return nil
	}
	if a < 2 || (a == 2 && b < 14) {
		return fmt.Errorf("needs nats-server 2.14 or later (consumer reset), connected to %s", v)
	}
	return nil
}

// consumer returns the current Consumer object. In ordered mode it is the
// one that holds the pin id, so it is replaced only when the durable is
// created anew.
func (s *Source) consumer() jetstream.Consumer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cons
}

// Run consumes until ctx is cancelled, Release or Close is called, and
// returns nil then; it returns an error only when it cannot go on (Run
// already running, the connection closed for good).
//
// Unordered, each message is passed to h on a single goroutine, in stream
// order, and h may block for back-pressure (which holds back pulling).
//
// Ordered, Run waits in Standby until this replica wins the consumer's pin,
// resets the consumer to its ack floor, and only then passes deliveries to
// h, each with the epoch that a fence revokes (see the package docs). The
// client library's callback never blocks: deliveries go through a bounded
// queue to one goroutine that calls h, which may block.
//
// When Run returns it has stopped fetching; messages it fetched but h did
// not take are not acked and come back after AckWait (or at the next
// owner's reset), and acks of messages h did take keep working as long as
// the connection is open. If the consumer disappears (deleted by an
// operator) Run creates it again, starting after the last ack floor it saw
// (redelivering what was in flight, which deduplication drops), and goes
// on.
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
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	s.runDone, s.runCancel = done, cancel
	s.mu.Unlock()
	defer func() {
		cancel()
		s.mu.Lock()
		s.runDone, s.runCancel = nil, nil
		s.mu.Unlock()
		s.setState(transition{to: StateStopped, reason: "Run returned"})
		close(done)
	}()
	if s.cfg.Ordering == Ordered {
		return s.runOrdered(ctx, h)
	}
	return s.runShared(ctx, h)
}

// runShared is the unordered mode: Consume on the shared durable, the
// callback passing each message to h.
func (s *Source) runShared(ctx context.Context, h bridge.Handler) error {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { s.monitor(ctx, nil) })

	var lastWarn time.Time
	for ctx.Err() == nil && s.waiting() {
		s.waitMode(ctx, &lastWarn)
	}
	if ctx.Err() != nil {
		return nil
	}
	cons := s.consumer()
	delay := reconnectMin
	for {
		s.setState(transition{to: StateShared})
		cc, err := cons.Consume(func(msg jetstream.Msg) { s.deliver(ctx, msg, h) },
			jetstream.PullMaxMessages(s.cfg.FetchBatch),
			jetstream.PullExpiry(pullExpiry),
			jetstream.PullHeartbeat(sharedHeartbeat),
			jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) { s.sharedConsumeErr(ctx, err) }))
		if err == nil {
			stop := cc.Stop
			s.stopShared.Store(&stop)
			select {
			case <-ctx.Done():
				s.stopShared.Store(nil)
				cc.Stop()
				<-cc.Closed()
				return nil
			case <-cc.Closed():
				// The library stopped consuming on its own (consumer
				// deleted while a pull waited, its mode switched,
				// connection closed), or monitor stopped it.
				s.stopShared.Store(nil)
			}
		}
		if s.js.Conn().IsClosed() {
			return fmt.Errorf("natsjs: source %s: %w", s.cfg.Stream, nats.ErrConnectionClosed)
		}
		if err == nil {
			err = errors.New("consuming stopped")
		}
		s.failing.set(fmt.Errorf("consume: %w; recreating consumer %s", err, s.cfg.Durable))
		s.log.Warn("nats consume stopped, recreating consumer", "err", err, "retry_in", delay)
		if !sleepCtx(ctx, delay) {
			return nil
		}
		delay = min(2*delay, reconnectMax)
		c, err := s.recreateConsumer(ctx, s.ackFloor.Load())
		for err != nil && ctx.Err() == nil && s.waiting() {
			if s.waitMode(ctx, &lastWarn) {
				c, err = s.consumer(), nil
			}
		}
		if err == nil {
			cons, delay = c, reconnectMin
		} else if ctx.Err() == nil {
			s.failing.set(fmt.Errorf("consumer %s: %w", s.cfg.Durable, err))
		}
	}
}

// sharedConsumeErr handles the unordered Consume's errors: each is logged
// and reported as the source failing (a delivery, or a few quiet
// heartbeats, clear it: see monitor); missed heartbeats also check the
// connection.
func (s *Source) sharedConsumeErr(ctx context.Context, err error) {
	if ctx.Err() != nil {
		return
	}
	s.lastConsumeErr.Store(time.Now().UnixNano())
	if errors.Is(err, jetstream.ErrNoHeartbeat) {
		s.missedHeartbeats(sharedHeartbeat)
	} else {
		s.failing.set(fmt.Errorf("consume: %w", err))
	}
	s.log.Warn("nats consume error", "err", err)
}

// quietFor is how long the unordered Consume must go without an error,
// while connected, before its failure is cleared without a delivery (an
// idle stream): the library reports missed heartbeats every
// 2×sharedHeartbeat, so this long without one means they arrive again.
const quietFor = 3 * sharedHeartbeat

// pullExpiry bounds how long one pull request of the unordered mode waits
// on the server. The client's pull accounting can get out of step with the
// server's after the consumer sat at MaxAckPending (the server holds no
// request while the client believes it does); the client notices only when
// a request expires or its heartbeats (every pullExpiry/2) stop, so the
// library's 30s default would stall such a consumer for up to a minute. One
// request per 5s on an idle consumer costs nothing.
const pullExpiry = 5 * time.Second

// sleepCtx waits d and reports whether ctx is still live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// delivery carries one message and its Ack so that both take one
// allocation and the Ack closure captures a single pointer.
type delivery struct {
	m   bridge.Message
	msg jetstream.Msg
	ep  *epoch // nil in unordered mode
	// beat is when (UnixNano) an ordered delivery arrived or was last
	// heartbeaten while it waited in the intake queue (guarded by the
	// queue's lock while it waits there); seq is its stream sequence.
	beat int64
	seq  uint64
	// done: settled with success, for the epoch's cumulative acks (guarded
	// by their lock).
	done bool
}

// pinHeader is the server's pin id on every delivery of a pinned consumer.
const pinHeader = "Nats-Pin-Id"

// newDelivery turns msg into a bridge.Message (no copies: the header map and
// the data are the message's own). It removes the pin header, which belongs
// to the delivery, not to the event.
func (s *Source) newDelivery(msg jetstream.Msg, meta *ackMeta, hdr nats.Header) *delivery {
	if _, ok := hdr[pinHeader]; ok {
		delete(hdr, pinHeader)
		if len(hdr) == 0 {
			hdr = nil
		}
	}
	s.idle.delivery()
	d := &delivery{msg: msg}
	d.m = bridgeMessage(s.cfg.Rule, s.source, s.cfg.StripTokens, msg, meta, hdr)
	return d
}

// bridgeMessage is the bridge.Message of a delivery of rule's stream
// (source "<broker>/<stream>"): its subject without strip leading tokens,
// its headers and data (not copied), and its identity. Live sources and
// Replay build it alike, so that a replayed message gets the idempotency
// key its first delivery got.
func bridgeMessage(rule, source string, strip int, msg jetstream.Msg, meta *ackMeta, hdr nats.Header) bridge.Message {
	subject := msg.Subject()
	if strip > 0 {
		subject = stripTokens(subject, strip)
	}
	return bridge.Message{
		Message:    router.Message{Subject: subject, Header: hdr, Body: msg.Data()},
		Rule:       rule,
		SourceID:   sourceID(hdr, meta),
		Source:     source,
		Time:       time.Unix(0, meta.timestamp),
		Deliveries: int(meta.delivered),
	}
}

// stripTokens drops the first n tokens of subject ("" when it has no more).
func stripTokens(subject string, n int) string {
	for range n {
		i := strings.IndexByte(subject, '.')
		if i < 0 {
			return ""
		}
		subject = subject[i+1:]
	}
	return subject
}

// deliver is the unordered mode's callback: it passes the message to h and
// blocks while h does.
func (s *Source) deliver(ctx context.Context, msg jetstream.Msg, h bridge.Handler) {
	meta, ok := parseAck(msg.Reply())
	if !ok {
		// Not a JetStream delivery: nothing to ack and nothing to route.
		s.log.Warn("nats message without JetStream metadata", "subject", msg.Subject(), "reply", msg.Reply())
		return
	}
	s.failing.clear()
	d := s.newDelivery(msg, &meta, msg.Headers())
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
//
// For a revoked epoch only acks go out: the message's copy is stored, and
// the server applies the ack to the new owner's delivery of it. A nack or
// an in-progress signal is dropped: the new owner re-read the message from
// the ack floor and owns its redelivery; a nack would only deliver it once
// more.
//
// In ordered mode a final nack ends the epoch (it is revoked at once, before
// the pipeline can make the key's next message active): the redelivery
// would come after later messages of the key that the epoch still
// forwards. The next epoch's reset delivers the message again, in order,
// so the nack itself is not sent; that reset waits for a Hold's delay (as
// long as the pin can wait), and the message's delivery count goes on
// from this delivery's. The exception is a Hold that lets later messages
// of the key overtake (bridge.MayOvertake: a message that did not fit among
// the parked ones, or one not bound for a cell), sent as NakWithDelay
// within the live epoch.
func (d *delivery) ack(_ context.Context, err error) error {
	var aerr error
	switch {
	case err == nil && d.ep != nil && d.ep.acks != nil:
		// One ack for the settled prefix (cumack.go); none from a
		// revoked epoch.
		aerr = d.ep.acks.settled(d.ep, d.seq)
	case err == nil:
		aerr = d.msg.Ack()
	case errors.Is(err, bridge.ErrInProgress):
		if d.ep.Revoked() {
			return nil
		}
		return wrapSettle(d, err, d.msg.InProgress())
	case errors.Is(err, bridge.ErrRevoked):
	case d.ep.Revoked():
	case d.ep != nil && !bridge.MayOvertake(err):
		delay, _ := bridge.HoldDelay(err)
		d.ep.trip(fenceEvent{next: toAcquire, pin: d.ep.pin, nack: true, seq: d.seq, delivered: uint64(d.m.Deliveries), delay: delay,
			reason: "a delivery was negatively acknowledged (" + err.Error() + "): taking the consumer over again from the ack floor"})
	default:
		if delay, ok := bridge.HoldDelay(err); ok {
			aerr = d.msg.NakWithDelay(delay)
		} else {
			aerr = d.msg.Nak()
		}
	}
	d.ep.settled()
	return wrapSettle(d, err, aerr)
}

func wrapSettle(d *delivery, err, aerr error) error {
	if aerr != nil {
		return fmt.Errorf("natsjs: settle %s (%v): %w", d.m.SourceID, err, aerr)
	}
	return nil
}

// monitor asks the server for the consumer's state every BacklogInterval:
// NumPending feeds Backlog, and the ack floor is remembered for recreating
// a lost consumer. In ordered mode it also checks that an Active epoch's pin
// is still the server's, and kicks an idle consumer whose owner went away
// (see kick); unpinned wakes it at once. Whether the request is answered
// is how a standby reports that it could (not) take over, and a quiet
// unordered source that its failure is over (OnFailing). One request per
// interval is nothing next to the acks.
func (s *Source) monitor(ctx context.Context, unpinned <-chan struct{}) {
	t := time.NewTicker(s.cfg.BacklogInterval)
	defer t.Stop()
	// lastKick is when this source last kicked; unowned is when consumer
	// info first showed no pin with unacknowledged messages (zero: not so
	// at the last look).
	var lastKick, unowned time.Time
	for {
		cons := s.consumer()
		asked := time.Now()
		reconnects := s.js.Conn().Stats().Reconnects
		ictx, cancel := context.WithTimeout(ctx, s.cfg.BacklogInterval)
		info, err := retry.Do(ictx, s.quiet, retry.OpConsumerInfo, s.consumerName(),
			func(ctx context.Context) (*jetstream.ConsumerInfo, error) { return cons.Info(ctx) })
		cancel()
		// A request that went unanswered while the connection moved to
		// another server says nothing about the new one, nor one sent
		// before a probe of the standby was answered (sent while the
		// cluster did not answer, it times out after the cluster is
		// back): not reported (the next one, BacklogInterval later, is).
		stale := err != nil && (s.js.Conn().Stats().Reconnects != reconnects || s.probeAnswered.Load() > asked.UnixNano())
		if st := s.State().State; st == StateStandby && ctx.Err() == nil && !stale {
			// A standby learns only here whether it could take over: the
			// consumer's leader answers or not.
			switch {
			case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrDisconnected):
				s.failing.set(fmt.Errorf("standby: no answer to consumer info within %s (connected to %s)",
					s.cfg.BacklogInterval, serverOf(s.js.Conn())))
			case err != nil:
				s.failing.set(fmt.Errorf("standby: consumer info: %w", err))
			default:
				s.failing.clear()
			}
		}
		if err != nil {
			// Only the consumer asked about: one made again meanwhile
			// (by runShared, or another replica) is not stopped.
			if stop := s.stopShared.Load(); stop != nil && !stale && ctx.Err() == nil && errors.Is(err, jetstream.ErrConsumerNotFound) &&
				s.consumer() == cons {
				// Deleted while no pull of this replica waited (it was
				// disconnected, or busy): the library's pulls then find
				// no responder and it goes on. Stopping makes runShared
				// create it again after its ack floor.
				s.log.Warn("nats consumer not found; making it again", "consumer", s.cfg.Durable, "stream", s.cfg.Stream)
				(*stop)()
			}
			if !stale && ctx.Err() == nil && s.failing.failingNow() && s.idle.idle() {
				s.checkStored(ctx)
			}
		} else {
			s.idle.answered(asked, info)
			s.failing.recheck()
			if s.cfg.Ordering == Unordered && s.failing.failingNow() && s.js.Conn().IsConnected() &&
				time.Since(time.Unix(0, s.lastConsumeErr.Load())) >= quietFor && s.State().State == StateShared {
				s.failing.clear()
			}
			// A floor below the durable's start is not remembered, or the
			// next re-creation would start below the start.
			if !belowStart(&info.Config, info.AckFloor.Stream+1) {
				s.ackFloor.Store(info.AckFloor.Stream)
			}
			if s.cfg.Backlog != nil {
				n := info.NumPending
				if !s.ownsBacklog(info) {
					n = 0
				}
				s.cfg.Backlog(n)
			}
			if s.cfg.Ordering == Ordered {
				s.checkPin(info, asked)
				s.checkAckFloor(info, asked)
				switch {
				case pinnedID(info, s.cfg.Group) != "" || info.NumAckPending == 0:
					unowned = time.Time{}
				case unowned.IsZero():
					unowned = asked
				}
				if time.Since(lastKick) >= s.cfg.PinnedTTL && s.kick(ctx, info, asked.Sub(unowned)) {
					lastKick, unowned = time.Now(), time.Time{}
				}
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-unpinned:
		}
	}
}

// ownsBacklog tells whether this replica should report the consumer's
// backlog as its own: readiness counts a backlog without progress against
// the replica that reports it. A replica waiting for the other mode's
// clients does not (they make the progress), nor does a standby while
// another replica holds the pin (that one reports it); a standby reports it
// while no replica holds the pin, when nobody serves the rule.
func (s *Source) ownsBacklog(info *jetstream.ConsumerInfo) bool {
	switch s.State().State {
	case StateWaiting:
		return false
	case StateStandby, StateStopped:
		return s.cfg.Ordering != Ordered || pinnedID(info, s.cfg.Group) == ""
	}
	return true
}

// Release ends the source's current ownership gracefully. A running Run
// stops fetching and returns nil. In ordered mode Release then waits, within
// ctx, until the pipeline settled every delivery of the last epoch; if some
// are still open when ctx ends it revokes the epoch (they are not
// published and the next owner re-reads them). Then, if the server still
// names this source's pin and it cannot have lapsed yet (see giveBack), it
// resets the consumer when deliveries of the epoch were not acked (queued
// when fetching stopped, or revoked) and unpins, so that a standby takes
// over in milliseconds. A drain longer than about PinnedTTL minus two pull
// expiries leaves the pin to lapse instead: a standby may then take over
// before the drain ended (what this replica still publishes is a duplicate
// at most). With a ctx that is already done, Release revokes the running
// epoch at once, before it waits for anything: ownership was lost, and
// nothing more of the epoch may be published. It returns an error when
// Run did not return within ctx or deliveries were still open. Run may be
// called again afterwards.
func (s *Source) Release(ctx context.Context) error {
	s.mu.Lock()
	done, cancel := s.runDone, s.runCancel
	s.mu.Unlock()
	if cancel != nil {
		cancel()
		if ctx.Err() != nil {
			// Run's ctx is cancelled first, so no later epoch starts
			// handing deliveries over.
			s.revokeRunning()
		}
		select {
		case <-done:
		case <-ctx.Done():
			// Ownership ends here whatever Run still does: nothing more
			// of its epoch may be published or acknowledged.
			s.revokeRunning()
			return fmt.Errorf("natsjs: source %s release: Run did not return: %w", s.cfg.Stream, ctx.Err())
		}
	}
	s.mu.Lock()
	ep := s.held
	s.held = nil
	s.mu.Unlock()
	if ep == nil {
		return nil
	}
	return s.releaseEpoch(ctx, ep)
}

// revokeRunning revokes the epoch of a Run that has not returned: the
// active one, or, once Run's ctx ended, the one it left for Release (Run
// returns only after its handler calls did, and a handler can block, e.g.
// in a publish waiting for sink capacity). An epoch leaves active only
// after it was left in held, so reading active first, then held, finds it
// in one of the two.
func (s *Source) revokeRunning() {
	if ep := s.active.Load(); ep != nil {
		ep.Revoke()
		return
	}
	s.mu.Lock()
	ep := s.held
	s.mu.Unlock()
	if ep != nil {
		ep.Revoke()
	}
}

// Close stops a running Run, waits for it to return and releases the pin
// as Release does (within ctx). The consumer stays on the server for the
// next start, and the JetStream context is the caller's. Deliveries still
// open at the deadline are revoked and logged, which is not an error of
// Close: the next owner re-reads them.
func (s *Source) Close(ctx context.Context) error {
	s.stopped.Do(func() { close(s.stop) })
	err := s.Release(ctx)
	var open *OpenDeliveriesError
	if errors.As(err, &open) {
		s.log.Warn("nats source closed with deliveries still open; revoked", "open", open.Open)
		return nil
	}
	return err
}

// OpenDeliveriesError is Release's report that the pipeline had not settled
// Open deliveries of the released epoch in time; they were revoked.
type OpenDeliveriesError struct {
	Stream string
	Open   int64
}

func (e *OpenDeliveriesError) Error() string {
	return fmt.Sprintf("natsjs: source %s release: %d deliveries still open, revoked (the next owner re-reads them)", e.Stream, e.Open)
}
