package app

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

// Components start goroutines (the HTTP server, the pipeline, the rules
// watcher); every one must be gone when the tests end. The RocketMQ client
// this package links leaves goroutines behind by design (listed, with
// reasons, by rmqtesting).
func TestMain(m *testing.M) { goleak.VerifyTestMain(m, rmqtesting.IgnoreClientGoroutines()...) }
