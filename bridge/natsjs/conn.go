package natsjs

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// TLSConfig names PEM files for a TLS connection. CA verifies the server;
// Cert and Key (both or neither) are the client certificate for servers that
// require one.
type TLSConfig struct {
	CA   string
	Cert string
	Key  string
}

// BrokerConfig describes one NATS broker connection. Secrets (Password,
// Token, the Creds file) are used as given: the caller resolves environment
// variables and files before calling Connect. At most one of Creds,
// User/Password and Token may be set.
type BrokerConfig struct {
	// Name is the broker name from the bridge configuration; it labels logs
	// and the client name the server shows in its monitoring.
	Name string
	// URL is one or more comma-separated server URLs (nats:// or tls://).
	URL   string
	TLS   *TLSConfig
	Creds string
	User  string
	// Password goes with User.
	Password string
	Token    string
	// OnStateChange, when set, is called with true once connected and then
	// on every change between connected and disconnected/closed (never twice
	// in a row with the same value). It runs on the client's callback
	// goroutine and must not block; the bridge feeds it into the
	// cellbridge_connection_up gauge.
	OnStateChange func(up bool)
}

// Reconnect and liveness settings. A bridge must outlive broker restarts and
// network partitions, so it never gives up reconnecting; the backoff keeps a
// fleet of replicas from hammering a recovering server, and the reconnect
// buffer absorbs the source's acks issued while the link is down (the Sink
// and the dedupe store do not hand the client a request while the link is
// down: their request core, internal/jspub, fails it at once).
const (
	reconnectMin      = 100 * time.Millisecond
	reconnectMax      = 5 * time.Second
	reconnectBufBytes = 32 << 20
	pingInterval      = 10 * time.Second
	maxPingsOut       = 3
	dialTimeout       = 5 * time.Second
)

// ErrConfig reports an unusable BrokerConfig (conflicting auth methods,
// unreadable TLS files). Connect returns it without trying the network.
var ErrConfig = errors.New("natsjs: invalid broker config")

// Connect opens a connection to one broker and returns it connected. It
// retries refused or unreachable servers with backoff until ctx is done, but
// fails at once on errors that retrying cannot fix: bad configuration
// (ErrConfig), TLS failures and rejected credentials. The returned connection
// reconnects forever on its own; each state change is logged once and
// reported through cfg.OnStateChange. The caller owns the connection and
// closes it (nc.Close) after every Source and Sink that uses it is closed.
func Connect(ctx context.Context, cfg BrokerConfig, log *slog.Logger) (*nats.Conn, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("broker", cfg.Name)
	opts, err := connOptions(cfg, log)
	if err != nil {
		return nil, err
	}
	where := redactURL(cfg.URL)
	delay := reconnectMin
	for {
		nc, err := nats.Connect(cfg.URL, opts...)
		if err == nil {
			log.Info("nats connected", "url", nc.ConnectedUrlRedacted(), "server", nc.ConnectedServerName())
			return nc, nil
		}
		err = fmt.Errorf("natsjs: connect to broker %q at %s: %w", cfg.Name, where, explain(err))
		if !retryable(err) {
			return nil, err
		}
		log.Warn("nats connect failed, retrying", "url", where, "err", err, "retry_in", delay)
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("%w (gave up: %w)", err, ctx.Err())
		case <-t.C:
		}
		delay = min(2*delay, reconnectMax)
	}
}

// retryable tells transient connect failures (nothing listening yet, a
// timeout) from permanent ones; only the former are worth waiting for.
func retryable(err error) bool {
	return errors.Is(err, nats.ErrNoServers) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, os.ErrDeadlineExceeded)
}

// explain adds what an operator should check to the errors that are
// otherwise terse.
func explain(err error) error {
	switch {
	case errors.Is(err, nats.ErrAuthorization), errors.Is(err, nats.ErrAuthExpired),
		errors.Is(err, nats.ErrAuthRevoked), errors.Is(err, nats.ErrAccountAuthExpired):
		return fmt.Errorf("%w (check the broker's creds, user/password or token)", err)
	case errors.Is(err, nats.ErrSecureConnRequired):
		return fmt.Errorf("%w (configure tls for this broker)", err)
	}
	var certErr *tls.CertificateVerificationError
	if errors.As(err, &certErr) {
		return fmt.Errorf("%w (check tls.ca)", err)
	}
	if strings.Contains(err.Error(), "tls: certificate required") {
		return fmt.Errorf("%w (the server wants a client certificate: set tls.cert and tls.key)", err)
	}
	return err
}

