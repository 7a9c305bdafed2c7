package natsjs

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/retry"
)

// epoch is one period in which this replica holds the consumer's pin and
// forwards: it starts after a successful reset to the ack floor and ends
// with a fence (revoked) or a graceful stop (not revoked, released later).
type epoch struct {
	bridge.Epoch
	pin   string
	start time.Time
	// expect is the next delivery sequence and maxSeq the highest stream
	// sequence of a first delivery (read and written only by the client
	// library's callback once consuming started); reconnects is the
	// connection's reconnect count when the epoch was acquired.
	expect     uint64
	maxSeq     uint64
	reconnects uint64
	// stopped is when the epoch stopped pulling (the last pull that renewed
	// its pin left at most one pull expiry before), for the give-back;
	// written before the epoch is held, read by Release after.
	stopped time.Time
	// withheld is set once a stall hand-over of the epoch was withheld
	// (logged once per epoch); the run loop's only.
	withheld bool
	// acks sends the epoch's cumulative acks (cumack.go); nil when the
	// consumer acknowledges each message (AckPolicy explicit, a durable
	// created so by an earlier version).
	acks *cumAcks
	// carry maps the stream sequence of a message negatively acknowledged
	// in the last epoch to its delivery count there: the reset counts its
	// next delivery as a first one, the handler sees the count go on.
	// Only the client library's callback uses it once consuming started.
	carry map[uint64]uint64
	// dropped is set when deliveries of the epoch stay unacknowledged
	// without being handed over (queued when consuming stopped, or
	// revoked while open): a give-back resets the consumer first, so that
	// they are deliverable at once.
	dropped atomic.Bool
	// fence receives the first reason to end the epoch; trip revokes at
	// the same moment.
	fence chan fenceEvent
	// closed is set when the intake stops taking deliveries of the epoch.
	closed atomic.Bool
	// open counts deliveries handed to the handler and not finally
	// settled; draining is set once no more are handed over, and idle is
	// closed when both hold and open is zero.
	open     atomic.Int64
	draining atomic.Bool
	idleOnce sync.Once
	idle     chan struct{}
}

func newEpoch(pin string) *epoch {
	return &epoch{pin: pin, start: time.Now(), fence: make(chan fenceEvent, 1), idle: make(chan struct{})}
}

// Revoked reports whether the epoch was revoked; a nil epoch (unordered
// mode) never is.
func (e *epoch) Revoked() bool { return e != nil && e.Epoch.Revoked() }

// Revoke revokes the epoch: the pipeline publishes none of its messages
// that have not started publishing, and no cumulative ack of it goes out
// once Revoke returned (cumAcks.send), so the reset that follows a fence or
// starts the next epoch is never overtaken by one.
func (e *epoch) Revoke() {
	e.Epoch.Revoke()
	if e.acks != nil {
		e.acks.barrier()
	}
}

// settled records the final settlement of one delivery.
func (e *epoch) settled() {
	if e == nil {
		return
	}
	if e.open.Add(-1) == 0 && e.draining.Load() {
		e.idleOnce.Do(func() { close(e.idle) })
	}
}

// drain marks that no more deliveries are handed over; idle closes once the
// open ones are settled.
func (e *epoch) drain() {
	e.draining.Store(true)
	if e.open.Load() == 0 {
		e.idleOnce.Do(func() { close(e.idle) })
	}
}

// trip ends the epoch for reason f: the epoch is revoked at once (the
// pipeline publishes none of its messages that have not started
// publishing), and the run loop stops consuming when it reads f.
func (e *epoch) trip(f fenceEvent) {
	e.Revoke()
	select {
	case e.fence <- f:
	default: // an earlier reason is already on its way
	}
}

// next is where the run loop goes after a fence.
type next uint8

const (
	// toStandby: the pin is lost (another replica or nobody holds it).
	toStandby next = iota
	// toAcquire: the pin may still be this replica's (reconnect, missed
	// heartbeats, a lost delivery) or a new one was learned: reset and
	// consume again without probing.
	toAcquire
	// toRecreate: the durable is gone or no longer set up for this mode.
	toRecreate
	// toClosed: the connection is closed for good.
	toClosed
)

type fenceEvent struct {
	next   next
	reason string
	pin    string // toAcquire with a pin learned from a delivery
	// nack: a delivery was negatively acknowledged (acquiring again backs
	// off while that repeats); stall: this replica could not publish for
	// too long and gives the consumer to another replica.
	nack, stall bool
	// With nack: the stream sequence and delivery count of the nacked
	// delivery, and the delay its Hold asked for (0: none).
	seq, delivered uint64
	delay          time.Duration
}

// pinRun is one ordered Run.
type pinRun struct {
	s      *Source
	ctx    context.Context
	h      bridge.Handler
	nc     *nats.Conn
	status chan nats.Status
	// goneChecked is when the standby last asked whether the durable
	// exists (consumerGone).
	goneChecked time.Time
	// q is the intake queue: the client library's callback puts
	// deliveries in without blocking, drainIntake hands them to h, and
	// beat keeps the waiting ones from being redelivered.
	q *intake
	// pin is the pin this replica believes it holds, "" when none.
	pin string
	// pinnedAt is when the current pin was won in Standby, zero when it
	// was not (a re-acquisition); reason is why the loop moves on.
	pinnedAt time.Time
	reason   string
	// failures counts acquisitions that failed in a row (backoff); nacks
	// counts short epochs in a row ended by a negative acknowledgement
	// (backoff); strikes counts stall fences in a row (each doubles the
	// stall limit); pause is how long Standby waits before it probes again
	// (after a stall fence, so that another replica takes over).
	failures, nacks, strikes int
	pause                    time.Duration
	// lastPull is when this replica last pulled with r.pin: the probe that
	// won it, or the end of the last epoch's consuming.
	lastPull time.Time
	// notBefore is when the next reset may come at the earliest: after a
	// negative acknowledgement, its Hold's delay or the nack backoff.
	notBefore time.Time
	// carry is the next epoch's epoch.carry.
	carry map[uint64]uint64
	// lastWarn rate-limits repeated warnings (waiting, probe errors).
	lastWarn time.Time
}

