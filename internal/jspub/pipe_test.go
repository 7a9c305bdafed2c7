package jspub

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
)

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// outcomes records what a Pipe's completion received, by token, and fails
// the test if one token completes twice.
type outcomes struct {
	t       *testing.T
	mu      sync.Mutex
	replies map[int]*nats.Msg
	errs    map[int]error
	order   []int
}

func newOutcomes(t *testing.T) *outcomes {
	return &outcomes{t: t, replies: map[int]*nats.Msg{}, errs: map[int]error{}}
}

func (o *outcomes) complete(tok int, _ string, m *nats.Msg, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, dup := o.errs[tok]; dup {
		panic(fmt.Sprintf("request %d completed twice", tok))
	}
	o.replies[tok], o.errs[tok] = m, err
	o.order = append(o.order, tok)
}

// wait polls until request tok completed and returns its outcome.
func (o *outcomes) wait(tok int) (*nats.Msg, error) {
	o.t.Helper()
	poll.Eventually(o.t, 10*time.Second, fmt.Sprint("request ", tok, " completed"), func() bool {
		o.mu.Lock()
		defer o.mu.Unlock()
		_, ok := o.errs[tok]
		return ok
	})
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.replies[tok], o.errs[tok]
}

func newPipe(t *testing.T, nc *nats.Conn, cfg Config, o *outcomes) *Pipe[int] {
	t.Helper()
	p, err := New(nc, cfg, o.complete)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(testCtx(t)); err != nil {
			t.Error(err)
		}
	})
	return p
}

// capture takes subject on nc with a plain subscriber, so the test decides
// when and how requests to it are answered.
func capture(t *testing.T, nc *nats.Conn, subject string) *nats.Subscription {
	t.Helper()
	sub, err := nc.SubscribeSync(subject)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return sub
}

