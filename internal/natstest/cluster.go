//go:build unix

package natstest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// DefaultClusterTimeout bounds every wait of a Cluster unless ClusterTimeout
// says otherwise: a server becoming ready, a leader being elected, a
// process exiting.
const DefaultClusterTimeout = 30 * time.Second

// State is what a Cluster knows of one server process.
type State int

const (
	// Running: the process runs (it may still be catching up).
	Running State = iota
	// Stopped: the process is frozen by SIGSTOP until Cont.
	Stopped
	// Down: the process has exited (Kill, Shutdown or a crash).
	Down
)

func (s State) String() string {
	switch s {
	case Running:
		return "running"
	case Stopped:
		return "stopped"
	default:
		return "down"
	}
}

// ClusterOption adjusts StartCluster.
type ClusterOption func(*clusterConfig)

type clusterConfig struct {
	timeout time.Duration
	extra   string
	name    string
}

// ClusterTimeout bounds each wait of the cluster's helpers (default
// DefaultClusterTimeout).
func ClusterTimeout(d time.Duration) ClusterOption {
	return func(c *clusterConfig) { c.timeout = d }
}

// ServerConfig appends lines in the nats-server configuration format to
// every server's configuration file (limits, lame duck duration, accounts).
func ServerConfig(lines string) ClusterOption {
	return func(c *clusterConfig) { c.extra += "\n" + lines + "\n" }
}

// Node is one server of a Cluster. Its ports, files and name stay the same
// across restarts.
type Node struct {
	Index       int
	Name        string // server_name, as JetStream reports leaders
	URL         string // client URL, nats://127.0.0.1:port
	MonitorURL  string // HTTP monitoring, http://127.0.0.1:port
	ClusterPort int
	StoreDir    string
	ConfigFile  string
	LogFile     string // stdout and stderr of every run, appended

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{} // closed when the current process has exited
	stopped bool          // SIGSTOP sent, no SIGCONT since
	runs    int
}

// state reads the node's state under its lock.
func (n *Node) state() State {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.stateLocked()
}

func (n *Node) stateLocked() State {
	if n.done == nil {
		return Down
	}
	select {
	case <-n.done:
		return Down
	default:
	}
	if n.stopped {
		return Stopped
	}
	return Running
}

// Cluster is a JetStream cluster of nats-server processes (not in-process
// servers: a test can SIGKILL, SIGSTOP and restart each one) for one test.
// Every server listens on 127.0.0.1 with its own client, route and
// monitoring ports, chosen before start and kept across restarts, and its
// own store directory. All processes are killed when the test ends, and the
// tail of every server's log is printed when the test failed.
//
// Methods that wait are bounded by the cluster's timeout and fail the test
// with t.Fatalf when it passes, so they must be called from the test's
// goroutine; Node, State, URLs, URL and Ready may be called from any.
type Cluster struct {
	t     testing.TB
	cfg   clusterConfig
	bin   string
	nodes []*Node
	hc    *http.Client

	connMu sync.Mutex
	js     jetstream.JetStream
}

