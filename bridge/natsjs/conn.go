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

	"github.com/cellbridge/cellbridge/internal/retry"
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
	// PingInterval and MaxPingsOut decide how soon a link that stopped
	// answering (a frozen server, a dropped route) is noticed: the client
	// pings every PingInterval and reconnects once more than MaxPingsOut
	// pings are unanswered, i.e. after PingInterval×MaxPingsOut to
	// PingInterval×(MaxPingsOut+1). Defaults DefaultPingInterval and
	// DefaultMaxPingsOut (2s to 3s).
	PingInterval time.Duration
	MaxPingsOut  int
	// WriteTimeout bounds each write to the server's socket. A server that
	// stops reading (frozen, a hung VM) fills the socket's buffers within
	// a second under load; the next write then blocks holding the client's
	// lock, which also holds up the pings that would have found the link
	// dead, and the client's own bound is a minute. After WriteTimeout the
	// write fails and the client reconnects. Default DefaultWriteTimeout.
	WriteTimeout time.Duration
	// DialTimeout bounds one connection attempt to one server (TCP, TLS and
	// the server's greeting); a server that accepts connections but does
	// not answer costs this much per reconnect. Default DefaultDialTimeout.
	DialTimeout time.Duration
	// ReconnectWait caps the wait between two rounds of reconnect attempts
	// over the server list (it doubles from 100ms, with up to 25% jitter);
	// a list with a live server reconnects without waiting. Default
	// DefaultReconnectWait.
	ReconnectWait time.Duration
	// ListedOrder makes the client try the servers of URL in the order
	// written, on the first connection and on every reconnect, instead of
	// in a random order (which spreads replicas over a cluster): for a
	// replica that should prefer a server near it.
	ListedOrder bool
	// OnRequestError, when set, receives every failed attempt of Connect's
	// first connection (an error describing the broker, the server, the
	// attempt, the error and the wait before the next attempt). It is
	// called on Connect's goroutine and must not block.
	OnRequestError func(error)
}

// Defaults of BrokerConfig's liveness settings. The memo of issue 13
// measured a stale link noticed 2s after a server froze with 1s×2.
const (
	DefaultPingInterval  = time.Second
	DefaultMaxPingsOut   = 2
	DefaultDialTimeout   = 2 * time.Second
	DefaultReconnectWait = 2 * time.Second
	DefaultWriteTimeout  = 2 * time.Second
)

func (c *BrokerConfig) defaults() {
	orDefault(&c.PingInterval, DefaultPingInterval)
	orDefault(&c.MaxPingsOut, DefaultMaxPingsOut)
	orDefault(&c.DialTimeout, DefaultDialTimeout)
	orDefault(&c.ReconnectWait, DefaultReconnectWait)
	orDefault(&c.WriteTimeout, DefaultWriteTimeout)
}

// orDefault sets *v to d when it is zero or negative (not set).
func orDefault[T int | time.Duration](v *T, d T) {
	if *v <= 0 {
		*v = d
	}
}

// Reconnect settings. A bridge must outlive broker restarts and network
// partitions, so it never gives up reconnecting; the backoff keeps a fleet of
// replicas from hammering a recovering server. reconnectMax caps the
// source's own waits between attempts (consume restarts, probes).
//
// The client has no reconnect buffer (reconnectBufBytes): while the link is
// down every publish fails at once, decided under the same lock that marks
// the link down. With a buffer, a publish made in the moment between the
// link dropping and the Sink or the dedupe store learning of it (their
// request core, internal/jspub, refuses requests while the link is down)
// was kept and written whenever the link came back, possibly after a
// takeover had forwarded the key's later messages and after the target's
// duplicate window. A source ack that fails this way is not lost work: the
// message is delivered again (an ordered source resets to its ack floor
// after a reconnect anyway) and dropped by its idempotency key.
const (
	reconnectMin      = 100 * time.Millisecond
	reconnectMax      = 5 * time.Second
	reconnectBufBytes = -1
)

// ErrConfig reports an unusable BrokerConfig (conflicting auth methods,
// unreadable TLS files). Connect returns it without trying the network.
var ErrConfig = errors.New("natsjs: invalid broker config")