// runOrdered runs the Standby → Acquiring → Active state machine until ctx
// ends (see the package docs).
func (s *Source) runOrdered(ctx context.Context, h bridge.Handler) error {
	nc := s.js.Conn()
	r := &pinRun{
		s: s, ctx: ctx, h: h, nc: nc,
		status: nc.StatusChanged(nats.DISCONNECTED, nats.RECONNECTING, nats.CONNECTED, nats.CLOSED),
		// MaxAckPending bounds the deliveries of one epoch that are not
		// settled (the heartbeats keep queued ones from coming twice);
		// the rest is slack.
		q: newIntake(2*s.cfg.MaxAckPending + s.cfg.FetchBatch),
	}
	defer nc.RemoveStatusListener(r.status)
	// What is still queued when Run ends stays unacknowledged: the next
	// reset (this replica's give-back, or the next owner's) delivers it.
	defer r.q.drop()

	// The UNPINNED advisory tells a standby at once that the holder's pin
	// timed out or was released (without the permission to read it, the
	// monitor's consumer info polling sees the same, later).
	unpinned := make(chan struct{}, 1)
	adv, err := nc.Subscribe(advisoryUnpinned(s.cfg.Stream, s.cfg.Durable), func(*nats.Msg) {
		s.unpinnedAt.Store(time.Now().UnixNano())
		select {
		case unpinned <- struct{}{}:
		default:
		}
	})
	if err == nil {
		defer func() { _ = adv.Unsubscribe() }()
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	// The loop also returns when the connection closed for good: its
	// helpers end with it, not only with the caller's ctx.
	hctx, stop := context.WithCancel(ctx)
	defer stop()
	wg.Go(func() { r.drainIntake(hctx) })
	wg.Go(func() { r.beat(hctx) })
	wg.Go(func() { s.monitor(hctx, unpinned) })
	return r.loop()
}

func advisoryUnpinned(stream, durable string) string {
	return "$JS.EVENT.ADVISORY.CONSUMER.UNPINNED." + stream + "." + durable
}

// loop moves between the states until ctx ends.
func (r *pinRun) loop() error {
	s := r.s
	state := StateStandby
	if s.waiting() {
		state = StateWaiting
	}
	r.reason = "run started"
	for {
		if r.ctx.Err() != nil {
			return nil
		}
		if r.nc.IsClosed() {
			return fmt.Errorf("natsjs: source %s: %w", s.cfg.Stream, nats.ErrConnectionClosed)
		}
		switch state {
		case StateWaiting:
			if r.waitMode() {
				state = StateStandby
			}
		case StateStandby:
			if s.waiting() {
				state = StateWaiting
				continue
			}
			if r.standby() {
				state = StateAcquiring
			}
		case StateAcquiring:
			ep := r.acquire()
			if ep == nil {
				state = StateStandby
				continue
			}
			f := r.active(ep)
			r.after(ep, f)
			switch f.next {
			case toClosed:
				return fmt.Errorf("natsjs: source %s: %w", s.cfg.Stream, nats.ErrConnectionClosed)
			case toAcquire:
				if f.pin != "" {
					r.pin = f.pin
				}
				r.pinnedAt = time.Time{}
				state = StateAcquiring
			case toRecreate:
				r.pin = ""
				r.recreate()
				state = StateStandby
			default:
				r.pin = ""
				state = StateStandby
			}
			r.reason = f.reason
		}
	}
}

// recreate creates the durable again (deleted) or finds it in the other
// mode (then Standby moves on to StateWaiting). The next Standby starts
// with a new Consumer object.
func (r *pinRun) recreate() {
	if _, err := r.s.recreateConsumer(r.ctx, r.s.ackFloor.Load()); err != nil && !r.s.waiting() {
		r.s.log.Warn("nats consumer could not be created again; retrying", "err", err)
		sleepCtx(r.ctx, r.s.cfg.PinnedTTL)
	}
}

// waitMode re-checks the durable every BacklogInterval while it is in the
// other ordering mode and in use (nothing is pulled meanwhile); it reports
// true once the durable is (or was switched to) this source's mode.
func (r *pinRun) waitMode() bool {
	if r.s.waitMode(r.ctx, &r.lastWarn) {
		r.reason = "consumer now in this replica's ordering mode"
		return true
	}
	return false
}

// standby probes for the pin: one pull for one message at a time, with the
// priority group and (held by the Consumer object) the last pin id this
// replica had. The server hands the pin to such a request when none is
// current and a message is ready. It reports true once pinned (r.pin set);
// the probed message is not processed and not acked: the reset that
// follows delivers it again in order.
func (r *pinRun) standby() bool {
	s := r.s
	s.setState(transition{to: StateStandby, reason: r.reason})
	wait := r.pause
	if r.failures > 0 {
		// A failed acquisition: let the pin lapse (no pulls) before trying
		// again, longer after each failure in a row.
		wait = max(wait, min(reconnectMin<<min(r.failures, 10), s.cfg.PinnedTTL))
	}
	r.pause = 0
	if wait > 0 && !sleepCtx(r.ctx, wait) {
		return false
	}
	delay := reconnectMin
	for r.ctx.Err() == nil {
		if !r.waitConnected() {
			return false
		}
		asked := time.Now()
		msg, err := r.probe()
		if msg != nil || err == nil || errors.Is(err, jetstream.ErrPinIDMismatch) || errors.Is(err, jetstream.ErrConsumerLeadershipChanged) {
			// The server answered: this replica can take the consumer over
			// when its turn comes. (A probe without an answer is no sign of
			// failure by itself: the server's "nothing for you" has only a
			// tenth of ProbeWait to arrive; the monitor's consumer info,
			// with RequestTimeout, tells a standby that cannot reach the
			// consumer.)
			s.probeAnswered.Store(time.Now().UnixNano())
			s.failing.clear()
		}
		if msg != nil {
			pin := msg.Headers().Get(pinHeader)
			if pin == "" {
				// Delivered without a pin: the durable has no pinned
				// priority group any more (switched by another client).
				r.reason = "delivery without a pin: the consumer is no longer ordered"
				r.recreate()
				return false
			}
			if r.ctx.Err() != nil {
				// Won the pin while stopping: Release gives it back (the
				// probed message was delivered and is not acked: the
				// give-back resets first).
				ep := newEpoch(pin)
				ep.stopped = asked
				ep.dropped.Store(true)
				r.hold(ep)
				return false
			}
			r.pin, r.pinnedAt, r.lastPull = pin, time.Now(), asked
			r.reason = "won the pin"
			return true
		}
		switch {
		case err == nil, errors.Is(err, context.DeadlineExceeded), errors.Is(err, jetstream.ErrPinIDMismatch),
			errors.Is(err, jetstream.ErrConsumerLeadershipChanged), errors.Is(err, nats.ErrTimeout):
			// Nothing for this replica; the library forgot a stale pin id.
			// An answer that came at once (a 409, a 423) must not turn the
			// probes into a busy loop.
			if time.Since(asked) < s.cfg.ProbeWait/10 && !sleepCtx(r.ctx, reconnectMin) {
				return false
			}
			delay = reconnectMin
			continue
		case errors.Is(err, jetstream.ErrConsumerDeleted), errors.Is(err, jetstream.ErrConsumerNotFound),
			errors.Is(err, jetstream.ErrBadRequest):
			r.reason = "probe: " + err.Error()
			r.recreate()
			return false
		case errors.Is(err, nats.ErrNoResponders) && time.Since(r.goneChecked) >= s.cfg.PinnedTTL && r.consumerGone():
			// A pull on a durable that does not exist has no responder
			// (elections have none either: only a durable the server
			// says is not found is made again).
			r.reason = "probe: no responders, and the consumer is not found"
			r.recreate()
			return false
		}
		s.failing.set(fmt.Errorf("standby probe: %w", err))
		if time.Since(r.lastWarn) >= s.cfg.PinnedTTL {
			r.lastWarn = time.Now()
			s.log.Warn("nats standby probe failed", "err", err)
		}
		if !sleepCtx(r.ctx, delay) {
			return false
		}
		// At most a second: a probe is one pull request, and a consumer
		// whose leader was being elected (no responders) is noticed
		// within a second of the election's end, not up to PinnedTTL.
		delay = min(2*delay, probeRetryMax)
	}
	return false
}

// consumerGone reports whether the server answers that the durable does
// not exist (false for any other answer, or none within RequestTimeout).
// The standby asks at most once per PinnedTTL (goneChecked): during an
// election every probe finds no responder.
func (r *pinRun) consumerGone() bool {
	r.goneChecked = time.Now()
	ctx, cancel := context.WithTimeout(r.ctx, r.s.cfg.RequestTimeout)
	defer cancel()
	_, err := r.s.js.Consumer(ctx, r.s.cfg.Stream, r.s.cfg.Durable)
	return errors.Is(err, jetstream.ErrConsumerNotFound)
}

// probeRetryMax caps the wait between standby probes that failed.
const probeRetryMax = time.Second

// probe pulls for one message for at most ProbeWait. Its context is not
// Run's: a pull abandoned by the client would stay on the server until it
// expires and could win the pin for nobody, so a stopping Run lets the last
// probe finish (at most ProbeWait) and gives back a pin it won.
func (r *pinRun) probe() (jetstream.Msg, error) {
	pctx, cancel := context.WithTimeout(context.Background(), r.s.cfg.ProbeWait)
	defer cancel()
	b, err := r.s.consumer().Fetch(1, jetstream.FetchPriorityGroup(r.s.cfg.Group), jetstream.FetchContext(pctx))
	if err != nil {
		return nil, err
	}
	var msg jetstream.Msg
	for m := range b.Messages() {
		msg = m
	}
	if msg != nil {
		return msg, nil
	}
	return nil, b.Error()
}

// waitConnected returns true once the connection is up (false when ctx ends
// or it is closed). Requests made while reconnecting would wait in the
// client's buffer and reach the server late.
func (r *pinRun) waitConnected() bool {
	for !r.nc.IsConnected() {
		if r.nc.IsClosed() {
			return false
		}
		t := time.NewTimer(r.s.cfg.ProbeWait)
		select {
		case <-r.ctx.Done():
			t.Stop()
			return false
		case <-r.status:
		case <-t.C:
		}
		t.Stop()
	}
	return r.ctx.Err() == nil
}

// acquire resets the consumer to its ack floor while this replica holds
// r.pin: everything not acknowledged is delivered again, in stream order,
// before anything newer. Each attempt has RequestTimeout and waits for the
// connection; failed attempts are logged, counted and reported as the
// source failing, and retried until PinnedTTL has passed (by then the pin
// has lapsed anyway: nothing renewed it). It returns the new epoch, or nil
// to go back to Standby: never process without a successful reset.
func (r *pinRun) acquire() *epoch {
	s := r.s
	s.setState(transition{to: StateAcquiring, pin: r.pin, reason: r.reason})
	// A new epoch supersedes the last one: what it still holds is re-read.
	s.mu.Lock()
	if s.held != nil {
		s.held.Revoke()
		s.held = nil
	}
	s.mu.Unlock()
	if wait := time.Until(r.notBefore); wait > 0 {
		// A negative acknowledgement ended the last epoch: the reset that
		// delivers the message again waits for its Hold's delay, or backs
		// off while epochs keep ending that way, but never so long that
		// the pin (not renewed meanwhile) may lapse.
		sleepCtx(r.ctx, min(wait, time.Until(r.lastPull.Add(s.cfg.PinnedTTL-s.expiry-s.expiry/2))))
	}
	if r.ctx.Err() != nil || !r.waitConnected() {
		r.holdPin()
		return nil
	}
	pol := *s.pol
	pol.Max = time.Second
	report := s.pol.Report
	pol.Report = func(ae *retry.AttemptError) {
		if report != nil {
			report(ae)
		}
		s.failing.set(fmt.Errorf("consumer reset failed (retrying): %w", ae.Err))
	}
	rctx, cancel := context.WithTimeout(r.ctx, s.cfg.PinnedTTL)
	// The epoch belongs to the connection the successful reset went out
	// on: the count is read before each attempt, so that a reconnect
	// during an earlier attempt (sent to a server that stopped answering)
	// does not fence the epoch that starts after it.
	var reconnects uint64
	drainStatus(r.status) // what happened before is what waitConnected saw
	resp, err := retry.Do(rctx, &pol, retry.OpConsumerReset, s.consumerName(),
		func(ctx context.Context) (*jetstream.ConsumerResetResponse, error) {
			reconnects = r.nc.Stats().Reconnects
			return r.resetOnLink(ctx)
		})
	cancel()
	switch {
	case err == nil:
		// A reset numbers the next delivery 1 (the response's Delivered
		// may already count one the server was attempting meanwhile, to a
		// request that no longer waits): anything else first is a gap.
		ep := newEpoch(r.pin)
		ep.expect = 1
		ep.reconnects = reconnects
		ep.carry, r.carry = r.carry, nil
		// The reset's answer says how the consumer acknowledges: a
		// consumer's ack policy changes only with the consumer (a new pin).
		if resp.ConsumerInfo != nil && resp.Config.AckPolicy == jetstream.AckAllPolicy {
			ep.acks = &cumAcks{}
		}
		r.failures = 0
		return ep
	case r.ctx.Err() != nil, r.nc.IsClosed():
		r.holdPin()
		return nil
	case errors.Is(err, jetstream.ErrConsumerNotFound):
		r.reason = "reset: consumer not found"
		r.recreate()
		return nil
	}
	r.failures++
	r.reason = "consumer reset failed: " + err.Error()
	s.failing.set(fmt.Errorf("consumer reset failed; letting the pin lapse: %w", err))
	s.log.Warn("nats consumer reset failed; letting the pin lapse", "pin", r.pin, "err", err,
		"hint", "the reset needs nats-server 2.14+ and permission for $JS.API.CONSUMER.RESET")
	return nil
}

// errLinkLost ends a consumer reset attempt whose connection dropped while
// it waited for the answer; it wraps nats.ErrDisconnected, so the attempt
// is retried (on the new connection, once it is up).
var errLinkLost = fmt.Errorf("connection lost during the consumer reset: %w", nats.ErrDisconnected)

// resetOnLink resets the consumer to its ack floor, giving the attempt up
// as soon as the connection drops: a reset sent to a server that stopped
// answering (frozen, cut off) would otherwise wait out its whole timeout
// although the client has already moved to another server, where the next
// attempt goes at once.
func (r *pinRun) resetOnLink(ctx context.Context) (*jetstream.ConsumerResetResponse, error) {
	lctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	done := make(chan struct{})
	defer close(done)
	go func() {
		for {
			select {
			case <-done:
				return
			case st := <-r.status:
				if st != nats.CONNECTED {
					cancel(errLinkLost)
					return
				}
			}
		}
	}()
	resp, err := r.s.js.ResetConsumer(lctx, r.s.cfg.Stream, r.s.cfg.Durable)
	if err == nil && resp.ConsumerInfo != nil && belowStart(&resp.Config, resp.ResetSeq) {
		// The server does not check a reset to the ack floor against the
		// durable's start, and a durable made again right after its
		// deletion can report a floor below it (see checkStart): no pull
		// waits yet, so a second reset puts it where it starts before
		// anything is delivered.
		r.s.log.Warn("nats consumer reset below its start; resetting it to its start",
			"resetSeq", resp.ResetSeq, "startSeq", resp.Config.OptStartSeq)
		resp, err = r.s.js.ResetConsumerToSequence(lctx, r.s.cfg.Stream, r.s.cfg.Durable, resp.Config.OptStartSeq)
	}
	if err != nil && errors.Is(context.Cause(lctx), errLinkLost) {
		err = errLinkLost
	}
	return resp, err
}

// drainStatus drops the queued status events of ch.
func drainStatus(ch chan nats.Status) {
	for len(ch) > 0 {
		<-ch
	}
}

// hold leaves ep for Release or Close: the pin it may still hold is given
// up there, after its deliveries are settled.
func (r *pinRun) hold(ep *epoch) {
	r.s.mu.Lock()
	r.s.held = ep
	r.s.mu.Unlock()
}

// holdPin leaves the pin this replica holds between epochs (Run ended
// while acquiring) for Release: deliveries made to it are not acked, so
// the give-back resets first.
func (r *pinRun) holdPin() {
	ep := newEpoch(r.pin)
	ep.stopped = r.lastPull
	ep.dropped.Store(true)
	r.hold(ep)
}

// after takes stock when epoch ep ended with f: the backoffs, and a stall
// fence's give-back of the pin.
func (r *pinRun) after(ep *epoch, f fenceEvent) {
	s := r.s
	r.lastPull = ep.stopped
	r.notBefore, r.carry = time.Time{}, nil
	if f.nack && time.Since(ep.start) < s.cfg.PinnedTTL {
		r.nacks++
	} else {
		r.nacks = 0
	}
	if f.nack {
		// Epochs that keep ending this way (the pipeline refuses what it
		// is given) must not reset the consumer in a tight loop.
		wait := f.delay
		if r.nacks > 0 {
			wait = max(wait, reconnectMin<<min(r.nacks-1, 10))
		}
		r.notBefore = ep.stopped.Add(wait)
		r.carry = map[uint64]uint64{f.seq: f.delivered}
	}
	if f.stall {
		// Hand the consumer to another replica at once (reset, then
		// unpin: a standby's waiting probe wins it), and keep out of its
		// way for a while; if no other replica takes it, this one takes
		// it back after the pause.
		r.strikes++
		r.pause = s.cfg.PinnedTTL
		s.giveBack(ep.pin, ep.stopped, true)
	}
}

// active consumes in epoch ep until a fence or the end of Run and returns
// what ended it. On a fence ep is revoked, consuming stops and the
// deliveries still queued are dropped (the reset of the next epoch delivers
// them again). When Run ends, consuming stops and ep is left, not revoked,
// for Release.
func (r *pinRun) active(ep *epoch) fenceEvent {
	s := r.s
	cons := s.consumer()
	// Active before the first delivery can be handed over: a Release
	// (revokeRunning) finds the epoch in active or, once it left, in held,
	// never in neither while its deliveries are in the pipeline.
	s.active.Store(ep)
	defer s.active.CompareAndSwap(ep, nil)
	cc, err := cons.Consume(func(msg jetstream.Msg) { r.take(ep, msg) },
		jetstream.PullPriorityGroup(s.cfg.Group),
		jetstream.PullMaxMessages(s.cfg.FetchBatch),
		jetstream.PullExpiry(s.expiry),
		jetstream.PullHeartbeat(s.heartbeat),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) { r.consumeErr(ep, err) }))
	if err != nil {
		ep.Revoke()
		f := fenceEvent{next: toRecreate, reason: "consume: " + err.Error()}
		s.setState(transition{to: StateStandby, reason: f.reason})
		return f
	}
	s.setState(transition{to: StateActive, pin: ep.pin, reason: r.reason, epoch: true, epochStart: ep.start,
		takeover: !r.pinnedAt.IsZero(), pinnedAt: r.pinnedAt, unpinnedAt: r.unpinnedSince()})
	s.failing.clear()
	// Status events from before the reset are stale (the reconnect
	// counter, read before it, covers a reconnect since).
	drainStatus(r.status)
	closed := cc.Closed()
	tick := time.NewTicker(s.expiry)
	defer tick.Stop()
	for {
		select {
		case <-r.ctx.Done():
			// Run ends: the epoch is left for Release, not revoked; its
			// deliveries in the pipeline finish.
			r.stopConsume(ep, cc)
			r.hold(ep)
			return fenceEvent{}
		case f := <-ep.fence:
			r.stopConsume(ep, cc)
			r.q.drop()
			if r.ctx.Err() == nil {
				// Cleared by the next epoch, or by a standby probe the
				// server answers.
				s.failing.setFirst(fmt.Errorf("fenced: %s", f.reason))
			}
			tr := transition{to: StateStandby, reason: f.reason, fence: true}
			if f.next == toClosed {
				tr.to = StateStopped
			}
			if f.next == toAcquire {
				tr.to, tr.pin = StateAcquiring, ep.pin
				if f.pin != "" {
					tr.pin = f.pin
				}
			}
			s.setState(tr)
			return f
		case st := <-r.status:
			switch st {
			case nats.DISCONNECTED, nats.RECONNECTING:
				ep.trip(fenceEvent{next: toAcquire, reason: "connection lost"})
			case nats.CLOSED:
				ep.trip(fenceEvent{next: toClosed, reason: "connection closed"})
			}
		case <-closed:
			closed = nil
			ep.trip(fenceEvent{next: toRecreate, reason: "consume stopped"})
		case <-tick.C:
			// A reconnect whose status events were missed (the listener's
			// buffer is small) still shows in the counter.
			if r.nc.Stats().Reconnects != ep.reconnects {
				ep.trip(fenceEvent{next: toAcquire, reason: "reconnected"})
			}
			r.checkStall(ep)
		}
	}
}

