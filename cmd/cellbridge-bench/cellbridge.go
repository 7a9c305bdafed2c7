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

// runCellbridge is variants B (memory dedupe store) and C (JetStream KV
// dedupe store): the bridge of `cellbridge run` (package internal/app) in
// this process, with a configuration naming the bench's server as broker
// nats and the rules in bench/rules, so that it is built exactly as in
// production (natsjs connection, JetStream context and sink sized by
// maxInFlight, consumer MaxAckPending = maxInFlight+maxHeld+fetchBatch, live
// metrics registry and health, HTTP server, rules watcher). Tuning (-tune
// B:... or C:...): inflight=N, fetch=N, workers=N, lanes=N.
func runCellbridge(ctx context.Context, e *env) error {
	store, storeDesc := bridgeconfig.DedupeMemory, "memory (size 1000000, ttl 10m, reserveTTL 30s)"
	if e.spec.Variant == "C" || e.spec.Variant == "C-fault" {
		store, storeDesc = bridgeconfig.DedupeJetStream, "jetstream KV (bucket cellbridge-dedupe, ttl 10m, reserveTTL 30s, file storage)"
	}
	a, err := startBridge(ctx, e, fmt.Sprintf("brokers:\n  nats: {type: nats, url: %q}\ndedupe: {store: %s}\n", e.url, store))
	if err != nil {
		return err
	}
	eff := a.Pipeline.Config()
	e.settings = fmt.Sprintf("maxInFlight=%d workers=%d fetchBatch=%d lanes=%d dedupe=%s; metrics registry live (scraped at the end)",
		eff.MaxInFlight, eff.Workers, eff.FetchBatch, eff.Lanes, storeDesc)
	err = runUntilDone(ctx, a)
	oc := a.Outcomes()
	for _, outcome := range slices.Sorted(maps.Keys(oc)) {
		e.settings += fmt.Sprintf(" %s=%.0f", outcome, oc[outcome])
	}
	return err
}

// startBridge starts the bridge of `cellbridge run` on the variant's rules
// with brokers (the configuration's brokers and dedupe sections), the
// variant's tuning and, in the fault variants, the fault-injecting sink.
// BENCH_LOG=1 sends its log to stderr.
func startBridge(ctx context.Context, e *env, brokers string) (*app.App, error) {
	var pipeline []string
	for _, t := range []struct{ tune, field string }{{"inflight", "maxInFlight"}, {"fetch", "fetchBatch"}, {"workers", "workers"}, {"lanes", "lanes"}} {
		if n := e.tuneInt(t.tune, 0); n != 0 {
			pipeline = append(pipeline, fmt.Sprintf("%s: %d", t.field, n))
		}
	}
	rules, err := filepath.Abs(e.spec.Rules)
	if err != nil {
		return nil, err
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

// runUntilDone runs the bridge until the variant ends (ctx) and then stops
// it as `cellbridge run` does on SIGTERM: stop fetching, drain, close.
func runUntilDone(ctx context.Context, a *app.App) error {
	var failed error
	select {
	case <-ctx.Done():
	case <-a.Failed():
		failed = errors.New("the bridge stopped: a source failed")
	}
	return errors.Join(failed, a.Shutdown())
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
