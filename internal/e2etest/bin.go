package e2etest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// bridgePackage is the command the tests run.
const bridgePackage = "github.com/cellbridge/cellbridge/cmd/cellbridge"

var bridgeBin struct {
	mu    sync.Mutex
	built bool
	dir   string
	path  string
	err   error
	took  time.Duration
}

// BridgeBinary builds the cellbridge command once per test binary (without
// -race: the subprocess is the system under load, not under inspection)
// into a temporary directory, and returns its path. It fails the test when
// the build fails or takes more than five minutes.
func BridgeBinary(t testing.TB) string {
	t.Helper()
	bridgeBin.mu.Lock()
	defer bridgeBin.mu.Unlock()
	if !bridgeBin.built {
		bridgeBin.built = true
		start := time.Now()
		bridgeBin.path, bridgeBin.err = buildBridge(5 * time.Minute)
		bridgeBin.took = time.Since(start)
	}
	if bridgeBin.err != nil {
		t.Fatal(bridgeBin.err)
	}
	return bridgeBin.path
}

// BridgeBuildTime is how long BridgeBinary's build took (0 before it ran).
func BridgeBuildTime() time.Duration {
	bridgeBin.mu.Lock()
	defer bridgeBin.mu.Unlock()
	return bridgeBin.took
}

func buildBridge(within time.Duration) (string, error) {
	dir, err := os.MkdirTemp("", "cellbridge-e2e-")
	if err != nil {
		return "", fmt.Errorf("e2etest: %w", err)
	}
	bridgeBin.dir = dir
	path := filepath.Join(dir, "cellbridge")
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", path, bridgePackage).CombinedOutput(); err != nil {
		return "", fmt.Errorf("e2etest: go build %s: %v\n%s", bridgePackage, err, out)
	}
	return path, nil
}

// RemoveBinaries removes what BridgeBinary built. Call it from TestMain
// after m.Run; BridgeBinary must not be called afterwards.
func RemoveBinaries() {
	bridgeBin.mu.Lock()
	defer bridgeBin.mu.Unlock()
	if bridgeBin.dir != "" {
		os.RemoveAll(bridgeBin.dir)
	}
}
