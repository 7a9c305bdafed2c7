package app

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// RocketMQBroker is the settings of a broker of type rocketmq: a RocketMQ
// cluster reached through its name servers.
type RocketMQBroker struct {
	Nameservers    []string      `yaml:"nameservers"` // IP:port of each name server
	AccessKey      config.Secret `yaml:"accessKey"`
	SecretKey      config.Secret `yaml:"secretKey"`
	Namespace      string        `yaml:"namespace"`
	InstancePrefix string        `yaml:"instancePrefix"`
	ExactlyOnce    string        `yaml:"exactlyOnce"` // none | transactional
	// CheckBackWait (transactional targets): how long a redelivered message
	// whose earlier attempt was decided waits for that half message's
	// check-back; the broker's check interval plus its transaction timeout
	// plus a margin. Default 70s (a 4.x broker).
	CheckBackWait config.Duration `yaml:"checkBackWait"`
	// MessageGroups (targets): copies carry a RocketMQ 5.x message group,
	// for FIFO target topics.
	MessageGroups bool `yaml:"messageGroups"`
	// PersistInterval (sources): consumer offsets go to the broker at once
	// after an acknowledgement, then at most this often. Default 200ms.
	PersistInterval config.Duration `yaml:"persistInterval"`
	// DialTimeout and WriteTimeout bound connection attempts and writes
	// (defaults in the configuration's defaults table, equal to the
	// adapter's own): see rmq.SetRemotingTimeouts. The client keeps one
	// value for the process: with several rocketmq brokers the smallest
	// applies.
	DialTimeout  config.Duration `yaml:"dialTimeout"`
	WriteTimeout config.Duration `yaml:"writeTimeout"`
	// AckTimeout (targets) bounds one send attempt: the broker's answer
	// (and a transactional attempt's store calls); rmq.BrokerConfig.SendTimeout.
	AckTimeout config.Duration `yaml:"ackTimeout"`
}

// minPersistInterval bounds persistInterval from below: every persist
// sends one request per assigned queue.
const minPersistInterval = 10 * time.Millisecond

var rocketmqKind = &brokerKind{
	BrokerKind: config.BrokerKind{
		Type:         "rocketmq",
		NewSettings:  func() config.BrokerSettings { return &RocketMQBroker{} },
		ServesSource: func(s router.Source) bool { return s.Topic != "" },
		ServesTarget: func(t router.Target) bool { return t.Topic != "" },
	},
	connect: connectRocketMQ,
}

// Validate checks the name servers, the key pair and the exactly-once mode.
func (b *RocketMQBroker) Validate(c *config.BrokerCheck) {
	if len(b.Nameservers) == 0 {
		c.Errorf("nameservers", "required for type rocketmq (a list of IP:port)")
	}
	for i, ns := range b.Nameservers {
		host, port, err := net.SplitHostPort(ns)
		n, perr := strconv.Atoi(port)
		switch {
		case err != nil || host == "" || perr != nil || n < 1 || n > 65535:
			c.Errorf(fmt.Sprintf("nameservers[%d]", i), "want IP:port, got %q", ns)
		case net.ParseIP(host) == nil:
			// The RocketMQ client only accepts IP addresses here.
			c.Errorf(fmt.Sprintf("nameservers[%d]", i), "want IP:port (the RocketMQ client refuses host names), got %q", ns)
		}
	}
	if (b.AccessKey == "") != (b.SecretKey == "") {
		if b.AccessKey == "" {
			c.Errorf("accessKey", "required with secretKey")
		} else {
			c.Errorf("secretKey", "required with accessKey")
		}
	}
	switch b.ExactlyOnce {
	case "", "none", "transactional":
	default:
		c.Errorf("exactlyOnce", "unknown mode %q (want none or transactional)", b.ExactlyOnce)
	}
	switch {
	case b.CheckBackWait < 0:
		c.Errorf("checkBackWait", "must not be negative, got %v", b.CheckBackWait)
	case b.CheckBackWait > 0 && b.ExactlyOnce != "transactional":
		c.Errorf("checkBackWait", "only applies with exactlyOnce: transactional")
	}
	for _, d := range []struct {
		field string
		v     config.Duration
		min   time.Duration
	}{
		{"dialTimeout", b.DialTimeout, 100 * time.Millisecond},
		{"writeTimeout", b.WriteTimeout, 100 * time.Millisecond},
		{"ackTimeout", b.AckTimeout, 10 * time.Millisecond},
	} {
		if d.v.D() < d.min {
			c.Errorf(d.field, "must be at least %s, got %s", d.min, d.v)
		}
	}
	if b.PersistInterval != 0 && b.PersistInterval.D() < minPersistInterval {
		c.Errorf("persistInterval", "want at least %v (each persist sends a request per queue), got %v", minPersistInterval, b.PersistInterval)
	}
}

