package main

import (
	"testing"

	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/internal/e2etest"
	"github.com/cellbridge/cellbridge/internal/leakcheck"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func TestMain(m *testing.M) {
	// The RocketMQ client's connection bounds are process-wide: set before
	// the tests' own clients exist (an in-process bridge sets them too).
	rmq.SetRemotingTimeouts(0, 0)
	// Every in-process bridge (tests, demo) must have stopped all of its
	// goroutines, the embedded servers' included. The RocketMQ client
	// leaves goroutines behind by design (listed, with reasons, by
	// rmqtesting).
	leakcheck.Main(m, e2etest.RemoveBinaries, rmqtesting.IgnoreClientGoroutines()...)
}
