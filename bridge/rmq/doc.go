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
// parked as held, or waiting for redelivery; the client persists offsets
// every 5s and Close persists them once more before shutting down.
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
// messages of its key. A message left unacknowledged at shutdown or when
// a rebalance moves its queue is read again by the queue's next owner from
// the committed offset; so are the up to 5s of acknowledgements not yet
// persisted when a bridge dies. Those repeats carry the same idempotency
// key and are dropped by the dedupe store or the sink.
//
// Each message becomes a bridge.Message: Subject = the rule's topic, Body,
// Keys, Header = the user properties (system properties such as UNIQ_KEY,
// TAGS or MAX_OFFSET are left out), SourceID = the producer's unique
// message id (UNIQ_KEY, stable across redeliveries and retries) or, when
// missing, "<topic>/<broker>/<queue>/<offset>", Source = "<broker>/<topic>",
// Time = the broker's store time, Deliveries = reconsume times + local
// deliveries. A new group starts at the first stored message. When the
// topic has no route yet, Run retries starting every StartRetry. Rule
// reloads do not touch the consumer (the topic and group of a rule are
// fixed for the process).
//
// Buffering is bounded by the client: it keeps at most 32 pulled batches
// per queue plus 4 handed to Poll, FetchBatch messages each, and stops
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
// no goroutine is started per message. Close abandons the sends still in
// progress when its ctx ends. Each send is a new message: Keys = the
// idempotency key, every header (Cell-Msg-Id, Cell-Name, Cell-Shard,
// Cell-Rules-Version, Cell-Source, Cell-Hops, Cell-Error, and the source's
// own) as a user property, first value only; headers named like a system
// property or containing the property separators \x01 \x02 are not sent.
// The send status must be SEND_OK; anything else is retried, at most
// Retries times, as a new message. The client's own retry is off: it
// re-sends the same message, and with transactions that would give two
// half messages one unique id.
//
// Without exactlyOnce (the default), the sink is at-least-once with a
// stable key: a send whose answer was lost, a retry after a timeout, or a
// redelivery after a crash can store a message twice in the target topic;
// both copies carry the same Keys and Cell-Msg-Id, and consumers must
// deduplicate by them.
//
// # Transactional sink (exactlyOnce: transactional)
//
// The producer is a transaction producer in group "cellbridge-<broker>"
// (the same in every replica and after a restart: the broker sends
// check-backs to any producer of the group that heartbeats to it, which a
// producer does from its first send on). Every half message of one
// idempotency key K gets an attempt slot n, carried in the Cell-Tx-Slot
// property, and two records in the dedupe store: used(K,n) and
// decided(K,n). For each message:
//
//  1. the pipeline reserves K in the dedupe store;
//  2. the sink claims the first slot n whose decided(K,n) it can reserve
//     and that was never used, and commits used(K,n); a committed
//     decided(K,m) instead means an earlier attempt already delivered the
//     message: the sink reports a duplicate (bridge.ErrDuplicate);
//  3. it sends the half message (invisible to consumers);
//  4. the local transaction commits decided(K,n) — one write, which is the
//     decision — and then K;
//  5. the sink ends the transaction with commit; the pipeline commits K
//     again and acknowledges the source.
//
// A check-back (the broker asks when no end-transaction arrived, after its
// transaction timeout, 6s on a real broker) answers from decided(K,n):
// committed → commit (and commit K, in case the bridge died between the
// two writes of step 4); still reserved → unknown, asked again later (the
// attempt may be alive); neither → rollback. Because a slot is never
// reused and only the local transaction decides a slot, at most one half
// message per key is ever committed, whatever was killed when: a bridge
// killed before step 4 leaves an undecided slot (rolled back once its
// reservation expired, and the redelivered message takes the next slot);
// one killed after step 4 leaves a decided slot (committed by the
// check-back, and the redelivered message is a duplicate at step 2). A
// failed send gives its slot's reservation up at once.
//
// The records live for the dedupe store's TTL, and the store must be
// shared by all replicas (JetStream KV). One caveat remains: a bridge that
// stalls between steps 3 and 4 for longer than the reservation TTL, while
// a check-back rolls its half message back, commits a decision the broker
// no longer acts on, and that message is lost; keep the reservation TTL
// well above the send timeout. After a lost end-transaction, the message
// becomes visible when its check-back commits it.
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
// push consumer (racy under -race) is not used.
package rmq
