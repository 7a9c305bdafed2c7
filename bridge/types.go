package bridge

import (
	"context"
	"errors"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/cellbridge/cellbridge/router"
)

// Header names the bridge sets on forwarded messages (NATS headers, RocketMQ
// user properties). Original headers of the source message are kept.
const (
	// HeaderMsgID carries the idempotency key end to end. An incoming value is
	// kept unchanged; otherwise the bridge sets it from Message.SourceID.
	HeaderMsgID = "Cell-Msg-Id"
	// HeaderCell names the cell the message was routed to.
	HeaderCell = "Cell-Name"
	// HeaderShard is the shard number (decimal) of the message's key.
	HeaderShard = "Cell-Shard"
	// HeaderRulesVersion is the rules version that made the decision.
	HeaderRulesVersion = "Cell-Rules-Version"
	// HeaderSource names where the message came from (Message.Source).
	HeaderSource = "Cell-Source"
	// HeaderHops counts bridge hops; each forward increments it, and a message
	// arriving with a count at or over the limit goes to the DLQ.
	HeaderHops = "Cell-Hops"
	// HeaderError is set on DLQ messages only: "<reason>: <explanation>".
	HeaderError = "Cell-Error"
)

// Message is one source message handed to a Handler. The pipeline owns the
// Message (including its Header map, which it extends in place with the
// Cell-* headers) from the Handler call until the Ack's final call; the
// source must not reuse it meanwhile.
type Message struct {
	router.Message // Subject, Header, Body, Keys

	// Rule is the topic rule name this source serves.
	Rule string
	// SourceID is the deterministic identity used as idempotency key when the
	// message has no Cell-Msg-Id header: "ORDERS:1234" (stream:sequence), the
	// producer's Nats-Msg-Id, a RocketMQ unique message id, or
	// topic/broker/queue/offset. Never random, never a payload hash.
	SourceID string
	// Source is the value of the Cell-Source header, e.g. "nats/ORDERS".
	Source string
	// Time is when the source broker stored the message (zero if unknown); it
	// feeds the latency histogram and the freshness gauge.
	Time time.Time
	// Deliveries is 1 on the first delivery.
	Deliveries int
	// Epoch, when set, is the source's claim to this delivery. A source
	// that loses its right to forward (another replica took its consumer
	// or partition over and re-reads from the ack floor) revokes the
	// epoch: from then on the pipeline publishes none of the epoch's
	// messages that have not started publishing, and settles them with
	// ErrRevoked instead. nil means the delivery is never revoked.
	Epoch *Epoch
}

// Epoch is a source's period of ownership of its deliveries (see
// Message.Epoch). The zero Epoch is valid; it is safe for concurrent use.
type Epoch struct{ revoked atomic.Bool }

// Revoke ends the epoch. It is idempotent.
func (e *Epoch) Revoke() { e.revoked.Store(true) }

// Revoked reports whether Revoke was called. A nil Epoch is never revoked.
func (e *Epoch) Revoked() bool { return e != nil && e.revoked.Load() }

// ErrRevoked settles a message whose epoch was revoked before it was
// published: the source must not treat it as a failure of the message (the
// new owner re-reads it). A source may ignore it entirely.
var ErrRevoked = errors.New("bridge: delivery revoked (another replica owns the source now)")

// Ack settles one source message; the pipeline calls it exactly once with a
// final result, possibly after any number of ErrInProgress calls.
//
//   - err == nil: acknowledge (done for good).
//   - errors.As(err, **HoldError) (made by Hold): negative-ack, redeliver after
//     the HoldError's delay.
//   - err == ErrInProgress: extend the ack deadline; not final, may repeat.
//   - any other error: negative-ack, redeliver as soon as the source allows.
//
// An Ack is safe to call from any goroutine and must not block long. Its
// error is informational (the pipeline logs it at debug level and relies on
// redelivery plus deduplication).
type Ack func(ctx context.Context, err error) error

// Handler takes one message. It blocks while the pipeline is at its in-flight
// limit (back-pressure) and returns an error only when ctx is done, in which
// case it has already negatively acknowledged m. The source must not call
// ack itself after handing m to a Handler.
type Handler func(ctx context.Context, m *Message, ack Ack) error

// Source delivers messages of one topic rule to a Handler.
type Source interface {
	// Run fetches messages and calls h for each, one at a time or from
	// several goroutines, until ctx is cancelled (meaning: stop fetching);
	// then it returns. Messages already handed to h stay owned by the
	// pipeline. Run returns a non-nil error only for failures that stop it,
	// never for ctx cancellation.
	Run(ctx context.Context, h Handler) error
	// Close releases the source's resources after Run returned.
	Close(ctx context.Context) error
}

