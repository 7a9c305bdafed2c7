package natsjs

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
)

// publisher is one broker's asynchronous JetStream publisher, built on core
// NATS instead of jetstream.PublishMsgAsync: that one costs a map of
// futures, channels per publish, a JSON decode per ack and a goroutine
// hand-off per message, about as much CPU as the rest of the bridge's path.
//
// Every publish occupies one slot of a fixed table of MaxPending slots and
// asks for its ack on the reply subject prefix+token, where the token
// encodes the slot index and the slot's generation (bumped each time the
// slot is taken). One wildcard subscription (prefix+"*") receives every ack;
// its callback finds the slot by index, ignores the reply when the
// generation differs (a late ack of a publish that already failed, for a
// slot used again since), and calls done right there. A slot is free again
// only after done returned, so MaxPending bounds the publishes whose done has
// not run yet.
//
// A slot moves free → sending → pending → resolving → free; "failing"
// replaces "pending" when a failure (Close's deadline, a disconnect) hits a
// publish whose PublishMsg has not returned yet: done may not run while the
// client still reads the message, so PublishAsync resolves it afterwards.
// The phase and generation share one atomic word, so the ack path claims a
// slot with a compare-and-swap and takes the mutex only to free it.
type publisher struct {
	name   string
	nc     *nats.Conn
	prefix string // unique inbox + "."; the reply token follows it
	sub    *nats.Subscription
	status chan nats.Status // RECONNECTING, CLOSED and CONNECTED events of nc
	// down is set while nc is not connected (from status events): a
	// publish then fails at once instead of waiting in the client's
	// reconnect buffer. A buffered copy would be sent whenever the link
	// comes back, possibly minutes later, after the bridge (or another
	// replica, once AckWait redelivered the source message) has published
	// the message again, and after the target's duplicate window or a
	// change of the message's cell.
	down       atomic.Bool
	closing    <-chan struct{} // the Sink's: closed when Close starts
	ackTimeout time.Duration   // <= 0: none
	expiry     int64           // sweep ticks after which a pending publish has exceeded ackTimeout
	sweepEvery time.Duration

	slots []slot // fixed; indexed by the reply token

	mu      sync.Mutex
	free    []uint32 // free slot indices, used as a stack (a just-freed slot is warm in cache)
	tick    int64    // sweeps so far: the clock a slot's age is measured in
	waiters int      // PublishAsync calls blocked for a free slot
	closed  bool     // no slot is handed out any more
	drained bool     // drain has been closed
	drain   chan struct{}

	// wake carries one token when a slot was freed while publishers
	// waited; a publisher that takes a slot and leaves more free passes it
	// on, so no waiter sleeps next to a free slot.
	wake   chan struct{}
	stop   chan struct{}
	exited chan struct{}
}

// slot is one publish awaiting its ack. done, subject and tick are written
// under mu by the publisher taking the slot before word leaves free, failErr
// under mu by a failure before word becomes failing. The goroutine whose
// compare-and-swap then moves word into resolving (or PublishAsync, out of
// failing) reads them without the lock: the atomic store orders the writes
// before its read. The sweep and failures read them under mu.
type slot struct {
	word    atomic.Uint64 // generation<<3 | phase
	done    func(error)
	subject string
	tick    int64 // publisher.tick when taken
	failErr error // set with phase failing: the error PublishAsync resolves it with
}

// Slot phases (low 3 bits of slot.word).
const (
	phFree uint64 = iota
	phSending
	phPending
	phFailing
	phResolving
)

// maxSlots keeps slot indices well inside the reply token's low 32 bits and
// is above the largest in-flight limit the bridge's configuration accepts.
const maxSlots = 1 << 20

func word(gen uint32, phase uint64) uint64 { return uint64(gen)<<3 | phase }

// Ack status headers: a reply with an empty body and a Status header is a
// server status, not a PubAck ("503": nothing listens on the subject).
const (
	statusHdr          = "Status"
	descrHdr           = "Description"
	statusNoResponders = "503"
)

