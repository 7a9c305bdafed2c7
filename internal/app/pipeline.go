package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/fx"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/retry"
	"github.com/cellbridge/cellbridge/router"
	"github.com/nats-io/nats.go/jetstream"
)

// newDedupe opens the dedupe store.
func newDedupe(ctx startCtx, lc fx.Lifecycle, res *resources, cfg *config.Config, b *brokers, reqs *requests,
	status *startStatus, m *bridge.Metrics, log *slog.Logger) (dedupe.Store, error) {
	c := cfg.Dedupe
	var store dedupe.Store
	switch c.Store {
	case config.DedupeMemory:
		mem := dedupe.NewMemory(c.Memory())
		m.SetDedupeEvictions(mem.Evictions)
		store = mem
	case config.DedupeJetStream:
		status.begin(fmt.Sprintf("opening the dedupe store (bucket %s on broker %s)", c.Bucket, c.Broker))
		js, err := b.jetStream(c.Broker)
		if err == nil {
			kc := c.KV()
			kc.Log, kc.OnRequestError = log, reqs.report
			store, err = dedupe.NewJetStream(ctx, js, kc)
		}
		if err != nil {
			return nil, fmt.Errorf("dedupe store (jetstream bucket %s on broker %s): %w", c.Bucket, c.Broker, err)
		}
	default:
		return nil, fmt.Errorf("dedupe store %q is not supported by this build", c.Store)
	}
	res.add(lc, store.Close)
	protocols := "reserve and commit"
	if ck, ok := store.(dedupe.Checker); ok {
		protocols = "check and commit for targets whose duplicate window is at least " + ck.CheckWindow().String() +
			" (one write per message), reserve and commit for the others; per target in /status (dedupeProtocols)"
	}
	log.Info("dedupe store ready", "store", c.Store, "bucket", c.Bucket, "ttl", c.TTL.String(), "protocols", protocols)
	return store, nil
}

// newSinks builds one sink per broker kind that the rules publish to, and
// maps every target broker to its kind's sink.
func newSinks(lc fx.Lifecycle, res *resources, o *Options, b *brokers, store dedupe.Store) (bridge.SinkLookup, error) {
	byKind := map[string][]string{}
	for name, roles := range b.roles {
		if slices.Contains(roles, roleSink) && b.typeOf[name] != "" {
			byKind[b.typeOf[name]] = append(byKind[b.typeOf[name]], name)
		}
	}
	m := map[string]bridge.Sink{}
	for _, typ := range slices.Sorted(maps.Keys(byKind)) {
		names := slices.Sorted(slices.Values(byKind[typ]))
		s, err := b.clients[typ].sink(names, store)
		if err != nil {
			return nil, err
		}
		res.add(lc, s.Close)
		for _, n := range names {
			m[n] = s
			if o.WrapSink != nil {
				m[n] = o.WrapSink(n, s)
			}
		}
	}
	return bridge.StaticSinks(m), nil
}

// sources are the consumers of the topic rules, in rule order.
type sources struct {
	rules []string
	list  []bridge.Source
}

// newSources builds one source per topic rule, from its broker's kind, and
// lets the metrics and /status read what each one reports of its share of
// its rule (bridge.StatusReporter).
func newSources(ctx startCtx, lc fx.Lifecycle, res *resources, t *router.Table, b *brokers, m *bridge.Metrics) (*sources, error) {
	s := &sources{}
	res.add(lc, s.close)
	for _, r := range t.Rules() {
		c, err := b.client(r.Source.Broker)
		if err != nil {
			return nil, fmt.Errorf("rule %s: %w", r.Name, err)
		}
		src, err := c.source(ctx, r)
		if err != nil {
			return nil, err
		}
		s.rules = append(s.rules, r.Name)
		s.list = append(s.list, src)
	}
	m.SetSources(s.statuses)
	return s, nil
}

