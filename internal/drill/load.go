package drill

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// Event is one drill event published to the topic rule's source.
type Event struct {
	ID    string // payload id, unique in the run: "<run>-<n>"
	Key   string // shard key
	Seq   int    // per-key sequence number, from 1
	Shard int    // under the rules the drill started with
	// Subject is the NATS subject, or the RocketMQ topic, to publish to.
	Subject string
	Header  map[string][]string
	Body    []byte
	// Published is when the event was handed to the publisher; Stored
	// when the source confirmed it (zero until then, or when it failed).
	Published, Stored time.Time
}

// Publisher sends drill events to the source of the topic rule under test.
type Publisher interface {
	// PublishAsync sends e and calls done once with the result: nil when
	// the source broker stored it, and msgID, the idempotency key the bridge
	// derives for it (its Cell-Msg-Id), or "" when the publisher cannot
	// know it. The drill calls PublishAsync from one goroutine in event
	// order; the publisher must keep that order per key at the source.
	// done may run on any goroutine and must not block.
	PublishAsync(ctx context.Context, e *Event, done func(msgID string, err error)) error
	// Flush returns when every done callback has run, or ctx ends.
	Flush(ctx context.Context) error
}

// buildEvent fills e's header and body so that rule reads e.Key as the
// shard key (tally.Encode).
func buildEvent(rule *router.Rule, run string, e *Event) error {
	var err error
	e.Header, e.Body, err = tally.Encode(rule, tally.Payload{ID: e.ID, Key: e.Key, Seq: e.Seq, Run: run, Sent: e.Published.UnixNano()})
	return err
}

// pickKeys returns perShard keys for every shard of the rule under t (keys
// are 16-digit user ids, as in the example rules), or an error when the rule's
// shard function does not spread them over every shard.
func pickKeys(t *router.Table, rule string, perShard int) ([]string, error) {
	n := t.Shards()
	got := make([][]string, n)
	missing := n
	for i := 0; missing > 0 && i < 200*n*perShard; i++ {
		k := fmt.Sprintf("2077%012d", uint64(i)*7919+13)
		d := t.Resolve(rule, k)
		if d.Shard < 0 || d.Shard >= n || len(got[d.Shard]) >= perShard {
			continue
		}
		got[d.Shard] = append(got[d.Shard], k)
		if len(got[d.Shard]) == perShard {
			missing--
		}
	}
	if missing > 0 {
		return nil, fmt.Errorf("drill: could not find %d keys for each of the %d shards of rule %s", perShard, n, rule)
	}
	var keys []string
	// Interleave shards so that every moment of the load touches all of them.
	for j := range perShard {
		for s := range n {
			keys = append(keys, got[s][j])
		}
	}
	return keys, nil
}

// NATSPublisher publishes drill events to a JetStream stream.
type NATSPublisher struct {
	js jetstream.JetStream

	once    sync.Once
	futs    chan natsPending
	done    chan struct{}
	stopped chan struct{} // closed when collect returns
	pending Pending
}

type natsPending struct {
	f    jetstream.PubAckFuture
	done func(string, error)
}

var _ Publisher = (*NATSPublisher)(nil)

// NewNATSPublisher publishes with js (whose connection the caller owns).
// Close it after the last Flush.
func NewNATSPublisher(js jetstream.JetStream) *NATSPublisher {
	p := &NATSPublisher{js: js, futs: make(chan natsPending, 4096), done: make(chan struct{}), stopped: make(chan struct{})}
	go p.collect()
	return p
}

// collect waits for the acks in publish order, so that done runs in order.
func (p *NATSPublisher) collect() {
	defer close(p.stopped)
	for pf := range p.futs {
		select {
		case ack := <-pf.f.Ok():
			pf.done(fmt.Sprintf("%s:%d", ack.Stream, ack.Sequence), nil)
		case err := <-pf.f.Err():
			pf.done("", err)
		case <-p.done:
			pf.done("", errors.New("drill: publisher closed"))
		}
		p.pending.Add(-1)
	}
}

// PublishAsync implements Publisher: the idempotency key is the source
// stream and sequence ("ORDERS:42"), as the bridge derives it.
func (p *NATSPublisher) PublishAsync(ctx context.Context, e *Event, done func(string, error)) error {
	m := &nats.Msg{Subject: e.Subject, Header: nats.Header(e.Header), Data: e.Body}
	f, err := p.js.PublishMsgAsync(m)
	for errors.Is(err, jetstream.ErrTooManyStalledMsgs) {
		// The client's window of unanswered publishes is full (a slow
		// server): nothing was sent; wait for answers and send again.
		select {
		case <-p.js.PublishAsyncComplete():
		case <-time.After(50 * time.Millisecond):
		case <-ctx.Done():
			return fmt.Errorf("drill: publish: %w (%w)", err, ctx.Err())
		}
		f, err = p.js.PublishMsgAsync(m)
	}
	if err != nil {
		return fmt.Errorf("drill: publish: %w", err)
	}
	// The message is sent: its answer must be collected whatever ctx says.
	// collect drains futs as acks arrive (or time out), and the buffer
	// bounds the unacknowledged window.
	p.pending.Add(1)
	p.futs <- natsPending{f, done}
	return nil
}

// Flush implements Publisher.
func (p *NATSPublisher) Flush(ctx context.Context) error { return p.pending.Wait(ctx) }

// Pending counts events handed to a publisher whose done callback has not
// run yet; publishers use it to implement Flush. Safe for concurrent use.
type Pending struct{ n atomic.Int64 }

// Add changes the count by delta (+1 when handed over, -1 after done).
func (p *Pending) Add(delta int64) { p.n.Add(delta) }

// Load returns the count.
func (p *Pending) Load() int64 { return p.n.Load() }

// Wait polls until the count is zero or ctx ends.
func (p *Pending) Wait(ctx context.Context) error {
	for p.n.Load() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
	}
	return nil
}

// Close stops the ack collector; pending callbacks get an error.
func (p *NATSPublisher) Close(ctx context.Context) error {
	p.once.Do(func() {
		close(p.done)
		close(p.futs)
	})
	select {
	case <-p.stopped:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
