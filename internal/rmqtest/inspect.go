package rmqtest

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"
)

// Messages returns copies of the messages stored in a topic, ordered by queue id then queue offset.
// Half messages are not in their topic until committed (see HalfMessages); delayed and retried
// messages are in SCHEDULE_TOPIC_XXXX until due. Unknown topics yield nil.
func (b *Broker) Messages(topicName string) []Message {
	return readQueues(b, topicName, func(qs []*queue) []Message {
		var out []Message
		for _, q := range qs {
			out = appendExported(out, q.msgs)
		}
		return out
	})
}

// readQueues returns read's result over the queues of a topic, computed
// under the broker's lock; nil for unknown topics.
func readQueues[T any](b *Broker, topicName string, read func(qs []*queue) []T) []T {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.topics[topicName]
	if t == nil {
		return nil
	}
	return read(t.queues)
}

// appendExported appends copies of ms to out.
func appendExported(out []Message, ms []*stored) []Message {
	for _, m := range ms {
		out = append(out, m.export())
	}
	return out
}

// QueueOffsets returns the max offset (the number of stored messages) of every queue of a topic,
// indexed by queue id; nil for unknown topics.
func (b *Broker) QueueOffsets(topicName string) []int64 {
	return readQueues(b, topicName, func(qs []*queue) []int64 {
		out := make([]int64, len(qs))
		for i, q := range qs {
			out[i] = int64(len(q.msgs))
		}
		return out
	})
}

// CommittedOffset returns the offset a consumer group committed for a queue (through
// UPDATE_CONSUMER_OFFSET or a pull's commit flag), and whether it committed one.
func (b *Broker) CommittedOffset(group, topicName string, queueID int) (int64, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	off, ok := b.offsets[offsetKey{group, topicName, queueID}]
	return off, ok
}

// HalfMessages returns copies of the unresolved transactional half messages, ordered by commit log
// offset. Topic and QueueID are the ones the message will be committed to.
func (b *Broker) HalfMessages() []Message {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]Message, 0, len(b.half))
	for _, h := range b.half {
		out = append(out, h.m.export())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].CommitLogOffset < out[j].CommitLogOffset })
	return out
}

// DiscardedHalfMessages returns half messages dropped after Options.TransactionCheckMax check-backs.
func (b *Broker) DiscardedHalfMessages() []Message {
	b.mu.Lock()
	defer b.mu.Unlock()
	return appendExported(make([]Message, 0, len(b.discarded)), b.discarded)
}

// Consumers returns the client ids of a consumer group's members, sorted (what
// GET_CONSUMER_LIST_BY_GROUP answers).
func (b *Broker) Consumers(group string) []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.groupMembersLocked(group)
}

// Topics returns the names of all topics, sorted.
func (b *Broker) Topics() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make([]string, 0, len(b.topics))
	for n := range b.topics {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Requests returns how many requests with the given code the broker and name server received.
func (b *Broker) Requests(code int16) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.requests[code]
}

// Request codes for Requests.
const (
	CodeSendMessage      int16 = reqSendMessage
	CodeSendBatchMessage int16 = reqSendBatchMessage
	CodePullMessage      int16 = reqPullMessage
	CodeHeartbeat        int16 = reqHeartBeat
	CodeRoute            int16 = reqGetRouteInfoByTopic
	CodeSendBack         int16 = reqConsumerSendMsgBack
	CodeEndTransaction   int16 = reqEndTransaction
)

// CreateTopic creates a topic with the given number of read/write queues, or grows an existing one.
// Shrinking is refused (queue ids of stored messages would dangle).
func (b *Broker) CreateTopic(name string, queues int) error {
	if name == "" || len(name) > maxTopicLen || queues <= 0 {
		return fmt.Errorf("rmqtest: invalid topic %q with %d queues", name, queues)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.topics[name]
	if t == nil {
		b.createTopicLocked(name, queues, permReadWrite)
		return nil
	}
	if queues < len(t.queues) {
		return fmt.Errorf("rmqtest: topic %s has %d queues, cannot shrink to %d", name, len(t.queues), queues)
	}
	for len(t.queues) < queues {
		t.queues = append(t.queues, &queue{notify: make(chan struct{})})
	}
	return nil
}

// ConnInfo describes a client connection for DropConnections.
type ConnInfo struct {
	// ClientID is the id the client announced in its heartbeat ("IP@InstanceName"); "" before the
	// first heartbeat on this connection.
	ClientID   string
	RemoteAddr string
	// NameServer is true for connections to the name server port.
	NameServer bool
}

// MatchClient matches connections whose client id contains s (for example an InstanceName).
func MatchClient(s string) func(ConnInfo) bool {
	return func(ci ConnInfo) bool { return ci.ClientID != "" && strings.Contains(ci.ClientID, s) }
}

// MatchAll matches every connection.
func MatchAll(ConnInfo) bool { return true }

// DropConnections closes the client connections that match, as a network failure would: the broker
// forgets their consumers (and notifies the rest of each group) and their producers; the client
// reconnects on its next request and re-registers with its next heartbeat (up to 30s later). It
// returns the number of connections closed.
func (b *Broker) DropConnections(match func(ConnInfo) bool) int {
	b.mu.Lock()
	var drop []*conn
	for c := range b.conns {
		ci := ConnInfo{ClientID: c.clientID, NameServer: c.nameServer}
		if c.remote != nil {
			ci.RemoteAddr = c.remote.String()
		}
		if match(ci) {
			drop = append(drop, c)
		}
	}
	b.mu.Unlock()
	for _, c := range drop {
		c.close()
	}
	b.logf("dropped %d connections", len(drop))
	return len(drop)
}

// DelaySends delays the answer to every following send (single, batch, and the client's own retry
// sends) by d; 0 turns it off. Other requests on the same connection are not held up.
func (b *Broker) DelaySends(d time.Duration) {
	b.mu.Lock()
	b.sendDelay = d
	b.mu.Unlock()
}

// FailSends makes the next n sends fail with the response code (for example 14 service not
// available, 1 system error, or 10 flush disk timeout); the messages are not stored. n <= 0 turns it
// off.
func (b *Broker) FailSends(n int, code int16) {
	b.mu.Lock()
	b.failN = max(n, 0)
	b.failCode = code
	b.mu.Unlock()
}

// WaitConsumers blocks until the group has exactly n members or ctx ends (then it returns an error
// wrapping ctx.Err() and the last member list).
func (b *Broker) WaitConsumers(ctx context.Context, group string, n int) error {
	return b.waitFor(ctx, func() (bool, string) {
		m := b.Consumers(group)
		return len(m) == n, fmt.Sprintf("group %s has %d members %v, want %d", group, len(m), m, n)
	})
}

// WaitMessages blocks until the topic holds at least n messages or ctx ends (then it returns an
// error wrapping ctx.Err()).
func (b *Broker) WaitMessages(ctx context.Context, topicName string, n int64) error {
	return b.waitFor(ctx, func() (bool, string) {
		var sum int64
		for _, off := range b.QueueOffsets(topicName) {
			sum += off
		}
		return sum >= n, fmt.Sprintf("topic %s holds %d messages, want %d", topicName, sum, n)
	})
}

// waitFor polls cond every 10ms; the broker has no change feed for these conditions and tests only
// need them at human time scales.
func (b *Broker) waitFor(ctx context.Context, cond func() (bool, string)) error {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	for {
		ok, state := cond()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("rmqtest: %s: %w", state, ctx.Err())
		case <-t.C:
		}
	}
}
