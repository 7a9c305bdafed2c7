package natstest

import (
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/embedded"
)

// Server is a running embedded server for one test.
type Server struct {
	*server.Server
	// URL is the client URL (nats://127.0.0.1:port).
	URL string
	// StoreDir is where JetStream keeps its files; a restarted server
	// given the same dir finds its streams again.
	StoreDir string
	// Port is the client port (kept after a shutdown, for Restart).
	Port int
}

// Start runs a JetStream-enabled server on a random loopback port with its
// store in t.TempDir(); it is shut down when the test ends. tune may adjust
// options (TLS, auth) before start.
func Start(t testing.TB, tune ...func(*server.Options)) *Server {
	t.Helper()
	return StartDir(t, t.TempDir(), tune...)
}

// StartDir is Start with a given store directory, for restart tests.
func StartDir(t testing.TB, dir string, tune ...func(*server.Options)) *Server {
	t.Helper()
	s, err := embedded.Start(embedded.Options{Port: -1, StoreDir: dir, Tune: func(o *server.Options) {
		for _, f := range tune {
			f(o)
		}
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		s.Shutdown()
		s.WaitForShutdown()
	})
	return &Server{Server: s, URL: s.ClientURL(), StoreDir: dir, Port: s.Addr().(*net.TCPAddr).Port}
}

// Restart starts a server again where s was, after the test shut s down:
// the same client port (a client reconnects to it by itself) and the same
// store directory (its streams are found again). tune applies as for
// StartDir.
func (s *Server) Restart(t testing.TB, tune ...func(*server.Options)) *Server {
	t.Helper()
	return StartDir(t, s.StoreDir, append([]func(*server.Options){func(o *server.Options) { o.Port = s.Port }}, tune...)...)
}

// Connect opens a client connection closed when the test ends.
func (s *Server) Connect(t testing.TB, opts ...nats.Option) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := nats.Connect(s.URL, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// Tail returns the last n lines of a file (a log), or why it cannot.
func Tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// ClientOptions are the options Connect uses before the caller's: every
// server's URL, reconnect forever with short waits, and a name.
func ClientOptions(name string) []nats.Option {
	return []nats.Option{
		nats.Name(name),
		nats.Timeout(2 * time.Second),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(100 * time.Millisecond),
	}
}
