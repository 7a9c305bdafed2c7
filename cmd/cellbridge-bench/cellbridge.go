package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

// bridgeAvailable tells whether variants B and C can run in this build.
const bridgeAvailable = true

const bridgeMissing = "bridge packages not present"

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
// dedupe store): the pipeline built with the constructors and the parameter
// derivations cmd/cellbridge uses (natsjs connection, JetStream context and
// sink sized by maxInFlight, source consumer with MaxAckPending =
// maxInFlight+maxHeld+fetchBatch, live metrics registry and health), on the
// rules in bench/rules. Tuning (-tune B:... or C:...): inflight=N, fetch=N,
// workers=N, lanes=N, acktimeout=-1 (no ack timeout on the JetStream context).
func runCellbridge(ctx context.Context, e *env) error {
	kv := e.spec.Variant == "C" || e.spec.Variant == "C-fault"
	log := slog.New(slog.DiscardHandler)
	if os.Getenv("BENCH_LOG") != "" {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	table, err := router.Load(e.spec.Rules)
	if err != nil {
		return err
	}
	rule := table.Rule("orders")
	if rule == nil {
		return errors.New("bench rules: no topic rule \"orders\"")
	}
	cfg := bridge.Config{
		MaxInFlight: e.tuneInt("inflight", 0),
		FetchBatch:  e.tuneInt("fetch", 0),
		Workers:     e.tuneInt("workers", 0),
		Lanes:       e.tuneInt("lanes", 0),
	}.WithDefaults()

	nc, err := natsjs.Connect(ctx, natsjs.BrokerConfig{Name: "nats", URL: e.url}, log)
	if err != nil {
		return err
	}
	defer nc.Close()
	jcfg := natsjs.JetStreamConfig{MaxPending: cfg.MaxInFlight}
	if e.tuneInt("acktimeout", 0) < 0 {
		jcfg.AckTimeout = -1 // experiment: no per-publish timer in nats.go
	}
	js, err := natsjs.NewJetStream(nc, jcfg)
	if err != nil {
		return err
	}
	var store dedupe.Store
	storeDesc := "memory (size 1000000, ttl 10m, reserveTTL 30s)"
	if kv {
		store, err = dedupe.NewJetStream(ctx, js, dedupe.KVConfig{Bucket: "cellbridge-dedupe", TTL: 10 * time.Minute,
			ReserveTTL: 30 * time.Second, Replicas: 1})
		if err != nil {
			return err
		}
		storeDesc = "jetstream KV (bucket cellbridge-dedupe, ttl 10m, reserveTTL 30s, file storage)"
	} else {
		store = dedupe.NewMemory(dedupe.MemoryConfig{Size: 1_000_000, TTL: 10 * time.Minute, ReserveTTL: 30 * time.Second})
	}
	nsink, err := natsjs.NewSink(map[string]jetstream.JetStream{"nats": js}, natsjs.SinkConfig{MaxPending: cfg.MaxInFlight}, log)
	if err != nil {
		return err
	}
	var sink bridge.Sink = nsink
	if e.faults != nil {
		sink = &faultSink{Sink: nsink, f: e.faults}
	}
	met := bridge.NewMetrics("bench")
	health := bridge.NewHealth(met, log, nil)
	p, err := bridge.New(cfg, bridge.Deps{Rules: router.NewHolder(table), Dedupe: store,
		Sinks: bridge.StaticSinks(map[string]bridge.Sink{"nats": sink}), Metrics: met, Health: health, Log: log})
	if err != nil {
		return err
	}
	eff := p.Config()
	src, err := natsjs.NewSource(ctx, js, natsjs.SourceConfig{
		Rule:          rule.Name,
		Broker:        rule.Source.Broker,
		Stream:        rule.Source.Stream,
		Subject:       rule.Source.Subject,
		Durable:       rule.Source.Group,
		MaxAckPending: eff.MaxInFlight + eff.MaxHeld + eff.FetchBatch,
		AckWait:       eff.AckWait,
		FetchBatch:    eff.FetchBatch,
		Backlog:       func(n uint64) { health.Backlog(rule.Name, int64(n)) },
	}, log)
	if err != nil {
		return err
	}
	e.settings = fmt.Sprintf("maxInFlight=%d workers=%d fetchBatch=%d lanes=%d dedupe=%s; metrics registry live (scraped at the end)",
		eff.MaxInFlight, eff.Workers, eff.FetchBatch, eff.Lanes, storeDesc)

	runErr := p.Run(ctx, src)
	// Shut down as cmd/cellbridge does: stop fetching, drain, close.
	dctx, cancel := context.WithTimeout(context.Background(), eff.DrainTimeout)
	defer cancel()
	errs := []error{runErr, src.Close(dctx), p.Close(dctx), nsink.Close(dctx), store.Close(dctx), nc.FlushWithContext(dctx)}
	if mfs, err := met.Registry.Gather(); err == nil {
		for _, mf := range mfs {
			if mf.GetName() == "cellbridge_messages_total" {
				for _, m := range mf.GetMetric() {
					for _, l := range m.GetLabel() {
						if l.GetName() == "outcome" {
							e.settings += fmt.Sprintf(" %s=%.0f", l.GetValue(), m.GetCounter().GetValue())
						}
					}
				}
			}
		}
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
