// Package dedupe records idempotency keys so that the bridge forwards each
// source message at most once per TTL window, while the source's redelivery
// makes it at least once. Together: exactly once in effect.
//
// # Contract
//
// A Store maps an opaque key (any bytes, usually "stream:seq" or a
// producer's message id) to one of three states: absent, reserved (with an
// expiry of ReserveTTL) and committed (with an expiry of TTL, counted from
// the commit). Reserve moves absent → reserved and reports Reserved, or
// reports Duplicate (committed) or InFlight (reserved by someone else). Commit
// moves any state → committed. Release moves the caller's reservation →
// absent and leaves everything else alone. Expiry moves either state →
// absent. Stores are safe for concurrent use; the bridge calls them from
// hundreds of goroutines at once.
//
// # The part of the exactly-once argument that rests on this package
//
// For every source message the bridge does:
//
//	Reserve(key)
//	  Duplicate → ack the source message; do not publish.
//	  InFlight  → do not publish and do not ack: retry later (negative-ack
//	              with a delay). Another worker or replica is publishing it
//	              right now; it will commit (the retry then sees Duplicate),
//	              release, or crash (its reservation expires after
//	              ReserveTTL and the retry gets Reserved).
//	  Reserved  → publish; wait for the sink's confirmation;
//	              confirmed → Commit(key), then ack the source message;
//	              failed    → Release(key), negative-ack; a retry reserves again.
//	  error     → negative-ack and retry; nothing was published.
//
// Why this forwards once:
//
//   - A key becomes committed only after the sink confirmed the message
//     (commit after confirm), so a commit never hides a message that was not
//     stored downstream: nothing is lost by deduplication.
//   - While one holder publishes, every other attempt at the same key sees
//     InFlight and does not publish, so two replicas never publish the same
//     key concurrently while the reservation lives. ReserveTTL must therefore
//     exceed the longest publish-and-confirm time; the bridge's publish
//     timeout is kept below it.
//   - A holder that crashes between Reserve and Commit leaves a reservation
//     that expires after ReserveTTL; the redelivered message then reserves
//     and publishes. If the crash came after the sink stored the message but
//     before Commit, this publishes a second copy: the JetStream sink sends
//     the same key as Nats-Msg-Id and the cell stream drops the copy inside
//     its duplicate window (RocketMQ sinks close the same gap with
//     transactional messages). The store narrows the window of doubt to
//     those crashes; the sink's window closes it.
//   - A failed Commit (error) leaves the reservation, which expires; the
//     same sink window covers the redelivery.
//   - After TTL a committed key is forgotten; redeliveries later than TTL
//     are forwarded again. TTL must exceed the longest redelivery delay of
//     the source (ack wait × retries, plus hold delays).
//
// # Memory
//
// Memory keeps keys in the process: it deduplicates only what this replica
// sees, and at most Size keys (LRU eviction). An evicted key can be reserved
// and forwarded again; the sink's Nats-Msg-Id window still drops the copy.
// It suits a single replica and tests; Memory.Evictions tells whether Size
// is too small.
//
// # KV (JetStream key-value bucket)
//
// KV keeps keys in a JetStream stream laid out as a key-value bucket
// (KV_<bucket>, subjects $KV.<bucket>.<encoded key>, one message per key)
// shared by every replica, and survives restarts of the bridge and, with
// file storage, of the server. See NewJetStream for the protocol and the
// reasons it is correct and cheap.
//
// Keys are never written to logs or metrics labels by this package (they can
// be user ids); errors returned to the caller name the operation and bucket,
// and may contain the key.
package dedupe
