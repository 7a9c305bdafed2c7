package jspub

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// DefaultMaxPending is Config.MaxPending's default, and MaxPendingLimit its
// largest value (slot indices stay well inside the reply token's low 32
// bits).
const (
	DefaultMaxPending = 4096
	MaxPendingLimit   = 1 << 20
)

// Config tunes a Pipe.
type Config struct {
	// MaxPending caps the requests whose completion has not returned yet;
	// Send blocks at the cap. Default DefaultMaxPending, at most
	// MaxPendingLimit. The pipe holds a table of MaxPending slots of about
	// 64 bytes.
	MaxPending int
	// Timeout fails a request whose reply has not arrived this long after
	// it was sent, with an error wrapping ErrTimeout and ErrNoReply. One
	// goroutine sweeps the slot table every Timeout/4 (within 100ms..1s,
	// never more than Timeout), so the failure comes between Timeout and
	// Timeout plus three sweeps, and no timer is armed per request. Zero or
	// negative: no timeout (a lost reply then holds its slot until the
	// connection drops or Close gives up).
	Timeout time.Duration
}

// Completion receives the outcome of one request: the token Send was given,
// the subject it was sent to, and either the reply (err nil) or why there is
// none (reply nil; err wraps ErrNotSent or ErrNoReply, see Send). It runs on
// the subscription's goroutine (replies), the sweep goroutine (timeouts and
// disconnects), in Close, or in Send itself; it must not block, and must not
// call Send on the same Pipe: the slot is freed only after it returns.
type Completion[T any] func(tok T, subject string, reply *nats.Msg, err error)

// Pipe sends requests on one NATS connection and matches their replies,
// with any number of requests in flight (pipelining); see the package
// documentation. It is safe for concurrent use. T is what the caller needs
// to finish a request (a callback, a waiting call); Pipe stores it in the
// request's slot and hands it back to the Completion.
type Pipe[T any] struct {
	nc       *nats.Conn
	prefix   string // unique inbox + "."; the reply token follows it
	sub      *nats.Subscription
	status   chan nats.Status // RECONNECTING, CLOSED and CONNECTED events of nc
	complete Completion[T]
	// down is set while nc is not connected (from status events): a
	// request then fails at once instead of waiting in the client's
	// reconnect buffer, to be sent whenever the link comes back, possibly
	// minutes later and after its caller retried or gave up.
	down       atomic.Bool
	timeout    time.Duration // <= 0: none
	errTimeout error         // made once: names the timeout
	expiry     int64         // sweep ticks after which a pending request has exceeded timeout
	sweepEvery time.Duration

	slots []slot[T] // fixed; indexed by the reply token

	mu      sync.Mutex
	free    []uint32 // free slot indices, used as a stack (a just-freed slot is warm in cache)
	tick    int64    // sweeps so far: the clock a slot's age is measured in
	waiters int      // Send calls blocked for a free slot
	closed  bool     // no slot is handed out any more
	drained bool     // drain has been closed
	drain   chan struct{}

	// wake carries one token when a slot was freed while senders waited; a
	// sender that takes a slot and leaves more free passes it on, so no
	// waiter sleeps next to a free slot.
	wake     chan struct{}
	closing  chan struct{} // closed by Stop: wakes blocked senders
	stop     chan struct{}
	exited   chan struct{}
	stopOnce sync.Once
	shutOnce sync.Once
}

// slot is one request awaiting its reply. tok, subject and tick are written
// under mu by the sender taking the slot before word leaves free, failErr
// under mu by a failure before word becomes failing. The goroutine whose
// compare-and-swap then moves word into resolving (or Send, out of failing)
// reads them without the lock: the atomic store orders the writes before
// its read. The sweep and failures read them under mu.
type slot[T any] struct {
	word    atomic.Uint64 // generation<<3 | phase
	tok     T
	subject string
	tick    int64 // Pipe.tick when taken
	failErr error // set with phase failing: the error Send resolves it with
}

