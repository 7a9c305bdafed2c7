package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"time"

	"go.uber.org/dig"
	"go.uber.org/fx"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/router"
)

// ReplaySpec is what `cellbridge replay` republishes: a range of a
// broadcast rule's source stream, into one of its cells. Exactly one of
// FromSeq and FromTime is set; ToSeq or ToTime end the range (both zero:
// the stream's end when the replay starts).
type ReplaySpec struct {
	Rule, Cell string
	FromSeq    uint64
	FromTime   time.Time
	ToSeq      uint64
	ToTime     time.Time
}

// Replay republishes spec's range into spec.Cell exactly as the bridge
// would have: the same pipeline (headers, idempotency keys <key>@<cell>,
// per-key order, retries, the dedupe store of o.Config, so that the running
// bridge and later replays see what this one published), fed by a
// natsjs.Replay of the rule's source instead of its durable, over a table
// in which the rule broadcasts to spec.Cell only — also while the cell is
// still down in o.Rules (router.Table.ReplayInto). It connects to the
// brokers of o.Config, needs no HTTP server, and returns when every message
// of the range was published or settled otherwise (its report counts
// them), or ctx ended (then in-flight publishes are drained within
// pipeline.drainTimeout). The embedded default has nothing to replay from.
func Replay(ctx context.Context, o Options, spec ReplaySpec) (ReplayResult, error) {
	var rep ReplayResult
	if o.Config.Embedded() {
		return rep, errors.New("replay needs the brokers of a configuration file (-config); the embedded default has none")
	}
	table, err := o.Rules.ReplayInto(spec.Rule, spec.Cell)
	if err != nil {
		return rep, err
	}
	if o.Log == nil {
		o.Log = NewLogger(o.Config.Log, os.Stderr)
	}
	if o.Stdout == nil {
		o.Stdout = io.Discard
	}
	o.Rules = table
	sctx, cancel := context.WithTimeout(ctx, StartTimeout)
	defer cancel()
	res := &resources{}
	var (
		p   *bridge.Pipeline
		src *natsjs.Replay
	)
	fa := fx.New(
		fx.Supply(&o, o.Config, o.Rules, o.Log, res, &embeddedNATS{}, startCtx{sctx}, spec),
		fx.WithLogger(fxLogger),
		publishing,
		fx.Provide(newReplaySource),
		fx.Invoke(func(*brokers, dedupe.Store, bridge.SinkLookup) {}),
		fx.Populate(&p, &src),
		fx.StartTimeout(StartTimeout), fx.StopTimeout(StopTimeout(o.Config)),
	)
	err = dig.RootCause(fa.Err())
	if err == nil {
		err = fa.Start(sctx)
	}
	if err != nil {
		stopCtx, cancel := context.WithTimeout(context.Background(), StopTimeout(o.Config))
		defer cancel()
		return rep, errors.Join(err, res.rollback(stopCtx))
	}
	o.Log.Info("replay started", "rule", spec.Rule, "cell", spec.Cell, "rules_version", table.Version())
	runErr := p.Run(ctx, src)
	stopCtx, cancel := context.WithTimeout(context.Background(), StopTimeout(o.Config))
	defer cancel()
	stopErr := fa.Stop(stopCtx)
	rep = ReplayResult{ReplayReport: src.Report(), Outcomes: Info{Pipeline: p}.Outcomes()}
	o.Log.Info("replay done", "rule", spec.Rule, "cell", spec.Cell, "delivered", rep.Delivered, "settled", rep.Acked,
		"failed", rep.Failed, "first_seq", rep.First, "last_seq", rep.Last, "outcomes", rep.Outcomes)
	if runErr != nil {
		return rep, fmt.Errorf("replay of rule %s into cell %s: %w", spec.Rule, spec.Cell, runErr)
	}
	return rep, stopErr
}

// ReplayResult is what a replay did: the messages of the range it read
// (natsjs.ReplayReport) and what the pipeline did with them, as
// cellbridge_messages_total outcomes: forwarded (a copy published or found
// in the cell's duplicate window), duplicate (the dedupe store knew the
// copy), skipped (the event came from the cell, excludeOrigin).
type ReplayResult struct {
	natsjs.ReplayReport
	Outcomes map[string]float64
}

// newReplaySource reads the replayed rule's source stream.
func newReplaySource(b *brokers, t *router.Table, spec ReplaySpec, log *slog.Logger) (*natsjs.Replay, error) {
	r := t.Rule(spec.Rule)
	if !r.Source.IsNATS() {
		return nil, fmt.Errorf("rule %s: replay reads NATS JetStream sources only; its source is RocketMQ topic %s", r.Name, r.Source.Topic)
	}
	js, err := b.jetStream(r.Source.Broker)
	if err != nil {
		return nil, fmt.Errorf("rule %s: source: %w", r.Name, err)
	}
	return natsjs.NewReplay(js, natsjs.ReplayConfig{Rule: r, FromSeq: spec.FromSeq, FromTime: spec.FromTime,
		ToSeq: spec.ToSeq, ToTime: spec.ToTime}, log.With("component", "replay"))
}
