package natsjs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// states records OnStateChange reports.
type states struct {
	mu  sync.Mutex
	got []bool
}

func (s *states) report(up bool) {
	s.mu.Lock()
	s.got = append(s.got, up)
	s.mu.Unlock()
}

func (s *states) list() []bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]bool(nil), s.got...)
}

func (s *states) last() (up, ok bool) {
	l := s.list()
	if len(l) == 0 {
		return false, false
	}
	return l[len(l)-1], true
}

func connect(t *testing.T, cfg BrokerConfig) (*nats.Conn, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nc, err := Connect(ctx, cfg, quiet)
	if err == nil {
		t.Cleanup(nc.Close)
	}
	return nc, err
}

func TestConnectReportsStateAndReconnectsAfterRestart(t *testing.T) {
	srv := natstest.Start(t)
	var st states
	nc, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL, OnStateChange: st.report})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "reported up", func() bool { up, ok := st.last(); return ok && up })
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	stream := createStream(t, js, "R", "r.>")
	if _, err := js.Publish(testCtx(t), "r.1", []byte("before")); err != nil {
		t.Fatal(err)
	}

	srv.Shutdown()
	srv.WaitForShutdown()
	eventually(t, 10*time.Second, "reported down", func() bool { up, ok := st.last(); return ok && !up })

	srv.Restart(t)
	eventually(t, 20*time.Second, "reported up again", func() bool { up, _ := st.last(); return up })
	if _, err := js.Publish(testCtx(t), "r.2", []byte("after")); err != nil {
		t.Fatal(err)
	}
	if n := streamMsgs(t, stream); n != 2 {
		t.Fatalf("stream holds %d messages after restart, want 2", n)
	}
	if got := st.list(); len(got) != 3 || !got[0] || got[1] || !got[2] {
		t.Fatalf("state reports %v, want [true false true]: one per change", got)
	}
}

func TestConnectUserPassword(t *testing.T) {
	srv := natstest.Start(t, func(o *server.Options) { o.Username, o.Password = "bridge", "s3cret" })
	if _, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL, User: "bridge", Password: "s3cret"}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL, User: "bridge", Password: "wrong"})
	if !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("wrong password: err = %v, want nats.ErrAuthorization", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatalf("wrong password was retried for %s; it cannot succeed", time.Since(start))
	}
	t.Logf("wrong password: %v", err)
}

func TestConnectToken(t *testing.T) {
	srv := natstest.Start(t, func(o *server.Options) { o.Authorization = "tok-123" })
	if _, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL, Token: "tok-123"}); err != nil {
		t.Fatal(err)
	}
	if _, err := connect(t, BrokerConfig{Name: "nats", URL: srv.URL}); !errors.Is(err, nats.ErrAuthorization) {
		t.Fatalf("no token: err = %v, want nats.ErrAuthorization", err)
	}
}

func TestConnectTLSWithClientCert(t *testing.T) {
	p := natstest.NewPKI(t)
	srv := natstest.Start(t, func(o *server.Options) {
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{
			CertFile: p.ServerCert, KeyFile: p.ServerKey, CaFile: p.CA, Verify: true,
		})
		if err != nil {
			t.Fatal(err)
		}
		o.TLSConfig, o.TLS, o.TLSVerify = tc, true, true
	})
	good := &TLSConfig{CA: p.CA, Cert: p.ClientCert, Key: p.ClientKey}
	nc, err := connect(t, BrokerConfig{Name: "secure", URL: srv.URL, TLS: good})
	if err != nil {
		t.Fatal(err)
	}
	if !nc.TLSRequired() {
		t.Fatal("connection is not using TLS")
	}
	createStream(t, mustJS(t, nc), "T", "t.>")

	for _, tc := range []struct {
		name string
		cfg  BrokerConfig
	}{
		{"no tls config", BrokerConfig{Name: "secure", URL: strings.Replace(srv.URL, "tls://", "nats://", 1)}},
		{"system roots only", BrokerConfig{Name: "secure", URL: srv.URL}},
		{"no client cert", BrokerConfig{Name: "secure", URL: srv.URL, TLS: &TLSConfig{CA: p.CA}}},
		{"unknown CA", BrokerConfig{Name: "secure", URL: srv.URL, TLS: &TLSConfig{Cert: p.ClientCert, Key: p.ClientKey}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A refused handshake is final and returns at once; the deadline
			// only has to outlast a slow handshake on a loaded machine, which
			// Connect would retry (and then fail this test by reaching it).
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			nc, err := Connect(ctx, tc.cfg, quiet)
			if err == nil {
				nc.Close()
				t.Fatal("connected without valid TLS credentials")
			}
			if errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("retried until the deadline instead of failing: %v", err)
			}
			t.Logf("%s: %v", tc.name, err)
		})
	}
}

