package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/config"
)

func init() {
	register(&command{
		name:    "streams",
		summary: "plan (or with -apply create and update) the streams and KV buckets the rules need",
		usage: `Usage: cellbridge streams [-config FILE] [-rules DIR] [-apply] [-replicas N]

Lists, per NATS broker of the configuration, the JetStream streams and KV
buckets the rules and the configuration need, and how each differs from what
the broker has:

  - each topic rule's source stream, capturing its subject (and, for a
    partitioned rule, carrying the partition subject transform);
  - per cell a stream CELL_<CELL> capturing the rules' target subjects, and
    a stream DLQ capturing the dead-letter subjects, each with a duplicate
    window of at least pipeline.ackWait + dedupe.reserveTTL +
    pipeline.retry.max (2 minutes with the defaults); a target or DLQ
    subject that another stream already captures is left to that stream,
    whose window is raised when it is shorter;
  - the dedupe store's bucket (dedupe.store: jetstream), and the lease
    bucket cellbridge-leases (the replicas' rules versions, partition
    leases).

Without -apply it changes nothing (a broker it cannot reach gets the plan of
what is needed). With -apply it creates what is missing and updates what
differs: subjects are only ever added, windows and replicas only raised.
Changes that would lose something are refused, each with its reason (a
subject that overlaps another stream's without being captured by it, a
subject transform cellbridge did not set, a bucket that must be recreated,
a dedupe TTL lower than the bucket's); then nothing is changed at all.

Without -config it plans for the embedded default (nats://127.0.0.1:4222),
which creates the same streams by itself when it starts.

Exit status 0 when the plan holds no refusal (and, with -apply, everything
was applied), 1 otherwise.`,
		flags: streamsCommand,
	})
}

func streamsCommand(fs *flag.FlagSet) runFunc {
	var (
		f        runFlags
		apply    bool
		replicas int
		timeout  time.Duration
	)
	fs.StringVar(&f.config, "config", "", "bridge configuration `FILE`; without it, the embedded default")
	fs.StringVar(&f.rules, "rules", "", "rule `DIR` (overrides rules: in the configuration)")
	fs.BoolVar(&apply, "apply", false, "create and update what the plan says")
	fs.IntVar(&replicas, "replicas", 0, "replicas of new streams and buckets; existing ones with fewer are raised (0: new ones get 1, existing ones are kept)")
	fs.DurationVar(&timeout, "timeout", 10*time.Second, "give up on a broker after this long")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		if len(args) > 0 {
			return usageError(stderr, "streams", "unexpected arguments: %s", strings.Join(args, " "))
		}
		if replicas < 0 || replicas > 5 {
			return usageError(stderr, "streams", "-replicas must be between 0 and 5")
		}
		o, code := prepareRun(&f, stderr)
		if o == nil {
			return code
		}
		needs, err := app.Needs(o.Config, o.Rules, replicas)
		if err != nil {
			fmt.Fprintf(stderr, "cellbridge streams: %v\n", err)
			return exitError
		}
		if len(needs) == 0 {
			fmt.Fprintln(stdout, "the rules use no NATS broker: nothing to provision")
			return exitOK
		}
		failed := false
		count := map[string]int{}
		for _, n := range needs {
			fmt.Fprintf(stdout, "broker %s (%s)\n", n.Broker, n.URL)
			p, err := provisionBroker(ctx, o.Config, n, apply, timeout)
			if p == nil {
				fmt.Fprintf(stdout, "  not reachable: %v\n  what the rules need:\n", err)
				p = n.Offline()
				failed = failed || apply
			} else if err != nil {
				fmt.Fprintf(stdout, "  apply failed: %v\n", err)
				failed = true
			}
			writePlan(stdout, p)
			for _, a := range p.Actions {
				count[a.Op]++
			}
			failed = failed || len(p.Refused()) > 0
		}
		writeSummary(stdout, count, apply && !failed)
		if failed {
			return exitError
		}
		return exitOK
	}
}

// provisionBroker connects to one broker, compares the needs with it and,
// with apply, carries the plan out unless it refuses something. A nil plan
// means the broker could not be asked (err says why); a plan with an error
// could not be applied.
func provisionBroker(ctx context.Context, cfg *config.Config, n *app.BrokerNeeds, apply bool, timeout time.Duration) (*natsjs.Provisioning, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	nc, js, err := app.ConnectBroker(ctx, cfg, n.Broker, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, err
	}
	defer nc.Close()
	p, err := n.Plan(ctx, js)
	if err != nil {
		return nil, err
	}
	if apply && len(p.Refused()) == 0 {
		return p, p.Apply(ctx)
	}
	return p, nil
}

// writePlan prints one line per stream or bucket and what needs it.
func writePlan(w io.Writer, p *natsjs.Provisioning) {
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	for _, a := range p.Actions {
		first := ""
		switch {
		case a.Op == natsjs.OpRefuse:
			first = a.Refused
		case len(a.Changes) > 0:
			first = a.Changes[0]
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", a.Op, a.Object, first)
		if len(a.Changes) > 1 {
			for _, c := range a.Changes[1:] {
				fmt.Fprintf(tw, "  \t\t%s\n", c)
			}
		}
		for _, n := range a.Notes {
			fmt.Fprintf(tw, "  \t\t%s\n", n)
		}
		if len(a.Uses) > 0 {
			fmt.Fprintf(tw, "  \t\tfor: %s\n", strings.Join(a.Uses, "; "))
		}
	}
	_ = tw.Flush()
}

func writeSummary(w io.Writer, count map[string]int, applied bool) {
	var parts []string
	for _, op := range []string{natsjs.OpCreate, natsjs.OpUpdate, natsjs.OpOK, natsjs.OpSkip, natsjs.OpNeed, natsjs.OpRefuse} {
		if n := count[op]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, op))
		}
	}
	switch {
	case count[natsjs.OpRefuse] > 0:
		fmt.Fprintf(w, "\n%s: nothing was changed; resolve the refused ones first\n", strings.Join(parts, ", "))
	case applied:
		fmt.Fprintf(w, "\napplied: %s\n", strings.Join(parts, ", "))
	case count[natsjs.OpCreate]+count[natsjs.OpUpdate] > 0:
		fmt.Fprintf(w, "\nplan: %s; run with -apply to make the changes\n", strings.Join(parts, ", "))
	default:
		fmt.Fprintf(w, "\nplan: %s\n", strings.Join(parts, ", "))
	}
}