// newPublisher subscribes to a fresh inbox on nc and starts the goroutine
// that enforces ackTimeout and fails the publishes outstanding when the
// connection drops. The caller stops it with shutdown after Close drained it.
func newPublisher(name string, nc *nats.Conn, maxPending int, ackTimeout time.Duration, closing <-chan struct{}) (*publisher, error) {
	p := &publisher{
		name:       name,
		nc:         nc,
		prefix:     nc.NewInbox() + ".",
		closing:    closing,
		ackTimeout: ackTimeout,
		slots:      make([]slot, maxPending),
		free:       make([]uint32, maxPending),
		drain:      make(chan struct{}),
		wake:       make(chan struct{}, 1),
		stop:       make(chan struct{}),
		exited:     make(chan struct{}),
	}
	for i := range p.free {
		p.free[i] = uint32(maxPending - 1 - i) // slot 0 on top
	}
	if ackTimeout > 0 {
		// A quarter of the timeout (within 100ms..1s) bounds how late a
		// timeout fires while a sweep stays a rare scan of the table.
		p.sweepEvery = min(max(ackTimeout/4, min(100*time.Millisecond, ackTimeout)), time.Second)
		// A slot taken during tick t was sent no earlier than the start of
		// tick t, so expiry ticks later at least ackTimeout has passed; one
		// tick more because a ticker keeps one tick while the sweep
		// goroutine is busy and delivers it late, so two ticks can be
		// counted within one period.
		p.expiry = int64((ackTimeout+p.sweepEvery-1)/p.sweepEvery) + 2
	}
	sub, err := nc.Subscribe(p.prefix+"*", p.onAck)
	if err != nil {
		return nil, fmt.Errorf("natsjs: sink: broker %q: subscribe to acks: %w", name, err)
	}
	p.sub = sub
	// Room for every outstanding ack plus as many stale ones, so a slow
	// done never makes the client drop acks as a slow consumer.
	if err := sub.SetPendingLimits(max(2*maxPending, nats.DefaultSubPendingMsgsLimit), nats.DefaultSubPendingBytesLimit); err != nil {
		_ = sub.Unsubscribe()
		return nil, fmt.Errorf("natsjs: sink: broker %q: ack subscription: %w", name, err)
	}
	p.status = nc.StatusChanged(nats.RECONNECTING, nats.CLOSED, nats.CONNECTED)
	go p.run()
	return p, nil
}

// errLinkDown fails a publish made while the connection is down; it is not
// handed to the client, so no copy of it can arrive later.
var errLinkDown = fmt.Errorf("connection down, not sent: %w", nats.ErrDisconnected)

// linkBack reports whether the connection is up again although down is
// still set, and clears down then. The status listener drops events when its
// buffer is full, so a lost CONNECTED must not keep the sink failing
// publishes: each publish while down asks the connection itself.
func (p *publisher) linkBack() bool {
	if !p.nc.IsConnected() {
		return false
	}
	p.down.Store(false)
	return true
}

// publish implements PublishAsync for this broker (see Sink.PublishAsync).
func (p *publisher) publish(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	subject := m.Target.Subject
	i, gen, err := p.acquire(ctx, subject, done)
	if err != nil {
		done(err)
		return
	}
	setMsgID(m, m.MsgID)
	if p.down.Load() && !p.linkBack() {
		err = errLinkDown
	} else {
		var buf [64]byte
		reply := string(p.appendReply(buf[:0], i, gen))
		err = p.nc.PublishMsg(&nats.Msg{Subject: subject, Reply: reply, Header: nats.Header(m.Header), Data: m.Body})
	}
	sl := &p.slots[i]
	if err == nil {
		if sl.word.CompareAndSwap(word(gen, phSending), word(gen, phPending)) {
			return
		}
		// Already resolving (the ack beat us here), or failing: only this
		// goroutine moves a slot out of failing.
		if sl.word.Load() == word(gen, phFailing) {
			sl.word.Store(word(gen, phResolving))
			p.finish(i, sl.failErr)
		}
		return
	}
	err = fmt.Errorf("natsjs: publish to broker %q subject %q: %w", p.name, subject, err)
	if sl.word.CompareAndSwap(word(gen, phSending), word(gen, phResolving)) ||
		sl.word.CompareAndSwap(word(gen, phFailing), word(gen, phResolving)) {
		p.finish(i, err)
	}
}

