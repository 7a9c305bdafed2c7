package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// The production topology: every measured run starts a fresh nats-server
// process (natstest.StartProcess), the variant as one or two processes of
// its own (the real `cellbridge run` binary with a configuration file, or
// this binary with -variant-proc for the pipe, watermill and the other
// hand-written loops), and the load generator and verifier stay in this
// process. CPU time and peak memory of each process come from /proc.

// clockTick is the unit of utime and stime in /proc/PID/stat (USER_HZ):
// 100 on every Linux the bench runs on.
const clockTick = 10 * time.Millisecond

// procCPU is the CPU time (user + system, all threads, exited ones
// included) that process pid has used so far.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may hold spaces; fields after it are
	// counted from the closing parenthesis.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	u, err1 := strconv.ParseInt(f[11], 10, 64)
	s, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return time.Duration(u+s) * clockTick, nil
}

// procStatusMB reads a memory field (VmHWM:, VmRSS:) of process pid in MiB
// (0 when it cannot).
func procStatusMB(pid int, field string) float64 {
	path := "/proc/self/status"
	if pid > 0 {
		path = fmt.Sprintf("/proc/%d/status", pid)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field) {
			f := strings.Fields(line)
			if len(f) >= 2 {
				kb, _ := strconv.ParseFloat(f[1], 64)
				return kb / 1024
			}
		}
	}
	return 0
}

// procIO is a process's I/O system calls so far (all threads, exited ones
// included): reads (syscr) and writes (syscw), sockets included. Per
// message they show how well a process batches: every read or write wakes
// the peer too.
type procIO struct{ reads, writes int64 }

// readProcIO reads /proc/PID/io (zero when it cannot).
func readProcIO(pids ...int) procIO {
	var t procIO
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			k, v, ok := strings.Cut(line, ": ")
			if !ok {
				continue
			}
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			switch k {
			case "syscr":
				t.reads += n
			case "syscw":
				t.writes += n
			}
		}
	}
	return t
}

// resetPeakRSSOf resets process pid's peak-RSS mark (VmHWM), so that a
// later reading covers the timed phase only.
func resetPeakRSSOf(pid int) {
	_ = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// freePort returns a loopback port that was free a moment ago, below the
// ephemeral range (natstest.FreePortsE says why).
func freePort() (int, error) {
	ps, err := natstest.FreePortsE(1)
	if err != nil {
		return 0, err
	}
	return ps[0], nil
}

// proc is one variant process of a run: a bridge replica or a hand-written
// loop. Its stdout and stderr go to a log file in the run's directory.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // exit status, valid after done
	log  string
	// http is the base URL of its HTTP server (bridges; the loops when
	// profiled), "" when none.
	http string
}

// startProc starts bin with args, its output in logPath.
func startProc(name, logPath, bin string, args ...string) (*proc, error) {
	return startProcEnv(name, logPath, nil, bin, args...)
}

// startProcEnv is startProc with the environment env (nil: this
// process's).
func startProcEnv(name, logPath string, env []string, bin string, args ...string) (*proc, error) {
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = natstest.ChildSysProcAttr()
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{}), log: logPath}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM (a bridge drains and exits 0) and waits up to
// timeout, then kills the process. The error says what went wrong: a
// non-zero exit or the kill.
func (p *proc) stop(timeout time.Duration) error {
	if !p.exited() {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case <-p.done:
	case <-time.After(timeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		return fmt.Errorf("%s had not exited %s after SIGTERM; killed:\n%s", p.name, timeout, natstest.Tail(p.log, 20))
	}
	if p.err != nil {
		return fmt.Errorf("%s: %v:\n%s", p.name, p.err, natstest.Tail(p.log, 20))
	}
	return nil
}

// kill ends the process at once (after a failed run).
func (p *proc) kill() {
	if !p.exited() {
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// httpGet fetches url within timeout and returns the body of a 200.
func httpGet(ctx context.Context, hc *http.Client, url string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return b, fmt.Errorf("GET %s: %s: %s", url, resp.Status, strings.TrimSpace(string(b)))
	}
	return b, nil
}

// waitHTTP polls url until it answers 200 (or p exits, or timeout).
func (p *proc) waitHTTP(hc *http.Client, path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		if p.exited() {
			return fmt.Errorf("%s exited while starting (%v):\n%s", p.name, p.err, natstest.Tail(p.log, 30))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, last = httpGet(ctx, hc, p.http+path)
		cancel()
		if last == nil {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("%s: %s not answering 200 within %s: %v\n%s", p.name, path, timeout, last, natstest.Tail(p.log, 30))
}

// buildBridge builds the cellbridge command into dir, as `make build` does
// but keeping symbols (profiles), and returns the binary's path.
func buildBridge(dir string) (string, error) {
	path := filepath.Join(dir, "cellbridge")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", path, "github.com/cellbridge/cellbridge/cmd/cellbridge")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/cellbridge: %v\n%s", err, out)
	}
	return path, nil
}
