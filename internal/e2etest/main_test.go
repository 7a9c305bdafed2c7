package e2etest

import (
	"testing"

	"github.com/cellbridge/cellbridge/internal/leakcheck"
)

func TestMain(m *testing.M) { leakcheck.Main(m, RemoveBinaries) }
