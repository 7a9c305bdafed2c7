// Package natsjs connects the bridge to NATS JetStream: connections
// (Connect), a durable pull-consumer Source (ordered, one active replica at
// a time, or unordered), a PartitionedSource for partitioned rules (leases
// in a KV bucket), an asynchronous publishing Sink, stream and bucket
// provisioning (PlanStreams, PlanProvision; EnsureStreams for the embedded
// default and tests), the check of the streams before consuming
// (Preflight), and the deployment's registry of rules versions in the
// lease bucket (Registry).
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
// Each message reaches the handler as a bridge.Message without copying:
// Header is the message's header map (nil when it has none) and Body its
// data. SourceID is the producer's Nats-Msg-Id if set, else
// "<stream>:<stream sequence>"; both are stable across redeliveries, which is
// what the idempotency key needs. Time, Deliveries and the sequences are read
// from the ack subject by a parser that does not allocate (the client's
// Metadata allocates per message and costs three times as much).
// SourceConfig.StripTokens removes leading subject tokens first (a
// partitioned stream's "n<N>.<p>." prefix).
//
// How each bridge.Ack outcome maps to JetStream:
//
//	nil                   Ack              done for good
//	*bridge.HoldError     NakWithDelay(d)  redelivered after d (held shard)
//	bridge.ErrInProgress  InProgress       AckWait restarts; not final, may repeat
//	bridge.ErrRevoked     nothing          the next owner re-reads it
//	any other error       Nak              redelivered at once
//
// For a delivery whose epoch was revoked (below) only Ack goes out: its copy
// is stored, and the server applies the ack to the new owner's delivery of
// the same stream sequence; Nak, NakWithDelay and InProgress are dropped,
// because the new owner re-read the message and owns its redelivery.
//
// Acks are not confirmed (no AckSync): a lost ack only means the message is
// redelivered after AckWait, and the redelivery is recognised by its
// idempotency key (dedupe store, then the target stream's duplicate
// window). A round trip per message would cost throughput and buy nothing.
//
// With SourceConfig.CumulativeAcks (ordered only; rules' source.acks:
// cumulative) the durable has AckPolicy all and an epoch acknowledges the
// settled prefix of its deliveries, once per 128 messages or 2 ms, never
// past a delivery that was not settled with success and never once revoked
// (cumack.go says why, and how a late ack of an earlier epoch is repaired).
//
// AckWait must exceed the time the bridge may hold a message before
// settling it; the bridge sends ErrInProgress for messages that take longer
// (a sink being retried), which restarts AckWait on the server.
//
// The consumer's NumPending is reported through SourceConfig.Backlog every
// BacklogInterval from a consumer info request, which also tracks the ack
// floor. A replica that another one serves reports 0 (an ordered standby
// while another replica holds the pin, a replica waiting for the other
// ordering mode), because readiness counts a backlog without progress
// against the replica that reports it. An existing durable keeps its deliver policy (an operator may create
// it with DeliverNew to skip history); one deleted while the bridge runs is
// recreated starting after that ack floor rather than replaying the stream.
// Every JetStream API request of the source, and of EnsureStreams, goes
// through internal/retry: each attempt has its own timeout (RequestTimeout,
// 2s), waits for the connection instead of going into the client's
// reconnect buffer, and a failure worth repeating (no answer, no
// responders, an election, JetStream temporarily unavailable) is logged,
// reported through OnRequestError and retried with backoff where the
// caller has the time (at start-up: until its context ends).
//
// The source reports through SourceConfig.OnFailing why it cannot deliver
// (missed pull heartbeats, a fence, a failing reset, standby probes without
// answer, consume errors) and when it can again. Missed heartbeats while
// the connection claims to be up also ping the server: a frozen server
// keeps its TCP connections open, so when the ping is not answered within
// one heartbeat the connection is forced to another server at once, instead
// of after the client's ping timeout.
//
// # Unordered mode (ordering: none)
//
// Every replica pulls from the shared durable at once. Run consumes with
// Consume (PullMaxMessages = FetchBatch; a new pull goes out when half the
// batch is used), so the client always has a batch buffered and the server
// never waits for a request. The handler runs on the subscription's
// goroutine, in stream order, and may block: that is the bridge's
// back-pressure, and it also holds back new pulls. The server sends a
// heartbeat every second while a pull waits, so a silent server is noticed
// after 2s. Pull requests expire
// after 5s instead of the library's 30s: after the consumer sat at
// MaxAckPending the client's idea of what it has requested can drift from
// the server's, and an expiring request (or a missing heartbeat) is what
// puts them back in step. A message whose replica dies is redelivered after
// AckWait to another replica, possibly behind newer messages of its key;
// so is a delivery lost in transit when the replica's server fails (see
// docs/guarantees.md, section 7).
//
// # Ordered mode (the default)
//
// One replica at a time forwards the rule's messages, and every new owner
// starts from the consumer's ack floor, so that per-key order survives
// replicas, crashes, reconnects and scaling. The durable is a priority group
// (SourceConfig.Group, "cellbridge") with PriorityPolicyPinned and
// PinnedTTL (default 5s, at least 2s): the server gives each pull request of
// the group to one client at a time, the one holding the current pin id,
// and drops the pin when that client has not pulled for PinnedTTL. Each
// replica runs a state machine (Source.State):
//
//   - Standby. The replica probes: Fetch of one message with the priority
//     group, each probe waiting ProbeWait (1s) on the server, all on one
//     long-lived Consumer object (the client library keeps the pin id on
//     it). A probe is answered only when no pin is current and a message is
//     ready; it then carries the new pin id. So a durable with nothing to
//     deliver (none pending, none unacknowledged) has no owner once the
//     last one is gone, however long: the next message's delivery wins a
//     waiting probe the pin at once. The replica also reads the
//     consumer's UNPINNED advisory; when the pin is free and messages are
//     delivered but unacknowledged (their owner died, was cut off, or
//     released with deliveries open), and no probe can win the pin with a
//     message (nothing is pending, or the consumer sits at MaxAckPending,
//     or the pin has been free for PinnedTTL anyway), it kicks the consumer
//     with a reset so that those messages become deliverable and some
//     standby's probe wins the pin with them, at most once per PinnedTTL.
//     Without permission to read advisories the consumer info polled every
//     BacklogInterval shows the same, later.
//   - Acquiring. The probed message is neither processed nor acked. The
//     replica resets the consumer to its ack floor (ResetConsumer, server
//     2.14+): pending and redelivery state are cleared and delivery starts
//     again after the floor, numbered 1, 2, 3... Each attempt has
//     RequestTimeout; attempts stop after PinnedTTL, after which the pin has
//     lapsed anyway, and the replica goes back to Standby, backing off
//     longer after each failure. It never processes without a successful
//     reset.
//   - Active. A new epoch (bridge.Epoch) starts, and Consume runs with the
//     priority group, PullExpiry clamp(PinnedTTL/3, 1s, 5s) (the pulls that
//     renew the pin) and PullHeartbeat half of that. The library's callback
//     never blocks: it checks each delivery and puts it into a queue of
//     2×MaxAckPending+FetchBatch slots; one goroutine takes deliveries out
//     in order and calls the handler, which may block; nothing is handed
//     over once Run's ctx ended. A replica whose handler blocks keeps its
//     pin: its pulls go on, and the server stops at MaxAckPending. (A
//     handler blocking inside the callback would stop the pulls and lose
//     the pin after PinnedTTL.) Deliveries waiting in the queue get
//     in-progress heartbeats (every AckWait/4 for those that waited
//     AckWait/2, and one when handed over after AckWait/8), so that none is
//     delivered twice while it waits. Every delivery carries the epoch in
//     bridge.Message.Epoch. The epoch's first delivery must be number 1
//     (the reset's), and each first delivery must come after the previous
//     one in the stream.
//   - Fence. The epoch ends, is revoked at that moment (the pipeline then
//     publishes none of its messages that have not started publishing and
//     settles them with bridge.ErrRevoked), consuming stops, and the queued
//     deliveries are dropped, when: a delivery carries another pin id (the
//     library pulls again without an id after a 423 and may be pinned
//     anew) or none (the durable is no longer pinned); the server answers
//     423 wrong pin id; the consumer leader changed (the new leader has no
//     pin); heartbeats stopped; the connection is lost or was re-established;
//     a delivery sequence skipped one (a delivery lost in transit or
//     dropped by a slow subscription) or started again (another client
//     reset the consumer); the queue is full; consumer info names another
//     pin; a delivery was negatively acknowledged (the redelivery would
//     come after later messages of its key: the next epoch's reset delivers
//     it first instead; a bridge.HoldError with Overtake is the exception,
//     sent as NakWithDelay); or the replica's pipeline has not settled the
//     rule's oldest message for StallLimit (SourceConfig.StallAge: it
//     cannot publish, and hands the consumer to another replica with a
//     reset and an unpin, backing off). Where the pin may still be this
//     replica's (disconnect, heartbeats, gap, a new pin learned from a
//     delivery, a nack) it goes straight to Acquiring, else to Standby.
//     After a reconnect to another server the reset re-delivers what was in
//     transit at once, instead of after AckWait.
//   - Release. Release (and Close) stop fetching, wait until the pipeline
//     settled every delivery of the epoch (within the ctx; what is still
//     open then is revoked), and give the pin back while it cannot have
//     lapsed (PinnedTTL after the last pull, less one and a half pull
//     expiries): if the server still names this replica's pin, they reset
//     the consumer when deliveries of the epoch stay unacknowledged and
//     unpin (UnpinConsumer, which names no pin id, so never later), so that
//     a standby's probe wins it within milliseconds. When Run's ctx ends
//     (the bridge's shutdown) fetching stops and the epoch is left as it is
//     for Close, after the pipeline drained. A Release whose ctx is already
//     done revokes the running epoch at once.
//
// Why order holds (docs/guarantees.md, section 8): within an epoch only
// this replica receives, the reset delivers everything above the ack floor
// in stream order, and the sequence check proves nothing was lost in
// between; every message at or below the floor was acknowledged, which the
// pipeline does only after its copy was stored. So the first copy of an
// older message of a key is always stored before the first copy of a newer
// one, however many replicas, current or stale, publish at the same time.
// What a stale owner still publishes is a duplicate at worst, dropped by its
// idempotency key. A blocked or crashed replica costs PinnedTTL, not
// AckWait, and no reordering.
//
// Switching the mode. The durable is switched in place (CreateOrUpdate;
// the server allows changing the priority settings). A replica that finds
// the durable in the other mode while pull requests wait on it (replicas of
// the other configuration, or of a version before the ordered mode, are
// running) does not switch it: an older replica whose pulls were refused
// would switch it back. It waits in StateWaiting, pulls nothing, warns once
// a minute with the rule, stream, consumer and what to do, and switches the
// durable once no pull request waits. A rolling upgrade therefore keeps the
// old replicas forwarding until the last one is gone; then the new ones
// take the durable over.
//
// For operators, Source.State returns the state, the pin id, the epoch's
// start, the number of epochs and of takeovers (epochs after winning the pin
// in Standby: the figure behind cellbridge_takeovers_total), the last
// takeover's time, its cost (from the winning probe to the epoch start) and
// the time the consumer was without an owner before it (from the UNPINNED
// advisory), and the number and last reason of fences; SourceStatus gives
// the same as a bridge.SourceStatus (for /status and the metrics
// cellbridge_source_pinned and cellbridge_takeovers_total), and
// PartitionedSource.SourceStatus the partitions of a partitioned rule with
// each one's pin and epoch. SourceConfig.OnState reports each change; each change is logged once (rule, stream, consumer,
// state, previous state and time spent in it, pin, reason).
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
// A publish whose ack is lost fails after SinkConfig.AckTimeout (3s, per
// broker with AckTimeouts) instead of
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
// for, a Partition: an ordered Source (OrderedPartitions) on the durable
// PartitionDurable(group, N, p), filtered on PartitionFilter(N, p), with the
// two prefix tokens stripped before routing. Leases and memberships are
// keys of a JetStream KV bucket with a TTL and expiry markers: Create to
// take, compare-and-set Update to renew (every TTL/3), Delete with the last
// revision to release; each request with its own timeout. Every value is
// the replica id and a nonce of the instance, and only an exact match is
// one's own: a second live replica with the same id is refused and reports
// the duplicate. Assign spreads the
// partitions over the live members as a pure function of them (balanced to
// within one, few moves per change). A replica gives a partition up by
// stopping its pulling, waiting for the pipeline to settle, unpinning and
// deleting the lease; the next owner starts after that or after the lease
// expired, from the consumer's ack floor. A lease that cannot be renewed is
// lost: its partition's unpublished deliveries are revoked at once, and
// the partition stops.
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
// Connect waits for the first connection without giving up (until its
// context ends) on servers that refuse, do not answer or whose names do not
// resolve yet, one log line and one OnRequestError report per failed
// attempt, and fails at once on rejected credentials and TLS errors. The
// connection never gives up reconnecting (backoff 100ms doubling to
// ReconnectWait, 2s, with jitter, between rounds over the server list),
// keeps no reconnect buffer (a publish, a store request or a source ack
// made while the link is down fails at once, decided under the client's
// own lock, and the bridge retries it or the message is delivered again,
// so no stale copy is sent when the link returns, possibly after the
// message was published again or its shard moved), pings every
// PingInterval (1s) so that a dead link is noticed after MaxPingsOut (2)
// unanswered pings, 2–3s, gives each server DialTimeout (2s) to greet, and
// logs one line per state
// change while reporting it through BrokerConfig.OnStateChange. Publishes whose acks were outstanding when
// the link dropped fail with a disconnect error and are retried by the
// bridge; the duplicate window drops those that had been stored.
package natsjs
