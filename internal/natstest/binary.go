//go:build unix

package natstest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// serverModule is the module whose main package is the nats-server binary;
// its version is the one go.mod requires (the embedded servers' too).
const serverModule = "github.com/nats-io/nats-server/v2"

// EnvServerBinary names an existing nats-server binary to use instead of
// building one (for a machine without the Go toolchain, or to try another
// server version).
const EnvServerBinary = "CELLBRIDGE_NATS_SERVER"

var serverBin struct {
	once sync.Once
	path string
	err  error
}

// ServerBinary returns the path of a nats-server binary of the version in
// go.mod, building it on first use. The binary is kept in the user's cache
// directory (cellbridge-test/nats-server-<version>) and reused by later test
// runs and by every package's tests. Test binaries that build it at the same
// time take turns through a lock file, and each build is renamed into place
// atomically, so no process ever runs a half-written file. It fails the test
// when the binary cannot be built within five minutes.
func ServerBinary(t testing.TB) string {
	t.Helper()
	path, err := BuildServer()
	if err != nil {
		t.Fatal(err)
	}
	return path
}

// BuildServer is ServerBinary for programs that are not tests (the
// benchmark harness): the same cached binary, or why it cannot be built
// within five minutes.
func BuildServer() (string, error) {
	serverBin.once.Do(func() { serverBin.path, serverBin.err = buildServer(5 * time.Minute) })
	return serverBin.path, serverBin.err
}

func buildServer(within time.Duration) (string, error) {
	if p := os.Getenv(EnvServerBinary); p != "" {
		return p, nil
	}
	version, err := serverVersion()
	if err != nil {
		return "", err
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "cellbridge-test")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("natstest: nats-server cache: %w", err)
	}
	path := filepath.Join(dir, "nats-server-"+version)
	if isExecutable(path) {
		return path, nil
	}
	unlock, err := lockFile(path+".lock", within)
	if err != nil {
		return "", err
	}
	defer unlock()
	if isExecutable(path) { // built by another test binary while we waited
		return path, nil
	}
	tmp := fmt.Sprintf("%s.tmp-%d", path, os.Getpid())
	defer os.Remove(tmp)
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	// Built from the module graph of this repository: the version go.mod
	// requires, with the checksums go.sum holds.
	cmd := exec.CommandContext(ctx, "go", "build", "-o", tmp, serverModule)
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("natstest: go build %s: %v\n%s", serverModule, err, out)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", fmt.Errorf("natstest: nats-server cache: %w", err)
	}
	return path, nil
}

// serverVersion is the version of the nats-server package linked into this
// test binary: the one go.mod requires. (A local replace of the module
// keeps the version of what it replaces; set EnvServerBinary then.)
func serverVersion() (string, error) {
	if server.VERSION == "" {
		return "", errors.New("natstest: the nats-server package has no version")
	}
	return "v" + strings.NewReplacer("/", "_", "+", "_").Replace(server.VERSION), nil
}

func isExecutable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0
}

// lockFile takes an exclusive lock on path, polling so that the wait is
// bounded, and returns its release.
func lockFile(path string, within time.Duration) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("natstest: lock %s: %w", path, err)
	}
	deadline := time.Now().Add(within)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() {
				_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
				f.Close()
			}, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) || time.Now().After(deadline) {
			f.Close()
			return nil, fmt.Errorf("natstest: lock %s (held by another build for %s): %w", path, within, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
