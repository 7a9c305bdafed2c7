package rmq

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/bridge/rmq/rmqtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, leakIgnores()...)
}

// leakIgnores are rmqtest's list for the client plus the pull consumer's
// goroutines, which the client also leaves behind.
func leakIgnores() []goleak.Option {
	const mod = "github.com/apache/rocketmq-client-go/v2/"
	return append(rmqtest.IgnoreClientGoroutines(),
		// A queue's pull loop returns only after its in-flight long pull
		// (up to 30s) or error back-off ends; Shutdown does not wait.
		goleak.IgnoreAnyFunction(mod+"consumer.(*defaultPullConsumer).pullMessage"),
		goleak.IgnoreAnyFunction(mod+"consumer.(*defaultPullConsumer).pullMessage.func1"),
		goleak.IgnoreAnyFunction(mod+"consumer.(*defaultPullConsumer).pullMessage.func1.1"),
		// The pull-request dispatcher starts one goroutine per queue that
		// just calls pullMessage (above).
		goleak.IgnoreAnyFunction(mod+"consumer.(*defaultPullConsumer).Start.func1.1.1"),
	)
}