// statuses collects the sources' reports (bridge.Metrics.SetSources).
func (s *sources) statuses() []bridge.SourceStatus {
	var out []bridge.SourceStatus
	for _, src := range s.list {
		if r, ok := src.(bridge.StatusReporter); ok {
			out = append(out, r.SourceStatus())
		}
	}
	return out
}

// close closes every source at once, after the pipeline drained: an
// ordered source then gives its pin up and a partitioned one its leases, so
// that a standby replica takes each rule over within milliseconds instead of
// after the pin's or the lease's TTL; closing them one after the other would
// add up those hand-overs.
func (s *sources) close(ctx context.Context) error {
	errs := make([]error, len(s.list))
	var wg sync.WaitGroup
	for i, src := range s.list {
		wg.Go(func() {
			if err := src.Close(ctx); err != nil {
				errs[i] = fmt.Errorf("closing the source of rule %s: %w", s.rules[i], err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// pipelineIn is what the pipeline is built from (bridge.Deps).
type pipelineIn struct {
	fx.In
	Holder  *router.Holder
	Metrics *bridge.Metrics
	Health  *bridge.Health
	Store   dedupe.Store
	Sinks   bridge.SinkLookup
	Log     *slog.Logger
}

// newPipeline builds the pipeline; closing it is the drain, which runs
// after the fetch loops stopped (runPipeline) and before the sources close.
func newPipeline(lc fx.Lifecycle, res *resources, cfg *config.Config, in pipelineIn) (*bridge.Pipeline, error) {
	p, err := bridge.New(cfg.Pipeline.Bridge(), bridge.Deps{DedupeCheck: useCheck(cfg, in.Store, in.Log), Rules: in.Holder, Dedupe: in.Store, Sinks: in.Sinks,
		Metrics: in.Metrics, Health: in.Health, Log: in.Log})
	if err != nil {
		return nil, err
	}
	res.add(lc, func(ctx context.Context) error {
		dctx, cancel := context.WithTimeout(ctx, cfg.Pipeline.DrainTimeout.D())
		defer cancel()
		err := p.Close(dctx)
		in.Log.Info("bridge stopped")
		return err
	})
	return p, nil
}

// runPipeline registers the pipeline's loops, the last hook of the bridge:
// its OnStart serves the pipeline over HTTP and runs it over every source
// (a source that fails for good fails the bridge); its OnStop, the first,
// stops fetching.
func runPipeline(lc fx.Lifecycle, o *Options, p *bridge.Pipeline, srcs *sources, hs *httpServer, reg *registry, failed *failure, log *slog.Logger) {
	var (
		cancel context.CancelFunc
		wg     sync.WaitGroup
	)
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			hs.handler.set(pipelineHandler(o, p))
			var ctx context.Context
			ctx, cancel = context.WithCancel(context.Background())
			for i, src := range srcs.list {
				rule := srcs.rules[i]
				wg.Go(func() {
					if err := p.Run(ctx, src); err != nil {
						log.Error("source stopped; shutting down", "rule", rule, "err", err)
						failed.set()
					}
				})
			}
			reg.start(p, hs)
			log.Info("bridge running", "rules_version", o.Rules.Version(), "topics", srcs.rules, "dedupe", o.Config.Dedupe.Store)
			return nil
		},
		OnStop: func(ctx context.Context) error {
			// Stop fetching first; the pipeline's close then finishes
			// what is in flight. A Handle blocked on a full sink can hold
			// a source's Run past the cancel; the wait is bounded by the
			// stop deadline, and the close settles whatever is still in
			// flight.
			cancel()
			ran := make(chan struct{})
			go func() { wg.Wait(); close(ran) }()
			// A quarter of the stop's time at most: the drain, the
			// sources' hand-over (pin, leases) and the connections' last
			// acks come after this hook and need the rest. A Run still
			// blocked is released by the drain (Handle's waits end with
			// the pipeline's close).
			wait := 5 * time.Second
			if dl, ok := ctx.Deadline(); ok {
				wait = time.Until(dl) / 4
			}
			t := time.NewTimer(wait)
			defer t.Stop()
			select {
			case <-ran:
			case <-t.C:
				log.Warn("sources did not stop within a quarter of the stop's time; draining anyway", "waited", wait)
			case <-ctx.Done():
				log.Warn("sources did not stop before the stop deadline; draining anyway")
			}
			return nil
		},
	})
}

// newWatcher watches the rule directory and reloads the rules on change;
// the pipeline reports each outcome (metrics and one log line), so the
// watcher's own lines about it are at debug level.
func newWatcher(lc fx.Lifecycle, res *resources, o *Options, p *bridge.Pipeline, holder *router.Holder, reg *registry, b *brokers, log *slog.Logger) (*router.Watcher, error) {
	var (
		cancel context.CancelFunc
		wg     sync.WaitGroup
	)
	checks, stopChecks := context.WithCancel(context.Background())
	onReload := func(ev router.ReloadEvent) {
		p.RulesReloaded(ev.Version, ev.Previous, ev.Err, ev.At)
		if ev.Err == nil && !ev.Reverted { // Reverted: the running rules, nothing new
			t := holder.Load()
			checkReloaded(o, t, log)
			reg.reloaded(t, log)
			// Called from the watcher's Run, which wg counts: the Add
			// cannot race the Wait of the stop.
			wg.Go(func() { checkReloadedStreams(checks, o, t, b.jetStream, b.requestPolicy, log) })
		}
	}
	w, err := router.NewWatcher(o.RulesDir, holder, onReload, log.With("component", "rules"), router.OutcomeLevel(slog.LevelDebug))
	if err != nil {
		stopChecks()
		return nil, fmt.Errorf("watching rules %s: %w", o.RulesDir, err)
	}
	res.add(lc, w.Close)
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			var ctx context.Context
			ctx, cancel = context.WithCancel(context.Background())
			wg.Go(func() {
				if err := w.Run(ctx); err != nil && ctx.Err() == nil {
					log.Error("rules watcher stopped; reloads are off until restart", "err", err)
				}
			})
			return nil
		},
		OnStop: func(context.Context) error {
			stopChecks()
			cancel()
			wg.Wait()
			return nil
		},
	})
	return w, nil
}

