package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/app"
	bridgeconfig "github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// faultSink fails the first attempt of every 1000th order: done gets an
// error and nothing is published (the fault runs).
type faultSink struct {
	bridge.Sink
	f *faultInjector
}

func (s *faultSink) PublishAsync(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	if order, _, ok := parseEvent(m.Body); ok && s.f.shouldFail(order) {
		done(errInjected)
		return
	}
	s.Sink.PublishAsync(ctx, m, done)
}

// runCellbridge is variants B and C (memory or JetStream KV dedupe store,
// the shared durable of `ordering: none`: every replica pulls, no per-key
// order across replicas), O (ordered, the default: one replica forwards,
// a second waits as a hot standby) and P (ordered and partitioned: two
// replicas share the partitions of a rule keyed by the subject's user id
// token): the bridge of `cellbridge run` (package internal/app) in this
// process, with a configuration naming the bench's server as broker nats and
// the rules of bench/rules, so that it is built exactly as in production
// (natsjs connection, JetStream context and sink sized by maxInFlight,
// consumer MaxAckPending = maxInFlight+maxHeld+fetchBatch, live metrics
// registry and health, HTTP server, rules watcher). O and P run their two
// replicas in this one process, on the same two cores. Tuning (-tune B:...
// or C:..., O:..., P:...): inflight=N, fetch=N, workers=N, lanes=N; P and
// P2 also parts=N (partitions, default 12 and 2).
func runCellbridge(ctx context.Context, e *env) error {
	store, storeDesc := bridgeconfig.DedupeMemory, "memory (size 1000000, ttl 10m, reserveTTL 30s)"
	if e.spec.Variant == "C" || e.spec.Variant == "C-fault" {
		store, storeDesc = bridgeconfig.DedupeJetStream, "jetstream KV (bucket cellbridge-dedupe, ttl 10m, reserveTTL 30s, file storage)"
	}
	rules, mode, err := variantRules(e, "")
	if err != nil {
		return err
	}
	defer os.RemoveAll(rules)
	brokers := fmt.Sprintf("brokers:\n  nats: {type: nats, url: %q}\ndedupe: {store: %s}\n", e.url, store)
	replicas := 1
	if e.spec.Variant == "O" || e.partitions() > 0 {
		replicas = 2
	}
	// The replicas start together, as a rollout's pods do (a partitioned
	// replica waits one heartbeat for the others before it takes
	// partitions).
	apps := make([]*app.App, replicas)
	errs := make([]error, replicas)
	var wg sync.WaitGroup
	for i := range apps {
		wg.Go(func() { apps[i], errs[i] = startBridge(ctx, e, rules, brokers) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, a := range apps {
			if a != nil {
				_ = a.Shutdown()
			}
		}
		return err
	}
	eff := apps[0].Pipeline.Config()
	e.settings = fmt.Sprintf("%s; %d replica(s); maxInFlight=%d workers=%d fetchBatch=%d lanes=%d dedupe=%s; metrics registry live (scraped at the end)",
		mode, replicas, eff.MaxInFlight, eff.Workers, eff.FetchBatch, eff.Lanes, storeDesc)
	err = runUntilDone(ctx, apps)
	for i, a := range apps {
		oc := a.Outcomes()
		e.settings += fmt.Sprintf(" [replica %d:", i+1)
		for _, outcome := range slices.Sorted(maps.Keys(oc)) {
			e.settings += fmt.Sprintf(" %s=%.0f", outcome, oc[outcome])
		}
		e.settings += "]"
	}
	return err
}

// partitionedVariants are the partitioned variants and their partition
// counts: P the production overlay's 12 (a multiple of every replica count
// up to 6), P2 one partition per replica.
var partitionedVariants = map[string]int{"P": 12, "P2": 2}

// partitions is the partition count of the variant's rule (P, P2; 0 for
// the others); tuning parts=N overrides it.
func (e *env) partitions() int {
	n, ok := partitionedVariants[strings.TrimSuffix(e.spec.Variant, "-fault")]
	if !ok {
		return 0
	}
	return e.tuneInt("parts", n)
}

// variantRules writes the rules of bench/rules with the variant's source
// into a new directory under parent ("": the system's temporary directory)
// and returns it, with a description: B and C
// consume the shared durable (ordering: none, as every replica did before
// the ordered mode), O in the ordered default, P in partitions keyed by the
// subject's user id token; B-bc's broadcast rules are taken as written.
func variantRules(e *env, parent string) (dir, mode string, err error) {
	src, err := filepath.Abs(e.spec.Rules)
	if err != nil {
		return "", "", err
	}
	const source = `source: {broker: nats, stream: ORDERS, subject: "orders.>", group: cellbridge-orders}`
	var repl []string
	switch v := strings.TrimSuffix(e.spec.Variant, "-fault"); {
	case e.partitions() > 0:
		n := e.partitions()
		mode = fmt.Sprintf("ordering: ordered, partitions: %d", n)
		repl = []string{
			source, fmt.Sprintf(`source: {broker: nats, stream: ORDERS, subject: %q, group: cellbridge-orders, partitions: %d}`, partitionedSubject, n),
			"key: {json: user.id}", "key: {subjectToken: 2}",
		}
	case v == "B" || v == "C":
		mode = "ordering: none (shared durable)"
		repl = []string{source, strings.TrimSuffix(source, "}") + ", ordering: none}"}
	case v == "O":
		mode = "ordering: ordered (one active replica, one standby)"
	case v == "B"+bcSuffix:
		mode = "the broadcast rule's source as written (ordered, the default)"
	default:
		return "", "", fmt.Errorf("variant %s is not a cellbridge variant", v)
	}
	if acks := e.tuneStr("acks", ""); acks != "" {
		// -tune O:acks=cumulative (ordered variants: O, P, P2, B-bc)
		if len(repl) == 0 {
			repl = []string{source, source}
		}
		repl[1] = strings.Replace(repl[1], "}", ", acks: "+acks+"}", 1)
		mode += ", acks: " + acks
	}
	dir, err = os.MkdirTemp(parent, "cellbridge-bench-rules-")
	if err != nil {
		return "", "", err
	}
	files, err := filepath.Glob(filepath.Join(src, "*.yaml"))
	if err != nil {
		return "", "", err
	}
	r := strings.NewReplacer(repl...)
	found := make([]bool, len(repl)/2)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			return "", "", err
		}
		for i := 0; i < len(repl); i += 2 {
			found[i/2] = found[i/2] || strings.Contains(string(b), repl[i])
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(f)), []byte(r.Replace(string(b))), 0o644); err != nil {
			return "", "", err
		}
	}
	for i, ok := range found {
		if !ok {
			return "", "", fmt.Errorf("%s: no line %q to rewrite for variant %s", src, repl[2*i], e.spec.Variant)
		}
	}
	return dir, mode, nil
}

