package app

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/retry"
	"github.com/cellbridge/cellbridge/router"
)

// NATSBroker is the settings of a broker of type nats: a NATS server or
// cluster with JetStream.
type NATSBroker struct {
	URL      string        `yaml:"url"` // one URL or a comma-separated list
	TLS      *TLS          `yaml:"tls"`
	Creds    config.Path   `yaml:"creds"` // a .creds file (JWT + nkey seed)
	User     string        `yaml:"user"`
	Password config.Secret `yaml:"password"`
	Token    config.Secret `yaml:"token"`
	// Liveness and request bounds (defaults in the configuration's
	// defaults table, equal to the adapter's own): see
	// natsjs.BrokerConfig, natsjs.SourceConfig.RequestTimeout and
	// natsjs.SinkConfig.AckTimeout.
	PingInterval   config.Duration `yaml:"pingInterval"`
	MaxPingsOut    int             `yaml:"maxPingsOut"`
	WriteTimeout   config.Duration `yaml:"writeTimeout"`
	DialTimeout    config.Duration `yaml:"dialTimeout"`
	ReconnectWait  config.Duration `yaml:"reconnectWait"`
	RequestTimeout config.Duration `yaml:"requestTimeout"`
	AckTimeout     config.Duration `yaml:"ackTimeout"`
	// ServerOrder is "random" (the client shuffles the URLs) or "listed"
	// (it tries them in the order written).
	ServerOrder string `yaml:"serverOrder"`
}

// TLS holds PEM files. CA alone verifies the server; Cert+Key add a client
// certificate.
type TLS struct {
	CA   config.Path `yaml:"ca"`
	Cert config.Path `yaml:"cert"`
	Key  config.Path `yaml:"key"`
}

var natsKind = &brokerKind{
	BrokerKind: config.BrokerKind{
		Type:         config.NATSType,
		NewSettings:  func() config.BrokerSettings { return &NATSBroker{} },
		ServesSource: func(s router.Source) bool { return s.Stream != "" },
		ServesTarget: func(t router.Target) bool { return t.Subject != "" },
	},
	connect: connectNATS,
}

// Validate checks the URLs, the TLS files and that one authentication is
// chosen.
func (b *NATSBroker) Validate(c *config.BrokerCheck) {
	if b.URL == "" {
		c.Errorf("url", "required for type nats (nats://host:4222)")
	}
	for u := range strings.SplitSeq(b.URL, ",") {
		u = strings.TrimSpace(u)
		if u == "" && b.URL != "" {
			c.Errorf("url", "empty URL in list %q", b.URL)
			continue
		}
		if u == "" {
			continue
		}
		pu, err := url.Parse(u)
		if err != nil || pu.Host == "" {
			c.Errorf("url", "invalid URL %q (want nats://host:port)", u)
			continue
		}
		switch pu.Scheme {
		case "nats", "tls", "ws", "wss":
		default:
			c.Errorf("url", "unsupported scheme %q in %q (want nats, tls, ws or wss)", pu.Scheme, u)
		}
	}
	if t := b.TLS; t != nil {
		if (t.Cert == "") != (t.Key == "") {
			c.Errorf("tls", "cert and key go together (client certificate)")
		}
		if t.CA == "" && t.Cert == "" {
			c.Errorf("tls", "empty: set ca and/or cert+key")
		}
		for f, v := range map[string]config.Path{"ca": t.CA, "cert": t.Cert, "key": t.Key} {
			if v != "" {
				c.Readable("tls."+f, string(v))
			}
		}
	}
	if b.Creds != "" {
		c.Readable("creds", strings.TrimPrefix(string(b.Creds), "file:"))
	}
	if (b.User == "") != (b.Password == "") {
		if b.User == "" {
			c.Errorf("user", "required with password")
		} else {
			c.Errorf("password", "required with user")
		}
	}
	n := 0
	for _, set := range []bool{b.User != "" || b.Password != "", b.Token != "", b.Creds != ""} {
		if set {
			n++
		}
	}
	if n > 1 {
		c.Errorf("", "choose one authentication: user/password, token or creds")
	}
	for _, d := range []struct {
		field string
		v     config.Duration
		min   time.Duration
	}{
		{"pingInterval", b.PingInterval, 100 * time.Millisecond},
		{"writeTimeout", b.WriteTimeout, 100 * time.Millisecond},
		{"dialTimeout", b.DialTimeout, 100 * time.Millisecond},
		{"reconnectWait", b.ReconnectWait, 100 * time.Millisecond},
		{"requestTimeout", b.RequestTimeout, 10 * time.Millisecond},
		{"ackTimeout", b.AckTimeout, 10 * time.Millisecond},
	} {
		if d.v.D() < d.min {
			c.Errorf(d.field, "must be at least %s, got %s", d.min, d.v)
		}
	}
	if b.MaxPingsOut < 1 || b.MaxPingsOut > 100 {
		c.Errorf("maxPingsOut", "must be 1..100, got %d", b.MaxPingsOut)
	}
	if b.ServerOrder != "" && b.ServerOrder != "random" && b.ServerOrder != "listed" {
		c.Errorf("serverOrder", "must be random or listed, got %q", b.ServerOrder)
	}
}