func nextMsg(t *testing.T, sub *nats.Subscription) *nats.Msg {
	t.Helper()
	m, err := sub.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func answer(t *testing.T, nc *nats.Conn, reply, body string) {
	t.Helper()
	if err := nc.Publish(reply, []byte(body)); err != nil {
		t.Fatal(err)
	}
}

// isAll reports whether err wraps every one of targets.
func isAll(err error, targets ...error) bool {
	for _, target := range targets {
		if !errors.Is(err, target) {
			return false
		}
	}
	return err != nil
}

// With one slot, the second request reuses the first one's slot. A late
// reply to the first request's subject (and replies with tokens that name
// no slot) must not complete the second: only its own reply does.
func TestPipeIgnoresStaleReplyForReusedSlot(t *testing.T) {
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	sub := capture(t, nc, "req.>")
	o := newOutcomes(t)
	p := newPipe(t, nc, Config{MaxPending: 1}, o)

	p.Send(testCtx(t), "req.1", nil, []byte("a"), 1)
	first := nextMsg(t, sub)
	answer(t, nc, first.Reply, "one")
	if m, err := o.wait(1); err != nil || string(m.Data) != "one" {
		t.Fatalf("first request: %v, %v", m, err)
	}
	p.Send(testCtx(t), "req.2", nil, []byte("b"), 2)
	second := nextMsg(t, sub)
	if second.Reply == first.Reply {
		t.Fatalf("reused slot got the same reply subject %q", second.Reply)
	}
	answer(t, nc, first.Reply, "stale")
	answer(t, nc, p.prefix+"zz", "no such slot")
	answer(t, nc, p.prefix+"not-a-token", "garbage")
	// Replies arrive in the order they were sent: the stale ones first.
	answer(t, nc, second.Reply, "two")
	if m, err := o.wait(2); err != nil || string(m.Data) != "two" {
		t.Fatalf("second request: %v, %v; want its own reply", m, err)
	}
}

// At the cap, Send blocks until a slot frees; one blocked when the pipe is
// stopped fails as not sent, one whose ctx ends too; Close's deadline cuts
// the outstanding request short, as not answered.
func TestPipeBackPressureStopAndClose(t *testing.T) {
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	sub := capture(t, nc, "req.>")
	o := newOutcomes(t)
	p, err := New(nc, Config{MaxPending: 1}, o.complete)
	if err != nil {
		t.Fatal(err)
	}
	p.Send(testCtx(t), "req.1", nil, nil, 1)
	nextMsg(t, sub)

	cctx, cancel := context.WithCancel(context.Background())
	cancel()
	p.Send(cctx, "req.2", nil, nil, 2)
	if _, err := o.wait(2); !isAll(err, ErrNotSent, context.Canceled) {
		t.Fatalf("blocked Send with an ended ctx: %v, want ErrNotSent and context.Canceled", err)
	}

	sent := make(chan struct{})
	go func() {
		defer close(sent)
		p.Send(testCtx(t), "req.3", nil, nil, 3)
	}()
	poll.Eventually(t, 10*time.Second, "third Send blocked", func() bool { return p.Stats().Blocked == 1 })
	if s := p.Stats(); s.Outstanding != 1 || s.Down {
		t.Fatalf("stats %+v, want 1 outstanding and the link up", s)
	}
	p.Stop()
	<-sent
	if _, err := o.wait(3); !isAll(err, ErrNotSent, ErrClosed) {
		t.Fatalf("Send blocked at Stop: %v, want ErrNotSent and ErrClosed", err)
	}
	p.Send(testCtx(t), "req.4", nil, nil, 4)
	if _, err := o.wait(4); !isAll(err, ErrNotSent, ErrClosed) {
		t.Fatalf("Send after Stop: %v, want ErrNotSent and ErrClosed", err)
	}

	if err := p.Close(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close with an ended ctx and a request outstanding: %v, want context.Canceled", err)
	}
	if _, err := o.wait(1); !isAll(err, ErrNoReply, ErrClosed) || errors.Is(err, ErrNotSent) {
		t.Fatalf("request cut short by Close: %v, want ErrNoReply and ErrClosed", err)
	}
	if err := p.Close(testCtx(t)); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// A request whose reply never comes fails after the timeout, as not
// answered, and frees its slot; a reply coming after that is ignored.
func TestPipeTimeout(t *testing.T) {
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	sub := capture(t, nc, "req.>")
	o := newOutcomes(t)
	p := newPipe(t, nc, Config{MaxPending: 1, Timeout: 100 * time.Millisecond}, o)
	start := time.Now()
	p.Send(testCtx(t), "req.1", nil, nil, 1)
	late := nextMsg(t, sub)
	_, err := o.wait(1)
	if !isAll(err, ErrNoReply, ErrTimeout) {
		t.Fatalf("unanswered request: %v, want ErrNoReply and ErrTimeout", err)
	}
	if waited := time.Since(start); waited < 100*time.Millisecond {
		t.Fatalf("timed out after %v, before the timeout", waited)
	}
	answer(t, nc, late.Reply, "late")
	p.Send(testCtx(t), "req.2", nil, nil, 2)
	answer(t, nc, nextMsg(t, sub).Reply, "own")
	if m, err := o.wait(2); err != nil || string(m.Data) != "own" {
		t.Fatalf("request after a timeout: %v, %v; want its own reply", m, err)
	}
}

// When the connection drops, outstanding requests fail at once as not
// answered; while it is down, requests fail at once as not sent and no copy
// reaches the server after the reconnect.
func TestPipeConnectionDown(t *testing.T) {
	srv := natstest.Start(t)
	nc, js := srv.Connect(t, nats.MaxReconnects(-1), nats.ReconnectWait(20*time.Millisecond))
	if _, err := js.CreateStream(testCtx(t), jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}, Storage: jetstream.FileStorage}); err != nil {
		t.Fatal(err)
	}
	capture(t, nc, "req.>")
	o := newOutcomes(t)
	p := newPipe(t, nc, Config{}, o)
	p.Send(testCtx(t), "req.1", nil, nil, 1)
	poll.Eventually(t, 10*time.Second, "request outstanding", func() bool { return p.Stats().Outstanding == 1 })

	srv.Shutdown()
	srv.WaitForShutdown()
	if _, err := o.wait(1); !isAll(err, ErrNoReply, nats.ErrDisconnected) {
		t.Fatalf("request outstanding at the disconnect: %v, want ErrNoReply and nats.ErrDisconnected", err)
	}
	poll.Eventually(t, 10*time.Second, "pipe sees the link down", func() bool { return p.Stats().Down })
	p.Send(testCtx(t), "s.during", nil, []byte("x"), 2)
	if _, err := o.wait(2); !isAll(err, ErrNotSent, nats.ErrDisconnected) {
		t.Fatalf("request while down: %v, want ErrNotSent and nats.ErrDisconnected", err)
	}

	srv.Restart(t)
	poll.Eventually(t, 10*time.Second, "reconnected", nc.IsConnected)
	tok := 3
	poll.Eventually(t, 10*time.Second, "a publish after the reconnect", func() bool {
		p.Send(testCtx(t), "s.after", nil, []byte("y"), tok)
		m, err := o.wait(tok)
		tok++
		if err != nil {
			return false
		}
		_, err = ReadAck(m)
		return err == nil
	})
	st, err := js.Stream(testCtx(t), "S")
	if err != nil {
		t.Fatal(err)
	}
	info, err := st.Info(testCtx(t), jetstream.WithSubjectFilter("s.>"))
	if err != nil {
		t.Fatal(err)
	}
	if info.State.Subjects["s.during"] != 0 || info.State.Subjects["s.after"] != 1 {
		t.Fatalf("stream holds %v, want s.after once and no s.during", info.State.Subjects)
	}
}

// Requests from many goroutines through a few slots each complete once,
// with their own reply.
func TestPipeConcurrent(t *testing.T) {
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	responder, _ := srv.Connect(t)
	echo, err := responder.Subscribe("echo.*", func(m *nats.Msg) { _ = m.Respond(m.Data) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = echo.Unsubscribe() })
	if err := responder.Flush(); err != nil {
		t.Fatal(err)
	}
	o := newOutcomes(t)
	p := newPipe(t, nc, Config{MaxPending: 8, Timeout: 10 * time.Second}, o)
	const workers, each = 4, 250
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				n := w*each + i
				p.Send(testCtx(t), fmt.Sprint("echo.", w), nil, []byte(fmt.Sprint(n)), n)
			}
		})
	}
	wg.Wait()
	for n := range workers * each {
		if m, err := o.wait(n); err != nil || string(m.Data) != fmt.Sprint(n) {
			t.Fatalf("request %d: %v, %v", n, m, err)
		}
	}
}

func TestNewRejects(t *testing.T) {
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	o := newOutcomes(t)
	if _, err := New(nc, Config{MaxPending: MaxPendingLimit + 1}, o.complete); err == nil {
		t.Fatal("MaxPending over the limit accepted")
	}
	if _, err := New[int](nil, Config{}, o.complete); err == nil {
		t.Fatal("nil connection accepted")
	}
	if _, err := New[int](nc, Config{}, nil); err == nil {
		t.Fatal("nil completion accepted")
	}
}
