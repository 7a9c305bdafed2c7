package rmq

import (
	"hash/fnv"
	"strconv"
	"sync"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"github.com/cellbridge/cellbridge/bridge"
)

// PropertyMessageGroup is the property a RocketMQ 5.x broker reads as a
// message's group (FIFO messages; MessageConst.PROPERTY_SHARDING_KEY in the
// broker's sources). The Go client's own "SHARDING_KEY" property is not it:
// that one only feeds the client's hash queue selector and reaches the
// broker as an ordinary property.
const PropertyMessageGroup = "__SHARDINGKEY"

// orderKey is what fixes the target queue of a copy (and its message
// group): the decimal shard (Cell-Shard) of a routed message, so that all
// messages of a shard key — and so of one key — go to one queue; shard is
// -1 for a message without a key (a global route) and for DLQ copies
// (Cell-Error set), which are spread by their idempotency key instead.
//
// The shard and not the shard key itself: a sink sees only what the
// pipeline puts into bridge.Outgoing, and the key is not part of it. Every
// message of a key has the key's shard, so this keeps per-key order; a
// shard's keys share its queue.
func orderKey(h map[string][]string, msgID string) (key string, shard int) {
	if _, dlq := h[bridge.HeaderError]; !dlq {
		if vs := h[bridge.HeaderShard]; len(vs) > 0 {
			if n, err := strconv.Atoi(vs[0]); err == nil && n >= 0 {
				return vs[0], n
			}
		}
	}
	return msgID, -1
}

// orderSelector picks the target queue of a message from the properties
// the sink gave it (see queueIndex). The client calls it for every send
// with the topic's current write queues — every writable queue of every
// broker that has a master, sorted by broker name then queue id — which it
// re-reads from the name server every 30 s, so the choice follows route
// changes. It remembers each topic's queue count, so that the sink can
// group copies bound for one queue into a batch (batch.go); a batch,
// which carries no properties of its own, goes to the queue its hint
// names, or nowhere (the send fails and its messages go one by one) when
// the queue count changed since the batch was made.
type orderSelector struct {
	counts sync.Map // topic → int: the queue count of the last send
	hints  sync.Map // *primitive.MessageQueue (a batch's first message's Queue) → batchHint
}

var _ producer.QueueSelector = (*orderSelector)(nil)

// Select implements producer.QueueSelector.
func (o *orderSelector) Select(m *primitive.Message, mqs []*primitive.MessageQueue, _ string) *primitive.MessageQueue {
	if len(mqs) == 0 {
		return nil
	}
	if m.Batch {
		if h, ok := o.hints.Load(m.Queue); ok {
			if hint := h.(batchHint); hint.n == len(mqs) && hint.idx < len(mqs) {
				return mqs[hint.idx]
			}
		}
		return nil
	}
	if c, ok := o.counts.Load(m.Topic); !ok || c.(int) != len(mqs) {
		o.counts.Store(m.Topic, len(mqs))
	}
	return mqs[queueIndex(m.GetProperty(bridge.HeaderShard), m.GetProperty(bridge.HeaderError) != "",
		m.GetProperty(bridge.HeaderMsgID), m.GetProperty(primitive.PropertyKeys), len(mqs))]
}

// queues returns the queue count of the topic's last send, if any.
func (o *orderSelector) queues(topic string) (int, bool) {
	c, ok := o.counts.Load(topic)
	if !ok {
		return 0, false
	}
	return c.(int), true
}

// queueIndex maps a copy onto one of n queues: shard s goes to queue s mod
// n (a cell owning a contiguous range of at least n shards uses every
// queue evenly); a copy without a shard (or a DLQ copy) to the FNV-1a hash
// of its Cell-Msg-Id (of its Keys when it has none) mod n.
func queueIndex(shard string, dlq bool, msgID, keys string, n int) int {
	if !dlq {
		if s, err := strconv.Atoi(shard); err == nil && s >= 0 {
			return s % n
		}
	}
	if msgID == "" {
		msgID = keys
	}
	h := fnv.New32a()
	_, _ = h.Write([]byte(msgID))
	return int(h.Sum32() % uint32(n))
}