// checkStall fences ep when this replica has held the consumer for the
// stall limit and the oldest message its pipeline accepted for the rule has
// waited that long without being settled (SourceConfig.StallAge): it
// cannot publish (its target or dedupe store unreachable from here), and
// while it keeps the pin no other replica can forward the rule. The limit
// doubles with each stall fence in a row (at most eight times), so that
// replicas that all cannot publish (the target is down for everyone) pass
// the consumer around less and less often; it is back to StallLimit once an
// epoch ran for StallLimit with a stall age under half of it.
func (r *pinRun) checkStall(ep *epoch) {
	s := r.s
	if s.cfg.StallAge == nil {
		return
	}
	ran, age := time.Since(ep.start), s.cfg.StallAge()
	if ran >= s.cfg.StallLimit && age < s.cfg.StallLimit/2 {
		r.strikes = 0
	}
	limit := s.cfg.StallLimit << min(r.strikes, 3)
	if ran < limit || age < limit {
		return
	}
	if why := r.withholdHandOver(); why != "" {
		if !ep.withheld {
			ep.withheld = true
			s.log.Warn("ordered source: stalled, but the consumer stays here: "+why,
				"stream", s.cfg.Stream, "consumer", s.cfg.Durable, "stall_age", age.Round(time.Millisecond).String())
			s.setWithheld(why)
		}
		return
	}
	ep.trip(fenceEvent{next: toStandby, stall: true,
		reason: fmt.Sprintf("stalled: the oldest message accepted %s ago is not settled (limit %s); handing the consumer to another replica",
			age.Round(time.Millisecond), limit)})
}