func connOptions(cfg BrokerConfig, log *slog.Logger) ([]nats.Option, error) {
	if cfg.URL == "" {
		return nil, fmt.Errorf("%w: broker %q: url is empty", ErrConfig, cfg.Name)
	}
	auth := 0
	for _, set := range []bool{cfg.Creds != "", cfg.User != "" || cfg.Password != "", cfg.Token != ""} {
		if set {
			auth++
		}
	}
	if auth > 1 {
		return nil, fmt.Errorf("%w: broker %q: set only one of creds, user/password and token", ErrConfig, cfg.Name)
	}
	if cfg.Password != "" && cfg.User == "" {
		return nil, fmt.Errorf("%w: broker %q: password without user", ErrConfig, cfg.Name)
	}
	st := &connState{log: log, report: cfg.OnStateChange}
	opts := []nats.Option{
		nats.Name("cellbridge/" + cfg.Name),
		nats.Timeout(dialTimeout),
		nats.MaxReconnects(-1),
		nats.CustomReconnectDelay(reconnectDelay),
		nats.ReconnectBufSize(reconnectBufBytes),
		nats.PingInterval(pingInterval),
		nats.MaxPingsOutstanding(maxPingsOut),
		// Credentials may be rotated while the bridge runs; keep trying
		// instead of closing the connection after two auth errors.
		nats.IgnoreAuthErrorAbort(),
		nats.ConnectHandler(func(*nats.Conn) { st.set(true, "") }),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if nc.IsClosed() {
				return // the closed handler reports it
			}
			st.set(false, "nats disconnected", "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			st.set(true, "nats reconnected", "url", nc.ConnectedUrlRedacted())
		}),
		nats.ClosedHandler(func(*nats.Conn) { st.set(false, "nats connection closed") }),
		nats.LameDuckModeHandler(func(nc *nats.Conn) {
			log.Warn("nats server entering lame duck mode; will reconnect elsewhere", "url", nc.ConnectedUrlRedacted())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			if sub != nil {
				log.Warn("nats async error", "subject", sub.Subject, "err", err)
				return
			}
			log.Warn("nats async error", "err", err)
		}),
	}
	switch {
	case cfg.Creds != "":
		// Read now, so that a wrong path is a config error, not a
		// failed handshake.
		if _, err := os.Stat(cfg.Creds); err != nil {
			return nil, fmt.Errorf("%w: broker %q: creds: %w", ErrConfig, cfg.Name, err)
		}
		opts = append(opts, nats.UserCredentials(cfg.Creds))
	case cfg.User != "":
		opts = append(opts, nats.UserInfo(cfg.User, cfg.Password))
	case cfg.Token != "":
		opts = append(opts, nats.Token(cfg.Token))
	}
	if cfg.TLS != nil {
		tc, err := tlsConfig(cfg.TLS)
		if err != nil {
			return nil, fmt.Errorf("%w: broker %q: %w", ErrConfig, cfg.Name, err)
		}
		opts = append(opts, nats.Secure(tc))
	}
	return opts, nil
}

// tlsConfig loads the files up front so that a missing or malformed file is
// reported as such, not as a failed handshake.
func tlsConfig(c *TLSConfig) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CA != "" {
		pem, err := os.ReadFile(c.CA)
		if err != nil {
			return nil, fmt.Errorf("tls.ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("tls.ca: %s holds no PEM certificate", c.CA)
		}
		tc.RootCAs = pool
	}
	if (c.Cert == "") != (c.Key == "") {
		return nil, errors.New("tls.cert and tls.key must be set together")
	}
	if c.Cert != "" {
		cert, err := tls.LoadX509KeyPair(c.Cert, c.Key)
		if err != nil {
			return nil, fmt.Errorf("tls.cert/tls.key: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// reconnectDelay doubles from reconnectMin to reconnectMax with up to 25%
// jitter, so that replicas restarted together spread their attempts.
func reconnectDelay(attempts int) time.Duration {
	d := reconnectMax
	if attempts < 16 {
		d = min(reconnectMin<<max(attempts-1, 0), reconnectMax)
	}
	return d + rand.N(d/4+1)
}

// redactURL hides passwords in URLs before they reach logs and errors.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil || u.User == nil {
		return s
	}
	return u.Redacted()
}

// connState turns the client's callbacks into one log line and one report
// per actual change. The client calls them from one goroutine, but Connect's
// own first report may race with it, hence the mutex.
type connState struct {
	mu     sync.Mutex
	known  bool
	up     bool
	log    *slog.Logger
	report func(bool)
}

func (s *connState) set(up bool, msg string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.known && s.up == up {
		return
	}
	s.known, s.up = true, up
	if msg != "" {
		if up {
			s.log.Info(msg, args...)
		} else {
			s.log.Warn(msg, args...)
		}
	}
	if s.report != nil {
		s.report(up)
	}
}

// JetStreamConfig tunes the client library's asynchronous publishing on a
// JetStream context. The Sink does not use it (it publishes with core NATS
// and keeps its own table of pending acks, see SinkConfig); the settings
// matter only for other code that calls PublishMsgAsync on the context.
type JetStreamConfig struct {
	// MaxPending sizes the client library's async publish window: twice
	// this value, so that a caller sharing the Sink's MaxPending never
	// stalls in the library first. Default 4096.
	MaxPending int
	// AckTimeout, when positive, makes the client library fail an async
	// publish whose ack has not arrived in time, with one timer per
	// publish. Off by default.
	AckTimeout time.Duration
}

// NewJetStream returns a JetStream context for nc for the Source, the Sink
// and the dedupe store.
// It owns no goroutines of its own beyond those of nc.
func NewJetStream(nc *nats.Conn, cfg JetStreamConfig) (jetstream.JetStream, error) {
	if cfg.MaxPending <= 0 {
		cfg.MaxPending = defaultMaxPending
	}
	opts := []jetstream.JetStreamOpt{jetstream.WithPublishAsyncMaxPending(2 * cfg.MaxPending)}
	if cfg.AckTimeout > 0 {
		opts = append(opts, jetstream.WithPublishAsyncTimeout(cfg.AckTimeout))
	}
	js, err := jetstream.New(nc, opts...)
	if err != nil {
		return nil, fmt.Errorf("natsjs: jetstream: %w", err)
	}
	return js, nil
}