// Slot phases (low 3 bits of slot.word). A slot moves free → sending →
// pending → resolving → free; failing replaces pending when a failure
// (Close's deadline, a disconnect) hits a request whose PublishMsg has not
// returned yet: the completion may not run while the client still reads
// the caller's message, so Send resolves it afterwards.
const (
	phFree uint64 = iota
	phSending
	phPending
	phFailing
	phResolving
)

func word(gen uint32, phase uint64) uint64 { return uint64(gen)<<3 | phase }

// New subscribes to a fresh inbox on nc and starts the goroutine that
// enforces cfg.Timeout and fails the requests outstanding when the
// connection drops. complete receives every request's outcome. The caller
// ends the Pipe with Close.
func New[T any](nc *nats.Conn, cfg Config, complete Completion[T]) (*Pipe[T], error) {
	if nc == nil || complete == nil {
		return nil, fmt.Errorf("jspub: New needs a connection and a completion")
	}
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = DefaultMaxPending
	}
	if cfg.MaxPending > MaxPendingLimit {
		return nil, fmt.Errorf("jspub: MaxPending %d over %d", cfg.MaxPending, MaxPendingLimit)
	}
	p := &Pipe[T]{
		nc:       nc,
		prefix:   nc.NewInbox() + ".",
		complete: complete,
		timeout:  cfg.Timeout,
		slots:    make([]slot[T], cfg.MaxPending),
		free:     make([]uint32, cfg.MaxPending),
		drain:    make(chan struct{}),
		wake:     make(chan struct{}, 1),
		closing:  make(chan struct{}),
		stop:     make(chan struct{}),
		exited:   make(chan struct{}),
	}
	for i := range p.free {
		p.free[i] = uint32(cfg.MaxPending - 1 - i) // slot 0 on top
	}
	if cfg.Timeout > 0 {
		p.errTimeout = newFailure(fmt.Sprintf("no reply within %v", cfg.Timeout), ErrNoReply, ErrTimeout)
		// A quarter of the timeout (within 100ms..1s) bounds how late a
		// timeout fires while a sweep stays a rare scan of the table.
		p.sweepEvery = min(max(cfg.Timeout/4, min(100*time.Millisecond, cfg.Timeout)), time.Second)
		// A slot taken during tick t was sent no earlier than the start of
		// tick t, so expiry ticks later at least the timeout has passed;
		// one tick more because a ticker keeps one tick while the sweep
		// goroutine is busy and delivers it late, so two ticks can be
		// counted within one period.
		p.expiry = int64((cfg.Timeout+p.sweepEvery-1)/p.sweepEvery) + 2
	}
	sub, err := nc.Subscribe(p.prefix+"*", p.onReply)
	if err != nil {
		return nil, fmt.Errorf("jspub: subscribe to replies: %w", err)
	}
	p.sub = sub
	// Room for every outstanding reply plus as many stale ones, so a slow
	// completion never makes the client drop replies as a slow consumer.
	if err := sub.SetPendingLimits(max(2*cfg.MaxPending, nats.DefaultSubPendingMsgsLimit), nats.DefaultSubPendingBytesLimit); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("jspub: reply subscription: %w", err)
	}
	p.status = nc.StatusChanged(nats.RECONNECTING, nats.CLOSED, nats.CONNECTED)
	go p.run()
	return p, nil
}

