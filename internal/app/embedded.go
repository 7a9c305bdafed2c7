package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/fx"

	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/embedded"
)

// embeddedNATS is the in-process server of the embedded default; it is
// inert (no server, no URL) when brokers are configured.
type embeddedNATS struct {
	url string
}

func newEmbeddedNATS(lc fx.Lifecycle, res *resources, o *Options, log *slog.Logger) (*embeddedNATS, error) {
	e := &embeddedNATS{}
	if !o.Config.Embedded() {
		return e, nil
	}
	srv, err := startEmbedded(o.DataDir, o.NATSPort, o.NATSTune)
	if err != nil {
		return nil, err
	}
	res.add(lc, func(context.Context) error {
		srv.Shutdown()
		srv.WaitForShutdown()
		return nil
	})
	e.url = srv.ClientURL()
	log.Info("embedded nats-server started", "url", e.url, "store", srv.StoreDir())
	if o.NATSPort > 0 && o.NATSPort != srv.Addr().(*net.TCPAddr).Port {
		fmt.Fprintf(o.Stdout, "port %d is taken; the embedded NATS server listens on %s\n", o.NATSPort, e.url)
	} else {
		fmt.Fprintf(o.Stdout, "embedded NATS server (JetStream): %s\n", e.url)
	}
	return e, nil
}

// DefaultNATSPort is the embedded server's preferred client port, so that the
// usual tools (nats CLI) find it without flags.
const DefaultNATSPort = 4222

// brokers is the embedded default's configuration of brokers: the embedded
// server, a NATS broker named config.EmbeddedBroker.
func (e *embeddedNATS) brokers() map[string]*config.Broker {
	return map[string]*config.Broker{config.EmbeddedBroker: {Type: config.NATSType, Settings: &NATSBroker{URL: e.url}}}
}

// startEmbedded starts the in-process nats-server of the embedded default
// with its JetStream store under dataDir. port is the preferred client port
// (0: 4222); when it is taken a free port is used instead (the caller prints
// the URL). -1 asks for a random port. tune may adjust the options (tests).
func startEmbedded(dataDir string, port int, tune func(*server.Options)) (*server.Server, error) {
	if port == 0 {
		port = DefaultNATSPort
	}
	if port > 0 && !portFree("127.0.0.1", port) {
		port = -1
	}
	// The server keeps its files in <StoreDir>/jetstream.
	store, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(store, 0o755); err != nil {
		return nil, fmt.Errorf("embedded nats-server: data dir: %w", err)
	}
	return embedded.Start(embedded.Options{Host: "127.0.0.1", Port: port, StoreDir: store, Tune: tune})
}

// portFree reports whether host:port can be listened on right now. The
// server binds it a moment later; losing that race only costs a failed start
// with a clear error.
func portFree(host string, port int) bool {
	l, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		return false
	}
	l.Close()
	return true
}

// ExampleRulesDir finds deploy/rules for the embedded default: under the
// working directory, next to the binary (or its parent, for bin/), or in the
// source tree the binary was built from (go run).
func ExampleRulesDir() (string, error) {
	var candidates []string
	if wd, err := os.Getwd(); err == nil {
		candidates = append(candidates, wd)
	}
	if exe, err := os.Executable(); err == nil {
		if exe, err := filepath.EvalSymlinks(exe); err == nil {
			d := filepath.Dir(exe)
			candidates = append(candidates, d, filepath.Dir(d))
		}
	}
	if _, file, _, ok := runtime.Caller(0); ok && filepath.IsAbs(file) {
		candidates = append(candidates, filepath.Join(filepath.Dir(file), "..", ".."))
	}
	for _, c := range candidates {
		d := filepath.Join(c, "deploy", "rules")
		if st, err := os.Stat(d); err == nil && st.IsDir() {
			return filepath.Clean(d), nil
		}
	}
	return "", errors.New("cannot find the example rules (deploy/rules) next to the working directory or the binary; pass -rules DIR")
}
