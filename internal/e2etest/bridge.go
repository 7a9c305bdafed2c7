package e2etest

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/deployment"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

// BridgeOptions describes one bridge replica.
type BridgeOptions struct {
	// Name tells replicas apart in logs and failures ("replica-a").
	Name string
	// Config is the configuration file (WriteConfig writes one).
	Config string
	// Dir receives the log file; default t.TempDir().
	Dir string
	// HTTP is the listen address; default a free 127.0.0.1 port, kept
	// across restarts.
	HTTP string
	// Args are more arguments of `cellbridge run`.
	Args []string
	// Timeout bounds each wait: /healthz after a start, the exit after a
	// signal, /readyz in WaitReady. Default 30s.
	Timeout time.Duration
}

// Bridge is one `cellbridge run` subprocess. The process is killed when the
// test ends, and the tail of its log is printed when the test failed.
// Methods that wait fail the test with t.Fatalf, so they must be called
// from the test's goroutine; Ready, Status, Metric, Exited and LogTail may
// be called from any.
type Bridge struct {
	t    testing.TB
	opts BridgeOptions
	// URL is the HTTP base URL (http://127.0.0.1:port).
	URL string
	// Log is the file that receives the process's stdout and stderr,
	// appended across restarts.
	Log string

	client *deployment.BridgeClient

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	exitErr error
	runs    int
}

// StartBridge starts `cellbridge run -config FILE -http ADDR` and waits
// until it serves /healthz (it may not be ready yet: see WaitReady).
func StartBridge(t testing.TB, opts BridgeOptions) *Bridge {
	t.Helper()
	if opts.Name == "" {
		opts.Name = "bridge"
	}
	if opts.Dir == "" {
		opts.Dir = t.TempDir()
	}
	if opts.HTTP == "" {
		opts.HTTP = fmt.Sprintf("127.0.0.1:%d", natstest.FreePorts(t, 1)[0])
	}
	if opts.Timeout <= 0 {
		opts.Timeout = 30 * time.Second
	}
	b := &Bridge{t: t, opts: opts, URL: "http://" + opts.HTTP, Log: filepath.Join(opts.Dir, opts.Name+".log")}
	b.client = deployment.NewBridgeClient(b.URL)
	t.Cleanup(func() {
		b.kill()
		if t.Failed() {
			t.Logf("e2etest: %s, last lines of %s:\n%s", opts.Name, b.Log, b.LogTail(40))
		}
	})
	b.start()
	return b
}

func (b *Bridge) start() {
	b.t.Helper()
	f, err := os.OpenFile(b.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		b.t.Fatal(err)
	}
	args := append([]string{"run", "-config", b.opts.Config, "-http", b.opts.HTTP}, b.opts.Args...)
	cmd := exec.Command(BridgeBinary(b.t), args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = natstest.ChildSysProcAttr()
	b.mu.Lock()
	b.runs++
	fmt.Fprintf(f, "=== e2etest: %s run %d at %s\n", b.opts.Name, b.runs, time.Now().Format(time.RFC3339Nano))
	if err := cmd.Start(); err != nil {
		b.mu.Unlock()
		f.Close()
		b.t.Fatalf("e2etest: start %s: %v", b.opts.Name, err)
	}
	done := make(chan struct{})
	b.cmd, b.done, b.exitErr = cmd, done, nil
	b.mu.Unlock()
	go func() {
		err := cmd.Wait()
		f.Close()
		b.mu.Lock()
		b.exitErr = err
		b.mu.Unlock()
		close(done)
	}()
	b.wait(fmt.Sprintf("%s serving /healthz", b.opts.Name), func(ctx context.Context) bool {
		code, _, err := b.client.Get(ctx, "/healthz")
		return err == nil && code == http.StatusOK
	})
}

// wait polls cond until it holds, failing the test after the timeout or
// as soon as the process exits.
func (b *Bridge) wait(what string, cond func(ctx context.Context) bool) {
	b.t.Helper()
	deadline := time.Now().Add(b.opts.Timeout)
	pause := time.Millisecond
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		ok := cond(ctx)
		cancel()
		if ok {
			return
		}
		if exited, err := b.Exited(); exited {
			b.t.Fatalf("e2etest: waiting for %s: the process exited (%v):\n%s", what, err, b.LogTail(40))
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("e2etest: not within %s: %s", b.opts.Timeout, what)
		}
		time.Sleep(pause)
		pause = min(2*pause, 20*time.Millisecond)
	}
}

