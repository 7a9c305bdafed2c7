package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/router"
)

// replayFlags are the flags of `cellbridge replay`.
type replayFlags struct {
	run              runFlags
	rule, cell       string
	fromSeq, toSeq   uint64
	fromTime, toTime string
	jsonOut          bool
}

func init() {
	register(&command{
		name:    "replay",
		summary: "republish what a cell of a broadcast rule missed (from a source sequence or time), with the same idempotency keys",
		usage: `Usage: cellbridge replay -config FILE -rule NAME -cell CELL (-from-seq N | -from-time T) [-to-seq M | -to-time T]

Reads a range of a broadcast rule's source stream again and publishes each
event into one cell exactly as the bridge would have: the cell's target, the
event's Cell-Msg-Id, the copy's idempotency key <key>@<cell>, per-key order,
retries, and the dedupe store of the configuration (shared with the running
bridge when it is the jetstream store). Copies the cell already holds are
dropped as duplicates by that key, so replaying a range twice, or a range
that overlaps what the bridge sent, stores nothing twice within the dedupe
store's TTL and the target's duplicate window.

Use it for a cell that was down in the rules (its copies were skipped and
counted, not retried): 'cellbridge status' shows per cell the time of the
first missed message. The cell may still be marked down while it is
replayed; replay again from the last replayed message after marking it
active, to cover what arrived in between.

The rule's durable consumer is not touched: the range is read with an
ordered consumer that acknowledges nothing. Times are RFC 3339 (the source
broker's store times, as /status reports them); both ends are included. Only
NATS JetStream sources can be replayed.

Exit status 0 when every message of the range was settled (published, found
a duplicate, or skipped because it came from the cell), 1 otherwise.`,
		flags: replayCommand,
	})
}

func replayCommand(fs *flag.FlagSet) runFunc {
	f := &replayFlags{}
	fs.StringVar(&f.run.config, "config", "", "bridge configuration `FILE` (its brokers and dedupe store; required)")
	fs.StringVar(&f.run.rules, "rules", "", "rule `DIR` (overrides rules: in the configuration)")
	fs.StringVar(&f.rule, "rule", "", "the broadcast topic rule `NAME` (required)")
	fs.StringVar(&f.cell, "cell", "", "the `CELL` to republish into (required)")
	fs.Uint64Var(&f.fromSeq, "from-seq", 0, "first source stream `SEQUENCE`")
	fs.StringVar(&f.fromTime, "from-time", "", "first source store `TIME` (RFC 3339)")
	fs.Uint64Var(&f.toSeq, "to-seq", 0, "last source stream `SEQUENCE` (default: the stream's end)")
	fs.StringVar(&f.toTime, "to-time", "", "last source store `TIME` (RFC 3339; default: the stream's end)")
	fs.BoolVar(&f.jsonOut, "json", false, "print the result as JSON")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		return runReplay(ctx, f, args, stdout, stderr)
	}
}

func runReplay(ctx context.Context, f *replayFlags, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		return usageError(stderr, "replay", "unexpected arguments: %s", strings.Join(args, " "))
	}
	switch {
	case f.run.config == "":
		return usageError(stderr, "replay", "-config is required: replay publishes through the configured brokers")
	case f.rule == "" || f.cell == "":
		return usageError(stderr, "replay", "-rule and -cell are required")
	case (f.fromSeq > 0) == (f.fromTime != ""):
		return usageError(stderr, "replay", "give exactly one of -from-seq and -from-time")
	case f.toSeq > 0 && f.toTime != "":
		return usageError(stderr, "replay", "give at most one of -to-seq and -to-time")
	}
	spec := app.ReplaySpec{Rule: f.rule, Cell: f.cell, FromSeq: f.fromSeq, ToSeq: f.toSeq}
	for _, t := range []struct {
		flag, v string
		dst     *time.Time
	}{{"-from-time", f.fromTime, &spec.FromTime}, {"-to-time", f.toTime, &spec.ToTime}} {
		if t.v == "" {
			continue
		}
		v, err := time.Parse(time.RFC3339Nano, t.v)
		if err != nil {
			return usageError(stderr, "replay", "%s: want an RFC 3339 time such as 2026-01-02T15:04:05Z, got %q", t.flag, t.v)
		}
		*t.dst = v
	}
	o, code := prepareRun(&f.run, stderr)
	if o == nil {
		return code
	}
	if r := o.Rules.Rule(f.rule); r == nil || r.Broadcast == nil {
		fmt.Fprintf(stderr, "cellbridge replay: %s\n", replayRuleProblem(o.Rules, f.rule))
		return exitError
	}
	res, err := app.Replay(ctx, *o, spec)
	if err != nil {
		fmt.Fprintf(stderr, "cellbridge replay: %v\n", err)
		return exitError
	}
	writeReplay(stdout, f, res)
	if res.Failed > 0 || res.Acked != res.Delivered {
		return exitError
	}
	return exitOK
}

// writeReplay prints what a replay did: one line, or its JSON.
func writeReplay(w io.Writer, f *replayFlags, res app.ReplayResult) {
	if !f.jsonOut {
		fmt.Fprintf(w, "replayed rule %s into cell %s: %d messages read (stream sequences %d-%d, range end %d); "+
			"copies published %.0f, already in the dedupe store %.0f, from the cell itself %.0f; not settled %d\n",
			f.rule, f.cell, res.Delivered, res.First, res.Last, res.End,
			res.Outcomes[bridge.OutcomeForwarded], res.Outcomes[bridge.OutcomeDuplicate], res.Outcomes[bridge.OutcomeSkipped], res.Failed)
		return
	}
	b, _ := json.MarshalIndent(res, "", "  ")
	fmt.Fprintf(w, "%s\n", b)
}

// replayRuleProblem says why rule cannot be replayed.
func replayRuleProblem(t *router.Table, rule string) string {
	if t.Rule(rule) == nil {
		var names []string
		for _, r := range t.Rules() {
			names = append(names, r.Name)
		}
		return fmt.Sprintf("no topic rule %q (known: %s)", rule, strings.Join(names, ", "))
	}
	return fmt.Sprintf("topic rule %s does not broadcast (no target.cells): only the copies of broadcast rules are replayed", rule)
}