// Connect opens a connection to one broker and returns it connected. It
// retries servers that refuse, do not answer, cannot be reached or whose
// names do not resolve yet, with backoff until ctx is done, logging each
// failed attempt (broker, servers, error, attempt, next wait) and passing it
// to cfg.OnRequestError; it fails at once on errors that retrying cannot
// fix: bad configuration (ErrConfig), TLS failures and rejected credentials.
// The returned connection reconnects forever on its own; each state change
// is logged once and reported through cfg.OnStateChange. The caller owns the
// connection and closes it (nc.Close) after every Source and Sink that uses
// it is closed.
func Connect(ctx context.Context, cfg BrokerConfig, log *slog.Logger) (*nats.Conn, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg.defaults()
	opts, err := connOptions(cfg, log.With("broker", cfg.Name))
	if err != nil {
		return nil, err
	}
	pol := &retry.Policy{Broker: cfg.Name, URL: cfg.URL, Initial: reconnectMin, Max: cfg.ReconnectWait, Log: log,
		Retryable: func(err error) bool { return !retry.Permanent(err) && !errors.Is(err, nats.ErrConnectionClosed) },
		Report:    reportTo(cfg.OnRequestError)}
	nc, err := retry.Do(ctx, pol, retry.OpConnect, "", func(context.Context) (*nats.Conn, error) {
		nc, err := nats.Connect(cfg.URL, opts...)
		if err != nil {
			return nil, explain(cfg.Name, err)
		}
		return nc, nil
	})
	if err != nil {
		return nil, fmt.Errorf("natsjs: connect to broker %q at %s: %w", cfg.Name, redactURL(cfg.URL), err)
	}
	log.Info("nats connected", "broker", cfg.Name, "url", nc.ConnectedUrlRedacted(), "server", nc.ConnectedServerName())
	return nc, nil
}

// reportTo adapts an OnRequestError hook to a retry.Policy's Report.
func reportTo(f func(error)) func(*retry.AttemptError) {
	if f == nil {
		return nil
	}
	return func(ae *retry.AttemptError) { f(ae) }
}

// explain adds what an operator should check to the errors that are
// otherwise terse, naming broker's fields of the configuration.
func explain(broker string, err error) error {
	field := "brokers." + broker
	switch {
	case errors.Is(err, nats.ErrAuthorization), errors.Is(err, nats.ErrAuthExpired),
		errors.Is(err, nats.ErrAuthRevoked), errors.Is(err, nats.ErrAccountAuthExpired):
		return fmt.Errorf("%w (check the broker's creds: %s.user and .password, .token or .creds in the configuration, and the Secret or environment variable a ${NAME} in them comes from)", err, field)
	case errors.Is(err, nats.ErrSecureConnRequired):
		return fmt.Errorf("%w (configure %s.tls)", err, field)
	case errors.Is(err, nats.ErrNoServers):
		// The client reports a refused connection as no servers.
		return fmt.Errorf("%w (no server at the URL accepted a connection: refused or unreachable)", err)
	}
	var certErr *tls.CertificateVerificationError
	if errors.As(err, &certErr) {
		return fmt.Errorf("%w (check %s.tls.ca)", err, field)
	}
	if strings.Contains(err.Error(), "tls: certificate required") {
		return fmt.Errorf("%w (the server wants a client certificate: set %s.tls.cert and .tls.key)", err, field)
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
		nats.Timeout(cfg.DialTimeout),
		nats.MaxReconnects(-1),
		nats.CustomReconnectDelay(func(attempts int) time.Duration { return reconnectDelay(attempts, cfg.ReconnectWait) }),
		nats.ReconnectBufSize(reconnectBufBytes),
		nats.PingInterval(cfg.PingInterval),
		nats.MaxPingsOutstanding(cfg.MaxPingsOut),
		nats.FlusherTimeout(cfg.WriteTimeout),
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
		// Reconnects never run out and authentication errors do not
		// abort, so a close is our own Close (a stop, logged at info)
		// unless the server sent an error the client closes on (a
		// payload or control line over the server's limit): then the
		// connection's last error says so, and it is a fault.
		nats.ClosedHandler(func(nc *nats.Conn) {
			if err := nc.LastError(); err != nil {
				st.set(false, "nats connection closed", "err", err)
				return
			}
			st.setLevel(false, slog.LevelInfo, "nats connection closed")
		}),
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
	if cfg.ListedOrder {
		opts = append(opts, nats.DontRandomize())
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

// reconnectDelay doubles from reconnectMin to limit with up to 25% jitter,
// so that replicas restarted together spread their attempts.
func reconnectDelay(attempts int, limit time.Duration) time.Duration {
	d := limit
	if attempts < 16 {
		d = min(reconnectMin<<max(attempts-1, 0), limit)
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
	level := slog.LevelInfo
	if !up {
		level = slog.LevelWarn
	}
	s.setLevel(up, level, msg, args...)
}

// setLevel is set with the level of its log line given.
func (s *connState) setLevel(up bool, level slog.Level, msg string, args ...any) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.known && s.up == up {
		return
	}
	s.known, s.up = true, up
	if msg != "" {
		s.log.Log(context.Background(), level, msg, args...)
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