func TestConnectConfigErrors(t *testing.T) {
	p := natstest.NewPKI(t)
	for _, tc := range []struct {
		name string
		cfg  BrokerConfig
	}{
		{"no url", BrokerConfig{Name: "n"}},
		{"token and user", BrokerConfig{Name: "n", URL: "nats://127.0.0.1:1", Token: "t", User: "u"}},
		{"password without user", BrokerConfig{Name: "n", URL: "nats://127.0.0.1:1", Password: "p"}},
		{"missing CA file", BrokerConfig{Name: "n", URL: "nats://127.0.0.1:1", TLS: &TLSConfig{CA: p.CA + ".missing"}}},
		{"cert without key", BrokerConfig{Name: "n", URL: "nats://127.0.0.1:1", TLS: &TLSConfig{Cert: p.ClientCert}}},
		{"CA is not PEM", BrokerConfig{Name: "n", URL: "nats://127.0.0.1:1", TLS: &TLSConfig{CA: "conn_test.go"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Connect(context.Background(), tc.cfg, quiet)
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("err = %v, want ErrConfig", err)
			}
		})
	}
}

func TestConnectRetriesUntilContextEnds(t *testing.T) {
	srv := natstest.Start(t)
	url := srv.URL
	srv.Shutdown()
	srv.WaitForShutdown()
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err := Connect(ctx, BrokerConfig{Name: "down", URL: url}, quiet)
	if !errors.Is(err, nats.ErrNoServers) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want no servers + deadline exceeded", err)
	}
}

// TestConnectRetriesUnresolvableHost: a server name that does not resolve
// (yet: its pod is starting) is retried like a refused connection, each
// attempt reported, until the context ends.
func TestConnectRetriesUnresolvableHost(t *testing.T) {
	var mu sync.Mutex
	var attempts []error
	ctx, cancel := context.WithTimeout(context.Background(), 700*time.Millisecond)
	defer cancel()
	_, err := Connect(ctx, BrokerConfig{Name: "dns", URL: "nats://cellbridge-no-such-host.invalid:4222", ReconnectWait: 100 * time.Millisecond,
		OnRequestError: func(err error) { mu.Lock(); attempts = append(attempts, err); mu.Unlock() }}, quiet)
	var dnsErr *net.DNSError
	if !errors.As(err, &dnsErr) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the DNS error, retried until the deadline", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(attempts) < 2 {
		t.Fatalf("%d attempts reported, want it retried", len(attempts))
	}
	if msg := attempts[0].Error(); !strings.HasPrefix(msg, "connecting to broker dns (nats://cellbridge-no-such-host.invalid:4222): attempt 1 failed: ") ||
		!strings.Contains(msg, "; retrying in ") {
		t.Errorf("first attempt reported as %q", msg)
	}
}

// TestConnectWaitsForTheServer: nothing listens on the port at first; the
// connect succeeds once a server starts there, without a new call.
func TestConnectWaitsForTheServer(t *testing.T) {
	port := natstest.FreePorts(t, 1)[0]
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	var reported atomic.Int32
	type result struct {
		nc  *nats.Conn
		err error
	}
	done := make(chan result, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		nc, err := Connect(ctx, BrokerConfig{Name: "late", URL: url, OnRequestError: func(error) { reported.Add(1) }}, quiet)
		done <- result{nc, err}
	}()
	eventually(t, 10*time.Second, "failed attempts reported", func() bool { return reported.Load() >= 2 })
	natstest.Start(t, func(o *server.Options) { o.Port = port })
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatal(r.err)
		}
		r.nc.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("not connected within 10s of the server's start")
	}
}

func TestRedactURL(t *testing.T) {
	if got := redactURL("nats://u:secret@host:4222"); got != "nats://u:xxxxx@host:4222" {
		t.Fatalf("redactURL = %q", got)
	}
	if got := redactURL("nats://host:4222"); got != "nats://host:4222" {
		t.Fatalf("redactURL = %q", got)
	}
}

func mustJS(t testing.TB, nc *nats.Conn) jetstream.JetStream {
	t.Helper()
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// TestConnectListedOrder: with ListedOrder the client takes the servers in
// the order of the URL list, on the first connection and on a reconnect,
// so that a replica can prefer a server (and a test knows where a replica
// is attached).
func TestConnectListedOrder(t *testing.T) {
	srvs := []*natstest.Server{natstest.Start(t), natstest.Start(t), natstest.Start(t)}
	url := srvs[0].URL + "," + srvs[1].URL + "," + srvs[2].URL
	for range 5 {
		nc, err := connect(t, BrokerConfig{Name: "nats", URL: url, ListedOrder: true})
		if err != nil {
			t.Fatal(err)
		}
		if got := nc.ConnectedUrl(); got != srvs[0].URL {
			t.Fatalf("connected to %s, want the first listed %s", got, srvs[0].URL)
		}
		nc.Close()
	}
	nc, err := connect(t, BrokerConfig{Name: "nats", URL: url, ListedOrder: true, ReconnectWait: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	srvs[0].Shutdown()
	eventually(t, 10*time.Second, "reconnected to the second listed server", func() bool {
		return nc.IsConnected() && nc.ConnectedUrl() == srvs[1].URL
	})
}