// StartCluster starts n nats-server processes forming one JetStream
// cluster and waits until it is ready (see WaitReady). The binary is
// ServerBinary's.
func StartCluster(t testing.TB, n int, opts ...ClusterOption) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("natstest: a cluster of %d servers", n)
	}
	cfg := clusterConfig{timeout: DefaultClusterTimeout, name: "cellbridge-test"}
	for _, o := range opts {
		o(&cfg)
	}
	bin := ServerBinary(t)
	// Created first so that it is removed last, after every process is
	// gone (cleanups run in reverse order).
	dir := t.TempDir()
	c := &Cluster{t: t, cfg: cfg, bin: bin, hc: &http.Client{Timeout: 2 * time.Second}}
	ports := FreePorts(t, 3*n)
	for i := range n {
		nd := &Node{
			Index:       i,
			Name:        fmt.Sprintf("n%d", i),
			URL:         fmt.Sprintf("nats://127.0.0.1:%d", ports[3*i]),
			ClusterPort: ports[3*i+1],
			MonitorURL:  fmt.Sprintf("http://127.0.0.1:%d", ports[3*i+2]),
			StoreDir:    filepath.Join(dir, fmt.Sprintf("n%d", i), "store"),
			ConfigFile:  filepath.Join(dir, fmt.Sprintf("n%d", i), "nats-server.conf"),
			LogFile:     filepath.Join(dir, fmt.Sprintf("n%d", i), "nats-server.log"),
		}
		c.nodes = append(c.nodes, nd)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, nd := range c.nodes {
				t.Logf("natstest: %s (%s), last lines of %s:\n%s", nd.Name, nd.state(), nd.LogFile, Tail(nd.LogFile, 40))
			}
		}
	})
	t.Cleanup(c.killAll)
	for _, nd := range c.nodes {
		if err := os.MkdirAll(nd.StoreDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(nd.ConfigFile, []byte(c.config(nd)), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := c.spawn(nd); err != nil {
			t.Fatal(err)
		}
	}
	c.WaitReady()
	return c
}

// config is one server's configuration file.
func (c *Cluster) config(nd *Node) string {
	var routes []string
	for _, o := range c.nodes {
		if o != nd {
			routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", o.ClusterPort))
		}
	}
	clientPort := nd.URL[strings.LastIndexByte(nd.URL, ':')+1:]
	monitorPort := nd.MonitorURL[strings.LastIndexByte(nd.MonitorURL, ':')+1:]
	cluster := ""
	if len(c.nodes) > 1 {
		// A JetStream cluster of one is refused by the server: one server
		// runs JetStream on its own.
		cluster = fmt.Sprintf("cluster {\n  name: %s\n  listen: \"127.0.0.1:%d\"\n  routes: [%s]\n}\n",
			c.cfg.name, nd.ClusterPort, strings.Join(routes, ", "))
	}
	return fmt.Sprintf(`server_name: %s
listen: "127.0.0.1:%s"
http: "127.0.0.1:%s"
logtime: true
max_payload: 8MB
jetstream {
  store_dir: %q
}
%s%s`, nd.Name, clientPort, monitorPort, nd.StoreDir, cluster, c.cfg.extra)
}

// spawn starts nd's process and a goroutine that reaps it.
func (c *Cluster) spawn(nd *Node) error {
	f, err := os.OpenFile(nd.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("natstest: %s: %w", nd.Name, err)
	}
	cmd := exec.Command(c.bin, "-c", nd.ConfigFile)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = ChildSysProcAttr()
	nd.mu.Lock()
	defer nd.mu.Unlock()
	nd.runs++
	fmt.Fprintf(f, "=== natstest: %s run %d at %s\n", nd.Name, nd.runs, time.Now().Format(time.RFC3339Nano))
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("natstest: start %s: %w", nd.Name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		f.Close()
		close(done)
	}()
	nd.cmd, nd.done, nd.stopped = cmd, done, false
	return nil
}

// killAll kills every process and waits for each to be reaped.
func (c *Cluster) killAll() {
	c.connMu.Lock()
	if c.js != nil {
		c.js.Conn().Close()
		c.js = nil
	}
	c.connMu.Unlock()
	for _, nd := range c.nodes {
		nd.mu.Lock()
		cmd, done := nd.cmd, nd.done
		nd.mu.Unlock()
		if cmd == nil {
			continue
		}
		_ = cmd.Process.Signal(syscall.SIGKILL)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			c.t.Errorf("natstest: %s (pid %d) not reaped 10s after SIGKILL", nd.Name, cmd.Process.Pid)
		}
	}
}

// Len is the number of servers.
func (c *Cluster) Len() int { return len(c.nodes) }

// Node returns server i (0-based).
func (c *Cluster) Node(i int) *Node { return c.nodes[i] }

// State returns what the cluster knows of server i's process.
func (c *Cluster) State(i int) State { return c.nodes[i].state() }

// URLs returns every server's client URL, in server order.
func (c *Cluster) URLs() []string {
	out := make([]string, len(c.nodes))
	for i, nd := range c.nodes {
		out[i] = nd.URL
	}
	return out
}

// URL returns the client URLs joined by commas, as nats.Connect and the
// bridge's broker url field take them.
func (c *Cluster) URL() string { return strings.Join(c.URLs(), ",") }

