// Package rmqtest runs an in-process RocketMQ name server and broker on 127.0.0.1 that speaks the
// remoting protocol of the 4.x/5.x "remoting" clients, so that tests (and benchmark binaries) can run the
// real github.com/apache/rocketmq-client-go/v2 client against it over TCP.
//
// The broker keeps everything in memory. It supports what the Go client uses: topic routes (with the
// TBW102 default route and topic auto-creation on send), single and batch sends, consumer heartbeats
// and group membership with rebalance notifications, consumer offsets, long-polling pulls with tag
// filtering, consumer send-back to %RETRY% topics with (time-scaled) delay levels and %DLQ% topics,
// queue locks for orderly consumers, and transactional half messages with end-transaction and
// check-back. Tests inspect the stored state (Messages, QueueOffsets, CommittedOffset, HalfMessages,
// Consumers) and inject faults (DropConnections, DelaySends, FailSends, Restart).
//
// Lifecycle: New creates a broker, Start listens, Close stops every goroutine the broker started.
// Start in the tests of other packages is usually done with StartTB, which registers Close as a
// cleanup. Every exported method is safe for concurrent use.
package rmqtest
