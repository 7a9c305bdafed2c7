// Package natsjs connects the bridge to NATS JetStream: connections
// (Connect), a durable pull-consumer Source, a PartitionedSource for
// partitioned rules (leases in a KV bucket), an asynchronous publishing Sink
// and stream provisioning for the embedded default and tests
// (EnsureStreams).
//
// # Source
//
// A Source owns one durable pull consumer per topic rule: explicit acks,
// the rule's subject as filter, AckWait and MaxAckPending from the config,
// and no delivery limit (MaxDeliver -1). The limit stays off because two
// kinds of messages are redelivered on purpose and without end: held
// messages (their shard is blocked during a switch and must never be
// dropped or dead-lettered) and messages whose sink keeps failing (not the
// message's fault). Poison messages do not rely on a delivery limit either:
// the bridge sends them to the DLQ and acks them.
//
// Run consumes with Consume (PullMaxMessages = FetchBatch; a new pull goes
// out when half the batch is used), so the client always has a batch
// buffered and the server never waits for a request. The handler runs on the
// subscription's goroutine, in stream order, and may block: that is the
// bridge's back-pressure, and it also holds back new pulls. Pull requests
// expire after 5s instead of the library's 30s: after the consumer sat at
// MaxAckPending the client's idea of what it has requested can drift from
// the server's, and an expiring request (or a missing heartbeat) is what
// puts them back in step.
//
// Each message reaches the handler as a bridge.Message without copying:
// Header is the message's header map (nil when it has none) and Body its
// data. SourceID is the producer's Nats-Msg-Id if set, else
// "<stream>:<stream sequence>"; both are stable across redeliveries, which is
// what the idempotency key needs. Time, Deliveries and the sequence are read
// from the ack subject by a parser that does not allocate (the client's
// Metadata allocates per message and costs three times as much).
//
// How each bridge.Ack outcome maps to JetStream:
//
//	nil                   Ack              done for good
//	*bridge.HoldError     NakWithDelay(d)  redelivered after d (held shard)
//	bridge.ErrInProgress  InProgress       AckWait restarts; not final, may repeat
//	any other error       Nak              redelivered at once
//
// Acks are not confirmed (no AckSync): a lost ack only means the message is
// redelivered after AckWait, and the redelivery is recognised by its
// idempotency key (dedupe store, then the target stream's duplicate
// window). A round trip per message would cost throughput and buy nothing.
//
// AckWait must exceed the time the bridge may hold a message before
// settling it; the bridge sends ErrInProgress for messages that take longer
// (a sink being retried), which restarts AckWait on the server. A message
// whose replica dies is redelivered after AckWait to another replica.
//
// The consumer's NumPending is reported through SourceConfig.Backlog every
// BacklogInterval from a consumer info request, which also tracks the ack
// floor. An existing durable keeps its deliver policy (an operator may create
// it with DeliverNew to skip history); one deleted while the bridge runs is
// recreated starting after that ack floor rather than replaying the stream.
//
// # Sink
//
// PublishAsync publishes with core NATS on the JetStream context's
// connection and asks for the PubAck on a per-broker inbox, through the
// request core it shares with the dedupe store (internal/jspub); it does not
// go through the client library's async publish (no future, channel, map
// entry or JSON decoding per message). A fixed table of SinkConfig.MaxPending
// slots holds the publishes awaiting their ack; each reply subject carries
// its slot and a generation, so an ack that arrives after its slot timed out
// and was reused is recognised and ignored. PublishAsync blocks while the
// table is full, which is the bridge's back-pressure. The ack subscription's
// callback parses the PubAck with a small scanner (encoding/json only for
// replies of unusual shape), and calls done, in ack order: the pipeline
// keeps one message per key in flight, so completion order across keys does
// not matter. The message carries Nats-Msg-Id = the idempotency key, set in the
// bridge's header map itself (bridge.Outgoing allows a sink its own
// idempotency header), so no map is copied per message; the source's other
// Nats-* headers (JetStream control headers the producer set for the source
// stream, such as Nats-Expected-Stream) are removed, because the target
// stream would act on them.
//
// A publish whose ack is lost fails after SinkConfig.AckTimeout instead of
// holding its slot forever: one sweep goroutine per broker checks the table
// a few times per AckTimeout, so there is no timer per publish. The same
// goroutine fails the outstanding publishes at once when the connection
// drops (their acks cannot arrive any more; the bridge retries them and the
// target's duplicate window drops those that had been stored). done must
// not block and must not call PublishAsync on the same Sink (it runs on the
// ack subscription's goroutine). Close waits for the outstanding acks within
// its context; it leaves the connections to their owner, since the source
// and the dedupe store share them.
//
// A PubAck flagged Duplicate is reported as *DuplicateError, which wraps
// bridge.ErrDuplicate: the message is stored, by the earlier publish.
//
// Each target broker name maps to its own JetStream context, so a cell may
// live on its own NATS cluster.
//
// # Partitioned rules
//
// A rule with source.partitions N and a subject-token key reads its stream
// in N partitions (docs/partitions.md). The stream carries a subject
// transform (PartitionTransform: "n<N>.{{partition(N,w)}}." before the
// rule's subject, w the key token's ordinal among the subject's '*'
// wildcards), which CheckTransform verifies and ApplyStreamTransform sets. A
// PartitionedSource runs, for each partition this replica holds a lease
// for, a Partition: the ordered consumer of the durable
// PartitionDurable(group, N, p), filtered on PartitionFilter(N, p), with the
// two prefix tokens stripped before routing. Leases and memberships are
// keys of a JetStream KV bucket with a TTL and expiry markers: Create to
// take, compare-and-set Update to renew (every TTL/3), Delete with the last
// revision to release; each request with its own timeout. Assign spreads the
// partitions over the live members as a pure function of them (balanced to
// within one, few moves per change). A replica gives a partition up by
// stopping its pulling, waiting for the pipeline to settle, unpinning and
// deleting the lease; the next owner starts after that or after the lease
// expired, from the consumer's ack floor. A lease that cannot be renewed is
// lost: its partition stops at once and its unpublished deliveries are
// revoked.
//
// # Exactly once and the duplicate window
//
// The source message is acked only after the sink confirmed the publish,
// so nothing is lost; the republished message carries a deterministic
// Nats-Msg-Id, so a repeat is dropped. Two layers drop repeats: the dedupe
// store (reserve, publish, commit) and the target stream's duplicate window
// (StreamConfig.Duplicates, set by EnsureStreams, default 2m). The window
// closes the gap the store cannot: a publish that reached the stream but
// whose ack (or the commit after it) was lost, for instance when a replica
// was killed between publish and commit. The repeat comes after the source's
// AckWait (the dead replica's delivery must time out) and, when the store
// still holds the dead replica's reservation, after its ReserveTTL, plus the
// sink's retry backoff; the window must be longer than that sum (30s + 30s +
// 5s with the defaults). A longer window costs the server memory for the ids
// it remembers, nothing else.
//
// # Connections
//
// Connect never gives up reconnecting (backoff 100ms doubling to 5s, with
// jitter), keeps a reconnect buffer for the source's acks issued while the
// link is down (the Sink and the dedupe store do not use it: a publish or a
// store request made while the link is down fails at once and the bridge
// retries it, so no stale copy is sent when the link returns, possibly after
// the message was published again or its shard moved), pings every 10s so
// that a dead link is noticed within about 30s, and logs one line per state
// change while reporting it through BrokerConfig.OnStateChange. Publishes whose acks were outstanding when
// the link dropped fail with a disconnect error and are retried by the
// bridge; the duplicate window drops those that had been stored.
package natsjs
