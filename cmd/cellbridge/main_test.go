package main

import (
	"fmt"
	"os"
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "cellbridge-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	if code == 0 {
		// Every in-process bridge (fxtest, demo) must have stopped all of
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
