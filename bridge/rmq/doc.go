// Package rmq connects the bridge to RocketMQ through
// github.com/apache/rocketmq-client-go/v2: a Source per topic rule and a
// Sink serving every RocketMQ target broker. BrokerConfig holds the
// connection settings (IP:port name servers, never the client's vendor-host
// resolver; access/secret key; namespace; instance-name prefix); SetLogger
// routes the client's logging to slog.
//
// # Source: offsets advance only past forwarded messages
//
// A Source runs one clustering-mode pull consumer (Poll/ACK) per topic
// rule, subscribed to the rule's topic and tag expression, in the rule's
// group. The push consumer was not chosen: it commits a batch's offsets
// when its callback returns, so the callback would have to block until the
// pipeline settled every message of the batch, and it runs the callbacks of
// one queue's consecutive batches on separate goroutines, so messages of
// one key could reach the pipeline out of order; its orderly variant keeps
// order but serializes a queue behind a blocked callback and has data races
// under -race.
//
// With the pull consumer, the client pulls each assigned queue on its own
// goroutine and hands whole pulled batches, in queue order, to Poll. Run
// calls Poll on one goroutine and gives each message to the pipeline in
// that order, so the pipeline's per-key lanes see a key's messages in the
// order of their queue. The client acknowledges whole batches: a batch is
// acknowledged (ACK ConsumeSuccess) once the pipeline settled every one of
// its messages with nil. ACK removes the batch from the queue's process
// queue and sets the queue's consumer offset to its oldest message still
// there, so the offset never passes a message that is in the pipeline,
// parked as held, or waiting for redelivery. The client alone would send
// offsets to the broker 10 s after start and then every 5 s, so a crash
// would re-read up to 10 s of messages; the source sends them itself, at
// once after an acknowledgement and then at most every
// SourceConfig.PersistInterval (200 ms), and Close once more before
// shutting down.
//
// How each bridge.Ack outcome maps:
//
//	nil                   counted; the batch is ACKed when it is complete
//	*bridge.HoldError     handed to the pipeline again after the delay (local redelivery)
//	bridge.ErrInProgress  ignored (a pull consumer has no ack deadline)
//	any other error       handed again after SourceConfig.Redeliver
//	(after Run returned)  dropped: the offset stays before the message
//
// Redelivery is local, never through the broker's %RETRY% topic: sending a
// message back would let the offset move past it and put it behind later
// messages of its key. A local redelivery still comes after the later
// messages of its key that the pipeline already had: the pipeline holds
// a message so only when a rules reload changed its rule between
// broadcast and single-cell while it was in flight (a HoldError without
// Overtake); the ordered JetStream source re-reads from its ack floor
// instead, which this source does not do. A message left unacknowledged at shutdown or when
// a rebalance moves its queue is read again by the queue's next owner from
// the committed offset; so are, after a crash, the acknowledgements of the
// last PersistInterval and the pulled batches not fully settled (a batch is
// acknowledged whole): a few hundred milliseconds of traffic. Those repeats
// carry the same idempotency key and are dropped by the dedupe store or the
// sink (a transactional RocketMQ sink, a JetStream sink); a RocketMQ sink
// without transactions stores them again (the memory store does not
// survive the process).
//
// Each message becomes a bridge.Message: Subject = the rule's topic, Body,
// Keys, Header = the user properties plus the message's tag and keys under
// the headers TAGS and KEYS (other system properties such as UNIQ_KEY or
// MAX_OFFSET are left out; a RocketMQ sink gives TAGS and KEYS back to the
// copy, a JetStream sink keeps them as headers), SourceID = the producer's unique
// message id (UNIQ_KEY, stable across redeliveries and retries) or, when
// missing, "<topic>/<broker>/<queue>/<offset>", Source = "<broker>/<topic>",
// Time = the broker's store time, Deliveries = reconsume times + local
// deliveries. A new group starts at the first stored message. When the
// topic has no route yet, Run retries starting every StartRetry. Rule
// reloads do not touch the consumer (the topic and group of a rule are
// fixed for the process).
//
// Buffering is bounded by the client: it keeps at most 32 pulled batches
// per queue plus 4 handed to Poll, FetchBatch (128) messages each, and stops
// pulling a queue beyond that. A held message keeps its batch open but does
// not stop other batches or queues.
//
// # Sink
//
// One long-lived producer per target broker, each with its own instance
// name (prefix-broker-sink-pid-counter: the client shares one connection
// pool per IP@instance name, and a second client with other name servers
// would otherwise fail). A fixed pool of Workers goroutines sends
// synchronously; PublishAsync queues for them and blocks while MaxPending
// publishes are queued or being sent, which is the bridge's back-pressure;
// no goroutine is started per message. A worker that takes a publish also
// takes the publishes queued behind it, without waiting for more, and sends
// those bound for one queue of a non-transactional target as one batch
// request (at most SinkConfig.MaxBatch, 32, messages and 1 MiB of bodies;
// each keeps its own properties, keys and unique id; a batch holds at most
// one message per key, so no key's order changes; a failed batch is sent
// again message by message). Close abandons the sends still in
// progress when its ctx ends. Each send is a new message: every header
// (Cell-Msg-Id, Cell-Name, Cell-Shard, Cell-Rules-Version, Cell-Source,
// Cell-Hops, Cell-Error, and the source's own) as a user property, first
// value only; the headers TAGS and KEYS (a RocketMQ source's tag and keys)
// as the copy's tag and keys, with the idempotency key added to the keys
// (last, unless it is among them already); headers named like another
// system property or containing the property separators \x01 \x02 are not
// sent. The send status must be SEND_OK; anything else is retried, at most
// Retries times, as a new message. The client's own retry is off: it
// re-sends the same message, and with transactions that would give two
// half messages one unique id.
//
// # Target queue: one per key
//
// RocketMQ consumers read queue by queue (an orderly consumer locks a
// queue), so the sink sends all messages of a key to one queue: a copy of
// shard s (Cell-Shard) goes to queue s mod n of the topic's write queues
// (every writable queue of every broker with a master, sorted by broker
// name, then queue id, as the client read them from the name server last;
// it re-reads routes every 30 s). The shard and not the key itself: the
// pipeline hands a sink the shard, and every message of a key has its
// key's shard; a cell owning a contiguous range of at least n shards uses
// every queue evenly. Copies without a shard (a global route) and DLQ
// copies go to the FNV-1a hash of their idempotency key mod n. When the
// write queue count changes, most shards move to another queue: a consumer
// can then read a key's new messages before older ones still unread in its
// old queue (change queue counts when the cell's consumers caught up, or
// block the shards meanwhile). A cell's consumer reads a key in order with
// an orderly consumer (Java MessageListenerOrderly, the Go client's
// WithConsumerOrder, a 5.x FIFO consumer group), one queue at a time; a
// concurrent consumer does not keep order.
//
// RocketMQ 5.x message groups: the Go client speaks the 4.x remoting
// protocol and picks the queue itself; a 5.x broker reads a message's group
// from the __SHARDINGKEY property (PropertyMessageGroup; the client's own
// "SHARDING_KEY" is something else). With BrokerConfig.MessageGroups the
// copy carries its order key (the shard, or the idempotency key) as its
// group. Where a 5.x proxy checks topic message types (its default), a
// copy with a group is accepted only by a FIFO (or MIXED) topic and one
// without only by a NORMAL (or MIXED) topic: set MessageGroups exactly when
// the target topics, DLQ topics included, are FIFO. A transactional copy
// counts as TRANSACTION whatever its group. A 4.x broker stores the
// property as any other.
//
// Without exactlyOnce (the default), the sink is at-least-once with a
// stable key: a send whose answer was lost, a retry after a timeout, or a
// redelivery after a crash can store a message twice in the target topic;
// both copies carry the same Cell-Msg-Id (and Keys), and consumers must
// deduplicate by it. A key's first copies are in its queue in order.
//
// # Transactional sink (exactlyOnce: transactional)
//
// The producer is a transaction producer in group "cellbridge-<broker>"
// (the same in every replica and after a restart: the broker sends
// check-backs to any producer of the group connected to it, which a
// producer is from its first send on). Every half message of one
// idempotency key K gets an attempt slot n, carried in its unique id
// (UNIQ_KEY, the message id consumers see: the client's usual layout with
// the process and class loader digits replaced by a hash of K and n, and
// n), so that no property of the bridge's own reaches the cell; the
// records per slot in the dedupe store are used(K,n), decided(K,n),
// resolved(K,n) and rolledback(K,n). For each message:
//
//  1. the pipeline reserves K in the dedupe store;
//  2. the sink claims the first slot n whose decided(K,n) it can reserve
//     and that was never used, and commits used(K,n); a committed
//     decided(K,m) instead means an earlier attempt delivered the message,
//     or will once its check-back commits it: see step 6;
//  3. it sends the half message (invisible to consumers);
//  4. the local transaction commits decided(K,n) — one write, which is the
//     decision; a failed write answers unknown (it may have been applied:
//     only a check-back, reading the store again, decides then);
//  5. the client ends the transaction with commit (one way); the sink sends
//     a barrier behind it on the same connection (confirm.go) and confirms
//     the publish when the barrier is answered; the pipeline commits K and
//     acknowledges the source;
//  6. a claim that found decided(K,m) (the source redelivered the message:
//     its earlier attempt was never confirmed) reports the duplicate only
//     once a check-back answer for slot m was settled (here, or by a
//     replica: resolved(K,m)) or BrokerConfig.CheckBackWait passed
//     (wait.go), and keeps the message unacknowledged meanwhile, so that
//     the key's next message is never made visible before it.
//
// A check-back answers from decided(K,n): committed → commit; still
// reserved → unknown (the attempt may be alive); neither → rollback, after
// committing rolledback(K,n) (a failed write answers unknown), and
// rollback again whenever rolledback(K,n) is committed. A decision that
// reaches the store after such a rollback (a write the store owed and
// wrote back once its link healed, or a slow one) does not count: a claim
// takes the next slot, a waiting attempt (step 6) sends the message again
// instead of reporting a duplicate, and a local transaction that finds
// rolledback(K,n) after its own decision answers rollback. A
// final answer is settled a second later, once its one-way end-transaction
// went out: the sink commits K (for a commit) and resolved(K,n). Because a slot is never reused
// and only the local transaction decides a slot, at most one half message
// per key is ever committed, whatever was killed when: a bridge killed
// before step 4 leaves an undecided slot (rolled back once its reservation
// expired, and the redelivered message takes the next slot); one killed
// after step 4 leaves a decided slot (committed by the check-back, and the
// redelivered message waits for that at step 6). A failed send gives its
// slot's reservation up at once; one that certainly stored nothing (no
// connection made, no route; not an error code, which a 5.x proxy also
// answers for a broker that timed out) leaves no half message, and the
// key's next attempt in the same process takes that slot again — if no
// attempt used the next slot meanwhile, and within a minute (half the
// store's TTL where that is shorter) of the slot's used record — so that a
// broker that is down for a while does not use up the key's 64 slots
// (which would hold the key for the store's TTL). docs/guarantees.md section 10 has the order
// argument and its crash rows.
//
// Check-back timing: a real broker checks half messages only at its
// periodic scan (transactionCheckInterval: 60 s on 4.x, 30 s on 5.x), those
// older than its transactionTimeout (6 s), so a half message whose commit
// got lost becomes visible 6 s to a scan interval plus 6 s later; every
// "unknown" answer (its attempt's reservation still lives) adds a scan.
// Set CheckBackWait to the scan interval plus the timeout plus a margin.
//
// The records live for the dedupe store's TTL, and the store must be
// shared by all replicas and outlive a process (JetStream KV). Windows
// remain, each needing a store write slower than the reservation TTL (keep
// that TTL well above the send and store timeouts), each a duplicate, not
// a loss:
//
//   - a local transaction whose decision write outlives the slot's
//     reservation and lands between a check-back's read of decided(K,n)
//     and its write of rolledback(K,n), and whose read of rolledback(K,n)
//     comes before that write, answers commit while the check-back answers
//     rollback (the local transaction's read is a plain read, which a
//     lagging replica of the store may answer, so the window also covers a
//     rollback written just before it); the broker does not refuse an
//     end-transaction for a half message already ended, so the commit makes
//     the message visible, and later attempts, which find rolledback(K,n),
//     send it again;
//   - a check-back whose write of rolledback(K,n) fails answers unknown,
//     but the JetStream store writes a failed commit again in the
//     background: when that lands after another check-back committed the
//     slot (the decision came meanwhile), later attempts send it again.
//
// What the broker must allow: on 5.x, where the proxy checks topic message
// types (its default), transactional sends need target and DLQ topics of
// message type TRANSACTION (or MIXED): `mqadmin updateTopic ... -a
// +message.type=TRANSACTION`. With ACLs, the producer's account needs PUB
// on every target and DLQ topic (sends and end-transactions) and, on 5.x,
// GET on them for the barrier (a refused barrier is answered all the same,
// so it still works, but the broker logs the refusal); a source's account
// needs SUB on its topic and its consumer group (pulls, heartbeats,
// offsets; GET and UPDATE on 5.x, which ACL 2.0 asks for offset queries and
// updates). The committed copy keeps the PGROUP property: the broker
// copies the half message's properties, and check-backs need the group;
// it is a system property, which consumers' user properties do not show.
//
// # Client pitfalls handled here
//
// Shutdown does not wait for running callbacks and leaves goroutines
// behind: the bridge drains its pipeline before Source.Close and
// Sink.Close. Source.Close persists the offsets, then sends one
// synchronous request to each broker (the offsets are oneway requests, and
// Shutdown's close right behind them can reset the connection before the
// broker read them), and does not shut down within a second of Start (the
// client's first rebalance runs on its own goroutine and races with
// Shutdown). The client logs through logrus by default: SetLogger replaces
// it process-wide. Tests run the real client against rmqtest; the orderly
// push consumer (racy under -race) is not used. The producer's queue
// selector is the sink's (the client's default round-robins over all
// queues); the client's SHARDING_KEY property and hash selector are not
// used.
package rmq