// reloadCheckTimeout bounds checkReloadedStreams.
const reloadCheckTimeout = 30 * time.Second

// checkReloadedStreams runs the start-up preflight on a reloaded table:
// a reload that adds a cell, or moves a target to another subject, whose
// stream does not exist or drops repeats within too short a window is
// accepted (checkReloaded says why), but the operator hears of it at once,
// before the first publish fails or a repeat is stored twice. Each request
// is bounded and retried as at start (policy), the whole check gives up
// after reloadCheckTimeout, and ctx ends it at the stop.
func checkReloadedStreams(ctx context.Context, o *Options, t *router.Table, jsOf func(string) (jetstream.JetStream, error),
	policy func(string) *retry.Policy, log *slog.Logger) {
	if t == nil {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, reloadCheckTimeout)
	defer cancel()
	err := preflightOn(ctx, o.Config, t, natsBrokers(o.Config, t), jsOf, policy)
	var pe *PreflightError
	switch {
	case errors.As(err, &pe):
		for _, p := range pe.Problems {
			log.Error("reloaded rules need a stream that is missing or unfit; create or fix it (cellbridge streams -apply shows what it changes)",
				"rules_version", t.Version(), "problem", p.String())
		}
	case err != nil && !errors.Is(err, context.Canceled):
		log.Warn("reloaded rules: the streams they need could not be checked", "rules_version", t.Version(), "err", err)
	case err == nil:
		log.Debug("reloaded rules: every stream they need is fit", "rules_version", t.Version())
	}
}