// Send sends data with hdr to subject, asking for the reply on the pipe's
// inbox, and arranges for the Pipe's Completion to receive tok and the
// outcome exactly once. hdr and data are read before Send returns (the
// client copies them) and not kept, and the completion never runs while
// the client may still read them, so it may recycle them. Send blocks while MaxPending requests
// are outstanding, until a slot frees, ctx ends or the pipe is stopped; ctx
// matters only for that wait.
//
// The completion gets the reply, or an error that wraps ErrNotSent (pipe
// stopped: also ErrClosed; connection down: also nats.ErrDisconnected; ctx
// ended while blocked: also ctx's error; the client refused the message:
// also the client's error) or ErrNoReply (Config.Timeout passed: also
// ErrTimeout; the connection dropped: also nats.ErrDisconnected or
// nats.ErrConnectionClosed; Close's deadline: also ErrClosed). A request
// made while the connection is down is not handed to the client, so no copy
// of it waits in the client's reconnect buffer.
func (p *Pipe[T]) Send(ctx context.Context, subject string, hdr nats.Header, data []byte, tok T) {
	i, gen, err := p.acquire(ctx, subject, tok)
	if err != nil {
		p.complete(tok, subject, nil, err)
		return
	}
	if p.down.Load() && !p.linkBack() {
		err = errLinkDown
	} else {
		var buf [64]byte
		reply := string(p.appendReply(buf[:0], i, gen))
		if err = p.nc.PublishMsg(&nats.Msg{Subject: subject, Reply: reply, Header: hdr, Data: data}); err != nil {
			err = notSent(err)
		}
	}
	sl := &p.slots[i]
	if err == nil {
		if sl.word.CompareAndSwap(word(gen, phSending), word(gen, phPending)) {
			return
		}
		// Already resolving (the reply beat us here), or failing: only
		// this goroutine moves a slot out of failing.
		if sl.word.Load() == word(gen, phFailing) {
			sl.word.Store(word(gen, phResolving))
			p.finish(i, nil, sl.failErr)
		}
		return
	}
	if sl.word.CompareAndSwap(word(gen, phSending), word(gen, phResolving)) ||
		sl.word.CompareAndSwap(word(gen, phFailing), word(gen, phResolving)) {
		p.finish(i, nil, err)
	}
}

// linkBack reports whether the connection is up again although down is
// still set, and clears down then. The status listener drops events when its
// buffer is full, so a lost CONNECTED must not keep the pipe failing
// requests: each request while down asks the connection itself.
func (p *Pipe[T]) linkBack() bool {
	if !p.nc.IsConnected() {
		return false
	}
	p.down.Store(false)
	return true
}

// acquire takes a free slot for a request to subject, blocking at the cap
// until one is freed, ctx ends or the pipe is stopped.
func (p *Pipe[T]) acquire(ctx context.Context, subject string, tok T) (uint32, uint32, error) {
	p.mu.Lock()
	for len(p.free) == 0 && !p.closed {
		p.waiters++
		p.mu.Unlock()
		var err error
		select {
		case <-p.wake:
		case <-ctx.Done():
			err = notSent(ctx.Err())
		case <-p.closing:
			err = errClosed
		}
		p.mu.Lock()
		p.waiters--
		if err != nil {
			p.mu.Unlock()
			return 0, 0, err
		}
	}
	if p.closed {
		p.mu.Unlock()
		return 0, 0, errClosed
	}
	i := p.free[len(p.free)-1]
	p.free = p.free[:len(p.free)-1]
	if len(p.free) > 0 && p.waiters > 0 {
		p.signal()
	}
	sl := &p.slots[i]
	gen := uint32(sl.word.Load()>>3) + 1
	sl.tok, sl.subject, sl.tick, sl.failErr = tok, subject, p.tick, nil
	sl.word.Store(word(gen, phSending))
	p.mu.Unlock()
	return i, gen, nil
}

// signal wakes one blocked sender; p.mu is held.
func (p *Pipe[T]) signal() {
	select {
	case p.wake <- struct{}{}:
	default: // a token is already waiting
	}
}

// appendReply appends the reply subject of slot i in generation gen.
func (p *Pipe[T]) appendReply(b []byte, i, gen uint32) []byte {
	b = append(b, p.prefix...)
	return strconv.AppendUint(b, uint64(gen)<<32|uint64(i), 36)
}

