package app

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"

	"go.uber.org/fx"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// brokerKind is one entry of the table of broker kinds: what the
// configuration file accepts for a broker of this type (its settings, their
// validation, the rule endpoints it serves: config.BrokerKind) and how the
// bridge connects to such brokers, consumes from and publishes to them.
// Adding a kind is adding one entry to kinds; nothing else names a kind,
// except that the embedded default and the jetstream dedupe store are NATS
// features.
type brokerKind struct {
	config.BrokerKind
	// connect connects to the brokers of this kind that the rules or the
	// dedupe store use. It is called once per kind, with at least one broker.
	connect func(ctx context.Context, env kindEnv, used []usedBroker) (kindClient, error)
}

// kindEnv is what a kind's client may use.
type kindEnv struct {
	cfg    *config.Config
	health *bridge.Health
	log    *slog.Logger
	// requests counts and shows failed request attempts (the adapters'
	// OnRequestError); status is the start-up step for /readyz.
	requests *requests
	status   *startStatus
}

// usedBroker is a broker the rules or the dedupe store use, with the roles
// they give it (as labelled in cellbridge_connection_up).
type usedBroker struct {
	name     string
	settings config.BrokerSettings
	roles    []string
}

// kindClient is a connected broker kind.
type kindClient interface {
	// sink returns one sink publishing to the named brokers (targets and
	// DLQs of the rules). store is the dedupe store (a transactional sink
	// commits through it).
	sink(names []string, store dedupe.Store) (bridge.Sink, error)
	// source returns the consumer of a topic rule whose source broker is
	// of this kind; the pipeline's Run starts it.
	source(ctx context.Context, r *router.Rule) (bridge.Source, error)
	// close releases the connections, after the sinks and sources closed.
	close(ctx context.Context) error
}

// kinds is the table of broker kinds.
var kinds = []*brokerKind{natsKind, rocketmqKind}

func init() {
	for _, k := range kinds {
		config.RegisterBrokerKind(k.BrokerKind)
	}
}

func kindOf(typ string) *brokerKind {
	for _, k := range kinds {
		if k.Type == typ {
			return k
		}
	}
	return nil
}

// Roles a broker connection serves, as in cellbridge_connection_up.
const (
	roleSource = "source"
	roleSink   = "sink"
	roleDedupe = "dedupe"
)

// brokerRoles lists, per broker name, the roles the rules and the dedupe
// store give it. Brokers nothing uses are not connected.
func brokerRoles(cfg *config.Config, t *router.Table) map[string][]string {
	roles := map[string][]string{}
	add := func(b, role string) {
		if b != "" && !slices.Contains(roles[b], role) {
			roles[b] = append(roles[b], role)
		}
	}
	for _, r := range t.Rules() {
		add(r.Source.Broker, roleSource)
		for _, c := range t.Cells() {
			add(r.Render(c.Name, -1).Broker, roleSink)
		}
		if r.DLQ != nil {
			add(r.DLQ.Broker, roleSink)
		}
	}
	if cfg.Dedupe.Store == config.DedupeJetStream {
		add(cfg.Dedupe.Broker, roleDedupe)
	}
	return roles
}

// brokers holds the connected kinds and which kind each broker is.
type brokers struct {
	roles   map[string][]string
	typeOf  map[string]string     // broker name → type
	clients map[string]kindClient // type → client
}

// client returns the client of broker name's kind.
func (b *brokers) client(name string) (kindClient, error) {
	c := b.clients[b.typeOf[name]]
	if c == nil {
		return nil, fmt.Errorf("broker %q is not connected (no rule uses it)", name)
	}
	return c, nil
}

// newBrokers connects to every broker the rules or the dedupe store use,
// kind by kind. The embedded default has one NATS broker, the embedded
// server; its streams are created here, as the example rules need them.
func newBrokers(ctx startCtx, lc fx.Lifecycle, res *resources, o *Options, e *embeddedNATS, health *bridge.Health,
	reqs *requests, status *startStatus, log *slog.Logger) (*brokers, error) {
	cfg := o.Config
	b := &brokers{roles: brokerRoles(cfg, o.Rules), typeOf: map[string]string{}, clients: map[string]kindClient{}}
	for _, f := range cfg.InlineSecrets() {
		log.Warn("secret written in clear in the config file; prefer ${ENV_VAR} or file:/path", "field", f)
	}
	configured := cfg.Brokers
	if cfg.Embedded() {
		configured = e.brokers()
	}
	byKind := map[string][]usedBroker{}
	for _, name := range slices.Sorted(maps.Keys(configured)) {
		cb := configured[name]
		if b.roles[name] == nil {
			log.Warn("broker not used by any rule or the dedupe store; not connecting", "broker", name)
			continue
		}
		b.typeOf[name] = cb.Type
		byKind[cb.Type] = append(byKind[cb.Type], usedBroker{name: name, settings: cb.Settings, roles: b.roles[name]})
	}
	env := kindEnv{cfg: cfg, health: health, log: log, requests: reqs, status: status}
	for _, typ := range slices.Sorted(maps.Keys(byKind)) {
		k := kindOf(typ)
		if k == nil {
			return nil, fmt.Errorf("broker %q: type %s is not supported by this build", byKind[typ][0].name, typ)
		}
		c, err := k.connect(ctx, env, byKind[typ])
		if err != nil {
			return nil, err
		}
		b.clients[typ] = c
		res.add(lc, c.close)
	}
	if cfg.Embedded() {
		status.begin("creating the embedded default's streams")
		if err := ensureEmbeddedStreams(ctx, b, cfg, o.Rules); err != nil {
			return nil, err
		}
	}
	return b, nil
}
