package dedupe

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/jspub"
)

// Checker is an optional method of a Store: the check-then-commit protocol
// for targets that drop a copy of a message themselves (a JetStream stream
// drops a Nats-Msg-Id it stored within its duplicate window). The bridge
// uses it, when the store implements it, for targets whose sink reports
// such a window; the package documentation argues why exactly once holds.
type Checker interface {
	Store
	// Check reports Duplicate when key is committed, InFlight when it is
	// reserved (by Reserve, which other targets use) and not yet expired,
	// and Reserved otherwise, recording nothing: the caller publishes and
	// then Commits, and neither Release nor anything else is owed when the
	// publish fails. A nil error with Reserved does not keep another
	// caller from publishing the same key meanwhile; the target's window
	// drops that copy.
	Check(ctx context.Context, key string) (Outcome, error)
	// CheckWindow is the shortest duplicate window of a target for which
	// Check may be used instead of Reserve: a copy published by a second
	// attempt while the first is in flight comes at most this long after
	// the first was stored.
	CheckWindow() time.Duration
}

var _ AsyncChecker = (*KV)(nil)

// AsyncChecker is a Checker whose Check and Commit can also run without a
// goroutine waiting for each: the bridge then runs the messages of targets
// that use Check on the goroutines that deliver them (intake, the store's
// answers, the sink's confirmations) instead of on a pool of workers that
// each wait for a round trip.
type AsyncChecker interface {
	Checker
	// CheckAsync is Check with the outcome handed to done: on a goroutine
	// of the store, or on the caller's when it is known at once (closed,
	// a commit owed). done must not block for long: the answers of a
	// whole batch of keys are handed out one after the other.
	CheckAsync(ctx context.Context, key string, done func(Outcome, error))
	// CommitAsync is Commit with the result handed to done, with the same
	// rules; ctx bounds the wait for a free request slot.
	CommitAsync(ctx context.Context, key string, done func(error))
}

// Batched reads. Check reads keys in batches: one direct get request names
// up to maxCheckBatch key subjects (multi_last, nats-server 2.11 or newer)
// and the stream answers with the last message of each key that has one,
// then an end-of-batch status (204), or with one 404 when none has. A new
// key (the common case) thus costs the server a share of one request
// instead of a request of its own, which costs about as much as a stored
// write (BenchmarkKVWrites). At most maxCheckBatches batches are in flight;
// the keys asked for meanwhile wait and leave together in the next batch,
// so the batch grows with the load and a lone Check goes out at once.
const (
	maxCheckBatch   = 256 // well below the server's 1,024 answers per request
	maxCheckBatches = 4
)

// errBatchStatus is wrapped by the error of a batch the stream refused.
var errBatchStatus = errors.New("batch direct get refused")

// checkReq is one Check waiting for its batch: done gets the key's state,
// or (CheckAsync, done nil) out gets the outcome.
type checkReq struct {
	subj string
	done func(kvState, error)
	out  func(Outcome, error)
}

// answer hands the batch's answer for r to its caller.
func (r *checkReq) answer(kv *KV, st kvState, err error) {
	if r.out != nil {
		r.out(kv.checked(st, err))
		return
	}
	r.done(st, err)
}

// checkBatch is one multi_last request in flight.
type checkBatch struct {
	reqs  []*checkReq
	found map[string]kvState // answers so far, by subject
	timer *time.Timer
	// slow asks the stream's leader (askLeader) when the direct get has
	// not ended after KV.directWait; lead takes the leader's answers and
	// leadLeft counts the ones still awaited.
	slow     *time.Timer
	asked    bool
	lead     map[string]kvState
	leadLeft int
}

// checker batches the direct gets of Check (see maxCheckBatch): one
// subscription on a fresh inbox takes the answers of every batch, each
// batch on its own reply subject.
type checker struct {
	kv      *KV
	nc      *nats.Conn
	sub     *nats.Subscription
	prefix  string // inbox + "."; the batch number follows
	subject string // the stream's direct get API subject
	timeout time.Duration

	// ctx ends at close: it bounds the leader reads' wait for a request
	// slot.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	queue    []*checkReq
	inflight map[uint64]*checkBatch
	next     uint64
	closed   bool
}