// withholdHandOver returns why a stall hand-over must not happen now, or
// "": the new owner re-reads from the ack floor, and copies first stored
// longer ago than the duplicate window the configuration guarantees
// (SourceConfig.HandOverWindow) would be stored again. A target that is
// down for every replica keeps the floor where it is while the other
// targets' messages above it are forwarded and acknowledged, so without
// this check a long outage of one cell would, at each stall hand-over,
// re-forward the other cells' events past their window.
func (r *pinRun) withholdHandOver() string {
	s := r.s
	if s.cfg.HandOverWindow < 0 {
		return "no duplicate window protects the targets' copies (a target without one and no shared dedupe store), so a standby's re-read could store them twice; it holds the rule until it can publish again"
	}
	if s.cfg.HandOverWindow == 0 || s.cfg.UnackedAge == nil {
		return ""
	}
	a := s.cfg.UnackedAge()
	if a+s.cfg.PinnedTTL+s.cfg.HandOverMargin < s.cfg.HandOverWindow {
		return ""
	}
	return fmt.Sprintf("a standby would re-forward messages first forwarded up to %s ago, and with the pin's TTL (%s) and a margin (%s) that reaches the duplicate window the targets are guaranteed to have (%s); it holds the rule until it can publish again",
		a.Round(time.Millisecond), s.cfg.PinnedTTL, s.cfg.HandOverMargin, s.cfg.HandOverWindow)
}

