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

func newClient(t *testing.T, nc *nats.Conn, cfg Config) *Client {
	t.Helper()
	c, err := NewClient(nc, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(testCtx(t)); err != nil {
			t.Error(err)
		}
	})
	return c
}

// echoServer answers "echo.*" with the request's data on a connection of
// its own.
func echoServer(t *testing.T, srv *natstest.Server) {
	t.Helper()
	responder, _ := srv.Connect(t)
	sub, err := responder.Subscribe("echo.*", func(m *nats.Msg) { _ = m.Respond(m.Data) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := responder.Flush(); err != nil {
		t.Fatal(err)
	}
}

// The reply plumbing of the synchronous form: a request that times out
// leaves nothing behind that a late reply could reach; many requests in
// flight at once each get their own reply; a caller that stops waiting gets
// a not-answered error and its call is recycled once the slot resolves.
func TestClientRequest(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	echoServer(t, srv)
	never := capture(t, nc, "never")
	c := newClient(t, nc, Config{MaxPending: 4, Timeout: 100 * time.Millisecond})

	_, err := c.Request(ctx, "never", nil, []byte("x"))
	if !isAll(err, ErrNoReply, ErrTimeout) {
		t.Fatalf("unanswered request: %v, want ErrNoReply and ErrTimeout", err)
	}
	answer(t, nc, nextMsg(t, never).Reply, "late")
	for i := range 5 {
		m, err := c.Request(ctx, "echo.x", nil, []byte(fmt.Sprint(i)))
		if err != nil || string(m.Data) != fmt.Sprint(i) {
			t.Fatalf("request %d after a timeout: %v, %v; want its own reply", i, m, err)
		}
	}

	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for w := range 50 {
		wg.Go(func() {
			want := fmt.Sprint("w", w)
			if m, err := c.Request(ctx, fmt.Sprint("echo.", w%5), nil, []byte(want)); err != nil || string(m.Data) != want {
				errs <- fmt.Errorf("worker %d: %v, %v", w, m, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	cctx, cancel := context.WithCancel(ctx)
	go func() {
		_, _ = never.NextMsg(10 * time.Second) // the request is out: stop waiting
		cancel()
	}()
	if _, err := c.Request(cctx, "never", nil, nil); !isAll(err, ErrNoReply, context.Canceled) {
		t.Fatalf("request whose caller stopped waiting: %v, want ErrNoReply and context.Canceled", err)
	}
	poll.Eventually(t, 10*time.Second, "the abandoned request's slot freed by the timeout", func() bool {
		return c.Stats().Outstanding == 0
	})
	if _, err := c.Request(cctx, "echo.x", nil, nil); !isAll(err, ErrNotSent, context.Canceled) {
		t.Fatalf("request with an ended ctx: %v, want ErrNotSent and context.Canceled", err)
	}
	if m, err := c.Request(ctx, "echo.x", nil, []byte("after")); err != nil || string(m.Data) != "after" {
		t.Fatalf("request after an abandoned one: %v, %v", m, err)
	}
}

// Close wakes a waiting request once its ctx ends, and requests after Close
// fail at once.
func TestClientClose(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	nc, _ := srv.Connect(t)
	never := capture(t, nc, "never")
	c, err := NewClient(nc, Config{})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := c.Request(ctx, "never", nil, []byte("x"))
		done <- err
	}()
	nextMsg(t, never)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := c.Close(cctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Close with an ended ctx and a request waiting: %v", err)
	}
	if err := <-done; !isAll(err, ErrClosed, ErrNoReply) {
		t.Fatalf("waiter woken by Close: %v, want ErrClosed and ErrNoReply", err)
	}
	if _, err := c.Request(ctx, "never", nil, nil); !isAll(err, ErrClosed, ErrNotSent) {
		t.Fatalf("request after Close: %v, want ErrClosed and ErrNotSent", err)
	}
	if err := c.Close(ctx); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

// Publish reads the stream's answers: stored, duplicate, refused by an
// expected-sequence check, no stream.
func TestClientPublish(t *testing.T) {
	ctx := testCtx(t)
	srv := natstest.Start(t)
	nc, js := srv.Connect(t)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}}); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, nc, Config{Timeout: 5 * time.Second})
	id := nats.Header{jetstream.MsgIDHeader: {"k1"}}
	if ack, err := c.Publish(ctx, "s.a", id, []byte("1")); err != nil || string(ack.Stream) != "S" || ack.Seq != 1 || ack.Duplicate {
		t.Fatalf("first publish: %+v, %v", ack, err)
	}
	if ack, err := c.Publish(ctx, "s.b", id, []byte("1")); err != nil || !ack.Duplicate || ack.Seq != 1 {
		t.Fatalf("repeat of k1: %+v, %v; want a duplicate of seq 1", ack, err)
	}
	create := nats.Header{jetstream.ExpectedLastSubjSeqHeader: {"0"}}
	_, err := c.Publish(ctx, "s.a", create, []byte("2"))
	var ae *jetstream.APIError
	if !errors.As(err, &ae) || ae.ErrorCode != jetstream.JSErrCodeStreamWrongLastSequence {
		t.Fatalf("create over an existing subject: %v, want wrong last sequence", err)
	}
	if _, err := c.Publish(ctx, "nowhere", nil, nil); !isAll(err, ErrNoStream, nats.ErrNoResponders) {
		t.Fatalf("publish to no stream: %v, want ErrNoStream", err)
	}
}