// onReply is the reply subscription's callback: it resolves the request the
// reply subject names, unless that request was resolved already (a late
// reply for a slot used again since carries an older generation).
func (p *Pipe[T]) onReply(m *nats.Msg) {
	tok, ok := strings.CutPrefix(m.Subject, p.prefix)
	if !ok {
		return
	}
	v, err := strconv.ParseUint(tok, 36, 64)
	if err != nil || v&(1<<32-1) >= uint64(len(p.slots)) {
		return
	}
	i, gen := uint32(v), uint32(v>>32)
	sl := &p.slots[i]
	for {
		w := sl.word.Load()
		if w != word(gen, phSending) && w != word(gen, phPending) {
			return // stale, or failing: Send resolves that one
		}
		if sl.word.CompareAndSwap(w, word(gen, phResolving)) {
			break
		}
	}
	p.finish(i, m, nil)
}

// finish runs the completion of slot i, which the caller moved into
// resolving, and then frees the slot.
func (p *Pipe[T]) finish(i uint32, m *nats.Msg, err error) {
	sl := &p.slots[i]
	p.complete(sl.tok, sl.subject, m, err)
	p.mu.Lock()
	p.freeSlot(i)
	p.mu.Unlock()
}

// freeSlot frees slot i; p.mu is held.
func (p *Pipe[T]) freeSlot(i uint32) {
	sl := &p.slots[i]
	var zero T
	sl.tok, sl.subject, sl.failErr = zero, "", nil // let the collector have them
	sl.word.Store(word(uint32(sl.word.Load()>>3), phFree))
	p.free = append(p.free, i)
	if p.waiters > 0 {
		p.signal()
	}
	p.checkDrained()
}

// checkDrained closes drain once the pipe is stopped and every slot is
// free; p.mu is held.
func (p *Pipe[T]) checkDrained() {
	if p.closed && !p.drained && len(p.free) == len(p.slots) {
		p.drained = true
		close(p.drain)
	}
}

// run enforces the timeout and fails the outstanding requests when the
// connection drops (their replies would be lost with it) until stop closes.
func (p *Pipe[T]) run() {
	defer close(p.exited)
	var sweep <-chan time.Time
	if p.timeout > 0 {
		t := time.NewTicker(p.sweepEvery)
		defer t.Stop()
		sweep = t.C
	}
	status := p.status
	for {
		select {
		case <-p.stop:
			return
		case <-sweep:
			p.sweep()
		case st, ok := <-status:
			if !ok {
				status = nil
				continue
			}
			if st == nats.CONNECTED {
				p.down.Store(false)
				continue
			}
			p.down.Store(true)
			if st == nats.CLOSED {
				p.failAll(errLostClosed)
			} else {
				p.failAll(errLost)
			}
		}
	}
}

// sweep advances the tick and fails the pending requests that have waited
// longer than the timeout.
func (p *Pipe[T]) sweep() {
	var due []uint32
	p.mu.Lock()
	p.tick++
	if len(p.free) < len(p.slots) {
		for i := range p.slots {
			sl := &p.slots[i]
			w := sl.word.Load()
			// A request still sending is left to the next sweep: the
			// completion must not run while the client reads the message.
			if w&7 == phPending && p.tick-sl.tick >= p.expiry && sl.word.CompareAndSwap(w, w&^7|phResolving) {
				due = append(due, uint32(i))
			}
		}
	}
	p.mu.Unlock()
	p.resolve(due, p.errTimeout)
}

// failAll fails every outstanding request with err: the pending ones now,
// the ones still sending once PublishMsg has returned. It reports how many
// it failed.
func (p *Pipe[T]) failAll(err error) int {
	var due []uint32
	marked := 0
	p.mu.Lock()
	for i := range p.slots {
		switch p.fail(&p.slots[i], err) {
		case failNow:
			due = append(due, uint32(i))
		case failLater:
			marked++
		}
	}
	p.mu.Unlock()
	p.resolve(due, err)
	return len(due) + marked
}