func newChecker(kv *KV, nc *nats.Conn, timeout time.Duration) (*checker, error) {
	c := &checker{
		kv: kv, nc: nc, prefix: nc.NewRespInbox() + ".",
		subject:  strings.TrimSuffix(kv.getPrefix, "."), // the batch form names the stream only
		timeout:  timeout,
		inflight: map[uint64]*checkBatch{},
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	sub, err := nc.Subscribe(c.prefix+"*", c.onReply)
	if err != nil {
		c.cancel()
		return nil, err
	}
	c.sub = sub
	return c, nil
}

// read returns the state of subj as the next batch reads it.
func (c *checker) read(ctx context.Context, subj string) (kvState, error) {
	type result struct {
		st  kvState
		err error
	}
	ch := make(chan result, 1)
	c.enqueue(&checkReq{subj: subj, done: func(st kvState, err error) { ch <- result{st, err} }})
	select {
	case res := <-ch:
		return res.st, res.err
	case <-ctx.Done():
		// The batch answers later into the buffered channel, which
		// nobody reads: nothing to undo, a read changes nothing.
		return 0, ctx.Err()
	}
}

// enqueue hands r to the next batch, which answers it (checkReq.answer)
// on the goroutine that ends the batch (the subscription's, a timeout's,
// or the one sending the next batch), or on the caller's when the checker
// is closed. The batch's timeout bounds the wait.
func (c *checker) enqueue(r *checkReq) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		r.answer(c.kv, 0, jspub.ErrClosed)
		return
	}
	c.queue = append(c.queue, r)
	id, b := c.takeLocked()
	c.mu.Unlock()
	if b != nil {
		c.send(id, b)
	}
}

// takeLocked makes the next batch from the queue when fewer than
// maxCheckBatches are in flight (c.mu held).
func (c *checker) takeLocked() (uint64, *checkBatch) {
	if len(c.queue) == 0 || len(c.inflight) >= maxCheckBatches || c.closed {
		return 0, nil
	}
	n := min(len(c.queue), maxCheckBatch)
	b := &checkBatch{reqs: make([]*checkReq, n)}
	copy(b.reqs, c.queue)
	c.queue = append(c.queue[:0], c.queue[n:]...)
	c.next++
	id := c.next
	c.inflight[id] = b
	return id, b
}

// send sends batch id's request; a failure to send ends the batch.
func (c *checker) send(id uint64, b *checkBatch) {
	subjs := make([]string, 0, len(b.reqs))
	seen := make(map[string]struct{}, len(b.reqs))
	for _, r := range b.reqs {
		if _, ok := seen[r.subj]; !ok {
			seen[r.subj] = struct{}{}
			subjs = append(subjs, r.subj)
		}
	}
	req, err := json.Marshal(struct {
		MultiLast []string `json:"multi_last"`
	}{subjs})
	if err != nil { // cannot happen: strings marshal
		c.end(id, fmt.Errorf("batch direct get: %w", err))
		return
	}
	// Armed before the request leaves, so that the answer cannot end the
	// batch before its timer exists; a timer that fires after the end
	// finds the batch gone.
	c.mu.Lock()
	b.timer = time.AfterFunc(c.timeout, func() {
		c.end(id, fmt.Errorf("batch direct get: no answer within %v: %w", c.timeout, jspub.ErrNoReply))
	})
	if c.kv.directWait < c.timeout {
		b.slow = time.AfterFunc(c.kv.directWait, func() { c.askLeader(id, subjs) })
	}
	c.mu.Unlock()
	if !c.nc.IsConnected() {
		// Never into the client's reconnect buffer: the answer would come
		// whenever the link is back, long after its callers gave up.
		c.end(id, fmt.Errorf("batch direct get: %w: %w", jspub.ErrNotSent, nats.ErrConnectionReconnecting))
		return
	}
	if err := c.nc.PublishRequest(c.subject, c.prefix+strconv.FormatUint(id, 10), req); err != nil {
		c.end(id, fmt.Errorf("batch direct get: %w: %w", jspub.ErrNotSent, err))
	}
}