// checkReloaded warns about what a reloaded table asks for that the running
// bridge cannot do without a restart: new topic rules (no source consumes
// them), removed ones (their source keeps consuming), a rule's source changed (its stream, subject, group, ordering mode
// or partition count: the running source keeps consuming as it started),
// and brokers the configuration does not define.
//
// Such a reload is accepted, not refused: routing does not depend on how the
// source consumes, and refusing would also hold back every later reload of
// this replica until a restart, such as the blocked shards of a cell switch.
// The running sources stay as they are, which is safe: replicas started
// with the new mode wait until those of the old one are gone
// (natsjs.StateWaiting), and other partition counts use other consumers and
// leases (docs/partitions.md).
func checkReloaded(o *Options, t *router.Table, log *slog.Logger) {
	if t == nil {
		return
	}
	for _, r := range t.Rules() {
		old := o.Rules.Rule(r.Name)
		if old == nil {
			log.Warn("reloaded rules add a topic rule; restart the bridge to consume it", "rule", r.Name)
			continue
		}
		if what := sourceChange(old, r); what != "" {
			log.Warn("reloaded rules change how a rule is consumed; the running source keeps consuming as it started until the bridge restarts",
				"rule", r.Name, "change", what)
		}
	}
	for _, rn := range router.Renames(o.Rules, t) {
		if og, ng := rn.Old.Source.Group, rn.New.Source.Group; og != ng {
			log.Warn("reloaded rules rename a topic rule and its consumer group: after the restart the new group starts at the source's first retained message, and what the dedupe store and the targets' windows no longer cover is forwarded again; keep the old group (source.group) to keep its position",
				"rule", rn.New.Name, "renamed_from", rn.Old.Name, "group", ng, "old_group", og)
		}
	}
	for _, r := range o.Rules.Rules() {
		if t.Rule(r.Name) == nil {
			log.Warn("reloaded rules remove a topic rule; its source keeps consuming until the bridge restarts, and its messages find no route and no DLQ: they are held (redelivered every pipeline.holdDelay), not lost",
				"rule", r.Name)
		}
	}
	if err := o.Config.CheckRules(t); err != nil {
		log.Error("reloaded rules name brokers the configuration lacks; their messages cannot be published", "problems", err.Error())
	}
}

// sourceChange describes what changed in how rule r is consumed ("" when
// nothing did): its source, or the key token its partitions hash.
func sourceChange(old, r *router.Rule) string {
	var out []string
	diff := func(field string, a, b any) {
		if a != b {
			out = append(out, fmt.Sprintf("%s %v → %v", field, a, b))
		}
	}
	o, n := old.Source, r.Source
	diff("source.broker", o.Broker, n.Broker)
	diff("source.stream", o.Stream, n.Stream)
	diff("source.subject", o.Subject, n.Subject)
	diff("source.topic", o.Topic, n.Topic)
	diff("source.tags", o.Tags, n.Tags)
	diff("source.group", o.Group, n.Group)
	diff("source.ordering", o.Ordering, n.Ordering)
	if o.Acks != "" && n.Acks != "" { // both ordered (else ordering says it)
		diff("source.acks", o.Acks, n.Acks)
	}
	diff("source.partitions", o.Partitions, n.Partitions)
	if o.Partitions > 0 && n.Partitions > 0 {
		diff("key.subjectToken", old.Key.SubjectToken, r.Key.SubjectToken)
	}
	return strings.Join(out, ", ")
}

// useCheck reports whether the pipeline may use the KV store's
// check-then-commit protocol: `dedupe.protocol: check` and a bucket of one
// replica (validation refuses dedupe.replicas above 1 with check; a bucket
// made elsewhere with more replicas is found here, and reserve is used).
func useCheck(cfg *config.Config, store dedupe.Store, log *slog.Logger) bool {
	if cfg.Dedupe.Store != config.DedupeJetStream || cfg.Dedupe.Protocol != config.ProtocolCheck {
		return false
	}
	kv, ok := store.(*dedupe.KV)
	if !ok {
		return false
	}
	if n := kv.Replicas(); n != 1 {
		log.Warn("dedupe.protocol check needs a bucket of one replica (a lagging replica could answer a read); every target reserves",
			"bucket", cfg.Dedupe.Bucket, "replicas", n)
		return false
	}
	return true
}