// startBridge starts the bridge of `cellbridge run` on rules with brokers
// (the configuration's brokers and dedupe sections), the variant's tuning
// and, in the fault variants, the fault-injecting sink. BENCH_LOG=1 sends
// its log to stderr.
func startBridge(ctx context.Context, e *env, rules, brokers string) (*app.App, error) {
	var pipeline []string
	for _, t := range []struct{ tune, field string }{{"inflight", "maxInFlight"}, {"fetch", "fetchBatch"}, {"workers", "workers"}, {"lanes", "lanes"}} {
		if n := e.tuneInt(t.tune, 0); n != 0 {
			pipeline = append(pipeline, fmt.Sprintf("%s: %d", t.field, n))
		}
	}
	data := fmt.Sprintf("rules: %q\n%shttp: {listen: \"127.0.0.1:0\"}\npipeline: {%s}\n", rules, brokers, strings.Join(pipeline, ", "))
	cfg, err := bridgeconfig.Parse("bench.yaml", []byte(data))
	if err == nil {
		err = cfg.Validate()
	}
	if err != nil {
		return nil, fmt.Errorf("bench configuration:\n%s\n%w", data, err)
	}
	table, err := router.Load(rules)
	if err != nil {
		return nil, err
	}
	if err := cfg.CheckRules(table); err != nil {
		return nil, err
	}
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("BENCH_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	o := app.Options{Config: cfg, Rules: table, RulesDir: rules, Log: log, Version: "bench"}
	if e.faults != nil {
		o.WrapSink = func(_ string, s bridge.Sink) bridge.Sink { return &faultSink{Sink: s, f: e.faults} }
	}
	return app.Start(ctx, o)
}

// runUntilDone runs the bridges until the variant ends (ctx) and then stops
// them as `cellbridge run` does on SIGTERM: stop fetching, drain, close.
func runUntilDone(ctx context.Context, apps []*app.App) error {
	failed := make(chan struct{}, len(apps))
	for _, a := range apps {
		go func() {
			select {
			case <-a.Failed():
				failed <- struct{}{}
			case <-ctx.Done():
			}
		}()
	}
	var errs []error
	select {
	case <-ctx.Done():
	case <-failed:
		errs = append(errs, errors.New("a bridge stopped: a source failed"))
	}
	for _, a := range apps {
		errs = append(errs, a.Shutdown())
	}
	return errors.Join(errs...)
}

// checkRulesAgainstRouter cross-checks the harness's inline shard → cell table
// with the router's reading of the same directory.
func checkRulesAgainstRouter(dir string) error {
	t, err := router.Load(dir)
	if err != nil {
		return err
	}
	own, err := loadCellTable(dir)
	if err != nil {
		return err
	}
	for s := 0; s < own.shards; s++ {
		key := fmt.Sprintf("2088000000%04d%d", s, 7)
		d := t.Resolve("orders", key)
		want, got := own.subject[s], d.Target.Subject
		if d.Target.Topic != "" { // a RocketMQ rule
			want, got = rmqCellTopic(own.byShard[s]), d.Target.Topic
		}
		if d.Shard != s || d.Cell != own.byShard[s] || got != want {
			return fmt.Errorf("rules %s: shard %d: router says shard %d cell %s target %s, the harness %s %s",
				dir, s, d.Shard, d.Cell, got, own.byShard[s], want)
		}
	}
	return nil
}