// onReply takes one answer of a batch: a key's last message, or the end.
func (c *checker) onReply(m *nats.Msg) {
	id, err := strconv.ParseUint(m.Subject[len(c.prefix):], 10, 64)
	if err != nil {
		return
	}
	c.mu.Lock()
	b := c.inflight[id]
	anyFound := b != nil && b.found != nil
	c.mu.Unlock()
	if b == nil {
		return // ended (timed out) already
	}
	if len(m.Data) == 0 && m.Header.Get("Status") != "" {
		switch status, desc := m.Header.Get("Status"), m.Header.Get("Description"); {
		case status == "204": // EOB: every key that has a message was answered
			c.end(id, nil)
		case status == "404" && !anyFound && desc == "No Results":
			c.end(id, nil) // no key has a message
		case status == "503":
			c.end(id, jspub.ErrNoStream)
		default:
			c.end(id, fmt.Errorf("%w: status %s %s", errBatchStatus, status, desc))
		}
		return
	}
	subj := m.Header.Get(jetstream.SubjectHeader)
	if subj == "" {
		c.end(id, errors.New("batch direct get: an answer without a subject"))
		return
	}
	st, _, err := c.kv.classify(m.Header, m.Data)
	if err != nil {
		c.end(id, fmt.Errorf("batch direct get: %s: %w at revision %s", subj, err, m.Header.Get(jetstream.SequenceHeader)))
		return
	}
	// Under the lock: a timeout may end the batch (and read found) now.
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inflight[id] != b {
		return
	}
	if b.found == nil {
		b.found = map[string]kvState{}
	}
	b.found[subj] = st
}

// end ends batch id (once: later calls find it gone): every waiting Check
// gets its key's state, or err; then the next batch leaves.
func (c *checker) end(id uint64, err error) { c.endBatch(id, nil, err) }

// endBatch is end; with lead set, only if id is still batch lead, whose
// keys the leader answered (found: the leader's answers).
func (c *checker) endBatch(id uint64, lead *checkBatch, err error) {
	c.mu.Lock()
	b := c.inflight[id]
	if b == nil || lead != nil && b != lead {
		c.mu.Unlock()
		return
	}
	found := b.found
	if lead != nil {
		found = b.lead
	}
	delete(c.inflight, id)
	if b.timer != nil {
		b.timer.Stop()
	}
	if b.slow != nil {
		b.slow.Stop()
	}
	nid, nb := c.takeLocked()
	c.mu.Unlock()
	// The next batch leaves first: the callers' work below (a publish
	// each, in the bridge) overlaps with its round trip.
	if nb != nil {
		c.send(nid, nb)
	}
	for _, r := range b.reqs {
		if err != nil {
			r.answer(c.kv, 0, err)
			continue
		}
		st, ok := found[r.subj]
		if !ok {
			st = kvAbsent
		}
		r.answer(c.kv, st, nil)
	}
}

// askLeader asks the stream's leader for the keys subjs of batch id, one
// message get each, when the batch's direct get has not ended within
// KV.directWait: any replica of the bucket may take a direct get, and one
// on a frozen server never answers (Reserve's lookup does the same). The
// batch ends with the first complete answer, the direct get's or the
// leader's; its timeout still bounds both.
func (c *checker) askLeader(id uint64, subjs []string) {
	c.mu.Lock()
	b := c.inflight[id]
	if b == nil || b.asked || c.closed {
		c.mu.Unlock()
		return
	}
	b.asked = true
	b.lead = make(map[string]kvState, len(subjs))
	b.leadLeft = len(subjs)
	c.mu.Unlock()
	for _, subj := range subjs {
		c.kv.client.RequestAsync(c.ctx, c.kv.msgGet, nil, leaderGetReq(subj), func(m *nats.Msg, err error) {
			var st kvState
			if err == nil {
				st, _, _, err = c.kv.leaderAnswer(m)
			}
			c.mu.Lock()
			if c.inflight[id] != b {
				c.mu.Unlock()
				return // ended already
			}
			if err == nil {
				b.lead[subj] = st
				b.leadLeft--
			}
			done := err == nil && b.leadLeft == 0
			c.mu.Unlock()
			// A failed leader read leaves the batch to its direct get and
			// its timeout. The answers run the callers' work (a publish
			// each, in the bridge), which may make requests on the
			// client whose completion this is: on a goroutine of its own.
			if done {
				go c.endBatch(id, b, nil)
			}
		})
	}
}