// acquire takes a free slot for a publish to subject, blocking at the cap
// until one is freed, ctx ends or Close starts.
func (p *publisher) acquire(ctx context.Context, subject string, done func(error)) (uint32, uint32, error) {
	p.mu.Lock()
	for len(p.free) == 0 && !p.closed {
		p.waiters++
		p.mu.Unlock()
		var err error
		select {
		case <-p.wake:
		case <-ctx.Done():
			err = fmt.Errorf("natsjs: publish to broker %q: %w", p.name, ctx.Err())
		case <-p.closing:
			err = ErrClosed
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
		return 0, 0, ErrClosed
	}
	i := p.free[len(p.free)-1]
	p.free = p.free[:len(p.free)-1]
	if len(p.free) > 0 && p.waiters > 0 {
		p.signal()
	}
	sl := &p.slots[i]
	gen := uint32(sl.word.Load()>>3) + 1
	sl.done, sl.subject, sl.tick, sl.failErr = done, subject, p.tick, nil
	sl.word.Store(word(gen, phSending))
	p.mu.Unlock()
	return i, gen, nil
}

// signal wakes one blocked publisher; p.mu is held.
func (p *publisher) signal() {
	select {
	case p.wake <- struct{}{}:
	default: // a token is already waiting
	}
}

// appendReply appends the reply subject of slot i in generation gen.
func (p *publisher) appendReply(b []byte, i, gen uint32) []byte {
	b = append(b, p.prefix...)
	return strconv.AppendUint(b, uint64(gen)<<32|uint64(i), 36)
}

// onAck is the ack subscription's callback: it resolves the publish the
// reply subject names, unless that publish was resolved already.
func (p *publisher) onAck(m *nats.Msg) {
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
			return // stale, or failing: PublishAsync resolves that one
		}
		if sl.word.CompareAndSwap(w, word(gen, phResolving)) {
			break
		}
	}
	p.finish(i, p.result(sl.subject, m))
}

// result turns an ack message into what done gets.
func (p *publisher) result(subject string, m *nats.Msg) error {
	if len(m.Data) == 0 {
		if st := m.Header.Get(statusHdr); st != "" {
			if st == statusNoResponders {
				// No stream captures the subject (or it has no leader yet).
				return fmt.Errorf("natsjs: publish to broker %q subject %q: %w (%w)",
					p.name, subject, jetstream.ErrNoStreamResponse, nats.ErrNoResponders)
			}
			return fmt.Errorf("natsjs: publish to broker %q subject %q: server status %s %q: %w",
				p.name, subject, st, m.Header.Get(descrHdr), jetstream.ErrInvalidJSAck)
		}
	}
	if stream, seq, dup, ok := scanPubAck(m.Data); ok {
		if dup {
			return &DuplicateError{Broker: p.name, Stream: string(stream), Seq: seq}
		}
		return nil
	}
	// Errors and shapes the scanner does not know: the rare path.
	var ack struct {
		Error     *jetstream.APIError `json:"error"`
		Stream    string              `json:"stream"`
		Sequence  uint64              `json:"seq"`
		Duplicate bool                `json:"duplicate"`
	}
	if err := json.Unmarshal(m.Data, &ack); err != nil {
		return fmt.Errorf("natsjs: publish to broker %q subject %q: %w: %w", p.name, subject, jetstream.ErrInvalidJSAck, err)
	}
	switch {
	case ack.Error != nil:
		return fmt.Errorf("natsjs: publish to broker %q subject %q: %w", p.name, subject, ack.Error)
	case ack.Stream == "":
		return fmt.Errorf("natsjs: publish to broker %q subject %q: %w", p.name, subject, jetstream.ErrInvalidJSAck)
	case ack.Duplicate:
		return &DuplicateError{Broker: p.name, Stream: ack.Stream, Seq: ack.Sequence}
	}
	return nil
}

// finish calls the done of slot i, which the caller moved into resolving,
// and then frees the slot.
func (p *publisher) finish(i uint32, err error) {
	p.slots[i].done(err)
	p.mu.Lock()
	p.release(i)
	p.mu.Unlock()
}

// release frees slot i; p.mu is held.
func (p *publisher) release(i uint32) {
	sl := &p.slots[i]
	sl.done, sl.subject, sl.failErr = nil, "", nil // let the collector have them
	sl.word.Store(word(uint32(sl.word.Load()>>3), phFree))
	p.free = append(p.free, i)
	if p.waiters > 0 {
		p.signal()
	}
	p.checkDrained()
}

// checkDrained closes drain once the publisher is closed and every slot is
// free; p.mu is held.
func (p *publisher) checkDrained() {
	if p.closed && !p.drained && len(p.free) == len(p.slots) {
		p.drained = true
		close(p.drain)
	}
}

// run enforces the ack timeout and fails the outstanding publishes when the
// connection drops (their acks would be lost with it) until stop closes.
func (p *publisher) run() {
	defer close(p.exited)
	var sweep <-chan time.Time
	if p.ackTimeout > 0 {
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
			cause := nats.ErrDisconnected
			if st == nats.CLOSED {
				cause = nats.ErrConnectionClosed
			}
			p.failAll(func(subject string) error {
				return fmt.Errorf("natsjs: publish to broker %q subject %q: ack lost: %w", p.name, subject, cause)
			})
		}
	}
}

