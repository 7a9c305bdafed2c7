package rmq

import (
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"
)

// The client sends a half message's end-transaction one way and does not
// report a failed write; a bridge killed right after writing it can lose
// it (a connection closed with unread data is reset, and what the broker
// had not read yet is gone) while the source's acknowledgement of the
// message gets out. The half message would then wait for its check-back,
// and the key's next message, forwarded by the next bridge, would be
// visible first. So a transactional send is confirmed only once the
// broker has read its end-transaction: after a synchronous request sent
// behind it on the same connection was answered (a barrier: the broker
// reads a connection's frames in order). A barrier covers every
// end-transaction written before it was sent, so under load one round
// trip confirms many sends. A send whose barrier fails (no answer within
// the client's 3 s) waits for its check-back like a redelivered decided
// message (wait.go).
//
// The barrier is a SEARCH_OFFSET_BY_TIMESTAMP for the half message's queue,
// through a pull consumer that is never started and shares the producer's
// client instance (the client pools connections by instance name), so it
// takes the producer's connection. Any answer counts, an error code too
// (an ACL that refuses the lookup answers all the same).

// barrierClient is the part of the client's pull consumer used for
// barriers.
type barrierClient interface {
	OffsetForTimestamp(mq *primitive.MessageQueue, timestamp int64) (int64, error)
}

// errEnded reports a transactional send whose end-transaction was written;
// the worker hands the job to the confirmer.
type errEnded struct {
	ref slotRef
	mq  primitive.MessageQueue
}

func (e *errEnded) Error() string {
	return fmt.Sprintf("transactional attempt %d ended; waiting for the broker to read the end-transaction", e.ref.slot)
}

type ended struct {
	j   *job
	ref slotRef
	mq  primitive.MessageQueue
}

// confirmer runs the barriers of one transactional target.
type confirmer struct {
	barrier barrierClient
	waits   *txWaits
	done    func(*job, error)
	log     *slog.Logger

	mu      sync.Mutex
	pending []ended
	closed  bool
	wake    chan struct{}
	quit    chan struct{}
	exited  chan struct{}
}

func newConfirmer(b barrierClient, waits *txWaits, log *slog.Logger, done func(*job, error)) *confirmer {
	c := &confirmer{barrier: b, waits: waits, done: done, log: log,
		wake: make(chan struct{}, 1), quit: make(chan struct{}), exited: make(chan struct{})}
	go c.loop()
	return c
}

// add holds j until a barrier confirmed its end-transaction.
func (c *confirmer) add(j *job, e *errEnded) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		c.done(j, fmt.Errorf("rmq: broker %q: %w after the send (the message may be stored)", j.t.name, ErrClosed))
		return
	}
	c.pending = append(c.pending, ended{j: j, ref: e.ref, mq: e.mq})
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// close stops the barriers; what is still pending fails with ErrClosed.
// The sink calls it once its pending publishes resolved, so normally
// nothing is.
func (c *confirmer) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		<-c.exited
		return
	}
	c.closed = true
	c.mu.Unlock()
	close(c.quit)
	<-c.exited
	c.mu.Lock()
	left := c.pending
	c.pending = nil
	c.mu.Unlock()
	for _, e := range left {
		c.done(e.j, fmt.Errorf("rmq: broker %q: %w after the send (the message may be stored)", e.j.t.name, ErrClosed))
	}
}

func (c *confirmer) loop() {
	defer close(c.exited)
	for {
		select {
		case <-c.quit:
			return
		case <-c.wake:
		}
		for {
			c.mu.Lock()
			batch := c.pending
			c.pending = nil
			c.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			c.confirm(batch)
		}
	}
}

// confirm sends one barrier per broker of batch (all registered before it,
// so all written before it) and resolves the batch.
func (c *confirmer) confirm(batch []ended) {
	byBroker := map[string][]ended{}
	var order []string
	for _, e := range batch {
		if _, ok := byBroker[e.mq.BrokerName]; !ok {
			order = append(order, e.mq.BrokerName)
		}
		byBroker[e.mq.BrokerName] = append(byBroker[e.mq.BrokerName], e)
	}
	for _, name := range order {
		es := byBroker[name]
		mq := es[0].mq
		_, err := c.barrier.OffsetForTimestamp(&mq, time.Now().UnixMilli())
		var numErr *strconv.NumError
		if err == nil || errors.As(err, &numErr) { // an answer, whatever its code
			for _, e := range es {
				c.done(e.j, nil)
			}
			continue
		}
		c.log.Warn("transactional send: the broker did not answer the barrier behind its end-transactions; those messages wait for their check-backs",
			"broker_name", name, "messages", len(es), "err", err)
		for _, e := range es {
			if !c.waits.park(e.ref, e.j) {
				c.done(e.j, fmt.Errorf("rmq: broker %q: %w after the send (the message may be stored)", e.j.t.name, ErrClosed))
			}
		}
	}
}

// newBarrier returns the barrier client of a transactional producer: a pull
// consumer that is never started, with the producer's instance name, so
// that it shares the producer's client and connections.
func newBarrier(bc BrokerConfig, group, instance string) (barrierClient, error) {
	opts := []consumer.Option{
		consumer.WithNsResolver(bc.resolver()),
		consumer.WithGroupName(group),
		consumer.WithInstance(instance),
	}
	remotingDefaults()
	if bc.Namespace != "" {
		opts = append(opts, consumer.WithNamespace(bc.Namespace))
	}
	if c, ok := bc.credentials(); ok {
		opts = append(opts, consumer.WithCredentials(c))
	}
	pc, err := consumer.NewPullConsumer(opts...)
	if err != nil {
		return nil, fmt.Errorf("barrier client: %w", err)
	}
	return pc, nil
}
