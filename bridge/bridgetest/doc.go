// Package bridgetest is the conformance suite every bridge.Source and
// bridge.Sink adapter passes: the contract written in bridge/types.go,
// checked against the adapter's real broker (an embedded nats-server, the
// in-process RocketMQ broker with the real client). An adapter's test
// package calls TestSource and TestSink with a harness that knows how to
// make a fresh topic, publish raw input, build sources and sinks, and read
// back what a sink stored; everything else is the suite's.
//
// The package imports testing and is imported only by _test files.
//
// # Source contract points
//
//   - MessageFields: Rule, Subject, Body, user headers, a non-empty SourceID
//     per message, Source, Time (when the broker stored it) and
//     Deliveries = 1 on the first delivery.
//   - Order: messages of one partition reach the handler in publish order on
//     their first delivery (the input of per-key order, docs/guarantees.md §3).
//   - AckIsFinal: a message acknowledged with nil (from another goroutine)
//     is not delivered again, neither to the running source nor to the
//     group's next source after Close.
//   - NackRedelivers: any other error brings the message back with the same
//     SourceID, Body and headers, Deliveries counting up, and a fresh Header
//     map (the pipeline's edits of the first delivery's map do not leak).
//   - HoldDelaysRedelivery: bridge.Hold(d) brings it back, but not before d.
//   - InProgressIsNotFinal: bridge.ErrInProgress, repeated for longer than
//     the source's ack deadline, neither settles the message nor lets it be
//     redelivered; the final nil after it settles it.
//   - UnsettledComesBack: a message handed to the handler and never settled
//     is not acknowledged by the source: the group's next source gets it.
//   - AcksAfterRunCount: messages stay owned by the pipeline after Run
//     returned; acknowledging them then (before Close) counts.
//   - AckBehindUnsettled: a message acknowledged with nil while an earlier
//     one stays unsettled is not delivered to the group's next source; for
//     sources that commit offsets (SourceHarness.OffsetCommit) it is, right
//     after the unsettled one, with its SourceID unchanged.
//   - BlockedHandlerCancel: Run returns nil when ctx is cancelled while the
//     handler blocks (back-pressure) and returns ctx's error after a
//     negative ack; that message comes back to the group's next source.
//   - CancelledBeforeRun: Run with a cancelled ctx returns nil, and Close
//     after it too.
//
// Every test checks that Run returns nil within a bound once its ctx is
// cancelled, and that Close after it returns nil.
//
// # Sink contract points
//
//   - StoresBodyHeadersAndMsgID: done(nil) means stored; the stored message
//     carries Body, every header and MsgID (the broker's idempotency key);
//     the sink changes nothing in the Outgoing's headers but its own
//     idempotency header, does not use the Outgoing after done (the suite
//     scribbles over it in done), and stores a message without headers.
//   - DoneExactlyOnce: concurrent publishes each get exactly one done, all
//     nil, and each is stored once.
//   - Duplicate: a repeated MsgID is either dropped by the broker (done gets
//     an error wrapping bridge.ErrDuplicate, one copy stored) or stored again
//     with the same MsgID (done gets nil), as the harness declares.
//   - UnknownBroker: a target naming a broker the sink does not serve fails,
//     and not as a duplicate.
//   - BlockedPublishHonoursContext: PublishAsync blocks at the pending limit
//     and, when ctx ends first, calls done with ctx's error and returns.
//   - CloseWaitsForPending: Close returns after every accepted publish got
//     its done; a publish after Close gets exactly one non-nil done.
//   - CloseWithinContext: Close whose ctx ends while publishes are
//     unconfirmed returns soon after ctx ended, having called every pending
//     done exactly once with an error.
package bridgetest
