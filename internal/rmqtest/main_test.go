// TestMain lives in the external test package so that it can take the client's goroutine list from
// rmqtesting, which imports rmqtest and so cannot be imported by the package's own test files.
package rmqtest_test

import (
	"testing"

	"github.com/cellbridge/cellbridge/internal/leakcheck"
	"github.com/cellbridge/cellbridge/internal/rmqtest/rmqtesting"
)

func TestMain(m *testing.M) {
	leakcheck.Main(m, nil, rmqtesting.IgnoreClientGoroutines()...)
}
