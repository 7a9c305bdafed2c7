package natsjs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/router"
)

// ReplayConfig selects the stored messages of one topic rule that a Replay
// delivers again: a range of its source stream, by sequence or by store
// time, both ends included.
type ReplayConfig struct {
	// Rule is the topic rule; its source names the broker, stream and
	// subject (a partitioned rule's stored subjects are read and stripped
	// as its live sources do).
	Rule *router.Rule
	// FromSeq (a stream sequence, ≥ 1) or FromTime (the store time of the
	// first message): where to start. Exactly one is set.
	FromSeq  uint64
	FromTime time.Time
	// ToSeq or ToTime: the last message to deliver; both zero means the
	// stream's last message when Run starts.
	ToSeq  uint64
	ToTime time.Time
	// RequestTimeout bounds each JetStream request and each wait for the
	// next message. Default 5s.
	RequestTimeout time.Duration
}

// ReplayReport is what a Replay delivered.
type ReplayReport struct {
	// Delivered counts the messages handed to the handler; Acked those it
	// settled with success, Failed those it settled otherwise.
	Delivered, Acked, Failed int
	// First and Last are the stream sequences of the first and last
	// message delivered (0 when none).
	First, Last uint64
	// End is the stream sequence the replay stopped at (ToSeq, or the
	// stream's last sequence when Run started).
	End uint64
}

// Replay is a bridge.Source that delivers a range of a rule's source stream
// once, through an ordered consumer that acknowledges nothing (the rule's
// durable and its ack floor are not touched), with the message identity the
// rule's live source gives (bridge.Message.SourceID, Source, Time), so that
// what the pipeline publishes carries the idempotency keys it carried the
// first time. Run returns when every message of the range was handed over
// and settled.
type Replay struct {
	js     jetstream.JetStream
	cfg    ReplayConfig
	log    *slog.Logger
	filter string
	strip  int
	source string

	mu  sync.Mutex
	rep ReplayReport
	// open counts messages handed over and not settled yet; settled is
	// signalled on every settlement.
	open    int
	settled chan struct{}
}

var _ bridge.Source = (*Replay)(nil)