// unpinnedSince is the time of the UNPINNED advisory received during the
// current standby, zero if none.
func (r *pinRun) unpinnedSince() time.Time {
	at := r.s.unpinnedAt.Load()
	if at == 0 || r.pinnedAt.IsZero() {
		return time.Time{}
	}
	t := time.Unix(0, at)
	if t.After(r.pinnedAt) || r.pinnedAt.Sub(t) > r.s.cfg.PinnedTTL+r.s.cfg.AckWait {
		// Not the release this takeover followed.
		return time.Time{}
	}
	return t
}

// stopConsume stops taking deliveries of ep and waits (bounded) until the
// client library stopped consuming.
func (r *pinRun) stopConsume(ep *epoch, cc jetstream.ConsumeContext) {
	ep.closed.Store(true)
	ep.stopped = time.Now()
	cc.Stop()
	t := time.NewTimer(r.s.cfg.RequestTimeout)
	defer t.Stop()
	select {
	case <-cc.Closed():
	case <-t.C:
		// The callback checks ep.closed, so a late one is dropped.
	}
}

// take is the client library's callback for epoch ep. It never blocks: a
// delivery that does not belong to the epoch fences it, every other one
// goes into the intake queue.
func (r *pinRun) take(ep *epoch, msg jetstream.Msg) {
	if ep.closed.Load() || ep.Revoked() {
		ep.dropped.Store(true)
		return
	}
	meta, ok := parseAck(msg.Reply())
	if !ok {
		r.s.log.Warn("nats message without JetStream metadata", "subject", msg.Subject(), "reply", msg.Reply())
		return
	}
	hdr := msg.Headers()
	var pin string
	if v := hdr[pinHeader]; len(v) > 0 {
		pin = v[0]
	}
	if pin != ep.pin {
		// The library pulls again without a pin id after a 423 and may be
		// pinned anew: the delivery is not this epoch's.
		if pin == "" {
			ep.trip(fenceEvent{next: toRecreate, reason: "delivery without a pin: the consumer is no longer ordered"})
		} else {
			ep.trip(fenceEvent{next: toAcquire, pin: pin, reason: "pin changed to " + pin})
		}
		return
	}
	// Within an epoch only this replica receives, and the server numbers
	// deliveries 1, 2, 3... from this replica's reset, each first delivery
	// of a message after every earlier one in stream order. Anything else
	// fences: a jump means a delivery was lost on the way (in transit at a
	// reconnect, dropped by a slow subscription); a 1 again, or a first
	// delivery of a message at or below one already delivered, means
	// another client reset the consumer (and, in the second case, that the
	// first deliveries after that reset were lost). The next epoch starts
	// with this replica's own reset: numbering from anyone else's reset is
	// never taken as the start of an epoch.
	var why string
	switch {
	case meta.dseq == 1 && ep.expect != 1:
		why = fmt.Sprintf("consumer reset by another client (delivery sequence 1 again, expected %d)", ep.expect)
	case meta.dseq != ep.expect:
		why = fmt.Sprintf("delivery gap: consumer sequence %d, expected %d", meta.dseq, ep.expect)
	case meta.delivered == 1 && meta.seq <= ep.maxSeq:
		why = fmt.Sprintf("consumer reset by another client (first delivery of stream sequence %d after %d)", meta.seq, ep.maxSeq)
	}
	if why != "" {
		ep.trip(fenceEvent{next: toAcquire, pin: pin, reason: why})
		return
	}
	ep.expect = meta.dseq + 1
	first := meta.delivered == 1
	if first {
		ep.maxSeq = meta.seq
		if n, ok := ep.carry[meta.seq]; ok {
			meta.delivered = n + 1
			delete(ep.carry, meta.seq)
		}
	}
	r.s.failing.clear()
	d := r.s.newDelivery(msg, &meta, hdr)
	d.ep, d.seq = ep, meta.seq
	d.m.Epoch = &ep.Epoch
	d.beat = time.Now().UnixNano()
	if first && ep.acks != nil {
		ep.acks.add(d)
	}
	if !r.q.push(d) {
		ep.trip(fenceEvent{next: toAcquire, pin: pin, reason: "intake queue full"})
	}
}

