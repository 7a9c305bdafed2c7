//go:build unix

package natsjs

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

// failReports records a Source's OnFailing reports with their times.
type failReports struct {
	mu     sync.Mutex
	events []failReport
}

type failReport struct {
	at  time.Time
	err error
}

func (f *failReports) report(err error) {
	f.mu.Lock()
	f.events = append(f.events, failReport{time.Now(), err})
	f.mu.Unlock()
}

// firstFailure is the first failure reported after t0.
func (f *failReports) firstFailure(t0 time.Time) (failReport, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, e := range f.events {
		if e.err != nil && e.at.After(t0) {
			return e, true
		}
	}
	return failReport{}, false
}

// clearedAfter reports the time of the last report if it is a clear after t0.
func (f *failReports) clearedAfter(t0 time.Time) (time.Time, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if n := len(f.events); n > 0 && f.events[n-1].err == nil && f.events[n-1].at.After(t0) {
		return f.events[n-1].at, true
	}
	return time.Time{}, false
}

// arrivals records the first delivery time of each published sequence and
// acks every delivery.
type arrivals struct {
	mu    sync.Mutex
	first map[int]time.Time
	order []int // sequences in order of first arrival
	n     int   // deliveries, repeats included
}

func (a *arrivals) handle(_ context.Context, m *bridge.Message, ack bridge.Ack) error {
	seq, err := strconv.Atoi(string(m.Body))
	if err != nil {
		return ack(context.Background(), err)
	}
	a.mu.Lock()
	a.n++
	if _, ok := a.first[seq]; !ok {
		a.first[seq] = time.Now()
		a.order = append(a.order, seq)
	}
	a.mu.Unlock()
	if m.Epoch.Revoked() {
		return ack(context.Background(), bridge.ErrRevoked)
	}
	return ack(context.Background(), nil)
}

func (a *arrivals) seen(seq int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	_, ok := a.first[seq]
	return ok
}

// all reports whether every sequence below n arrived (unordered mode
// delivers the ones lost in transit after later ones).
func (a *arrivals) all(n int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range n {
		if _, ok := a.first[i]; !ok {
			return false
		}
	}
	return true
}

// feeder publishes "0", "1", ... to orders.k every gap on its own
// connection and remembers when each was stored.
type feeder struct {
	mu   sync.Mutex
	sent []time.Time
	stop chan struct{}
	done chan struct{}
}

func startFeeder(t *testing.T, js jetstream.JetStream, gap time.Duration) *feeder {
	f := &feeder{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(f.done)
		for i := 0; ; i++ {
			select {
			case <-f.stop:
				return
			case <-time.After(gap):
			}
			for {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				_, err := js.Publish(ctx, "orders.k", []byte(strconv.Itoa(i)), jetstream.WithMsgID(strconv.Itoa(i)))
				cancel()
				if err == nil {
					break
				}
				select {
				case <-f.stop:
					return
				default:
				}
			}
			f.mu.Lock()
			f.sent = append(f.sent, time.Now())
			f.mu.Unlock()
		}
	}()
	t.Cleanup(f.halt)
	return f
}

// halt stops publishing and returns how many messages were stored.
func (f *feeder) halt() {
	select {
	case <-f.stop:
	default:
		close(f.stop)
	}
	<-f.done
}

func (f *feeder) stored() []time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]time.Time(nil), f.sent...)
}

