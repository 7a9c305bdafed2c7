package natsjs

import (
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Cumulative acknowledgement (ordered mode, consumers with AckPolicy all).
//
// Within an epoch one replica receives every delivery of the consumer, the
// first deliveries in stream order without a gap (take fences on anything
// else). So an ack of stream sequence S can stand for every message of the
// consumer at or below S as soon as the epoch's pipeline has finally
// settled (acked) every first delivery up to S: that prefix is stored in its
// cells or dead-lettered. cumAcks keeps the epoch's first deliveries in
// stream order, marks them as the pipeline settles them (in any order), and
// sends one ack for the end of the settled prefix: at once when the prefix
// has grown by cumAckEvery or nothing of the epoch is open any more (a
// graceful release waits for that, so its last ack is on the wire before the
// consumer is unpinned), else after at most cumAckDelay. The server then
// processes one ack per batch instead of one per message.
//
// What never goes out:
//   - An ack past a delivery not settled with success: a held message (the
//     epoch ended on it), one refused because its epoch was revoked, one
//     negatively acknowledged to be redelivered within the epoch (only its
//     redelivery's success marks it), one queued and dropped when consuming
//     stopped. The prefix stops there; the next owner re-reads from it.
//   - Any ack of a revoked epoch. The server numbers deliveries from 1 again
//     after each reset and ignores a cumulative ack whose delivery number is
//     at or below its floor; a late ack from an earlier epoch, with a high
//     delivery number, would move that floor above the new epoch's numbers,
//     and the server would ignore the new epoch's acks until it delivered
//     past it. What the revoked epoch settled is re-read by the next owner
//     and dropped by its idempotency key.
//
// A late ack can still come from an epoch that ended without being revoked
// (sent just before another replica's reset, or a replica frozen past its
// pin's lapse): the monitor sees the consumer's ack floor above its
// delivered count, which only that can cause, and the active epoch then
// resets again from the (correct) floor the late ack set: see
// Source.checkAckFloor.
type cumAcks struct {
	mu sync.Mutex
	// q holds the epoch's first deliveries from the oldest one not yet
	// below the floor, in stream order; q[:head] are below it (nil).
	q    []*delivery
	head int
	// last is the highest delivery below the floor whose ack has not gone
	// out, unsent how many deliveries it stands for; armed is set while a
	// timer will send it.
	last   jetstream.Msg
	unsent int
	armed  bool
}

const (
	// cumAckEvery is how many settled deliveries one cumulative ack covers
	// at most while deliveries keep coming; cumAckDelay how long a settled
	// delivery waits for its ack at most. A crash re-reads what was settled
	// and not acked yet (dropped by its idempotency key), so both only move
	// how much a takeover re-reads.
	cumAckEvery = 128
	cumAckDelay = 2 * time.Millisecond
)

// add records a first delivery of the epoch; the client library's callback
// calls it in delivery (stream) order.
func (c *cumAcks) add(d *delivery) {
	c.mu.Lock()
	c.q = append(c.q, d)
	c.mu.Unlock()
}

// settled records that the pipeline settled the delivery of stream sequence
// seq with success (the first delivery or a redelivery within the epoch) and
// sends the ack that is due now, if any. A sequence below the floor, or not
// first delivered in this epoch, changes nothing.
func (c *cumAcks) settled(ep *epoch, seq uint64) error {
	return c.send(ep, c.mark(ep, seq))
}

// mark records seq as settled and returns the message whose ack is due now
// (nil: none yet, or a timer sends it).
func (c *cumAcks) mark(ep *epoch, seq uint64) jetstream.Msg {
	c.mu.Lock()
	defer c.mu.Unlock()
	open := c.q[c.head:]
	i := sort.Search(len(open), func(i int) bool { return open[i].seq >= seq })
	if i == len(open) || open[i].seq != seq {
		return nil
	}
	open[i].done = true
	for c.head < len(c.q) && c.q[c.head].done {
		c.last = c.q[c.head].msg
		c.q[c.head] = nil
		c.head++
		c.unsent++
	}
	if c.head == len(c.q) {
		c.q, c.head = c.q[:0], 0
	} else if c.head >= 4096 && c.head > len(c.q)/2 {
		n := copy(c.q, c.q[c.head:])
		clear(c.q[n:])
		c.q, c.head = c.q[:n], 0
	}
	switch {
	case c.unsent == 0:
		return nil
	case c.unsent >= cumAckEvery || len(c.q) == 0:
		return c.take()
	case !c.armed:
		c.armed = true
		time.AfterFunc(cumAckDelay, func() { c.flush(ep) })
	}
	return nil
}

// take hands the pending ack over (c.mu held).
func (c *cumAcks) take() jetstream.Msg {
	m := c.last
	c.last, c.unsent = nil, 0
	return m
}

// flush sends the pending ack, if any (the timer's).
func (c *cumAcks) flush(ep *epoch) {
	c.mu.Lock()
	c.armed = false
	m := c.take()
	c.mu.Unlock()
	_ = c.send(ep, m)
}

// send acknowledges m unless there is none or the epoch was revoked. The
// check and the ack are one step under c.mu, and epoch.Revoke waits for
// c.mu after revoking (barrier): once Revoke returns, no ack of the epoch
// can go out any more, and every one that passed the check is in the
// connection's buffer already, ahead of whatever the caller sends next (the
// reset of a fence or of the next epoch). Ack only buffers the message; it
// does not wait for the server.
func (c *cumAcks) send(ep *epoch, m jetstream.Msg) error {
	if m == nil {
		return nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if ep.Revoked() {
		return nil
	}
	return m.Ack()
}

// barrier returns once no send that passed its revocation check is still
// running (see send).
func (c *cumAcks) barrier() {
	c.mu.Lock()
	// Nothing to do inside: waiting for c.mu is the point.
	c.mu.Unlock()
}

// checkAckFloor fences the active epoch when the consumer's ack floor (as a
// delivery number) is above the deliveries it counts: a cumulative ack of
// an earlier epoch arrived after this epoch's reset (see cumAcks), and the
// server would ignore this epoch's acks until it delivered past that
// number. The epoch's next reset starts after the floor the late ack set,
// which is right: an epoch acknowledges only a prefix that was settled.
// info must have been asked for after the epoch's reset (asked).
func (s *Source) checkAckFloor(info *jetstream.ConsumerInfo, asked time.Time) {
	ep := s.active.Load()
	if ep == nil || ep.acks == nil || !ep.start.Before(asked) || info.AckFloor.Consumer <= info.Delivered.Consumer {
		return
	}
	s.log.Warn("nats consumer ack floor ahead of its deliveries (a late cumulative ack of an earlier owner); resetting to it",
		"ackFloorConsumerSeq", info.AckFloor.Consumer, "deliveredConsumerSeq", info.Delivered.Consumer, "ackFloorStreamSeq", info.AckFloor.Stream)
	ep.trip(fenceEvent{next: toAcquire, pin: ep.pin,
		reason: fmt.Sprintf("ack floor %d ahead of the deliveries (%d): a late cumulative ack of an earlier epoch; taking the consumer over again from it",
			info.AckFloor.Consumer, info.Delivered.Consumer)})
}