// What fail did with a slot.
const (
	failNone  = iota // not outstanding, or failed already
	failNow          // moved into resolving: the caller runs its completion
	failLater        // marked failing: Send resolves it
)

// fail moves a pending slot into resolving (failNow: the caller runs its
// completion), or marks a sending slot failing with err for Send to resolve
// (failLater); other slots are left alone (failNone). p.mu is held: only one
// failure sets failErr, and Send reads it only after seeing the failing
// phase stored after it.
func (p *Pipe[T]) fail(sl *slot[T], err error) int {
	for {
		w := sl.word.Load()
		switch w & 7 {
		case phPending:
			if sl.word.CompareAndSwap(w, w&^7|phResolving) {
				return failNow
			}
		case phSending:
			sl.failErr = err
			if sl.word.CompareAndSwap(w, w&^7|phFailing) {
				return failLater
			}
		default:
			return failNone
		}
		// Lost a race: the request became pending, or its reply claimed it.
	}
}

// resolve runs the completions of slots the caller moved into resolving,
// with err, then frees them under one lock.
func (p *Pipe[T]) resolve(due []uint32, err error) {
	if len(due) == 0 {
		return
	}
	for _, i := range due {
		sl := &p.slots[i]
		p.complete(sl.tok, sl.subject, nil, err)
	}
	p.mu.Lock()
	for _, i := range due {
		p.freeSlot(i)
	}
	p.mu.Unlock()
}

// Stats is a snapshot of a Pipe's load.
type Stats struct {
	// Outstanding counts the requests holding a slot: sent (or being sent)
	// and not yet completed.
	Outstanding int
	// Blocked counts the Send calls waiting for a free slot.
	Blocked int
	// Down reports that the pipe has seen the connection drop and not yet
	// seen it come back: Send fails at once meanwhile.
	Down bool
}

// Stats returns the pipe's current load. It is safe for concurrent use.
func (p *Pipe[T]) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return Stats{Outstanding: len(p.slots) - len(p.free), Blocked: p.waiters, Down: p.down.Load()}
}

// Stop makes the pipe refuse requests: blocked and later Send calls
// complete with an error wrapping ErrClosed and ErrNotSent. Requests
// already sent keep waiting for their replies. It returns at once, and is
// idempotent and safe for concurrent use; Close must still be called.
func (p *Pipe[T]) Stop() {
	p.stopOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		close(p.closing)
		p.checkDrained()
		p.mu.Unlock()
	})
}

// Close stops the pipe (see Stop), waits until every request sent has
// completed, then ends its goroutine and its subscription. If ctx ends
// first, the requests still waiting for a reply complete with an error
// wrapping ErrClosed and ErrNoReply (they may or may not have taken effect;
// one still inside the client's PublishMsg completes as soon as that
// returns), and Close returns an error wrapping ctx's error; when none was
// left to cut short it returns nil. It does not close the connection. Close
// is idempotent and safe for concurrent use.
func (p *Pipe[T]) Close(ctx context.Context) error {
	p.Stop()
	var err error
	select {
	case <-p.drain:
	case <-ctx.Done():
		// Only a request cut short makes an error: the pipe may have
		// drained meanwhile (select picks at random when both are ready),
		// or hold only requests whose completion is running.
		if n := p.failAll(errCutShort); n > 0 {
			err = fmt.Errorf("jspub: close: %d requests cut short: %w", n, ctx.Err())
		}
		<-p.drain
	}
	p.shutOnce.Do(p.shutdown)
	return err
}

// shutdown stops the goroutine and the subscription; called once drain
// closed. A connection already closed has dropped the subscription itself,
// so Unsubscribe's error is of no interest.
func (p *Pipe[T]) shutdown() {
	close(p.stop)
	<-p.exited
	p.nc.RemoveStatusListener(p.status)
	_ = p.sub.Unsubscribe()
}