// adapter maps the settings onto the adapter's connection config.
func (b *NATSBroker) adapter(name string) natsjs.BrokerConfig {
	bc := natsjs.BrokerConfig{Name: name, URL: b.URL, Creds: string(b.Creds), User: b.User,
		Password: b.Password.Value(), Token: b.Token.Value(), PingInterval: b.PingInterval.D(),
		MaxPingsOut: b.MaxPingsOut, WriteTimeout: b.WriteTimeout.D(), DialTimeout: b.DialTimeout.D(), ReconnectWait: b.ReconnectWait.D(),
		ListedOrder: b.ServerOrder == "listed"}
	if b.TLS != nil {
		bc.TLS = &natsjs.TLSConfig{CA: string(b.TLS.CA), Cert: string(b.TLS.Cert), Key: string(b.TLS.Key)}
	}
	return bc
}

// natsClient holds one connection and JetStream context per NATS broker.
type natsClient struct {
	env      kindEnv
	conns    map[string]*nats.Conn
	js       map[string]jetstream.JetStream
	settings map[string]*NATSBroker
	// closing is set before the connections are closed on purpose, so that
	// their going down is not reported as a fault.
	closing atomic.Bool
}

func connectNATS(ctx context.Context, env kindEnv, used []usedBroker) (kindClient, error) {
	c := &natsClient{env: env, conns: map[string]*nats.Conn{}, js: map[string]jetstream.JetStream{},
		settings: map[string]*NATSBroker{}}
	for _, u := range used {
		settings := u.settings.(*NATSBroker)
		c.settings[u.name] = settings
		bc := settings.adapter(u.name)
		bc.OnStateChange = func(up bool) {
			for _, r := range u.roles {
				if !up && c.closing.Load() {
					// Our own close at the stop: not a fault.
					env.health.ConnectionClosed(u.name, r)
					continue
				}
				env.health.ConnectionChanged(u.name, r, up)
			}
		}
		bc.OnRequestError = env.requests.report
		env.requests.watch(u.name)
		env.status.begin(fmt.Sprintf("connecting to broker %s (%s)", u.name, retry.Redact(settings.URL)))
		nc, err := natsjs.Connect(ctx, bc, env.log)
		if err != nil {
			c.closeNow()
			return nil, err
		}
		c.conns[u.name] = nc
		js, err := natsjs.NewJetStream(nc, natsjs.JetStreamConfig{MaxPending: env.cfg.SinkMaxPending()})
		if err != nil {
			c.closeNow()
			return nil, err
		}
		c.js[u.name] = js
	}
	return c, nil
}