// Timeout is the bound of each of the cluster's waits.
func (c *Cluster) Timeout() time.Duration { return c.cfg.timeout }

// signal sends sig to server i's process, which must be in one of states.
func (c *Cluster) signal(i int, sig syscall.Signal, states ...State) *Node {
	c.t.Helper()
	nd := c.nodes[i]
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if st := nd.stateLocked(); !slices.Contains(states, st) {
		c.t.Fatalf("natstest: %s to %s: the server is %s", sig, nd.Name, st)
	}
	if err := nd.cmd.Process.Signal(sig); err != nil {
		c.t.Fatalf("natstest: %s to %s: %v", sig, nd.Name, err)
	}
	return nd
}

// waitExit waits until nd's process has exited.
func (c *Cluster) waitExit(nd *Node, what string) {
	c.t.Helper()
	nd.mu.Lock()
	done := nd.done
	nd.mu.Unlock()
	select {
	case <-done:
	case <-time.After(c.cfg.timeout):
		c.t.Fatalf("natstest: %s: %s has not exited within %s", what, nd.Name, c.cfg.timeout)
	}
}

// Kill sends SIGKILL to server i (running or stopped) and waits until the
// process is gone. Its store stays for Restart.
func (c *Cluster) Kill(i int) {
	c.t.Helper()
	nd := c.signal(i, syscall.SIGKILL, Running, Stopped)
	c.waitExit(nd, "kill -9")
}

// Shutdown stops server i gracefully (SIGTERM: the server closes its
// clients and routes and syncs its store) and waits until it has exited.
func (c *Cluster) Shutdown(i int) {
	c.t.Helper()
	nd := c.signal(i, syscall.SIGTERM, Running)
	c.waitExit(nd, "SIGTERM")
}

// Stop freezes server i with SIGSTOP: its sockets stay open and nothing
// answers, as with a hung machine, until Cont.
func (c *Cluster) Stop(i int) {
	c.t.Helper()
	c.freeze(i, true)
}

// Cont resumes server i after Stop.
func (c *Cluster) Cont(i int) {
	c.t.Helper()
	c.freeze(i, false)
}

// freeze sends SIGSTOP (stop) or SIGCONT to a running or stopped server.
func (c *Cluster) freeze(i int, stop bool) {
	c.t.Helper()
	sig, from := syscall.SIGCONT, Stopped
	if stop {
		sig, from = syscall.SIGSTOP, Running
	}
	nd := c.signal(i, sig, from)
	if stop {
		// kill(2) returns before every thread of the process has
		// stopped: a thread busy in the kernel can still answer a
		// request. Wait until the kernel reports each thread stopped.
		c.waitThreads(nd, 'T')
	}
	nd.mu.Lock()
	nd.stopped = stop
	nd.mu.Unlock()
}

