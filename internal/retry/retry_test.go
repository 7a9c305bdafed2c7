package retry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/internal/syncbuf"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// reports collects a Policy's reports.
type reports struct {
	mu  sync.Mutex
	all []AttemptError
}

func (r *reports) add(ae *AttemptError) {
	r.mu.Lock()
	r.all = append(r.all, *ae)
	r.mu.Unlock()
}

func (r *reports) list() []AttemptError {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]AttemptError(nil), r.all...)
}

// syncBuffer is a log sink tests read while the code writes.
type syncBuffer = syncbuf.Buffer

// TestDoBoundsEachAttempt sends a JetStream API request that is never
// answered (a real server without JetStream, and a subscriber on the API
// subject that stays silent, as a server in an election does): each attempt
// ends after Policy.Timeout, is logged and reported with its number and the
// wait before the next, and the request gives up only when the caller's
// context ends.
func TestDoBoundsEachAttempt(t *testing.T) {
	srv := natstest.Start(t, func(o *server.Options) { o.JetStream = false })
	nc, js := srv.Connect(t)
	// Swallow stream info requests for stream S: no reply, no 503.
	sub, err := nc.Subscribe(jetstream.DefaultAPIPrefix+"STREAM.INFO.S", func(*nats.Msg) {})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	var logs syncBuffer
	var rep reports
	p := &Policy{Broker: "b1", Conn: nc, Timeout: 150 * time.Millisecond, Initial: 20 * time.Millisecond, Max: 40 * time.Millisecond,
		Log: slog.New(slog.NewTextHandler(&logs, nil)), Report: rep.add}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	var calls atomic.Int32
	_, err = Do(ctx, p, OpStreamInfo, "S", func(ctx context.Context) (jetstream.Stream, error) {
		calls.Add(1)
		return js.Stream(ctx, "S")
	})
	took := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "gave up") {
		t.Fatalf("err = %v, want the caller's deadline", err)
	}
	if took > 2*time.Second {
		t.Fatalf("took %v for a 1s context", took)
	}
	got := rep.list()
	if n := int(calls.Load()); n < 3 || len(got) != n {
		t.Fatalf("%d attempts, %d reports: want several attempts of 150ms in 1s, each reported", n, len(got))
	}
	for i, ae := range got {
		if ae.Attempt != i+1 || ae.Broker != "b1" || ae.Op != OpStreamInfo || ae.On != "S" || ae.URL != srv.URL {
			t.Errorf("report %d: %+v", i, ae)
		}
		if i < len(got)-1 && (ae.RetryIn < 20*time.Millisecond || ae.RetryIn > 50*time.Millisecond) {
			t.Errorf("report %d: retry in %v, want the backoff (20ms, 40ms cap, +25%% jitter)", i, ae.RetryIn)
		}
	}
	text := logs.String()
	for _, want := range []string{"broker request failed; retrying", "broker=b1", "url=" + srv.URL, "op=stream_info", "on=S", "attempt=1", "attempt=2", "retry_in=2"} {
		if !strings.Contains(text, want) {
			t.Errorf("log lacks %q:\n%s", want, text)
		}
	}
}

// TestDoStopsOnPermanentError: a stream that does not exist is an answer,
// not a reason to wait, and not a failed attempt to report.
func TestDoStopsOnPermanentError(t *testing.T) {
	srv := natstest.Start(t)
	nc, js := srv.Connect(t)
	var rep reports
	p := &Policy{Broker: "b1", Conn: nc, Report: rep.add}
	_, err := Do(context.Background(), p, OpStreamInfo, "MISSING", func(ctx context.Context) (jetstream.Stream, error) {
		return js.Stream(ctx, "MISSING")
	})
	if !errors.Is(err, jetstream.ErrStreamNotFound) || strings.Contains(err.Error(), "gave up") {
		t.Fatalf("err = %v, want stream not found at once", err)
	}
	if got := rep.list(); len(got) != 0 {
		t.Fatalf("reports %+v: an answer is not a failed attempt", got)
	}
}

