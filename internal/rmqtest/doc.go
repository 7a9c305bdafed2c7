// Package rmqtest runs an in-process RocketMQ name server and broker on 127.0.0.1 that speaks the
// remoting protocol, so that tests (and benchmark binaries) can run the real
// github.com/apache/rocketmq-client-go/v2 client against it over TCP. Everything is kept in memory;
// Restart keeps it.
//
// # Lifecycle
//
//	b := rmqtest.New(rmqtest.Options{DelayScale: 0.01})
//	if err := b.Start(ctx); err != nil { ... }
//	defer b.Close(ctx)
//	resolver := primitive.NewPassthroughResolver([]string{b.NameServerAddr()})
//
// Tests use rmqtesting.StartTB, which closes the broker in t.Cleanup, and
// rmqtesting.IgnoreClientGoroutines for goleak; this package imports neither testing nor goleak, so
// that binaries (the bench harness) can run the broker.
// Every exported method is safe for concurrent use; Close stops every goroutine the broker started.
//
// # Protocol coverage
//
// Frames are decoded with JSON or ROCKETMQ-serialized headers and answered in the same
// serialization. Name server: GET_ROUTEINFO_BY_TOPIC (105): known topics, the TBW102 default route
// (so producers auto-create topics), %RETRY% topics created on demand; unknown topics answer 17.
// Broker:
//   - SEND_MESSAGE (10), SEND_MESSAGE_V2 (310), SEND_BATCH_MESSAGE (320, short header names a–n,
//     body of concatenated encoded messages): topics are auto-created with Options.DefaultQueues
//     (unless DisableAutoCreate); the answer carries msgId (offset message id), queueId,
//     queueOffset, transactionId. Messages with a DELAY level wait in SCHEDULE_TOPIC_XXXX for the
//     scaled delay. Sends to %RETRY% topics past maxReconsumeTimes go to %DLQ%<group>.
//   - PULL_MESSAGE (11): long polling up to suspendTimeoutMillis (capped by Options.MaxSuspend),
//     woken by new messages in the queue; TAG filtering by the request's expression or the group's
//     heartbeat subscription; answers 0 found, 19 nothing new (after the hold), 20 nothing matched in
//     the scanned range, 21 only for an offset beyond the queue end or negative; ext fields
//     nextBeginOffset, minOffset, maxOffset, suggestWhichBrokerId; the commit-offset flag stores the
//     offset. Message encoding follows the client's DecodeMessage field by field.
//   - HEART_BEAT (34): producer and consumer groups, subscriptions; creates %RETRY%<group>;
//     membership changes send NOTIFY_CONSUMER_IDS_CHANGED (40) to every member of the group. A closed
//     connection removes its consumers (and notifies), as the Go client never unregisters.
//     UNREGISTER_CLIENT (35) is honoured too.
//   - GET_CONSUMER_LIST_BY_GROUP (38), QUERY/UPDATE_CONSUMER_OFFSET (14/15; a group without an offset
//     reads 0, since the store never deletes), GET_MAX/MIN_OFFSET (30/31),
//     SEARCH_OFFSET_BY_TIMESTAMP (29).
//   - CONSUMER_SEND_MSG_BACK (36): the message is looked up by commit log offset and re-stored in
//     %RETRY%<group> with delay level 3+reconsumeTimes (or the requested one), RETRY_TOPIC and
//     ORIGIN_MESSAGE_ID set, reconsumeTimes+1; past maxReconsumeTimes it goes to %DLQ%<group>.
//   - LOCK/UNLOCK_BATCH_MQ (41/42) with Options.LockExpiry.
//   - Transactions: a prepared send (TRAN_MSG / sysFlag) is kept as a half message, invisible;
//     END_TRANSACTION (37) commit stores it in its topic at a new offset without TRAN_MSG, rollback
//     drops it, unknown keeps it. As on a real broker, a periodic scan (every
//     Options.TransactionCheckInterval) checks back every unresolved half message at least
//     TransactionCheckDelay old with CHECK_TRANSACTION_STATE (39) on a connection of its producer
//     group, up to TransactionCheckMax times; an unknown answer waits for the next scan.
//
// Other codes answer 3 (not supported).
//
// # Deviations from a real broker
//
// Consumers registered before Restart stay members for Options.RestartGrace so that a restart does
// not empty the group until the clients' next heartbeat (up to 30s later); on Restart and Close,
// held pulls and every request still arriving answer 14 (service not available) for a moment
// before the connections close, because the client never fails a request whose connection closed.
// A connection that sends with a producer group counts as a producer of that group for check-backs,
// even before its heartbeat; a scan that finds no producer of a half message's group does not count
// a check (a real broker does, and discards the message after TransactionCheckMax such scans). The group's last subscription is remembered after its members left.
// Not implemented: SQL92 filters (pulls answer 1), timer messages (TIMER_DELIVER_MS is stored as a
// plain property and delivered at once), message deletion and retention, broadcasting offsets,
// client expiry without a closed connection, ACL.
//
// # Client behaviour seen against this broker (rocketmq-client-go v2.1.3-0.20251226070945-2173d070fd1b)
//
//   - Heartbeats go out at Start, after each rebalance that changed the queues, 1s after the client
//     started and then every 30s; rebalances run at Start, on NOTIFY_CONSUMER_IDS_CHANGED and every
//     20s. Offsets are committed with each pull (when the in-memory offset is > 0), every 5s (first
//     after 10s) and on Shutdown; a Shutdown right after the callback returned may miss the last
//     offsets, so those messages are delivered again.
//   - A request whose connection closes is not failed: it waits for its own timeout (pulls 30s,
//     sends SendMsgTimeout). DropConnections therefore stalls the dropped client's pulls for up to
//     30s, which is what a network failure does too.
//   - The race detector reports two data races inside the client: Shutdown racing a rebalance (the
//     client's closed flag), and the orderly push consumer's process queue (WithConsumerOrder).
//     Shut consumers down once rebalances settled, and do not use the orderly push consumer in
//     -race tests; queue locks are tested at the protocol level here.
package rmqtest
