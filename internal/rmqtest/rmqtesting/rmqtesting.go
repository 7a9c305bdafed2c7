package rmqtesting

import (
	"context"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/rmqtest"
)

// StartTB starts a broker for a test and closes it in t.Cleanup. It fails the test when the broker
// cannot start.
func StartTB(t testing.TB, opts rmqtest.Options) *rmqtest.Broker {
	t.Helper()
	b := rmqtest.New(opts)
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("rmqtesting: start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("rmqtesting: close: %v", err)
		}
	})
	return b
}

// IgnoreClientGoroutines lists, as goleak options, the goroutines rocketmq-client-go leaves behind
// after its producers and consumers shut down, so that goleak checks the caller's own goroutines
// only. Each entry says why the client leaks it.
func IgnoreClientGoroutines() []goleak.Option {
	const (
		mod      = "github.com/apache/rocketmq-client-go/v2/"
		internal = mod + "internal."
	)
	return []goleak.Option{
		// go-cache janitor started by a package-level cache at init; it never stops.
		goleak.IgnoreAnyFunction("github.com/patrickmn/go-cache.(*janitor).Run"),
		// rmqClient.Start tickers sleep (1s, 10s) before they first look at the done channel.
		goleak.IgnoreAnyFunction(internal + "(*rmqClient).Start.func1.1"),
		goleak.IgnoreAnyFunction(internal + "(*rmqClient).Start.func1.2"),
		goleak.IgnoreAnyFunction(internal + "(*rmqClient).Start.func1.3"),
		goleak.IgnoreAnyFunction(internal + "(*rmqClient).Start.func1.4"),
		goleak.IgnoreAnyFunction(internal + "(*rmqClient).Start.func1.5"),
		// Consumer statistics goroutines sleep up to an hour and have no stop signal.
		goleak.IgnoreAnyFunction(mod + "consumer.(*statsItemSet).init.func1"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*statsItemSet).init.func2"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*statsItemSet).init.func3"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*statsItemSet).init.func4"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*statsItemSet).init.func5"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*statsItemSet).init.func6"),
		// The push consumer's expired-message cleaner sleeps ConsumeTimeout (15 min) before its loop.
		goleak.IgnoreAnyFunction(mod + "consumer.(*pushConsumer).Start.func1.2"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*pushConsumer).Start.func1.3"),
		// Pull loops end only after their in-flight pull returns (up to 30s) or an error back-off.
		goleak.IgnoreAnyFunction(mod + "consumer.(*pushConsumer).pullMessage"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*pushConsumer).pullMessage.func1"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*defaultPullConsumer).pullMessage"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*defaultPullConsumer).pullMessage.func1"),
		// The pull consumer's dispatcher starts each queue's pull loop on a goroutine of its own.
		goleak.IgnoreAnyFunction(mod + "consumer.(*defaultPullConsumer).Start.func1.1.1"),
		// Requests in flight when the client shut its connections wait for their own timeout: closing
		// a connection does not fail its pending futures.
		goleak.IgnoreAnyFunction(mod + "internal/remote.(*ResponseFuture).waitResponse"),
		goleak.IgnoreAnyFunction(mod + "internal/remote.(*remotingClient).InvokeAsync.func1"),
		// A rebalance that starts as the consumer shuts down blocks forever handing a new queue to the
		// pull dispatcher, which already stopped; later rebalances wait for its mutex.
		goleak.IgnoreAnyFunction(internal + "(*rmqClient).RebalanceImmediately"),
		goleak.IgnoreAnyFunction(internal + "(*rmqClient).RebalanceIfNotPaused"),
		goleak.IgnoreAnyFunction(mod + "consumer.(*defaultConsumer).updateProcessQueueTable"),
		// The transactional producer's check-back loop ranges over a channel Shutdown never closes.
		goleak.IgnoreAnyFunction(mod + "producer.(*transactionProducer).checkTransactionState"),
		// Check-back and notification handlers run on their own goroutine per request; a check-back
		// handler blocks forever on an unbuffered channel once its producer is gone.
		goleak.IgnoreAnyFunction(internal + "GetOrNewRocketMQClient.func2"),
		goleak.IgnoreAnyFunction(mod + "internal/remote.(*remotingClient).processCMD.func2"),
	}
}
