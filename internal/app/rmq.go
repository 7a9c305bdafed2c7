package app

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sort"

	"go.uber.org/fx"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// rmqComp owns the RocketMQ side: one Sink (a producer per target broker)
// and the construction of RocketMQ sources. Its OnStart runs after the
// dedupe store started (a transactional sink commits it); its OnStop runs
// after the pipeline drained and the sources closed.
type rmqComp struct {
	o      *Options
	health *bridge.Health
	log    *slog.Logger
	roles  map[string][]string
	sink   *rmq.Sink
}

func newRMQ(lc fx.Lifecycle, o *Options, d *dedupeComp, health *bridge.Health, log *slog.Logger) *rmqComp {
	r := &rmqComp{o: o, health: health, log: log, roles: brokerRoles(o.Config, o.Rules)}
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			var sinkBrokers []rmq.BrokerConfig
			for _, name := range r.brokerNames() {
				rmq.SetLogger(log) // only when RocketMQ is used: the setting is process-wide
				if slices.Contains(r.roles[name], roleSink) {
					sinkBrokers = append(sinkBrokers, r.brokerConfig(name))
				}
			}
			if len(sinkBrokers) == 0 {
				return nil
			}
			s, err := rmq.NewSink(rmq.SinkConfig{Brokers: sinkBrokers, Dedupe: d.store, MaxPending: sinkMaxPending(o.Config)},
				log.With("component", "sink"))
			if err != nil {
				return err
			}
			r.sink = s
			for _, bc := range sinkBrokers {
				health.ConnectionChanged(bc.Name, roleSink, true)
			}
			return nil
		},
		OnStop: func(ctx context.Context) error {
			if r.sink == nil {
				return nil
			}
			return r.sink.Close(ctx)
		},
	})
	return r
}

// brokerNames lists the RocketMQ brokers the rules use, sorted.
func (r *rmqComp) brokerNames() []string {
	var names []string
	for name := range r.roles {
		if b := r.o.Config.Brokers[name]; b != nil && b.Type == config.BrokerRocketMQ {
			names = append(names, name)
		}
	}
	sort.Strings(names)
	return names
}

func (r *rmqComp) brokerConfig(name string) rmq.BrokerConfig {
	b := r.o.Config.Brokers[name]
	return rmq.BrokerConfig{Name: name, NameServers: b.Nameservers, AccessKey: b.AccessKey.Value(),
		SecretKey: b.SecretKey.Value(), Namespace: b.Namespace, InstancePrefix: b.InstancePrefix,
		Transactional: b.ExactlyOnce == "transactional"}
}

// addSinks adds the RocketMQ sink under each RocketMQ target broker name.
func (r *rmqComp) addSinks(m map[string]bridge.Sink) {
	if r.sink == nil {
		return
	}
	for _, name := range r.brokerNames() {
		if slices.Contains(r.roles[name], roleSink) {
			m[name] = r.sink
		}
	}
}

// newSource builds the consumer of a RocketMQ topic rule (started by Run).
func (r *rmqComp) newSource(rule *router.Rule) (bridge.Source, error) {
	name := rule.Name
	src, err := rmq.NewSource(r.brokerConfig(rule.Source.Broker), rmq.SourceConfig{
		Rule:      name,
		Topic:     rule.Source.Topic,
		Tags:      rule.Source.Tags,
		Group:     rule.Source.Group,
		Redeliver: r.o.Config.Pipeline.Retry.Initial.D(),
		Backlog:   func(n int64) { r.health.Backlog(name, n) },
	}, r.log.With("component", "source"))
	if err != nil {
		return nil, fmt.Errorf("rule %s: %w", name, err)
	}
	r.health.ConnectionChanged(rule.Source.Broker, roleSource, true)
	return src, nil
}