// frozenServerFault runs a source of the given ordering attached to server
// 0 of a 3-node cluster, whose stream and consumer are led by server 1 and
// fed through server 2, and freezes server 0 (SIGSTOP) while messages flow.
// The client's pings are the old 10s×3, so that only the source's own
// reaction to missed heartbeats can notice the frozen server in time.
// It checks that the source reports failing within 5s, delivers again
// (on another server) and clears the report, and that every message
// arrives, first copies in stream order, and returns the worst lateness.
func frozenServerFault(t *testing.T, cfg SourceConfig) (failAfter, recoverAfter, worst time.Duration) {
	c := natstest.StartCluster(t, 3)
	c.AddStream(jetstream.StreamConfig{Name: "ORDERS", Subjects: []string{"orders.>"}, Duplicates: time.Minute})
	nc, err := connect(t, BrokerConfig{Name: "nats", URL: c.Node(0).URL, PingInterval: 10 * time.Second, MaxPingsOut: 3})
	if err != nil {
		t.Fatal(err)
	}
	js := mustJS(t, nc)
	var fails failReports
	cfg.OnFailing = fails.report
	var fenceMu sync.Mutex
	var fences []string // the reason of every fence, in order
	cfg.OnState = func(st SourceState) {
		fenceMu.Lock()
		defer fenceMu.Unlock()
		if int(st.Fences) > len(fences) {
			fences = append(fences, st.LastFence)
		}
	}
	src := newSource(t, js, cfg)
	c.MoveStreamLeader("ORDERS", 1)
	c.MoveConsumerLeader("ORDERS", cfg.Durable, 1)

	pc, err := nats.Connect(c.Node(2).URL, natstest.ClientOptions("feeder")...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pc.Close)
	feed := startFeeder(t, mustJS(t, pc), 20*time.Millisecond)
	a := &arrivals{first: map[int]time.Time{}}
	run(t, src, a.handle)
	eventually(t, 20*time.Second, "deliveries flowing", func() bool { return a.seen(20) })

	t0 := time.Now()
	c.Stop(0)
	t.Cleanup(func() { c.Cont(0) })
	eventually(t, 10*time.Second, "the source reports failing", func() bool { _, ok := fails.firstFailure(t0); return ok })
	f, _ := fails.firstFailure(t0)
	failAfter = f.at.Sub(t0)
	t.Logf("failing reported %v after SIGSTOP: %v", failAfter.Round(time.Millisecond), f.err)
	if failAfter > 5*time.Second {
		t.Errorf("failing reported %v after the server froze, want within 5s", failAfter)
	}
	eventually(t, 30*time.Second, "delivering again and the failure cleared", func() bool {
		_, ok := fails.clearedAfter(f.at)
		return ok && a.seen(len(feed.stored())-1)
	})
	cleared, _ := fails.clearedAfter(f.at)
	recoverAfter = cleared.Sub(t0)
	if nc.ConnectedUrl() == c.Node(0).URL || nc.Stats().Reconnects == 0 {
		t.Errorf("connected to %s after %d reconnects: want another server", nc.ConnectedUrl(), nc.Stats().Reconnects)
	}
	time.Sleep(time.Second) // messages keep flowing after the recovery
	feed.halt()
	sent := feed.stored()
	eventually(t, 60*time.Second, "every message delivered", func() bool { return a.all(len(sent)) })

	a.mu.Lock()
	defer a.mu.Unlock()
	for i, at := range sent {
		first, ok := a.first[i]
		if !ok {
			t.Fatalf("message %d never delivered", i)
		}
		worst = max(worst, first.Sub(at))
	}
	for i := 1; i < len(a.order); i++ {
		if a.order[i] < a.order[i-1] && cfg.Ordering != Unordered {
			t.Fatalf("first deliveries out of stream order: %d after %d", a.order[i], a.order[i-1])
		}
	}
	fenceMu.Lock()
	defer fenceMu.Unlock()
	t.Logf("%d messages; failing after %v, cleared after %v; worst lateness %v; %d deliveries; %d reconnects; now on %s; fences: %q",
		len(sent), failAfter.Round(time.Millisecond), recoverAfter.Round(time.Millisecond), worst.Round(time.Millisecond),
		a.n, nc.Stats().Reconnects, nc.ConnectedUrl(), fences)
	if cfg.Ordering != Unordered && slices.Contains(fences, "reconnected") {
		// The missed heartbeats fence the epoch; the reconnect that
		// follows comes during the consumer reset, whose successful
		// attempt goes out on the new connection: the epoch it starts
		// is not fenced again for that reconnect.
		t.Errorf("an epoch started on the new connection was fenced for the reconnect: fences %q", fences)
	}
	return failAfter, recoverAfter, worst
}

// TestOrderedSourceFrozenServer: the server a replica is attached to
// freezes. Missed pull heartbeats fence the epoch and report the source
// failing; the connection is found dead (no PONG) and reconnected to
// another server at once; the consumer is reset to its ack floor, so what
// was lost in transit comes back in order within seconds, not AckWait.
func TestOrderedSourceFrozenServer(t *testing.T) {
	cfg := orderedConfig()
	_, recoverAfter, worst := frozenServerFault(t, cfg)
	if worst > 10*time.Second || recoverAfter > 10*time.Second {
		t.Errorf("recovered after %v, worst lateness %v: want both within 10s (AckWait is %v)", recoverAfter, worst, cfg.AckWait)
	}
}

// TestUnorderedSourceFrozenServer: as above on the shared durable. The
// failure is reported and cleared the same way; deliveries lost in transit
// to the frozen server come back only after AckWait (docs/guarantees.md),
// so the worst lateness is about AckWait.
func TestUnorderedSourceFrozenServer(t *testing.T) {
	cfg := orderedConfig()
	cfg.Ordering = Unordered
	cfg.AckWait = 3 * time.Second
	_, recoverAfter, worst := frozenServerFault(t, cfg)
	if recoverAfter > 10*time.Second || worst > cfg.AckWait+10*time.Second {
		t.Errorf("recovered after %v, worst lateness %v: want within 10s, and AckWait (%v) plus 10s", recoverAfter, worst, cfg.AckWait)
	}
}