// TestDoWaitsForTheConnection: while the server is down no attempt is made
// (a request in the client's reconnect buffer would arrive late); the
// request goes out once the client reconnected to the restarted server.
func TestDoWaitsForTheConnection(t *testing.T) {
	srv := natstest.Start(t)
	nc, err := nats.Connect(srv.URL, natstest.ClientOptions("retry-test")...)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateStream(context.Background(), jetstream.StreamConfig{Name: "S", Subjects: []string{"s"}}); err != nil {
		t.Fatal(err)
	}
	srv.Shutdown()
	srv.WaitForShutdown()
	poll.Eventually(t, 5*time.Second, "client notices the server is gone", func() bool { return !nc.IsConnected() })

	var rep reports
	var disconnectedCalls atomic.Int32
	p := &Policy{Broker: "b1", Conn: nc, Timeout: 200 * time.Millisecond, Initial: 10 * time.Millisecond, Max: 20 * time.Millisecond, Report: rep.add}
	done := make(chan error, 1)
	go func() {
		_, err := Do(context.Background(), p, OpStreamInfo, "S", func(ctx context.Context) (jetstream.Stream, error) {
			if !nc.IsConnected() {
				disconnectedCalls.Add(1)
			}
			return js.Stream(ctx, "S")
		})
		done <- err
	}()
	poll.Eventually(t, 5*time.Second, "failed attempts while down", func() bool { return len(rep.list()) >= 2 })
	for _, ae := range rep.list() {
		if !errors.Is(ae.Err, nats.ErrDisconnected) {
			t.Errorf("attempt while down: %v, want not connected", ae.Err)
		}
	}
	srv.Restart(t)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("after the restart: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no success within 10s of the restart")
	}
	if n := disconnectedCalls.Load(); n != 0 {
		t.Errorf("%d attempts were sent while disconnected", n)
	}
}

func TestTransient(t *testing.T) {
	dnsErr := &net.DNSError{Err: "no such host", Name: "nats-0.nats", IsNotFound: true}
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{context.DeadlineExceeded, true},
		{nats.ErrTimeout, true},
		{nats.ErrNoResponders, true},
		{nats.ErrNoServers, true},
		{fmt.Errorf("wrapped: %w", nats.ErrDisconnected), true},
		{&net.OpError{Op: "dial", Net: "tcp", Err: dnsErr}, true},
		{dnsErr, true},
		{&net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}, true},
		{&jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10009, Description: "JetStream cluster can not handle request"}, true},
		{&jetstream.APIError{Code: 500, ErrorCode: 10119, Description: "consumer is offline"}, true},
		{&jetstream.APIError{Code: 400, ErrorCode: 10005, Description: "insufficient resources"}, true},
		{&jetstream.APIError{Code: 429, ErrorCode: 10167, Description: "too many requests"}, true},
		{jetstream.ErrStreamNotFound, false},
		{jetstream.ErrConsumerNotFound, false},
		{&jetstream.APIError{Code: 400, ErrorCode: 10003, Description: "bad request"}, false},
		{&jetstream.APIError{Code: 500, ErrorCode: 10074, Description: "replicas > 1 not supported in non-clustered mode"}, false},
		{&jetstream.APIError{Code: 500, ErrorCode: 10012, Description: "start sequence can not be updated"}, false},
		{&jetstream.APIError{Code: 500, ErrorCode: 10012, Description: "consumer closed"}, true},
		{nats.ErrConnectionClosed, false},
		{nats.ErrAuthorization, false},
		{errors.New("remote error: tls: certificate required"), false},
		{errors.New("something else"), false},
	} {
		if got := Transient(tc.err); got != tc.want {
			t.Errorf("Transient(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestAttemptErrorText(t *testing.T) {
	ae := &AttemptError{Broker: "nats", URL: "nats://10.0.0.1:4222", Op: OpConnect, Attempt: 3, Err: nats.ErrNoServers, RetryIn: 400 * time.Millisecond}
	if got, want := ae.Error(), "connecting to broker nats (nats://10.0.0.1:4222): attempt 3 failed: nats: no servers available for connection; retrying in 400ms"; got != want {
		t.Errorf("connect:\n got %s\nwant %s", got, want)
	}
	ae = &AttemptError{Broker: "nats", URL: "nats://a:4222", Op: OpConsumerCreate, On: "ORDERS/cellbridge-orders", Attempt: 1, Err: context.DeadlineExceeded}
	if got, want := ae.Error(), "broker nats (nats://a:4222): consumer_create ORDERS/cellbridge-orders: attempt 1 failed: context deadline exceeded"; got != want {
		t.Errorf("consumer:\n got %s\nwant %s", got, want)
	}
	if !errors.Is(ae, context.DeadlineExceeded) {
		t.Error("AttemptError does not unwrap to its error")
	}
	if got := Redact("nats://u:secret@a:4222,nats://b:4222"); strings.Contains(got, "secret") || !strings.Contains(got, "nats://b:4222") {
		t.Errorf("Redact = %s", got)
	}
}