// waitThreads waits until every thread of nd's process is in the given
// /proc state (Linux; elsewhere it returns at once).
func (c *Cluster) waitThreads(nd *Node, state byte) {
	c.t.Helper()
	tasks := fmt.Sprintf("/proc/%d/task", nd.cmd.Process.Pid)
	if _, err := os.Stat(tasks); err != nil {
		return // no procfs
	}
	deadline := time.Now().Add(c.cfg.timeout)
	for {
		all, err := threadsIn(tasks, state)
		if err == nil && all {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("natstest: %s: not every thread stopped within %s (%v)", nd.Name, c.cfg.timeout, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// threadsIn reports whether every thread listed under tasks
// (/proc/PID/task) is in state.
func threadsIn(tasks string, state byte) (bool, error) {
	ents, err := os.ReadDir(tasks)
	if err != nil {
		return false, err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(tasks, e.Name(), "stat"))
		if err != nil {
			continue // the thread ended
		}
		// "TID (comm) S ...": the state follows the last ')'.
		i := strings.LastIndexByte(string(b), ')')
		if i < 0 || i+2 >= len(b) {
			return false, fmt.Errorf("unexpected %s/stat", e.Name())
		}
		if b[i+2] != state {
			return false, nil
		}
	}
	return true, nil
}

// Restart starts server i again, after Kill or Shutdown, with the same
// ports, configuration and store, and waits until it accepts client
// connections (not until it has caught up: see WaitReady).
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	nd := c.nodes[i]
	if st := nd.state(); st != Down {
		c.t.Fatalf("natstest: restart %s: the server is %s; Kill or Shutdown it first", nd.Name, st)
	}
	if err := c.spawn(nd); err != nil {
		c.t.Fatal(err)
	}
	addr := strings.TrimPrefix(nd.URL, "nats://")
	c.poll(fmt.Sprintf("%s accepting clients on %s after restart", nd.Name, addr), func() error {
		if nd.state() == Down {
			return errExited
		}
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

// RollingRestart restarts the servers one after the other, as an operator
// upgrades a cluster: each is shut down gracefully, started again, and the
// cluster must be ready (WaitReady) before the next one goes.
func (c *Cluster) RollingRestart() {
	c.t.Helper()
	for i := range c.nodes {
		c.Shutdown(i)
		c.Restart(i)
		c.WaitReady()
	}
}

var errExited = errors.New("the process exited")

// isBadRequest reports a JetStream API refusal that no retry changes (a
// configuration the server rejects), as opposed to one of an election.
func isBadRequest(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && apiErr.Code == http.StatusBadRequest
}

// poll calls check until it returns nil, failing the test with its last
// error after the cluster's timeout. A server that exits on its own fails
// the test at once.
func (c *Cluster) poll(what string, check func() error) {
	c.t.Helper()
	deadline := time.Now().Add(c.cfg.timeout)
	pause := time.Millisecond
	for {
		err := check()
		if err == nil {
			return
		}
		if errors.Is(err, errExited) || isBadRequest(err) {
			c.t.Fatalf("natstest: waiting for %s: %v", what, err)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("natstest: not within %s: %s: %v", c.cfg.timeout, what, err)
		}
		time.Sleep(pause)
		pause = min(2*pause, 50*time.Millisecond)
	}
}

// WaitReady waits until every server that runs (not killed, not stopped)
// answers /healthz with 200 (JetStream enabled, a meta leader known, every
// stream and consumer it hosts current), all agree on one meta leader that
// is itself running, each has a route to every other running server, and a
// JetStream request through a client connection succeeds.
func (c *Cluster) WaitReady() {
	c.t.Helper()
	c.poll("the cluster to be ready", c.Ready)
}

// Ready is WaitReady's check, once: nil when the cluster is ready, else
// what is not.
func (c *Cluster) Ready() error {
	var running []*Node
	for _, nd := range c.nodes {
		nd.mu.Lock()
		st, runs := nd.stateLocked(), nd.runs
		nd.mu.Unlock()
		if st == Down && runs > 0 && !c.expectedDown(nd) {
			return fmt.Errorf("%s: %w:\n%s", nd.Name, errExited, Tail(nd.LogFile, 20))
		}
		if st == Running {
			running = append(running, nd)
		}
	}
	if len(running) == 0 {
		return errors.New("no server runs")
	}
	names := map[string]bool{}
	for _, nd := range running {
		names[nd.Name] = true
	}
	leader := ""
	for _, nd := range running {
		var hz struct {
			Status string `json:"status"`
			Error  string `json:"error"`
		}
		if err := c.monitor(nd, "/healthz", &hz); err != nil {
			return err
		}
		if hz.Status != "ok" {
			return fmt.Errorf("%s /healthz: %s %s", nd.Name, hz.Status, hz.Error)
		}
		var rz struct {
			Routes []struct {
				RemoteName string `json:"remote_name"`
			} `json:"routes"`
		}
		if err := c.monitor(nd, "/routez", &rz); err != nil {
			return err
		}
		routed := map[string]bool{}
		for _, r := range rz.Routes {
			routed[r.RemoteName] = true
		}
		for name := range names {
			if name != nd.Name && !routed[name] {
				return fmt.Errorf("%s has no route to %s", nd.Name, name)
			}
		}
		if len(c.nodes) == 1 {
			break // no meta group without a cluster
		}
		jz, err := c.jsz(nd, nil)
		if err != nil {
			return err
		}
		if jz.Meta == nil || jz.Meta.Leader == "" {
			return fmt.Errorf("%s knows no meta leader", nd.Name)
		}
		if leader != "" && jz.Meta.Leader != leader {
			return fmt.Errorf("meta leader: %s says %s, another server %s", nd.Name, jz.Meta.Leader, leader)
		}
		leader = jz.Meta.Leader
	}
	if len(c.nodes) > 1 && !names[leader] {
		return fmt.Errorf("meta leader %s is not running", leader)
	}
	js, err := c.jetStream()
	if err != nil {
		return err
	}
	if u := js.Conn().ConnectedUrl(); u != "" && !slices.ContainsFunc(running, func(nd *Node) bool { return nd.URL == u }) {
		// The helper's own connection is attached to a stopped server
		// (its pings would notice only after minutes): move it.
		_ = js.Conn().ForceReconnect()
		return fmt.Errorf("the cluster's connection was attached to %s, which does not run; reconnecting", u)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := js.AccountInfo(ctx); err != nil {
		return fmt.Errorf("JetStream account info: %w", err)
	}
	return nil
}

// expectedDown reports whether nd's process exited because the cluster
// was told to end it (Kill, Shutdown), not by crashing.
func (c *Cluster) expectedDown(nd *Node) bool {
	nd.mu.Lock()
	defer nd.mu.Unlock()
	if nd.cmd == nil || nd.cmd.ProcessState == nil {
		return false
	}
	ws, ok := nd.cmd.ProcessState.Sys().(syscall.WaitStatus)
	if !ok {
		return false
	}
	// SIGKILL and SIGTERM come from this helper (or the test); a server
	// that exits by itself exits with a status.
	return ws.Signaled() || ws.ExitStatus() == 0
}

// monitor GETs a monitoring endpoint of nd and decodes its JSON body.
func (c *Cluster) monitor(nd *Node, path string, v any) error {
	resp, err := c.hc.Get(nd.MonitorURL + path)
	if err != nil {
		return fmt.Errorf("%s %s: %w", nd.Name, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", nd.Name, path, err)
	}
	// /healthz answers 503 with a JSON body that says why.
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusServiceUnavailable {
		return fmt.Errorf("%s %s: %s: %s", nd.Name, path, resp.Status, strings.TrimSpace(string(body)))
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("%s %s: %w", nd.Name, path, err)
	}
	return nil
}

// jszInfo is the part of /jsz the cluster reads.
type jszInfo struct {
	Meta *struct {
		Leader string `json:"leader"`
	} `json:"meta_cluster"`
	Accounts []struct {
		Streams []struct {
			Name    string       `json:"name"`
			Cluster *raftCluster `json:"cluster"`
			// Consumers: ConsumerInfo as the server reports it.
			Consumers []struct {
				Name    string       `json:"name"`
				Cluster *raftCluster `json:"cluster"`
			} `json:"consumer_detail"`
		} `json:"stream_detail"`
	} `json:"account_details"`
}

type raftCluster struct {
	Leader string `json:"leader"`
}

// globalAccount is the account of clients when the servers configure none.
const globalAccount = "$G"

func (c *Cluster) jsz(nd *Node, q url.Values) (*jszInfo, error) {
	var jz jszInfo
	path := "/jsz"
	if len(q) > 0 {
		path += "?" + q.Encode()
	}
	if err := c.monitor(nd, path, &jz); err != nil {
		return nil, err
	}
	return &jz, nil
}

// claimant asks the running servers which one claims to lead what claims
// reads from its own /jsz answer; an error unless exactly one does.
func (c *Cluster) claimant(q url.Values, claims func(nd *Node, jz *jszInfo) bool) (int, error) {
	var claimants []int
	for i, nd := range c.nodes {
		if nd.state() != Running {
			continue
		}
		jz, err := c.jsz(nd, q)
		if err != nil {
			continue // a server that does not answer leads nothing we can use
		}
		if claims(nd, jz) {
			claimants = append(claimants, i)
		}
	}
	if len(claimants) != 1 {
		return -1, fmt.Errorf("%d running servers claim it %v", len(claimants), claimants)
	}
	return claimants[0], nil
}

// leader polls claimant until one server claims the lead, and returns its
// index.
func (c *Cluster) leader(what string, q url.Values, claims func(nd *Node, jz *jszInfo) bool) int {
	c.t.Helper()
	idx := -1
	c.poll(what, func() (err error) {
		idx, err = c.claimant(q, claims)
		return err
	})
	return idx
}

// moveLeader asks the current leader to step down in favour of server to
// (subject: the JetStream API's stepdown of a stream or consumer) until to
// claims the lead.
func (c *Cluster) moveLeader(what, subject string, to int, q url.Values, claims func(nd *Node, jz *jszInfo) bool) {
	c.t.Helper()
	js := c.JetStream()
	req, _ := json.Marshal(map[string]any{"placement": map[string]string{"preferred": c.nodes[to].Name}})
	var sent time.Time
	c.poll(fmt.Sprintf("%s led by %s", what, c.nodes[to].Name), func() error {
		if i, err := c.claimant(q, claims); err == nil && i == to {
			return nil
		}
		if time.Since(sent) < 3*time.Second {
			return errors.New("stepdown sent, election running") // a stepdown during an election only prolongs it
		}
		sent = time.Now()
		msg, err := js.Conn().Request(subject, req, 2*time.Second)
		if err != nil {
			return err
		}
		var resp struct {
			Error *struct {
				Description string `json:"description"`
			} `json:"error"`
		}
		if json.Unmarshal(msg.Data, &resp) == nil && resp.Error != nil {
			return fmt.Errorf("stepdown: %s", resp.Error.Description)
		}
		return errors.New("stepdown sent")
	})
}

// MetaLeader returns the index of the server that leads the JetStream meta
// group, waiting (bounded) while an election runs. A cluster of one server
// has no meta group: 0.
func (c *Cluster) MetaLeader() int {
	c.t.Helper()
	if len(c.nodes) == 1 {
		return 0
	}
	return c.leader("the meta leader", nil, func(nd *Node, jz *jszInfo) bool {
		return jz.Meta != nil && jz.Meta.Leader == nd.Name
	})
}

var (
	streamLeaderQuery   = url.Values{"acc": {globalAccount}, "streams": {"true"}, "stream-leader-only": {"true"}}
	consumerLeaderQuery = url.Values{"acc": {globalAccount}, "streams": {"true"}, "consumers": {"true"}}
)

// leadsStream reports whether nd claims the lead of stream.
func leadsStream(stream string) func(nd *Node, jz *jszInfo) bool {
	return func(nd *Node, jz *jszInfo) bool {
		for _, a := range jz.Accounts {
			for _, s := range a.Streams {
				if s.Name == stream && s.Cluster != nil && s.Cluster.Leader == nd.Name {
					return true
				}
			}
		}
		return false
	}
}

// leadsConsumer reports whether nd claims the lead of consumer of stream.
func leadsConsumer(stream, consumer string) func(nd *Node, jz *jszInfo) bool {
	return func(nd *Node, jz *jszInfo) bool {
		for _, a := range jz.Accounts {
			for _, s := range a.Streams {
				if s.Name != stream {
					continue
				}
				for _, cs := range s.Consumers {
					if cs.Name == consumer && cs.Cluster != nil && cs.Cluster.Leader == nd.Name {
						return true
					}
				}
			}
		}
		return false
	}
}

// StreamLeader returns the index of the server that leads stream,
// waiting (bounded) while an election runs.
func (c *Cluster) StreamLeader(stream string) int {
	c.t.Helper()
	return c.leader("the leader of stream "+stream, streamLeaderQuery, leadsStream(stream))
}

// ConsumerLeader returns the index of the server that leads the durable
// consumer of stream, waiting (bounded) while an election runs.
func (c *Cluster) ConsumerLeader(stream, consumer string) int {
	c.t.Helper()
	return c.leader(fmt.Sprintf("the leader of consumer %s of stream %s", consumer, stream), consumerLeaderQuery, leadsConsumer(stream, consumer))
}

// MoveStreamLeader makes server to the leader of stream (a leader
// stepdown that prefers it) and waits (bounded) until it leads. A test uses
// it to choose what a fault hits: move everything else off the server it
// is about to kill.
func (c *Cluster) MoveStreamLeader(stream string, to int) {
	c.t.Helper()
	c.moveLeader("stream "+stream, "$JS.API.STREAM.LEADER.STEPDOWN."+stream, to, streamLeaderQuery, leadsStream(stream))
}

// MoveConsumerLeader makes server to the leader of the durable consumer
// of stream, as MoveStreamLeader does for a stream.
func (c *Cluster) MoveConsumerLeader(stream, consumer string, to int) {
	c.t.Helper()
	c.moveLeader(fmt.Sprintf("consumer %s of stream %s", consumer, stream),
		fmt.Sprintf("$JS.API.CONSUMER.LEADER.STEPDOWN.%s.%s", stream, consumer), to, consumerLeaderQuery, leadsConsumer(stream, consumer))
}

// Connections returns the names of the client connections server i holds
// (nats.Name; "" for unnamed ones), from its /connz. A test can tell from
// them which server a bridge replica is attached to (the bridge names its
// connections "cellbridge/<broker>").
func (c *Cluster) Connections(i int) ([]string, error) {
	var cz struct {
		Conns []struct {
			Name string `json:"name"`
		} `json:"connections"`
	}
	if err := c.monitor(c.nodes[i], "/connz?limit=4096", &cz); err != nil {
		return nil, err
	}
	names := make([]string, len(cz.Conns))
	for j, cn := range cz.Conns {
		names[j] = cn.Name
	}
	return names, nil
}

// Connect opens a client connection to the cluster (any server; it
// reconnects to another one when its server goes) that is closed when the
// test ends.
func (c *Cluster) Connect(t testing.TB, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(c.URL(), append(ClientOptions(t.Name()), opts...)...)
	if err != nil {
		t.Fatalf("natstest: connect to the cluster: %v", err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// jetStream is the cluster's own client, for Ready and the Add helpers.
func (c *Cluster) jetStream() (jetstream.JetStream, error) {
	c.connMu.Lock()
	defer c.connMu.Unlock()
	if c.js != nil {
		return c.js, nil
	}
	nc, err := nats.Connect(c.URL(), ClientOptions("natstest-cluster")...)
	if err != nil {
		return nil, fmt.Errorf("connect to the cluster: %w", err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, err
	}
	c.js = js
	return js, nil
}

// JetStream returns a JetStream context on the cluster's own connection,
// closed when the test ends.
func (c *Cluster) JetStream() jetstream.JetStream {
	c.t.Helper()
	js, err := c.jetStream()
	if err != nil {
		c.t.Fatal(err)
	}
	return js
}

// AddStream creates or updates a stream; Replicas defaults to the number of
// servers (at most 5). JetStream API calls fail while an election runs, so
// it retries each within the cluster's timeout.
func (c *Cluster) AddStream(cfg jetstream.StreamConfig) jetstream.Stream {
	c.t.Helper()
	cfg.Replicas = c.replicas(cfg.Replicas)
	return retryCreate(c, "stream "+cfg.Name, func(ctx context.Context, js jetstream.JetStream) (jetstream.Stream, error) {
		return js.CreateOrUpdateStream(ctx, cfg)
	})
}

// AddKV creates or updates a key-value bucket; Replicas defaults to the
// number of servers (at most 5). Retried like AddStream.
func (c *Cluster) AddKV(cfg jetstream.KeyValueConfig) jetstream.KeyValue {
	c.t.Helper()
	cfg.Replicas = c.replicas(cfg.Replicas)
	return retryCreate(c, "key-value bucket "+cfg.Bucket, func(ctx context.Context, js jetstream.JetStream) (jetstream.KeyValue, error) {
		return js.CreateOrUpdateKeyValue(ctx, cfg)
	})
}

// replicas is n, or every server (at most 5) when n is 0.
func (c *Cluster) replicas(n int) int {
	if n == 0 {
		return min(len(c.nodes), 5)
	}
	return n
}

// retryCreate calls create, each attempt bounded by 5s, until it succeeds
// within the cluster's timeout.
func retryCreate[T any](c *Cluster, what string, create func(context.Context, jetstream.JetStream) (T, error)) T {
	c.t.Helper()
	js := c.JetStream()
	var v T
	c.poll(what+" created", func() (err error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		v, err = create(ctx, js)
		return err
	})
	return v
}
