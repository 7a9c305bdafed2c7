package bridge

import (
	"testing"

	"github.com/cellbridge/cellbridge/internal/leakcheck"
)

func TestMain(m *testing.M) {
	leakcheck.Main(m, nil)
}
