package rmq

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/bridge/rmq/rmqtest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, leakIgnores()...)
}

// leakIgnores lists the client's goroutines (rmqtest keeps the list).
func leakIgnores() []goleak.Option { return rmqtest.IgnoreClientGoroutines() }