// TestNewSourceDuringMetaElection creates a source while the cluster
// elects a new meta leader (the old one was killed a moment before), as a
// replica restarted at that moment does: the consumer lookup and creation
// find no leader, each attempt is bounded, reported and retried, and the
// source is made once the election is over, instead of one request eating
// the caller's whole deadline.
func TestNewSourceDuringMetaElection(t *testing.T) {
	c := natstest.StartCluster(t, 3)
	c.AddStream(jetstream.StreamConfig{Name: "ORDERS", Subjects: []string{"orders.>"}})
	meta := c.MetaLeader()
	var urls []string
	for i, u := range c.URLs() {
		if i != meta {
			urls = append(urls, u)
		}
	}
	nc, err := connect(t, BrokerConfig{Name: "nats", URL: strings.Join(urls, ",")})
	if err != nil {
		t.Fatal(err)
	}
	js := mustJS(t, nc)
	var mu sync.Mutex
	var attempts []error
	cfg := orderedConfig()
	cfg.RequestTimeout = 500 * time.Millisecond
	cfg.OnRequestError = func(err error) { mu.Lock(); attempts = append(attempts, err); mu.Unlock() }
	c.Kill(meta)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	src, err := NewSource(ctx, js, cfg, quiet)
	took := time.Since(start)
	if err != nil {
		t.Fatalf("NewSource during the election: %v (after %v)", err, took)
	}
	_ = src.Close(testCtx(t))
	mu.Lock()
	defer mu.Unlock()
	t.Logf("source made %v after the meta leader was killed, %d failed attempts first", took.Round(time.Millisecond), len(attempts))
	for _, err := range attempts {
		t.Logf("  %v", err)
	}
	if took > 20*time.Second {
		t.Errorf("took %v", took)
	}
}

// TestWriteTimeoutFrozenServerUnderLoad: a server that stops reading while
// the client publishes as fast as it can. The socket's buffers fill, the
// next write blocks with the client's lock held, and the pings that would
// find the link dead wait behind it; without a write timeout the client
// stays "connected" for the client library's default minute. With
// WriteTimeout the write fails, and the client reconnects to another
// server of the list within seconds.
func TestWriteTimeoutFrozenServerUnderLoad(t *testing.T) {
	c := natstest.StartCluster(t, 3)
	cfg := BrokerConfig{Name: "nats", URL: c.URL(), ListedOrder: true, WriteTimeout: 500 * time.Millisecond}
	nc, err := connect(t, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if nc.ConnectedUrl() != c.Node(0).URL {
		t.Fatalf("connected to %s, want the first listed server %s", nc.ConnectedUrl(), c.Node(0).URL)
	}
	payload := make([]byte, 1024)
	var mu sync.Mutex
	var longest time.Duration
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			default:
			}
			t0 := time.Now()
			_ = nc.Publish("load.x", payload)
			mu.Lock()
			longest = max(longest, time.Since(t0))
			mu.Unlock()
		}
	}()
	time.Sleep(300 * time.Millisecond)
	t0 := time.Now()
	c.Stop(0)
	t.Cleanup(func() { c.Cont(0) })
	// The reconnect to another server can take milliseconds: the link
	// counts as given up once the client is no longer on server 0 (while
	// it reconnects, it is on none).
	eventually(t, 20*time.Second, "the link to the frozen server given up", func() bool { return nc.ConnectedUrl() != c.Node(0).URL })
	left := time.Since(t0)
	eventually(t, 20*time.Second, "reconnected to another server", func() bool {
		return nc.Status() == nats.CONNECTED && nc.ConnectedUrl() != c.Node(0).URL
	})
	back := time.Since(t0)
	close(stop)
	<-done
	mu.Lock()
	defer mu.Unlock()
	t.Logf("link given up %v after SIGSTOP (last error %v), reconnected to %s after %v; longest publish call %v",
		left.Round(time.Millisecond), nc.LastError(), nc.ConnectedUrl(), back.Round(time.Millisecond), longest.Round(time.Millisecond))
	// The pings (1s × 2) cannot act while a write blocks: only the write
	// timeout ends it. Without it this takes a minute.
	if left > 10*time.Second {
		t.Errorf("the link was given up %v after the server froze, want within seconds (WriteTimeout %v)", left, cfg.WriteTimeout)
	}
}
