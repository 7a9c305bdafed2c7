package rmq

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/leakcheck"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func TestMain(m *testing.M) {
	// Process-wide, before the tests' own clients (feeders, readers) exist.
	SetRemotingTimeouts(0, 0)
	leakcheck.Main(m, nil, leakIgnores()...)
}

// leakIgnores lists the client's goroutines (rmqtesting keeps the list).
func leakIgnores() []goleak.Option { return rmqtesting.IgnoreClientGoroutines() }