// consumeErr turns the client library's consume errors into fences.
func (r *pinRun) consumeErr(ep *epoch, err error) {
	switch {
	case errors.Is(err, jetstream.ErrPinIDMismatch):
		ep.trip(fenceEvent{next: toStandby, reason: "pin lost (423 wrong pin id)"})
	case errors.Is(err, jetstream.ErrConsumerLeadershipChanged):
		ep.trip(fenceEvent{next: toStandby, reason: "consumer leader changed (the pin is cleared)"})
	case errors.Is(err, jetstream.ErrNoHeartbeat):
		ep.trip(fenceEvent{next: toAcquire, reason: "missed heartbeats"})
		r.s.missedHeartbeats(r.s.heartbeat)
	case errors.Is(err, jetstream.ErrConsumerDeleted), errors.Is(err, jetstream.ErrBadRequest):
		ep.trip(fenceEvent{next: toRecreate, reason: "consume: " + err.Error()})
	case errors.Is(err, jetstream.ErrConnectionClosed), errors.Is(err, nats.ErrConnectionClosed):
		ep.trip(fenceEvent{next: toClosed, reason: "connection closed"})
	default:
		if r.ctx.Err() == nil {
			r.s.failing.set(fmt.Errorf("consume: %w", err))
			r.s.log.Warn("nats consume error", "err", err)
		}
	}
}

