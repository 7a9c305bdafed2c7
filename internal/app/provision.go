package app

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// BrokerNeeds is what the rules and the configuration need on one NATS
// broker: streams (natsjs.PlanStreams) and KV buckets (the dedupe store's,
// the lease bucket of partitioned rules and of the replicas' rules
// versions), and how to provision them.
type BrokerNeeds struct {
	Broker string
	// URL is the broker's URL as an operator may see it (no password).
	URL     string
	Streams []natsjs.StreamPlan
	Buckets []natsjs.BucketPlan
	Opts    natsjs.ProvisionOptions
}

// Needs lists, per NATS broker (sorted by name), what the rules and the
// configuration need. replicas > 0 is the replica count of new streams
// and buckets, and existing ones with fewer are raised to it; 0 keeps
// existing ones and creates new ones with 1 (the dedupe bucket with
// dedupe.replicas, the lease bucket with partitions.replicas). The
// duplicate window is the configuration's StreamWindow. The embedded default's broker is the embedded server on
// its default port.
func Needs(cfg *config.Config, t *router.Table, replicas int) ([]*BrokerNeeds, error) {
	names := map[string]*BrokerNeeds{}
	get := func(name string) *BrokerNeeds {
		if n := names[name]; n != nil {
			return n
		}
		n := &BrokerNeeds{Broker: name, Opts: natsjs.ProvisionOptions{Duplicates: cfg.StreamWindow(), Replicas: max(1, replicas), RaiseReplicas: replicas > 0}}
		names[name] = n
		return n
	}
	isNATS := func(name string) bool {
		if cfg.Embedded() {
			return name == config.EmbeddedBroker
		}
		b := cfg.Brokers[name]
		return b != nil && b.Type == config.NATSType
	}
	for name := range brokerRoles(cfg, t) {
		if isNATS(name) {
			if s := natsjs.PlanStreams(t, natsjs.StreamOptions{Broker: name}); len(s) > 0 {
				get(name).Streams = s
			}
		}
	}
	if cfg.Dedupe.Store == config.DedupeJetStream {
		kc := cfg.Dedupe.KV()
		raise := replicas > 0
		if cfg.Dedupe.Protocol == config.ProtocolCheck {
			// Check reads the bucket from any of its replicas, which
			// a lagging one could answer with a key missing: the bucket
			// stays at one replica (-replicas raises the others).
			raise = false
		} else {
			kc.Replicas = max(kc.Replicas, replicas)
		}
		n := get(cfg.Dedupe.Broker)
		n.Buckets = append(n.Buckets, natsjs.BucketPlan{
			Bucket:   kc.Bucket,
			Uses:     []string{"dedupe store of every replica"},
			Settings: fmt.Sprintf("ttl %s, reservations expire after %s, replicas %d", natsjs.FormatDuration(kc.TTL), natsjs.FormatDuration(kc.ReserveTTL), kc.Replicas),
			Create:   func(ctx context.Context, js jetstream.JetStream) error { return dedupe.EnsureBucket(ctx, js, kc) },
			Check: func(have jetstream.StreamConfig) (*jetstream.StreamConfig, []string, string) {
				return dedupe.CheckBucket(have, kc, raise)
			},
		})
	}
	leaseUses := map[string][]string{}
	if b := RegistryBroker(cfg, t); b != "" {
		leaseUses[b] = append(leaseUses[b], "rules versions of the replicas of deployment "+cfg.Deployment.Name)
	}
	for _, r := range t.Rules() {
		if r.Source.Partitions > 0 && r.Source.IsNATS() {
			leaseUses[r.Source.Broker] = append(leaseUses[r.Source.Broker], "partition leases of rule "+r.Name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(leaseUses)) {
		// The bucket the bridge uses (partitions: section), with
		// partitions.replicas or this provisioning's replicas, whichever is
		// more (as the dedupe bucket): a bucket made here is the one the
		// replicas then use, and they do not raise its replicas.
		lc := leaseConfig(cfg.Partitions)
		lc.Replicas = max(1, lc.Replicas, replicas)
		bp, err := natsjs.LeaseBucketPlan(lc, leaseUses[name])
		if err != nil {
			return nil, err
		}
		n := get(name)
		n.Buckets = append(n.Buckets, bp)
	}
	out := make([]*BrokerNeeds, 0, len(names))
	for _, name := range slices.Sorted(maps.Keys(names)) {
		n := names[name]
		n.URL = brokerURL(cfg, name)
		out = append(out, n)
	}
	return out, nil
}

// brokerURL is a NATS broker's URL without credentials.
func brokerURL(cfg *config.Config, name string) string {
	if cfg.Embedded() {
		return fmt.Sprintf("nats://127.0.0.1:%d", DefaultNATSPort)
	}
	if s, ok := cfg.Brokers[name].Settings.(*NATSBroker); ok {
		return natsjs.RedactURL(s.URL)
	}
	return ""
}

// Plan compares the needs with what the broker has (natsjs.PlanProvision)
// on the connection js.
func (n *BrokerNeeds) Plan(ctx context.Context, js jetstream.JetStream) (*natsjs.Provisioning, error) {
	return natsjs.PlanProvision(ctx, js, n.Streams, n.Buckets, n.Opts)
}

// Offline is the plan without asking the broker.
func (n *BrokerNeeds) Offline() *natsjs.Provisioning {
	return natsjs.OfflinePlan(n.Streams, n.Buckets, n.Opts)
}

// ConnectBroker connects to a configured NATS broker (the embedded
// default's server on its default port) for a command that does not run
// the bridge, giving up when ctx ends. The caller closes the connection.
func ConnectBroker(ctx context.Context, cfg *config.Config, name string, log *slog.Logger) (*nats.Conn, jetstream.JetStream, error) {
	var bc natsjs.BrokerConfig
	switch {
	case cfg.Embedded() && name == config.EmbeddedBroker:
		bc = natsjs.BrokerConfig{Name: name, URL: brokerURL(cfg, name)}
	case cfg.Brokers[name] == nil:
		return nil, nil, fmt.Errorf("no broker %q in %s", name, cfg.File)
	default:
		s, ok := cfg.Brokers[name].Settings.(*NATSBroker)
		if !ok {
			return nil, nil, fmt.Errorf("broker %q is of type %s, not %s", name, cfg.Brokers[name].Type, config.NATSType)
		}
		bc = s.adapter(name)
	}
	nc, err := natsjs.Connect(ctx, bc, log)
	if err != nil {
		return nil, nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return nc, js, nil
}

// provisionTimeout bounds the embedded default's provisioning.
const provisionTimeout = 30 * time.Second

// ensureEmbeddedStreams provisions on the embedded server what the rules
// and the configuration need, with the code of `cellbridge streams -apply`.
func ensureEmbeddedStreams(ctx context.Context, b *brokers, cfg *config.Config, t *router.Table) error {
	js, err := b.jetStream(config.EmbeddedBroker)
	if err != nil {
		return fmt.Errorf("embedded default: creating streams: %w", err)
	}
	needs, err := Needs(cfg, t, 0)
	if err != nil {
		return fmt.Errorf("embedded default: creating streams: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, provisionTimeout)
	defer cancel()
	for _, n := range needs {
		p, err := n.Plan(ctx, js)
		if err == nil {
			err = p.Apply(ctx)
		}
		if err != nil {
			return fmt.Errorf("embedded default: creating streams: %w", err)
		}
	}
	return nil
}