// SharedStoreNeed implements config.SharedStoreUser: a transactional
// target's decided half messages are checked back on any replica of the
// producer group, also after a restart, and answered from the dedupe
// store (docs/guarantees.md, section 10).
func (b *RocketMQBroker) SharedStoreNeed() string {
	if b.ExactlyOnce == "transactional" {
		return "has exactlyOnce: transactional: the broker's check-backs of its half messages go to any replica and are answered from the dedupe store, also after a restart"
	}
	return ""
}

// adapter maps the settings onto the adapter's broker config.
func (b *RocketMQBroker) adapter(name string) rmq.BrokerConfig {
	return rmq.BrokerConfig{Name: name, NameServers: b.Nameservers, AccessKey: b.AccessKey.Value(),
		SecretKey: b.SecretKey.Value(), Namespace: b.Namespace, InstancePrefix: b.InstancePrefix,
		Transactional: b.ExactlyOnce == "transactional", CheckBackWait: b.CheckBackWait.D(),
		MessageGroups: b.MessageGroups, SendTimeout: b.AckTimeout.D()}
}

// minSet is the smaller of a and b where a of zero is not set yet.
func minSet(a, b time.Duration) time.Duration {
	if a <= 0 {
		return b
	}
	return min(a, b)
}

// rmqClient builds RocketMQ producers and consumers; the client library
// connects per producer and consumer, so there is nothing to hold here.
type rmqClient struct {
	env     kindEnv
	brokers map[string]*RocketMQBroker
}

func connectRocketMQ(_ context.Context, env kindEnv, used []usedBroker) (kindClient, error) {
	rmq.SetLogger(env.log) // only when RocketMQ is used: the setting is process-wide
	c := &rmqClient{env: env, brokers: map[string]*RocketMQBroker{}}
	var dial, write time.Duration
	for _, u := range used {
		b := u.settings.(*RocketMQBroker)
		c.brokers[u.name] = b
		dial = minSet(dial, b.DialTimeout.D())
		write = minSet(write, b.WriteTimeout.D())
	}
	// Process-wide as well, and before the first client is made.
	rmq.SetRemotingTimeouts(dial, write)
	return c, nil
}

// sink is one Sink with a producer per target broker; a transactional
// broker's half messages commit through store.
func (c *rmqClient) sink(names []string, store dedupe.Store) (bridge.Sink, error) {
	var bcs []rmq.BrokerConfig
	for _, n := range names {
		bcs = append(bcs, c.brokers[n].adapter(n))
	}
	s, err := rmq.NewSink(rmq.SinkConfig{Brokers: bcs, Dedupe: store, DedupeTTL: c.env.cfg.Dedupe.TTL.D(), MaxPending: c.env.cfg.SinkMaxPending(),
		OnRetry: c.env.requests.publishRetried},
		c.env.log.With("component", "sink"))
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		c.env.health.ConnectionChanged(n, roleSink, true)
	}
	return s, nil
}

func (c *rmqClient) source(_ context.Context, r *router.Rule) (bridge.Source, error) {
	name := r.Name
	src, err := rmq.NewSource(c.brokers[r.Source.Broker].adapter(r.Source.Broker), rmq.SourceConfig{
		Rule:      name,
		Topic:     r.Source.Topic,
		Tags:      r.Source.Tags,
		Group:     r.Source.Group,
		Redeliver: c.env.cfg.Pipeline.Retry.Initial.D(),
		Backlog:   func(n int64) { c.env.health.Backlog(name, n) },
		// Not ready while the consumer cannot start (a topic not
		// created yet or misspelt, name servers down): nothing of the
		// rule is forwarded.
		OnFailing: func(err error) { c.env.health.SourceFailing(name, err) },
		// Zero: the adapter's default.
		PersistInterval: c.brokers[r.Source.Broker].PersistInterval.D(),
	}, c.env.log.With("component", "source"))
	if err != nil {
		return nil, fmt.Errorf("rule %s: %w", name, err)
	}
	c.env.health.ConnectionChanged(r.Source.Broker, roleSource, true)
	return src, nil
}

func (c *rmqClient) close(context.Context) error { return nil }
