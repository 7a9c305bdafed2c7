package config

import (
	"testing"

	"go.uber.org/goleak"
)

// Nothing here starts goroutines; goleak keeps it that way.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
