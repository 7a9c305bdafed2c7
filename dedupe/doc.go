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
//	              confirmed → Commit(key), then ack the source message (also
//	                          when Commit failed: the message is stored
//	                          downstream, and a redelivery would only be
//	                          published again);
//	              failed    → Release(key), negative-ack; a retry reserves
//	                          again (if Release failed, once the store
//	                          released it later or the reservation
//	                          expired).
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
//     exceed the longest publish-and-confirm time: the caller's publish
//     timeout must stay below it.
//   - A holder that crashes between Reserve and Commit leaves a reservation
//     that expires after ReserveTTL; the redelivered message then reserves
//     and publishes. If the crash came after the sink stored the message but
//     before Commit, this publishes a second copy: the JetStream sink sends
//     the same key as Nats-Msg-Id and the cell stream drops the copy inside
//     its duplicate window (RocketMQ sinks close the same gap with
//     transactional messages). The store narrows the window of doubt to
//     those crashes; the sink's window closes it.
//   - A failed Commit (error) leaves the reservation until a store writes
//     the commit later or it expires; the same sink window covers a
//     redelivery published after the expiry, which needs a lost source ack
//     on top of the lost commit.
//   - After TTL a committed key is forgotten; redeliveries later than TTL
//     are forwarded again. TTL must exceed the longest redelivery delay of
//     the source (ack wait × retries, plus hold delays).
//
// # Check then commit (targets that drop a copy themselves)
//
// A target that drops a message whose idempotency key it stored within a
// window (a JetStream stream's duplicate window, the sink sending the key
// as Nats-Msg-Id) needs no reservation: Checker.Check reads the key and
// writes nothing, so that a forwarded message costs the store one write
// (Commit) instead of two. The bridge uses it only when asked
// (`dedupe.protocol: check`) and only on a bucket of one replica (see the
// last point below). For such a target the bridge does:
//
//	Check(key)
//	  Duplicate → ack the source message; do not publish.
//	  InFlight  → a reservation (Reserve, used for other targets) holds
//	              the key: retry later, as above.
//	  Reserved  → publish; confirmed → Commit(key), then ack; failed →
//	              negative-ack and retry (nothing to release).
//	  error     → negative-ack and retry; nothing was published.
//
// Why this forwards once, given the target's window W ≥ CheckWindow (the
// store's ReserveTTL; the bridge asks the sink for W and uses Reserve for a
// target whose window is shorter or unknown):
//
//   - Nothing is lost: as above, a key is committed only after the sink
//     confirmed its message, and Duplicate means committed.
//   - Two attempts at one key (a redelivery while the first is in flight,
//     two replicas, a producer's repeat) may both read the key before
//     either commits, and both publish. The second copy reaches the target
//     at most this long after the first was stored: the first attempt's
//     confirmation and Commit (bounded by the sink's ack timeout and the
//     store's request timeout), plus the second's own way from its read to
//     its publish (in the process; no round trip). Both timeouts must stay
//     below ReserveTTL (KVConfig.Timeout, the bridge's ack timeout), so
//     the copy comes within W and the target drops it: the store no longer
//     keeps the second attempt from publishing, the target's window keeps
//     its copy from being stored. This is the one thing given up against
//     Reserve: the second attempt publishes a copy the target drops instead
//     of waiting.
//   - A crash between the publish and Commit leaves nothing in the store
//     (Reserve would leave a reservation that expires after ReserveTTL):
//     the redelivery, after the source's ack wait, reads the key as free
//     and publishes again with the same key, and the target's window drops
//     the copy, exactly as the window covers the expired reservation's
//     redelivery today. The deployment's requirement on W (it exceeds
//     ReserveTTL, the source's ack wait and the retry backoff together)
//     covers both.
//   - A failed Commit is owed and written in the background (below); the
//     store's own Check of the key answers Duplicate meanwhile.
//   - A read must see every commit older than W. A bucket of one replica
//     answers from the stream itself. A replica of a clustered bucket does
//     not qualify: nats-server lets a follower answer direct gets once it
//     is mostly (not fully) caught up and goes on answering when it falls
//     behind later, and neither its answer nor "no results" says how
//     stale it is, while a batched read (multi_last) exists only as a
//     direct get. A follower back from minutes away could then answer
//     "absent" for a key committed more than W ago, and a second attempt
//     (a replay, a takeover from an old ack floor) would store a copy the
//     target no longer drops. So Check is used with one replica only (the
//     configuration refuses `protocol: check` with `replicas` above 1, and
//     the bridge falls back to Reserve, with a warning, for a bucket made
//     elsewhere with more); a freshness fence (a key each store writes
//     every second and every batch also reads, its sequence bounding the
//     answer's lag) would lift that, and is not built.
//   - Reservations and commits of both protocols share a bucket: Check
//     reads a reservation as InFlight (its holder may publish to a target
//     without a window), Reserve reads a commit of either as Duplicate.
//
// RocketMQ targets (no window; transactional sends need the reservation)
// keep Reserve. Check is read in batches (KV below), and AsyncChecker lets
// the bridge run Check and Commit without a goroutine waiting for each.
//
// # Taking a previous owner's reservation over (Taker)
//
// An ordered source forwards a rule's keys from one replica at a time, in
// epochs; the next owner re-reads from the ack floor what the last one had
// taken (docs/guarantees.md, section 8). A last owner that was killed,
// frozen or cut off leaves the reservations of its messages in flight,
// which nobody commits or releases: Reserve answers InFlight until they
// expire, and the key, with every later message of it, waits ReserveTTL.
// For a message of a current epoch whose target has a window W of at least
// TakeOverWindow (2 × ReserveTTL) the bridge calls TakeOver instead of
// retrying:
//
//	TakeOver(key)
//	  another holder's reservation at revision n → write this store's
//	              reservation conditional on n: Reserved (a write based on
//	              a stale read is refused; read again)
//	  anything else → as Reserve
//
// Why this forwards once:
//
//   - Nothing is lost or committed early: the taker publishes and commits
//     as after Reserve; Duplicate still means committed.
//   - The other holder's copy, if it stored one, was stored after its
//     reservation was made; the reservation was younger than ReserveTTL
//     when the taker read it (else it would have expired), and the taker's
//     write and publish are each bounded by a timeout below ReserveTTL:
//     its copy comes within 2 × ReserveTTL ≤ W of the first and the target
//     drops it. This is the re-read the memory store (no shared
//     reservations) makes on every takeover, within the same window.
//   - A holder that is alive after all (a frozen owner resuming) commits
//     its confirmed copy (Commit is unconditional and records a true fact)
//     or releases (conditional on its own value: a no-op now). Two stores
//     may take a key from each other in turn; each copy is still dropped.
//   - Order does not rest on reservations: one epoch publishes a key's
//     messages one at a time, and each epoch starts at the ack floor.
//
// Not used for sources without epochs (replicas sharing a durable hold
// each other's live reservations there) nor for targets without a window
// of at least TakeOverWindow (RocketMQ). TakeOver reads from the bucket's
// leader, so a lagging follower cannot hide a commit from it. What waiting
// bought is in docs/guarantees.md, section 8, T1.
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
// (KV_<bucket>, subjects $KV.<bucket>.<encoded key>, one message per key,
// max age = TTL, per-message TTLs allowed) shared by every replica. With
// file storage it survives restarts of the bridge and of the server.
//
// The protocol and why it satisfies the contract:
//
//   - Reserve = publish "r<store token>-<call number>" (a value no other
//     Reserve call, of this store or another, ever writes) with
//     Nats-Expected-Last-Subject-Sequence: 0 and Nats-TTL: ReserveTTL. The
//     stream leader stores it only if the key has no message, so of any
//     number of concurrent Reserves on any number of connections exactly one
//     is stored: exactly one caller gets Reserved. The server removes the
//     message after ReserveTTL by itself, so a crashed holder's reservation
//     frees itself with no cleanup by anyone. When the create is refused,
//     one read (direct get) tells committed ("c": Duplicate) from reserved
//     ("r…": InFlight) from a delete/purge marker (the create is repeated
//     expecting the marker's revision, again atomic).
//   - A Reserve whose reply is lost (jspub.ErrNoReply: a timeout, the
//     connection dropped) fails, but its write may have been stored: a
//     reservation that no caller holds, which would block the key for
//     ReserveTTL. The store remembers such values (in memory, for
//     ReserveTTL). A later Reserve of the key that reads one of them there
//     takes it over and returns Reserved at once. Exactly one holder still
//     holds: the value belongs to one call, which failed, so nobody believes
//     it holds that reservation; the take-over removes the value from
//     memory under a lock, so at most one later call takes it; a call that
//     got Reserved never has its value remembered (values are remembered
//     only on failure, and every call writes its own). A reservation of
//     another call of the same store (the same key reserved concurrently
//     in this process) is InFlight, like another replica's. A lost write
//     that reaches the stream only after the key was reserved again or
//     committed is refused by its own condition (the key has a message).
//     When no Reserve of the store took a lost value over within a tenth
//     of ReserveTTL (at least the request timeout: the caller's own retry
//     normally comes sooner), the store takes the value back from memory
//     and purges the key if it still holds that value (conditional on its
//     revision), so that another replica, which took the source over after
//     a reconnect, is not kept waiting for ReserveTTL; a Reserve of this
//     store that comes meanwhile finds no value to take over and sees
//     InFlight until the purge.
//   - Commit = publish "c" with no expectation and no per-message TTL: it
//     replaces the reservation (one message per key) and lives for the
//     bucket's max age, i.e. TTL from the commit. It is unconditional on
//     purpose: it runs only after the sink confirmed, so "this key is
//     stored downstream" is true even if the caller's reservation expired
//     and another replica holds the key now; that replica's publish is then
//     a duplicate the sink drops, and its Release cannot remove the commit.
//   - Release = read the key; if it still holds this store's token, write
//     a purge marker expecting that exact revision (and a 1s TTL so the
//     marker does not linger). A commit or another replica's reservation
//     has another revision, so the conditional write is refused: Release
//     can never undo a commit or free someone else's reservation.
//   - A Commit or Release that fails (the connection dropped, the bucket's
//     leader is being elected) leaves the reservation in place, and every
//     replica's Reserve of the key would meet it as InFlight until it
//     expires after ReserveTTL (30s), holding the key's later messages
//     back that long. The store remembers such a write (in memory, for
//     ReserveTTL) and writes it again in the background, at once when the
//     connection is back and then with backoff (50ms doubling to 1s), and
//     once more when it is closed. Both writes stay correct whenever they
//     land: the commit is true (the sink confirmed the message), the
//     release is the same conditional purge. Until then its own Reserve of
//     the key answers Duplicate for an owed commit, without the bucket (the
//     message is stored downstream), and takes over a reservation it owes
//     the release of, as it takes over a lost one (nobody holds it). The
//     background release and such a take-over both claim the debt first
//     (in memory, under a lock), so only one of them acts; a Reserve that
//     would write a new reservation while the release is owed settles the
//     debt before, so that the background release never mistakes the new
//     reservation for the old. The background release reads the key from
//     the stream's leader (the message get API, which can stay unanswered
//     for a while after a cluster lost its quorum); the store's own Reserve
//     does not wait for it.
//   - Check = a read of the key's last message, batched: one direct get
//     request (multi_last, nats-server 2.11 or newer) names the keys of up
//     to 256 Checks and the stream answers with the last message of each
//     key that has one, then an end-of-batch status, or with one 404 when
//     none has (the common case: new keys). At most four batches are in
//     flight; Checks made meanwhile wait and leave together, so a batch
//     grows with the load and a lone Check leaves at once. A batch not
//     answered within a quarter of KVConfig.Timeout is asked again of the
//     stream's leader, one message get per key (any replica may take a
//     direct get, and one on a frozen server never answers; Reserve's
//     read does the same); the first complete answer ends the batch. A
//     batch without an answer within KVConfig.Timeout fails its Checks (an
//     error: the caller retries; a read changes nothing). A commit this store owes
//     answers Duplicate without a read. A single direct get costs the
//     server about as much as a stored write (BenchmarkKVWrites: a get and
//     an overwrite cost what a create and an overwrite do), which is why
//     the reads are batched.
//
// Cost and throughput. A new key costs two round trips, each one stored
// message: Reserve (create) and Commit (overwrite); Release and the
// Duplicate/InFlight answers cost a read more. With Check, a new key costs
// one stored message (Commit) and a share of a batched read. Both are JetStream publishes
// whose acknowledgements the caller awaits (Commit returns nil only once the
// commit is stored: a commit that is fire-and-forget would silently hand
// the guarantee to the sink's duplicate window whenever it is lost). The
// waits do not serialise callers: requests from all goroutines are
// pipelined on the one connection through the same request core as the
// JetStream sink (internal/jspub): one shared reply subscription, a fixed
// table of request slots, acknowledgements and refusals read by one scanner,
// so the client adds no per-request inbox, channel, timer or JSON decoding.
// The server's work (two stored messages per forwarded message with
// Reserve, one and a share of a batched read with Check) is what bounds the
// rate; see BenchmarkKV and BenchmarkKVWrites. With Check, the bridge also
// needs no goroutine per waiting call (AsyncChecker): a pool of workers
// that each wait for a round trip made the client flush a few messages at a
// time, which cost the bridge and the server more per message than the
// writes themselves (bench/notes.md).
//
// Failed requests. A request whose reply does not come within
// KVConfig.Timeout (2s by default) fails (a sweep enforces it), and so do
// the requests in flight when the connection drops; a request made while
// the connection is down fails at once and is never handed to the client,
// so no write waits in its reconnect buffer to land later. A direct get
// (the read of Reserve) that gets no answer within a quarter of the timeout
// is asked again of the stream's leader: any replica may be handed a direct
// get, and one on a frozen server never answers. Each such failure
// is an error of the call, which the caller handles as the protocol above
// says (Reserve: retry, which takes over its own lost reservation; Commit
// and Release: written again in the background, see above). None of them
// can break the argument: a write whose reply was lost may still have been
// stored, and every write is either conditional (Reserve, Release) or true
// whenever it lands (Commit). The bucket's set-up in NewJetStream bounds each attempt
// by the same timeout and retries attempts that failed for reasons that
// pass (no answer, no responders, an election: internal/retry) until its
// context ends.
//
// No subject delete markers are configured: nothing here needs them, and the
// server would write one more message for every key that expires. A bucket
// made elsewhere with markers works too (Reserve writes over them).
//
// Keys are never written to logs or metrics labels by this package (they can
// be user ids); errors returned to the caller name the operation and bucket,
// and may contain the key.
package dedupe