// drainIntake hands queued deliveries to the handler, one at a time, in
// arrival order, until ctx (Run) ends. Deliveries of a fenced or stopped
// epoch are dropped: they stay unacknowledged, and the next reset delivers
// them again. Nothing is handed over once Run's ctx ended: a delivery the
// handler refused because of that (a negative ack that revokes the epoch)
// must not be followed by the next one of its key.
func (r *pinRun) drainIntake(ctx context.Context) {
	handover := int64(r.s.cfg.AckWait / 8)
	for {
		d := r.q.pop()
		if d == nil {
			select {
			case <-ctx.Done():
				return
			case <-r.q.wake:
			}
			continue
		}
		ep := d.ep
		if ctx.Err() != nil || r.ctx.Err() != nil {
			ep.dropped.Store(true)
			return
		}
		if ep.Revoked() || ep.closed.Load() {
			ep.dropped.Store(true)
			continue
		}
		// The pipeline counts a message's wait from here: its first
		// heartbeat comes up to three quarters of AckWait later. One that
		// waited in the queue since its last heartbeat gets one now.
		if time.Now().UnixNano()-d.beat >= handover {
			_ = d.ack(ctx, bridge.ErrInProgress)
		}
		ep.open.Add(1)
		_ = r.h(r.ctx, &d.m, d.ack)
	}
}

// beat sends an in-progress heartbeat, every AckWait/4, for each queued
// delivery that has waited AckWait/2 since it arrived or since its last
// one (the pipeline does the same for what it holds), so that the server
// does not redeliver a message whose first delivery is still queued: that
// would hand the pipeline the message twice and could fill the queue. A
// revoked epoch's deliveries get none (the ack does not send it).
func (r *pinRun) beat(ctx context.Context) {
	every := max(r.s.cfg.AckWait/4, 10*time.Millisecond)
	t := time.NewTicker(every)
	defer t.Stop()
	var due []*delivery
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			due = r.q.due(now, r.s.cfg.AckWait/2, due[:0])
			for _, d := range due {
				_ = d.ack(ctx, bridge.ErrInProgress)
			}
			clear(due)
		}
	}
}

// checkPin fences the Active epoch when consumer info requested after the
// epoch started names another pin or none: the pin timed out, was
// unpinned by an operator, or a new consumer leader cleared it, and the
// 423 that would say so may not come (a silent connection).
func (s *Source) checkPin(info *jetstream.ConsumerInfo, asked time.Time) {
	ep := s.active.Load()
	if ep == nil || !asked.After(ep.start) {
		return
	}
	if cur := pinnedID(info, s.cfg.Group); cur != ep.pin {
		ep.trip(fenceEvent{next: toStandby, reason: fmt.Sprintf("consumer info shows pin %q", cur)})
	}
}

func pinnedID(info *jetstream.ConsumerInfo, group string) string {
	for _, g := range info.PriorityGroups {
		if g.Group == group {
			return g.PinnedClientID
		}
	}
	return ""
}