// Exited reports whether the current process has exited, and how (nil:
// exit status 0).
func (b *Bridge) Exited() (bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	select {
	case <-b.done:
		return true, b.exitErr
	default:
		return false, nil
	}
}

// Pid is the current process's id.
func (b *Bridge) Pid() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cmd.Process.Pid
}

// signal sends sig to the running process and waits until it has exited.
func (b *Bridge) signal(sig syscall.Signal) error {
	b.t.Helper()
	if exited, err := b.Exited(); exited {
		b.t.Fatalf("e2etest: %s to %s: the process has already exited (%v)", sig, b.opts.Name, err)
	}
	b.mu.Lock()
	p, done := b.cmd.Process, b.done
	b.mu.Unlock()
	if err := p.Signal(sig); err != nil {
		b.t.Fatalf("e2etest: %s to %s: %v", sig, b.opts.Name, err)
	}
	select {
	case <-done:
	case <-time.After(b.opts.Timeout):
		b.t.Fatalf("e2etest: %s has not exited within %s of %s:\n%s", b.opts.Name, b.opts.Timeout, sig, b.LogTail(40))
	}
	_, err := b.Exited()
	return err
}

// Kill9 kills the process with SIGKILL (no drain, no flush) and waits until
// it is gone.
func (b *Bridge) Kill9() {
	b.t.Helper()
	_ = b.signal(syscall.SIGKILL)
}

// Term stops the process with SIGTERM and waits (bounded) until it has
// exited; the error is its exit status (nil: 0, a clean drain).
func (b *Bridge) Term() error {
	b.t.Helper()
	return b.signal(syscall.SIGTERM)
}

// Restart starts the process again, after Kill9 or Term, with the same
// configuration and HTTP address, and waits until it serves /healthz.
func (b *Bridge) Restart() {
	b.t.Helper()
	if exited, _ := b.Exited(); !exited {
		b.t.Fatalf("e2etest: restart %s: the process still runs; Kill9 or Term it first", b.opts.Name)
	}
	b.start()
}

// kill ends the process at the end of the test, whatever its state.
func (b *Bridge) kill() {
	b.mu.Lock()
	cmd, done := b.cmd, b.done
	b.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		b.t.Errorf("e2etest: %s (pid %d) not reaped 10s after SIGKILL", b.opts.Name, cmd.Process.Pid)
	}
}

// Ready asks /readyz: true on 200, false on 503 with the reasons the body
// gives; an error when the bridge does not answer.
func (b *Bridge) Ready(ctx context.Context) (bool, string, error) { return b.client.Ready(ctx) }

// Status fetches /status.
func (b *Bridge) Status(ctx context.Context) (bridge.Status, error) { return b.client.Status(ctx) }

// Source returns this replica's share of rule as its /status reports it
// (bridge.SourceStatus: for an ordered rule its state, pin and epoch start,
// for a partitioned rule the partitions it owns, each with its state, since
// when and its consumer's epoch start; the last takeover), or nil when the
// rule's source reports none.
func (b *Bridge) Source(ctx context.Context, rule string) (*bridge.SourceStatus, error) {
	st, err := b.client.Status(ctx)
	if err != nil {
		return nil, err
	}
	for _, r := range st.Rules {
		if r.Rule == rule {
			return r.Source, nil
		}
	}
	return nil, nil
}

// Metric sums the samples of a metric in /metrics whose labels include
// labels (nil: all).
func (b *Bridge) Metric(ctx context.Context, name string, labels map[string]string) (float64, error) {
	return b.client.Metric(ctx, name, labels)
}

// WaitReady waits (bounded) until /readyz answers 200.
func (b *Bridge) WaitReady() {
	b.t.Helper()
	b.wait(b.opts.Name+" ready (/readyz 200)", func(ctx context.Context) bool {
		ok, _, err := b.Ready(ctx)
		return err == nil && ok
	})
}

// LogTail returns the last n lines of the process's log.
func (b *Bridge) LogTail(n int) string { return natstest.Tail(b.Log, n) }
