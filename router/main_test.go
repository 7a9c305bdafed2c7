package router

import (
	"testing"

	"go.uber.org/goleak"
)

// The watcher owns goroutines (its own and fsnotify's); none may outlive a test.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