// Outgoing is one message to publish.
type Outgoing struct {
	// Target is where to publish: broker name plus NATS subject or RocketMQ
	// topic.
	Target router.Target
	// MsgID is the idempotency key: the Nats-Msg-Id on JetStream, the message
	// Keys on RocketMQ.
	MsgID string
	// Header holds every header to send, Cell-* included. It is the source
	// message's own map, owned by the pipeline until the final ack: a sink
	// may add its broker's idempotency header in place (Nats-Msg-Id =
	// MsgID) instead of copying the map, and remove headers its broker
	// would act on as control headers (JetStream's Nats-*, set by the
	// producer for the source stream); it must not change anything else.
	Header map[string][]string
	// Body is the payload, not copied from the source message.
	Body []byte
}

// Sink publishes to one kind of broker; one Sink serves every target broker
// name of its kind.
type Sink interface {
	// PublishAsync starts publishing m and calls done exactly once with the
	// result: nil when the broker confirmed it stored the message, an error
	// wrapping ErrDuplicate when the broker dropped it as a duplicate (counts
	// as confirmed), any other error when it is not known to be stored. It
	// blocks while the sink's pending limit is reached (back-pressure), and
	// calls done with ctx's error if ctx ends first. done runs on a sink
	// goroutine (or the caller's, for immediate failures) and must not block.
	// The caller does not modify m until done was called; the sink must not
	// use m (or its Header map) after calling done.
	PublishAsync(ctx context.Context, m *Outgoing, done func(error))
	// Close waits for pending publishes (calling their done) within ctx and
	// releases the sink's connections.
	Close(ctx context.Context) error
}

// WindowSink is a Sink whose targets drop a message themselves when they
// stored one with the same Outgoing.MsgID within a window (a JetStream
// stream's duplicate window). The pipeline then may use the dedupe store's
// check-then-commit protocol for the target (dedupe.Checker): one write per
// message instead of a reservation and a commit, the target's window
// dropping the copy of a concurrent second attempt (docs/guarantees.md).
type WindowSink interface {
	Sink
	// DuplicateWindow returns the window of the stream that stores tg's
	// messages, looked up from the broker (bounded by the sink's own
	// request timeout and ctx): 0 when the target does not drop repeats
	// (no window), an error when it cannot tell now. The pipeline caches
	// the answer for a while and asks again.
	DuplicateWindow(ctx context.Context, tg router.Target) (time.Duration, error)
}

// Publish publishes m through s and waits for the result (or ctx). It is a
// convenience for tools and tests; the pipeline uses PublishAsync.
func Publish(ctx context.Context, s Sink, m *Outgoing) error {
	ch := make(chan error, 1)
	s.PublishAsync(ctx, m, func(err error) { ch <- err })
	select {
	case err := <-ch:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ErrDuplicate is wrapped by sink errors that mean "the broker already had a
// message with this idempotency key": the pipeline treats it as confirmed.
var ErrDuplicate = errors.New("bridge: duplicate message dropped by the broker")

// ErrInProgress, passed to an Ack, asks the source to extend the message's
// ack deadline; it is not a final result.
var ErrInProgress = errors.New("bridge: message in progress")

// HoldError asks the source to redeliver the message after Delay (a
// negative acknowledgement with delay). Make one with Hold.
type HoldError struct {
	Delay time.Duration
	// Overtake is set when later messages of the message's key may be
	// forwarded before its redelivery: it did not fit among the parked
	// messages (MaxHeld; every later message of its key gets the same
	// answer until its park queue is released), or it is not bound for a
	// cell (a poison message without a usable DLQ target, a message
	// without identity). Without it, a source that keeps per-key order
	// across redeliveries must not hand over a later message of the key
	// before the redelivery (the ordered JetStream source ends its epoch).
	Overtake bool
}

func (e *HoldError) Error() string {
	return "bridge: hold message for " + e.Delay.String()
}

// Hold returns a *HoldError for an Ack: negative-ack, redeliver after d.
func Hold(d time.Duration) error { return &HoldError{Delay: d} }

// MayOvertake reports whether err is a HoldError whose Overtake is set:
// later messages of the key may be forwarded before the redelivery.
func MayOvertake(err error) bool {
	var h *HoldError
	return errors.As(err, &h) && h.Overtake
}

// HoldDelay reports whether err asks for a delayed redelivery and the delay.
func HoldDelay(err error) (time.Duration, bool) {
	var h *HoldError
	if errors.As(err, &h) {
		return h.Delay, true
	}
	return 0, false
}

// smallInts avoids strconv allocations for shard numbers and hop counts.
func itoa(n int) string {
	return strconv.Itoa(n) // strconv returns static strings for 0..99
}