// close fails the waiting and unanswered reads and ends the subscription.
func (c *checker) close() {
	c.cancel()
	c.mu.Lock()
	c.closed = true
	queue := c.queue
	c.queue = nil
	ids := make([]uint64, 0, len(c.inflight))
	for id := range c.inflight {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	for _, r := range queue {
		r.answer(c.kv, 0, jspub.ErrClosed)
	}
	for _, id := range ids {
		c.end(id, jspub.ErrClosed)
	}
	_ = c.sub.Unsubscribe()
}

// CheckWindow implements Checker: ReserveTTL, the time within which the
// reservation protocol keeps a second attempt from publishing (and which
// exceeds every publish-and-commit, see KVConfig.Timeout).
// Replicas is the replica count of the bucket's stream when the store was
// opened. Check needs 1: a replica answers direct gets once it is mostly
// caught up and goes on answering when it falls behind, and an answer does
// not tell how stale it is, so with several replicas a read can miss a
// commit older than a target's duplicate window (dedupe/doc.go).
func (kv *KV) Replicas() int { return kv.replicas }

func (kv *KV) CheckWindow() time.Duration { return kv.reserveFor }

// Check implements Checker: one share of a batched direct get, no write.
// A key whose Commit by this store failed is a Duplicate without a read
// (the commit is written in the background). A reservation, this store's
// or another's, is InFlight: it belongs to a Reserve, whose holder may be
// publishing to a target that has no window.
func (kv *KV) Check(ctx context.Context, key string) (Outcome, error) {
	if kv.closed.Load() {
		return 0, kv.opErr("check", ErrClosed)
	}
	subj := kv.subject(key)
	if kv.owed.owes(subj) == owedCommit {
		return Duplicate, nil
	}
	st, err := kv.check.read(ctx, subj)
	return kv.checked(st, err)
}

// checked is the outcome of Check for a key read as st (or a failed read).
func (kv *KV) checked(st kvState, err error) (Outcome, error) {
	if err != nil {
		return 0, kv.opErr("check", err)
	}
	switch st {
	case kvCommitted:
		return Duplicate, nil
	case kvReserved, kvOurs:
		return InFlight, nil
	}
	return Reserved, nil
}

// CheckAsync implements AsyncChecker.
func (kv *KV) CheckAsync(_ context.Context, key string, done func(Outcome, error)) {
	if kv.closed.Load() {
		done(0, kv.opErr("check", ErrClosed))
		return
	}
	subj := kv.subject(key)
	if kv.owed.owes(subj) == owedCommit {
		done(Duplicate, nil)
		return
	}
	kv.check.enqueue(&checkReq{subj: subj, out: done})
}

// CommitAsync implements AsyncChecker: Commit's write, its result handed
// to done; a failure (unless ctx ended) is owed and written again in the
// background, as Commit's is.
func (kv *KV) CommitAsync(ctx context.Context, key string, done func(error)) {
	if kv.closed.Load() {
		done(kv.opErr("commit", ErrClosed))
		return
	}
	subj := kv.subject(key)
	kv.client.RequestAsync(ctx, subj, nil, committedVal, func(m *nats.Msg, err error) {
		if err == nil {
			_, err = jspub.ReadAck(m)
		}
		if err != nil {
			if ctx.Err() == nil {
				kv.owed.owe(subj, owedCommit, 0, 0)
			}
			done(kv.opErr("commit", err))
			return
		}
		kv.owed.paid(subj, 0)
		done(nil)
	})
}