// sweep advances the tick and fails the pending publishes that have waited
// longer than ackTimeout.
func (p *publisher) sweep() {
	var due []uint32
	p.mu.Lock()
	p.tick++
	if len(p.free) < len(p.slots) {
		for i := range p.slots {
			sl := &p.slots[i]
			w := sl.word.Load()
			// A publish still sending is left to the next sweep: done
			// must not run while the client reads the message.
			if w&7 == phPending && p.tick-sl.tick >= p.expiry && sl.word.CompareAndSwap(w, w&^7|phResolving) {
				due = append(due, uint32(i))
			}
		}
	}
	p.mu.Unlock()
	p.resolve(due, func(subject string) error {
		return fmt.Errorf("natsjs: publish to broker %q subject %q: no ack within %v: %w",
			p.name, subject, p.ackTimeout, jetstream.ErrAsyncPublishTimeout)
	})
}

// failAll fails every outstanding publish with errFor(its subject): the
// pending ones now, the ones still sending once PublishMsg has returned.
// It reports how many it failed.
func (p *publisher) failAll(errFor func(subject string) error) int {
	var due []uint32
	marked := 0
	p.mu.Lock()
	for i := range p.slots {
		switch p.fail(&p.slots[i], errFor) {
		case failNow:
			due = append(due, uint32(i))
		case failLater:
			marked++
		}
	}
	p.mu.Unlock()
	p.resolve(due, errFor)
	return len(due) + marked
}

// What fail did with a slot.
const (
	failNone  = iota // not outstanding, or failed already
	failNow          // moved into resolving: the caller calls its done
	failLater        // marked failing: PublishAsync resolves it
)

// fail moves a pending slot into resolving (failNow: the caller calls its
// done), or marks a sending slot failing with errFor(subject) for
// PublishAsync to resolve (failLater); other slots are left alone (failNone).
// p.mu is held: only one failure sets failErr, and PublishAsync reads it
// only after seeing the failing phase stored after it.
func (p *publisher) fail(sl *slot, errFor func(subject string) error) int {
	for {
		w := sl.word.Load()
		switch w & 7 {
		case phPending:
			if sl.word.CompareAndSwap(w, w&^7|phResolving) {
				return failNow
			}
		case phSending:
			sl.failErr = errFor(sl.subject)
			if sl.word.CompareAndSwap(w, w&^7|phFailing) {
				return failLater
			}
		default:
			return failNone
		}
		// Lost a race: the publish became pending, or its ack claimed it.
	}
}

// resolve calls done for slots the caller moved into resolving, then frees
// them under one lock.
func (p *publisher) resolve(due []uint32, errFor func(subject string) error) {
	if len(due) == 0 {
		return
	}
	for _, i := range due {
		sl := &p.slots[i]
		sl.done(errFor(sl.subject))
	}
	p.mu.Lock()
	for _, i := range due {
		p.release(i)
	}
	p.mu.Unlock()
}

// close stops handing out slots; drain closes once every slot is free.
func (p *publisher) close() {
	p.mu.Lock()
	p.closed = true
	p.checkDrained()
	p.mu.Unlock()
}

// shutdown stops the goroutine and the subscription; call it after drain
// closed. A connection already closed has dropped the subscription itself,
// so Unsubscribe's error is of no interest.
func (p *publisher) shutdown() {
	close(p.stop)
	<-p.exited
	p.nc.RemoveStatusListener(p.status)
	_ = p.sub.Unsubscribe()
}