func (c *natsClient) sink(names []string, _ dedupe.Store) (bridge.Sink, error) {
	js := map[string]jetstream.JetStream{}
	ackTimeouts := map[string]time.Duration{}
	for _, n := range names {
		js[n] = c.js[n]
		ackTimeouts[n] = c.settings[n].AckTimeout.D()
	}
	return natsjs.NewSink(js, natsjs.SinkConfig{MaxPending: c.env.cfg.SinkMaxPending(), AckTimeouts: ackTimeouts},
		c.env.log.With("component", "sink"))
}

func (c *natsClient) source(ctx context.Context, r *router.Rule) (bridge.Source, error) {
	cfg := c.env.cfg
	rule := r.Name
	health := c.env.health
	log := c.env.log.With("component", "source")
	c.env.status.begin(fmt.Sprintf("creating the consumer %s/%s of rule %s on broker %s", r.Source.Stream, r.Source.Group, rule, r.Source.Broker))
	// cellbridge_source_failing{rule} exists (0) from the start, for the
	// alert that reads it.
	health.SourceFailing(rule, nil)
	base := natsjs.SourceConfig{
		Rule:           rule,
		Broker:         r.Source.Broker,
		Stream:         r.Source.Stream,
		Subject:        r.Source.Subject,
		Durable:        r.Source.Group,
		Ordering:       natsjs.Ordering(r.Source.Ordering),
		CumulativeAcks: r.Source.Acks == router.AcksCumulative,
		PinnedTTL:      cfg.Ordering.PinnedTTL.D(),
		StallLimit:     cfg.Ordering.StallLimit.D(),
		MaxAckPending:  cfg.SourceMaxAckPending(),
		AckWait:        cfg.Pipeline.AckWait.D(),
		FetchBatch:     cfg.Pipeline.FetchBatch,
		Backlog:        func(n uint64) { health.Backlog(rule, int64(n)) },
		RequestTimeout: c.settings[r.Source.Broker].RequestTimeout.D(),
		OnRequestError: c.env.requests.report,
		OnFailing:      func(err error) { health.SourceFailing(rule, err) },
	}
	if r.Source.Partitions > 0 {
		base.MaxAckPending = cfg.PartitionMaxAckPending(r.Source.Partitions)
		base.FetchBatch = cfg.PartitionFetchBatch(r.Source.Partitions)
		p := cfg.Partitions
		src, err := natsjs.NewPartitionedSource(ctx, c.js[r.Source.Broker], natsjs.PartitionedConfig{
			Rule:         rule,
			Broker:       r.Source.Broker,
			Stream:       r.Source.Stream,
			Subject:      r.Source.Subject,
			Group:        r.Source.Group,
			KeyToken:     r.Key.SubjectToken,
			Partitions:   r.Source.Partitions,
			ReplicaID:    p.ReplicaID,
			Leases:       leaseConfig(p),
			DrainTimeout: p.DrainTimeout.D(),
			Consumer:     base,
			Failing:      func(err error) { health.SourceFailing(rule, err) },
		}, log)
		if err != nil {
			return nil, fmt.Errorf("rule %s: %w", rule, err)
		}
		log.Info("partitioned source ready", "rule", rule, "partitions", r.Source.Partitions,
			"replica", src.ReplicaID(), "bucket", p.Bucket)
		return src, nil
	}
	// A replica that holds the pin but cannot publish hands the rule to
	// another one (natsjs.SourceConfig.StallAge); a partition's lease, not
	// its pin, decides who runs it, so only here.
	base.StallAge = func() time.Duration { return health.StallAge(rule) }
	// ... unless the new owner's re-read would reach copies older than the
	// duplicate window the configuration guarantees: then it keeps the
	// rule (natsjs.SourceConfig.HandOverWindow).
	base.UnackedAge = func() time.Duration { return health.UnackedAge(rule) }
	base.HandOverWindow = cfg.HandOverWindow()
	reach := cfg.Ordering.StallLimit.D() + cfg.Ordering.PinnedTTL.D() + natsjs.DefaultHandOverMargin
	if base.Ordering == natsjs.Ordered && reach >= base.HandOverWindow {
		log.Warn("ordering.stallLimit: a stall hand-over re-reads messages at least this old; with ordering.pinnedTTL and a margin that reaches the duplicate window the configuration guarantees, so a replica that cannot publish keeps the rule (docs/guarantees.md)",
			"rule", rule, "stallLimit", cfg.Ordering.StallLimit.String(), "pinnedTTL", cfg.Ordering.PinnedTTL.String(),
			"window", base.HandOverWindow.String())
	}
	src, err := natsjs.NewSource(ctx, c.js[r.Source.Broker], base, log)
	if err != nil {
		return nil, fmt.Errorf("rule %s: %w", rule, err)
	}
	return src, nil
}

