package natsjs

import (
	"os"
	"testing"

	"github.com/cellbridge/cellbridge/internal/leakcheck"
)

func TestMain(m *testing.M) {
	// The takeover test runs replicas as processes of this binary, so
	// that it can kill one with SIGKILL.
	if url := os.Getenv(replicaEnv); url != "" {
		os.Exit(runReplica(url))
	}
	leakcheck.Main(m, nil)
}