// NewReplay checks cfg and returns a Replay of it.
func NewReplay(js jetstream.JetStream, cfg ReplayConfig, log *slog.Logger) (*Replay, error) {
	r := cfg.Rule
	switch {
	case r == nil || !r.Source.IsNATS():
		return nil, errors.New("natsjs: replay: needs a topic rule with a NATS JetStream source")
	case (cfg.FromSeq > 0) == !cfg.FromTime.IsZero():
		return nil, errors.New("natsjs: replay: give a start sequence or a start time, not both")
	case cfg.ToSeq > 0 && !cfg.ToTime.IsZero():
		return nil, errors.New("natsjs: replay: give an end sequence or an end time, not both")
	case cfg.ToSeq > 0 && cfg.ToSeq < cfg.FromSeq:
		return nil, fmt.Errorf("natsjs: replay: end sequence %d before start %d", cfg.ToSeq, cfg.FromSeq)
	case !cfg.ToTime.IsZero() && !cfg.FromTime.IsZero() && cfg.ToTime.Before(cfg.FromTime):
		return nil, fmt.Errorf("natsjs: replay: end time %s before start %s", cfg.ToTime.Format(time.RFC3339Nano), cfg.FromTime.Format(time.RFC3339Nano))
	}
	if cfg.RequestTimeout <= 0 {
		cfg.RequestTimeout = 5 * time.Second
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	rp := &Replay{js: js, cfg: cfg, log: log, filter: r.Source.Subject, source: r.Source.Broker + "/" + r.Source.Stream,
		settled: make(chan struct{}, 1)}
	if n := r.Source.Partitions; n > 0 {
		// Every partition's stored subjects: "n<N>.<p>.<subject>".
		rp.filter = "n" + strconv.Itoa(n) + ".*." + r.Source.Subject
		rp.strip = PartitionPrefixTokens
	}
	return rp, nil
}

// Report returns what was delivered so far.
func (rp *Replay) Report() ReplayReport {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	return rp.rep
}

// Run delivers the range to h, one message at a time in stream order, then
// waits until h settled every one of them. It returns ctx's error when ctx
// ends first, and an error when the stream cannot be read.
func (rp *Replay) Run(ctx context.Context, h bridge.Handler) error {
	src := rp.cfg.Rule.Source
	rctx, cancel := context.WithTimeout(ctx, rp.cfg.RequestTimeout)
	st, err := rp.js.Stream(rctx, src.Stream)
	cancel()
	if err != nil {
		return fmt.Errorf("natsjs: replay: stream %s: %w", src.Stream, err)
	}
	end := st.CachedInfo().State.LastSeq
	if rp.cfg.ToSeq > 0 {
		end = min(end, rp.cfg.ToSeq)
	}
	rp.mu.Lock()
	rp.rep.End = end
	rp.mu.Unlock()
	cc := jetstream.OrderedConsumerConfig{FilterSubjects: []string{rp.filter}}
	if rp.cfg.FromSeq > 0 {
		cc.DeliverPolicy, cc.OptStartSeq = jetstream.DeliverByStartSequencePolicy, rp.cfg.FromSeq
	} else {
		t := rp.cfg.FromTime
		cc.DeliverPolicy, cc.OptStartTime = jetstream.DeliverByStartTimePolicy, &t
	}
	if end == 0 || (rp.cfg.FromSeq > end) {
		return nil // nothing stored in the range
	}
	rctx, cancel = context.WithTimeout(ctx, rp.cfg.RequestTimeout)
	cons, err := rp.js.OrderedConsumer(rctx, src.Stream, cc)
	cancel()
	if err != nil {
		return fmt.Errorf("natsjs: replay: stream %s: ordered consumer: %w", src.Stream, err)
	}
	if err := rp.deliver(ctx, cons, end, h); err != nil {
		return err
	}
	for {
		rp.mu.Lock()
		open := rp.open
		rp.mu.Unlock()
		if open == 0 {
			return nil
		}
		select {
		case <-rp.settled:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// replayPatience is how many waits for the next message in a row (each
// up to RequestTimeout) a replay makes while its consumer still reports
// messages pending: the ordered consumer is made again after a fault (an
// election, a reconnect), which can take longer than one wait.
const replayPatience = 4

// deliver hands the range's messages to h until the end of the range.
func (rp *Replay) deliver(ctx context.Context, cons jetstream.Consumer, end uint64, h bridge.Handler) error {
	waits := 0
	for {
		wctx, cancel := context.WithTimeout(ctx, rp.cfg.RequestTimeout)
		msg, err := cons.Next(jetstream.FetchContext(wctx))
		cancel()
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, jetstream.ErrNoMessages) || errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout):
			// No message within the wait: the range is done only when
			// the consumer has nothing more pending. Otherwise it is
			// being made again (a fault): wait again, a few times.
			pending, ierr := rp.pending(ctx, cons)
			if ierr == nil && pending == 0 {
				return nil
			}
			waits++
			rp.mu.Lock()
			last := rp.rep.Last
			rp.mu.Unlock()
			why := fmt.Sprintf("%d messages pending", pending)
			if ierr != nil {
				why = "consumer info: " + ierr.Error()
			}
			if waits >= replayPatience {
				again := fmt.Sprintf("-from-seq %d", last+1)
				if last == 0 { // nothing delivered yet: the same start
					again = fmt.Sprintf("-from-seq %d", rp.cfg.FromSeq)
					if rp.cfg.FromSeq == 0 {
						again = "-from-time " + rp.cfg.FromTime.Format(time.RFC3339Nano)
					}
				}
				return fmt.Errorf("natsjs: replay: stream %s: no message for %s after sequence %d (range end %d; %s): "+
					"the replay is not finished; run it again from %s",
					rp.cfg.Rule.Source.Stream, time.Duration(waits)*rp.cfg.RequestTimeout, last, end, why, again)
			}
			rp.log.Warn("replay: no message within the wait; waiting again", "stream", rp.cfg.Rule.Source.Stream,
				"after_seq", last, "range_end", end, "why", why, "wait", waits, "of", replayPatience)
			continue
		case err != nil:
			return fmt.Errorf("natsjs: replay: stream %s: %w", rp.cfg.Rule.Source.Stream, err)
		}
		waits = 0
		meta, ok := parseAck(msg.Reply())
		if !ok {
			return fmt.Errorf("natsjs: replay: a message without JetStream metadata (reply %q)", msg.Reply())
		}
		if meta.seq > end || (!rp.cfg.ToTime.IsZero() && time.Unix(0, meta.timestamp).After(rp.cfg.ToTime)) {
			return nil
		}
		d := &replayed{rp: rp}
		d.m = bridgeMessage(rp.cfg.Rule.Name, rp.source, rp.strip, msg, &meta, msg.Headers())
		rp.mu.Lock()
		rp.open++
		rp.rep.Delivered++
		if rp.rep.First == 0 {
			rp.rep.First = meta.seq
		}
		rp.rep.Last = meta.seq
		rp.mu.Unlock()
		if err := h(ctx, &d.m, d.ack); err != nil {
			return err // h nacked it: counted as failed
		}
		if meta.seq >= end || meta.pending == 0 {
			return nil
		}
	}
}

// pending asks the replay's consumer how many messages of its filter it
// has not delivered yet (up to the stream's end).
func (rp *Replay) pending(ctx context.Context, cons jetstream.Consumer) (uint64, error) {
	ictx, cancel := context.WithTimeout(ctx, rp.cfg.RequestTimeout)
	defer cancel()
	info, err := cons.Info(ictx)
	if err != nil {
		return 0, err
	}
	return info.NumPending, nil
}

// replayed is one delivered message and its settlement.
type replayed struct {
	rp *Replay
	m  bridge.Message
}

// ack records the pipeline's result: nothing goes back to the server (the
// consumer acknowledges nothing), a failure is counted for the report.
func (d *replayed) ack(_ context.Context, err error) error {
	if errors.Is(err, bridge.ErrInProgress) {
		return nil
	}
	rp := d.rp
	rp.mu.Lock()
	rp.open--
	if err == nil {
		rp.rep.Acked++
	} else {
		rp.rep.Failed++
		rp.log.Warn("replayed message not published", "source_id", d.m.SourceID, "err", err)
	}
	rp.mu.Unlock()
	select {
	case rp.settled <- struct{}{}:
	default:
	}
	return nil
}

// Close implements bridge.Source; the ordered consumer ends with Run.
func (rp *Replay) Close(context.Context) error { return nil }
