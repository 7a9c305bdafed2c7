package main

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/internal/e2etest"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func TestMain(m *testing.M) {
	// The RocketMQ client's connection bounds are process-wide: set before
	// the tests' own clients exist (an in-process bridge sets them too).
	rmq.SetRemotingTimeouts(0, 0)
	code := m.Run()
	e2etest.RemoveBinaries()
	if code == 0 {
		// Every in-process bridge (tests, demo) must have stopped all of
		// its goroutines, the embedded servers' included.
		// The RocketMQ client leaves goroutines behind by design (listed,
		// with reasons, by rmqtesting).
		if err := goleak.Find(rmqtesting.IgnoreClientGoroutines()...); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}