// close flushes and closes every connection: acks are sent without waiting
// for replies, and what was settled should not be redelivered after a
// restart. A flush that fails (the connection is down or reconnecting, the
// server does not answer) is logged, not an error of the stop: an ack lost
// with it only means a redelivery, which deduplication drops. A connection
// that is not connected is not flushed (the flush would wait for a
// reconnect until the stop's deadline, and the process would be killed);
// the connections are flushed at once, together for at most
// closeFlushTimeout.
func (c *natsClient) close(ctx context.Context) error {
	c.closing.Store(true)
	fctx, cancel := context.WithTimeout(ctx, closeFlushTimeout)
	defer cancel()
	var wg sync.WaitGroup
	for name, nc := range c.conns {
		wg.Go(func() {
			var err error
			switch {
			case nc.IsClosed():
			case nc.IsConnected():
				err = nc.FlushWithContext(fctx)
			default:
				err = fmt.Errorf("not connected (%s)", nc.Status())
			}
			if err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
				c.env.log.Warn("nats connection not flushed before closing; messages settled just before may be redelivered (and dropped as duplicates)",
					"broker", name, "err", err)
			}
			nc.Close()
		})
	}
	wg.Wait()
	return nil
}

// closeFlushTimeout bounds the flush of each connection at the stop: a
// connected server answers a flush within milliseconds.
const closeFlushTimeout = 2 * time.Second

// closeNow closes the connections opened so far (a failed connect).
func (c *natsClient) closeNow() {
	c.closing.Store(true)
	for _, nc := range c.conns {
		nc.Close()
	}
}

// requestPolicy is how the bridge's own requests to the connected NATS
// broker name are made while it starts (the preflight's): each attempt
// bounded by the broker's requestTimeout, retried with backoff, each
// failure logged, counted and shown on /readyz. nil for a broker that is
// not a connected NATS broker (one attempt then).
func (b *brokers) requestPolicy(name string) *retry.Policy {
	c, err := b.client(name)
	if err != nil {
		return nil
	}
	nc, ok := c.(*natsClient)
	if !ok || nc.conns[name] == nil {
		return nil
	}
	s := nc.settings[name]
	if s == nil {
		return nil
	}
	return &retry.Policy{Broker: name, Conn: nc.conns[name], URL: s.URL, Timeout: s.RequestTimeout.D(), Log: nc.env.log,
		Report: func(ae *retry.AttemptError) { nc.env.requests.report(ae) }}
}

// jetStream returns the JetStream context of a connected NATS broker: the
// jetstream dedupe store and the embedded default's streams use it.
func (b *brokers) jetStream(name string) (jetstream.JetStream, error) {
	c, err := b.client(name)
	if err != nil {
		return nil, err
	}
	nc, ok := c.(*natsClient)
	if !ok {
		return nil, fmt.Errorf("broker %q is of type %s, not %s", name, b.typeOf[name], config.NATSType)
	}
	return nc.js[name], nil
}

// leaseConfig is the lease bucket as the partitions: section configures it:
// the partitioned sources' leases and the deployment's registry share it.
func leaseConfig(p config.PartitionsConfig) natsjs.LeaseConfig {
	return natsjs.LeaseConfig{Bucket: p.Bucket, TTL: p.LeaseTTL.D(), Heartbeat: p.Heartbeat.D(), Replicas: p.Replicas}
}
