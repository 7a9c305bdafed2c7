package app

import (
	"testing"

	"github.com/cellbridge/cellbridge/internal/leakcheck"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

// Components start goroutines (the HTTP server, the pipeline, the rules
// watcher); every one must be gone when the tests end. The RocketMQ client
// this package links leaves goroutines behind by design (listed, with
// reasons, by rmqtesting).
func TestMain(m *testing.M) { leakcheck.Main(m, nil, rmqtesting.IgnoreClientGoroutines()...) }
