//go:build unix

package natstest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// ProcessOptions describes one stand-alone nats-server process
// (StartProcess).
type ProcessOptions struct {
	// Dir holds the store, the configuration file and the log; required.
	// It is left in place when the process ends.
	Dir string
	// Config is appended to the configuration file, in the nats-server
	// configuration format (limits, prof_port, ...).
	Config string
	// Timeout bounds the wait for the server to become ready and for it to
	// exit after Stop's SIGTERM. Default 30s.
	Timeout time.Duration
}

// Process is one nats-server process with JetStream on loopback ports,
// started outside any test (the benchmark harness runs a fresh one per
// measured run, so that the server is measured as deployed: its own
// process, its own CPU and memory). The binary is BuildServer's.
type Process struct {
	// URL is the client URL, nats://127.0.0.1:port.
	URL string
	// MonitorURL is the HTTP monitoring base URL, http://127.0.0.1:port.
	MonitorURL string
	// StoreDir, ConfigFile and LogFile are under ProcessOptions.Dir.
	StoreDir, ConfigFile, LogFile string

	opts ProcessOptions
	cmd  *exec.Cmd
	done chan struct{} // closed once the process has been reaped
}

// StartProcess writes a configuration, starts nats-server and waits (within
// the timeout) until its /healthz answers ok. The process dies with the
// calling program (ChildSysProcAttr).
func StartProcess(opts ProcessOptions) (*Process, error) {
	if opts.Dir == "" {
		return nil, errors.New("natstest: StartProcess: Dir is empty")
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultClusterTimeout
	}
	bin, err := BuildServer()
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	p := &Process{
		URL:        fmt.Sprintf("nats://127.0.0.1:%d", ports[0]),
		MonitorURL: fmt.Sprintf("http://127.0.0.1:%d", ports[1]),
		StoreDir:   filepath.Join(opts.Dir, "store"),
		ConfigFile: filepath.Join(opts.Dir, "nats-server.conf"),
		LogFile:    filepath.Join(opts.Dir, "nats-server.log"),
		opts:       opts,
		done:       make(chan struct{}),
	}
	if err := os.MkdirAll(p.StoreDir, 0o755); err != nil {
		return nil, fmt.Errorf("natstest: %w", err)
	}
	conf := fmt.Sprintf("listen: \"127.0.0.1:%d\"\nhttp: \"127.0.0.1:%d\"\nmax_payload: 8MB\njetstream {\n  store_dir: %q\n}\n%s\n",
		ports[0], ports[1], p.StoreDir, opts.Config)
	if err := os.WriteFile(p.ConfigFile, []byte(conf), 0o644); err != nil {
		return nil, fmt.Errorf("natstest: %w", err)
	}
	f, err := os.OpenFile(p.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("natstest: %w", err)
	}
	p.cmd = exec.Command(bin, "-c", p.ConfigFile)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	p.cmd.SysProcAttr = ChildSysProcAttr()
	if err := p.cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("natstest: start %s: %w", bin, err)
	}
	go func() {
		_ = p.cmd.Wait()
		f.Close()
		close(p.done)
	}()
	if err := p.waitHealthy(); err != nil {
		p.Kill()
		return nil, err
	}
	return p, nil
}

// waitHealthy polls /healthz until it answers 200 ok, the process exits or
// the timeout passes.
func (p *Process) waitHealthy() error {
	hc := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(p.opts.Timeout)
	pause := time.Millisecond
	var last error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("natstest: nats-server exited while starting:\n%s", Tail(p.LogFile, 20))
		default:
		}
		resp, err := hc.Get(p.MonitorURL + "/healthz")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("/healthz: %s %s", resp.Status, strings.TrimSpace(string(body)))
		}
		last = err
		if time.Now().After(deadline) {
			return fmt.Errorf("natstest: nats-server not healthy within %s: %v", p.opts.Timeout, last)
		}
		time.Sleep(pause)
		pause = min(2*pause, 20*time.Millisecond)
	}
}

// Pid is the process id (for reading its CPU time and memory in /proc).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Stop ends the server gracefully (SIGTERM: it closes its clients and syncs
// its store) and waits for it within the timeout, then kills it. It returns
// an error when SIGKILL was needed.
func (p *Process) Stop() error {
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(context.Background(), p.opts.Timeout)
	defer cancel()
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		p.Kill()
		return fmt.Errorf("natstest: nats-server (pid %d) had not exited %s after SIGTERM; killed", p.Pid(), p.opts.Timeout)
	}
}

// Kill ends the server with SIGKILL and waits until it is reaped (at most
// 10s).
func (p *Process) Kill() {
	_ = p.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
	}
}
