// Package embedded runs an in-process nats-server with JetStream. It backs the
// bridge's embedded default (`cellbridge run` without brokers) and the test
// helpers in internal/natstest.
package embedded

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Options configures an embedded server. The zero value listens on a random
// loopback port with JetStream stored in a temporary directory chosen by the
// server.
type Options struct {
	// Host defaults to 127.0.0.1.
	Host string
	// Port is the client port; 0 means the server default (4222) and -1 a
	// random free port.
	Port int
	// StoreDir holds JetStream's file storage. Empty means a temporary dir.
	StoreDir string
	// Tune, when set, may change any server option before start (TLS,
	// authorization, limits).
	Tune func(*server.Options)
}

// Start starts a server and waits until it accepts client connections. The
// caller owns the server and must call Shutdown and WaitForShutdown.
func Start(o Options) (*server.Server, error) {
	opts := &server.Options{
		Host:      o.Host,
		Port:      o.Port,
		JetStream: true,
		StoreDir:  o.StoreDir,
		NoLog:     true,
		NoSigs:    true,
		// The bridge publishes with large pending windows; the default 64 MiB
		// max pending is plenty but keep the payload limit explicit.
		MaxPayload: 8 << 20,
	}
	if opts.Host == "" {
		opts.Host = "127.0.0.1"
	}
	if o.Tune != nil {
		o.Tune(opts)
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats-server: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded nats-server: not ready for connections after 30s")
	}
	return s, nil
}