// kick resets a consumer whose pin is free while messages are delivered
// and unacknowledged (their owner died, was cut off or released it with
// deliveries open) and no standby probe can win the pin with a message:
// none is pending (an idle stream), or the consumer sits at its
// MaxAckPending (the server delivers nothing until acks come), or the pin
// has been free for PinnedTTL (unownedFor) with such messages anyway. The
// reset makes them deliverable now instead of after AckWait, and some
// standby's probe wins the pin with them. Only a Standby source kicks. It
// reports whether it reset.
func (s *Source) kick(ctx context.Context, info *jetstream.ConsumerInfo, unownedFor time.Duration) bool {
	if s.State().State != StateStandby || pinnedID(info, s.cfg.Group) != "" || info.NumAckPending == 0 {
		return false
	}
	full := info.Config.MaxAckPending > 0 && info.NumAckPending >= info.Config.MaxAckPending
	if info.NumPending != 0 && !full && unownedFor < s.cfg.PinnedTTL {
		return false
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	resp, err := retry.Do(rctx, s.quiet, retry.OpConsumerReset, s.consumerName()+" (kick)",
		func(ctx context.Context) (*jetstream.ConsumerResetResponse, error) {
			return s.js.ResetConsumer(ctx, s.cfg.Stream, s.cfg.Durable)
		})
	if err != nil {
		s.log.Debug("nats consumer kick failed", "err", err)
		return false
	}
	s.log.Info("nats consumer kicked: no owner, unacknowledged messages made deliverable again",
		"unacked", info.NumAckPending, "pending", info.NumPending, "reset_seq", resp.ResetSeq)
	return true
}

// releaseEpoch waits until ep's deliveries are settled (within ctx),
// revokes what is still open, and gives the pin back (giveBack), resetting
// the consumer first when deliveries of the epoch stay unacknowledged.
func (s *Source) releaseEpoch(ctx context.Context, ep *epoch) error {
	start := time.Now()
	ep.drain()
	select {
	case <-ep.idle:
	default:
		select {
		case <-ep.idle:
		case <-ctx.Done():
		}
	}
	var err error
	if !isClosed(ep.idle) {
		ep.Revoke()
		ep.dropped.Store(true)
		err = &OpenDeliveriesError{Stream: s.cfg.Stream, Open: ep.open.Load()}
	} else if ep.acks != nil {
		// The settled prefix's last ack goes out now, ahead of the
		// give-back's reset and unpin, not on its timer after them (with
		// deliveries dropped when consuming stopped, the prefix never
		// reaches the end of the queue, which is what sends it inline).
		ep.acks.flush(ep)
	}
	unpinned := s.giveBack(ep.pin, ep.stopped, ep.dropped.Load() || ep.Revoked())
	s.log.Info("nats source released", "pin", ep.pin, "unpinned", unpinned, "took", time.Since(start).Round(time.Millisecond))
	return err
}

// giveBack lets the next owner start at once after this replica stopped
// pulling with pin at stopped: if the server still names pin, it resets
// the consumer to its ack floor when reset is set (deliveries that were
// not acked become deliverable now, not after AckWait, even at
// MaxAckPending), then unpins, so that a standby's waiting probe wins a new
// pin. UnpinConsumer names no pin id: it clears whatever pin is current. So
// the requests are made only while pin cannot have lapsed yet: it lapses
// PinnedTTL after the last pull that carried it, which left at most one
// pull expiry before stopped, and half an expiry is kept for the way to
// the server. Later the pin may be gone, or another replica's, and is left
// alone (it lapses, or has lapsed, by itself). Each request has
// RequestTimeout within that window. It reports whether it unpinned.
func (s *Source) giveBack(pin string, stopped time.Time, reset bool) bool {
	if pin == "" || stopped.IsZero() {
		return false
	}
	deadline := stopped.Add(s.cfg.PinnedTTL - s.expiry - s.expiry/2)
	if time.Until(deadline) <= 0 {
		s.log.Debug("nats pin not given back: it may have lapsed already", "pin", pin, "stopped", time.Since(stopped).Round(time.Millisecond))
		return false
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline)
	defer cancel()
	cons := s.consumer()
	info, err := retry.Do(ctx, s.pol, retry.OpConsumerInfo, s.consumerName(),
		func(ctx context.Context) (*jetstream.ConsumerInfo, error) { return cons.Info(ctx) })
	if err != nil || pinnedID(info, s.cfg.Group) != pin {
		return false
	}
	if reset && info.NumAckPending > 0 {
		_, err := retry.Do(ctx, s.pol, retry.OpConsumerReset, s.consumerName()+" (give-back)",
			func(ctx context.Context) (*jetstream.ConsumerResetResponse, error) {
				return s.js.ResetConsumer(ctx, s.cfg.Stream, s.cfg.Durable)
			})
		if err != nil {
			s.log.Warn("nats consumer reset before the unpin failed; a standby kicks it", "pin", pin, "err", err)
		}
	}
	_, err = retry.Do(ctx, s.pol, retry.OpConsumerUnpin, s.consumerName(),
		func(ctx context.Context) (struct{}, error) {
			st, err := s.js.Stream(ctx, s.cfg.Stream)
			if err == nil {
				err = st.UnpinConsumer(ctx, s.cfg.Durable, s.cfg.Group)
			}
			return struct{}{}, err
		})
	if err != nil {
		s.log.Warn("nats unpin failed; the pin lapses after PinnedTTL", "pin", pin, "err", err)
		return false
	}
	return true
}
