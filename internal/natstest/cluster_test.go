//go:build unix

package natstest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestCluster drives every operation of the cluster once and checks its
// effect from outside: a stream's leader killed loses the lead to another
// server and its store survives a restart; a stopped server answers
// nothing until continued; a rolling restart keeps the stream.
func TestCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test: skipped with -short")
	}
	start := time.Now()
	c := StartCluster(t, 3)
	t.Logf("3 servers ready %v after start (binary %s)", time.Since(start).Round(time.Millisecond), ServerBinary(t))
	if got := len(c.URLs()); got != 3 || strings.Count(c.URL(), ",") != 2 {
		t.Fatalf("URLs %v, URL %q", c.URLs(), c.URL())
	}
	meta := c.MetaLeader()
	st := c.AddStream(jetstream.StreamConfig{Name: "T", Subjects: []string{"t.>"}})
	info, err := st.Info(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Config.Replicas != 3 || info.Cluster == nil || len(info.Cluster.Replicas) != 2 {
		t.Fatalf("stream T: replicas %d, cluster %+v", info.Config.Replicas, info.Cluster)
	}
	kv := c.AddKV(jetstream.KeyValueConfig{Bucket: "B"})
	if s, err := kv.Status(ctx(t)); err != nil || s.(*jetstream.KeyValueBucketStatus).StreamInfo().Config.Replicas != 3 {
		t.Fatalf("bucket B: %v %v", s, err)
	}
	_, js := c.Connect(t)
	for i := range 10 {
		if _, err := js.Publish(ctx(t), "t.x", fmt.Appendf(nil, "%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := js.CreateOrUpdateConsumer(ctx(t), "T", jetstream.ConsumerConfig{Durable: "D", AckPolicy: jetstream.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
	sl, cl := c.StreamLeader("T"), c.ConsumerLeader("T", "D")
	if info.Cluster.Leader != c.Node(sl).Name {
		t.Errorf("StreamLeader %s, stream info says %s", c.Node(sl).Name, info.Cluster.Leader)
	}
	t.Logf("meta leader %s, stream T %s, consumer T/D %s", c.Node(meta).Name, c.Node(sl).Name, c.Node(cl).Name)

	// Leaders move where a test wants them.
	to := (sl + 1) % 3
	c.MoveStreamLeader("T", to)
	if got := c.StreamLeader("T"); got != to {
		t.Fatalf("stream T led by %s after moving it to %s", c.Node(got).Name, c.Node(to).Name)
	}
	sl = to
	to = (cl + 1) % 3
	c.MoveConsumerLeader("T", "D", to)
	if got := c.ConsumerLeader("T", "D"); got != to {
		t.Fatalf("consumer T/D led by %s after moving it to %s", c.Node(got).Name, c.Node(to).Name)
	}
	// The test's named connection is on exactly one server.
	on := 0
	for i := range 3 {
		names, err := c.Connections(i)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range names {
			if n == t.Name() {
				on++
			}
		}
	}
	if on != 1 {
		t.Fatalf("the test's connection %q found on %d servers", t.Name(), on)
	}

	// kill -9 the stream's leader: another server takes the lead, the
	// stream keeps its messages, and the killed server comes back.
	step := time.Now()
	c.Kill(sl)
	if c.State(sl) != Down {
		t.Fatalf("state after Kill: %s", c.State(sl))
	}
	if nl := c.StreamLeader("T"); nl == sl {
		t.Fatalf("stream leader still %s after it was killed", c.Node(sl).Name)
	}
	t.Logf("kill -9 %s: a new leader of T after %v", c.Node(sl).Name, time.Since(step).Round(time.Millisecond))
	c.WaitReady() // two of three: quorum holds
	step = time.Now()
	c.Restart(sl)
	c.WaitReady()
	t.Logf("restart %s: cluster ready after %v", c.Node(sl).Name, time.Since(step).Round(time.Millisecond))
	if n := msgs(t, js, "T"); n != 10 {
		t.Fatalf("stream T holds %d messages after the restart, want 10", n)
	}

	// SIGSTOP: the server takes no client and answers no monitoring
	// request until SIGCONT.
	c.Stop(2)
	if c.State(2) != Stopped {
		t.Fatalf("state after Stop: %s", c.State(2))
	}
	var hz struct{ Status string }
	if err := c.monitor(c.Node(2), "/healthz", &hz); err == nil {
		t.Fatalf("a stopped server answered /healthz: %+v", hz)
	}
	step = time.Now()
	c.WaitReady() // the two others are ready without it
	t.Logf("SIGSTOP n2: the two others ready after %v", time.Since(step).Round(time.Millisecond))
	step = time.Now()
	c.Cont(2)
	c.WaitReady()
	t.Logf("SIGCONT n2: cluster ready after %v", time.Since(step).Round(time.Millisecond))
	if err := c.monitor(c.Node(2), "/healthz", &hz); err != nil || hz.Status != "ok" {
		t.Fatalf("after SIGCONT: %+v %v", hz, err)
	}

	rolled := time.Now()
	c.RollingRestart()
	t.Logf("rolling restart of 3 servers: %v", time.Since(rolled).Round(time.Millisecond))
	if n := msgs(t, js, "T"); n != 10 {
		t.Fatalf("stream T holds %d messages after the rolling restart, want 10", n)
	}
	for i := range 3 {
		if !strings.Contains(Tail(c.Node(i).LogFile, 1000), "=== natstest: "+c.Node(i).Name+" run 2") {
			t.Errorf("%s was not restarted by RollingRestart", c.Node(i).Name)
		}
	}
}

// TestClusterDetectsCrash: a server that exits by itself (here: its port
// taken on restart) fails the wait at once with its log, instead of the
// wait running out.
func TestClusterDetectsCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("cluster test: skipped with -short")
	}
	c := StartCluster(t, 1, ClusterTimeout(10*time.Second))
	c.Shutdown(0)
	if err := c.Ready(); err == nil || errors.Is(err, errExited) {
		t.Fatalf("Ready after a shutdown: %v (want not ready, not a crash)", err)
	}
	// Break the configuration: the server exits with status 1.
	nd := c.Node(0)
	if err := os.WriteFile(nd.ConfigFile, []byte("jetstream { store_dir: \n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := c.spawn(nd); err != nil {
		t.Fatal(err)
	}
	var err error
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if err = c.Ready(); errors.Is(err, errExited) {
			break
		}
	}
	if !errors.Is(err, errExited) {
		t.Fatalf("Ready with a crashed server: %v", err)
	}
}

// TestLockFile: a second holder waits for the first, and gives up after its
// bound.
func TestLockFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.lock")
	unlock, err := lockFile(path, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := lockFile(path, 100*time.Millisecond); err == nil {
		t.Fatal("a second lock while the first is held")
	}
	var got atomic.Bool
	done := make(chan error, 1)
	go func() {
		u, err := lockFile(path, 5*time.Second)
		if err == nil {
			got.Store(true)
			u()
		}
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // the waiter polls meanwhile (not synchronization: checked below)
	if got.Load() {
		t.Fatal("the waiter took the lock while it was held")
	}
	unlock()
	if err := <-done; err != nil || !got.Load() {
		t.Fatalf("waiter after unlock: %v", err)
	}
}

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return c
}

func msgs(t *testing.T, js jetstream.JetStream, stream string) uint64 {
	t.Helper()
	st, err := js.Stream(ctx(t), stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}