// scanPubAck reads a PubAck of the usual shape, {"stream":"S","seq":N} with
// optional "duplicate", "domain" and other scalar members, without
// encoding/json (which costs more than the rest of handling an ack). ok is
// false for anything else (an "error" member, escapes or non-ASCII in
// strings, nested values, malformed JSON, no stream): the caller then
// decodes with encoding/json, which gives the same answer whenever ok is
// true. Keys match case-insensitively, as encoding/json matches them.
// stream aliases b.
func scanPubAck(b []byte) (stream []byte, seq uint64, dup bool, ok bool) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return nil, 0, false, false
	}
	i = skipSpace(b, i+1)
	if i < len(b) && b[i] == '}' {
		return nil, 0, false, false // no stream
	}
	for {
		var key []byte
		if key, i, ok = scanString(b, i); !ok {
			return nil, 0, false, false
		}
		i = skipSpace(b, i)
		if i >= len(b) || b[i] != ':' {
			return nil, 0, false, false
		}
		i = skipSpace(b, i+1)
		switch {
		case equalFold(key, "stream"):
			if stream, i, ok = scanString(b, i); !ok {
				return nil, 0, false, false
			}
		case equalFold(key, "seq"):
			if seq, i, ok = scanUint(b, i); !ok {
				return nil, 0, false, false
			}
		case equalFold(key, "duplicate"):
			switch {
			case hasLiteral(b, i, "true"):
				dup, i = true, i+4
			case hasLiteral(b, i, "false"):
				dup, i = false, i+5
			default:
				return nil, 0, false, false
			}
		case equalFold(key, "error"):
			return nil, 0, false, false
		default:
			if i, ok = skipScalar(b, i); !ok {
				return nil, 0, false, false
			}
		}
		i = skipSpace(b, i)
		if i >= len(b) {
			return nil, 0, false, false
		}
		if b[i] == '}' {
			break
		}
		if b[i] != ',' {
			return nil, 0, false, false
		}
		i = skipSpace(b, i+1)
	}
	if skipSpace(b, i+1) != len(b) || len(stream) == 0 {
		return nil, 0, false, false
	}
	return stream, seq, dup, true
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// scanString reads a string of printable ASCII without escapes at b[i].
func scanString(b []byte, i int) ([]byte, int, bool) {
	if i >= len(b) || b[i] != '"' {
		return nil, i, false
	}
	for j := i + 1; j < len(b); j++ {
		c := b[j]
		if c == '"' {
			return b[i+1 : j], j + 1, true
		}
		if c < 0x20 || c >= 0x80 || c == '\\' {
			return nil, i, false
		}
	}
	return nil, i, false
}

// scanUint reads a JSON integer that fits a uint64 at b[i].
func scanUint(b []byte, i int) (uint64, int, bool) {
	j := i
	var n uint64
	for j < len(b) && b[j] >= '0' && b[j] <= '9' {
		d := uint64(b[j] - '0')
		if n > (1<<64-1-d)/10 {
			return 0, i, false
		}
		n = n*10 + d
		j++
	}
	if j == i || (b[i] == '0' && j > i+1) {
		return 0, i, false // none, or a leading zero
	}
	if j < len(b) && (b[j] == '.' || b[j] == 'e' || b[j] == 'E') {
		return 0, i, false
	}
	return n, j, true
}

// skipScalar skips a string, number, true, false or null at b[i].
func skipScalar(b []byte, i int) (int, bool) {
	if i >= len(b) {
		return i, false
	}
	switch c := b[i]; {
	case c == '"':
		_, j, ok := scanString(b, i)
		return j, ok
	case hasLiteral(b, i, "true"), hasLiteral(b, i, "null"):
		return i + 4, true
	case hasLiteral(b, i, "false"):
		return i + 5, true
	case c == '-' || (c >= '0' && c <= '9'):
		return skipNumber(b, i)
	}
	return i, false
}

// skipNumber skips a number of JSON's grammar at b[i].
func skipNumber(b []byte, i int) (int, bool) {
	digits := func(j int) int {
		for j < len(b) && b[j] >= '0' && b[j] <= '9' {
			j++
		}
		return j
	}
	j := i
	if b[j] == '-' {
		j++
	}
	switch {
	case j < len(b) && b[j] == '0':
		j++
	case j < len(b) && b[j] >= '1' && b[j] <= '9':
		j = digits(j)
	default:
		return i, false
	}
	if j < len(b) && b[j] == '.' {
		k := digits(j + 1)
		if k == j+1 {
			return i, false
		}
		j = k
	}
	if j < len(b) && (b[j] == 'e' || b[j] == 'E') {
		j++
		if j < len(b) && (b[j] == '+' || b[j] == '-') {
			j++
		}
		k := digits(j)
		if k == j {
			return i, false
		}
		j = k
	}
	return j, true
}

func hasLiteral(b []byte, i int, lit string) bool {
	return len(b)-i >= len(lit) && string(b[i:i+len(lit)]) == lit
}

// equalFold reports whether the ASCII key equals name (lower case) ignoring
// case; keys are ASCII here, so this matches encoding/json's folding.
func equalFold(key []byte, name string) bool {
	if len(key) != len(name) {
		return false
	}
	for i := range key {
		c := key[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		if c != name[i] {
			return false
		}
	}
	return true
}
