package natsjs

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/retry"
	"github.com/cellbridge/cellbridge/router"
)

// StreamOptions tunes EnsureStreams.
type StreamOptions struct {
	// Broker limits provisioning to sources and targets on this broker
	// name; empty means every NATS source and target in the table.
	Broker string
	// Duplicates is the Nats-Msg-Id duplicate window of every stream.
	// Default 2m. It must cover the longest time between a publish and its
	// repeat: the source's AckWait plus the dedupe store's ReserveTTL plus
	// the sink retry backoff (a replica killed between publish and commit),
	// or that repeat is stored twice.
	Duplicates time.Duration
	// Replicas defaults to 1 (a single embedded server).
	Replicas int
	// RequestTimeout bounds each attempt of the stream requests; failed
	// attempts worth repeating are retried until ctx ends (internal/retry).
	// Default 2s.
	RequestTimeout time.Duration
	// Log receives one line per failed attempt; nil: none.
	Log *slog.Logger
	// OnRequestError, when set, receives every failed attempt (see
	// SourceConfig.OnRequestError).
	OnRequestError func(error)
}

// DLQStream is the stream EnsureStreams creates for DLQ targets.
const DLQStream = "DLQ"

// CellStream names the target stream of a cell: CELL_<CELL>.
func CellStream(cell string) string { return "CELL_" + strings.ToUpper(cell) }

// StreamPlan is one stream the rules need (PlanStreams).
type StreamPlan struct {
	Name     string
	Subjects []string
	// Transform is the subject transform of a partitioned rule's source
	// stream (RuleTransform); nil for every other stream.
	Transform *jetstream.SubjectTransformConfig
	// Source is true for a rule's source stream, which must exist under
	// this name; the subjects of the others (targets, DLQs) may be
	// captured by any stream.
	Source bool
	// Uses says what needs the stream, one line per rule and role
	// ("source of rule orders", "targets of rule orders in cell rz00").
	Uses []string
}

// PlanStreams lists the streams the table needs on opts.Broker: each rule's
// source stream with its subject (and, for a partitioned rule, the subject
// transform it needs; the router checks that every rule of such a stream
// agrees on it); per cell a CELL_<CELL> stream capturing
// every rule's target subject rendered for that cell ({shard} and {topic}
// become the wildcard "*"); and one DLQ stream capturing the DLQ subjects,
// widened to "<first token>.>" (e.g. "dlq.>") when that overlaps nothing
// else. Subjects covered by another subject of the same stream are dropped,
// since the server refuses overlaps. The result is sorted by name.
func PlanStreams(table *router.Table, opts StreamOptions) []StreamPlan {
	want := map[string][]string{}
	uses := map[string][]string{}
	sources := map[string]bool{}
	transforms := map[string]*jetstream.SubjectTransformConfig{}
	add := func(stream, subj, use string) {
		if stream != "" && subj != "" && !slices.Contains(want[stream], subj) {
			want[stream] = append(want[stream], subj)
		}
		if stream != "" && use != "" && !slices.Contains(uses[stream], use) {
			uses[stream] = append(uses[stream], use)
		}
	}
	on := func(broker string) bool { return opts.Broker == "" || broker == opts.Broker }
	var dlq, dlqUses []string
	for _, r := range table.Rules() {
		if r.Source.IsNATS() && on(r.Source.Broker) {
			subj := r.Source.Subject
			if subj == "" {
				subj = r.Source.Stream + ".>"
			}
			add(r.Source.Stream, subj, "source of rule "+r.Name)
			sources[r.Source.Stream] = true
			if tr, err := RuleTransform(r); err == nil {
				transforms[r.Source.Stream] = &tr
			}
		}
		if r.Target.Subject != "" {
			for _, c := range table.Cells() {
				if on(r.Render(c.Name, -1).Broker) && (r.Broadcast == nil || broadcastsTo(r, c.Name)) {
					add(CellStream(c.Name), subjectFilter(r.Target.Subject, c.Name), "targets of rule "+r.Name+" in cell "+c.Name)
				}
			}
		}
		if r.DLQ != nil && r.DLQ.Subject != "" && on(r.DLQ.Broker) {
			if !slices.Contains(dlq, r.DLQ.Subject) {
				dlq = append(dlq, r.DLQ.Subject)
			}
			dlqUses = append(dlqUses, "dead letters of rule "+r.Name)
		}
	}
	for _, subj := range dlq {
		wide := subj
		if first, _, ok := strings.Cut(subj, "."); ok {
			wide = first + ".>"
		}
		if overlapsAny(wide, want) {
			wide = subj
		}
		add(DLQStream, wide, "")
	}
	if len(dlq) > 0 {
		uses[DLQStream] = dlqUses
	}
	plans := make([]StreamPlan, 0, len(want))
	for name, subjects := range want {
		plans = append(plans, StreamPlan{Name: name, Subjects: minimalSubjects(subjects), Transform: transforms[name],
			Source: sources[name], Uses: uses[name]})
	}
	slices.SortFunc(plans, func(a, b StreamPlan) int { return strings.Compare(a.Name, b.Name) })
	return plans
}

// EnsureStreams provisions the streams PlanStreams lists (PlanProvision,
// then Apply): it creates missing ones and updates existing ones, which
// keep their subjects and gain the planned ones, get a duplicate window of
// at least opts.Duplicates (a longer one is kept) and, for a partitioned
// rule's source, the planned subject transform (see docs/partitions.md
// before changing the partition count of a stream that holds events). A
// target or DLQ subject that another stream captures is left to it. New
// streams use file storage. It is what the embedded default and the tests
// use; operators run `cellbridge streams -apply`, which plans the same way.
// It changes nothing when the plan refuses a change (ErrRefused).
func EnsureStreams(ctx context.Context, js jetstream.JetStream, table *router.Table, opts StreamOptions) error {
	pol := &retry.Policy{Broker: opts.Broker, Conn: js.Conn(), Timeout: opts.RequestTimeout, Log: opts.Log,
		Report: reportTo(opts.OnRequestError)}
	p, err := PlanProvision(ctx, js, PlanStreams(table, opts), nil,
		ProvisionOptions{Duplicates: opts.Duplicates, Replicas: opts.Replicas, RaiseReplicas: opts.Replicas > 1, Retry: pol})
	if err == nil {
		err = p.Apply(ctx)
	}
	return err
}

// broadcastsTo reports whether broadcast rule r selects cell (down or not:
// a down cell's copies are replayed into its stream later).
func broadcastsTo(r *router.Rule, cell string) bool {
	for _, c := range r.BroadcastCells() {
		if c.Cell == cell {
			return true
		}
	}
	return false
}

// subjectFilter renders a subject template into the filter that captures
// every subject it can produce for one cell: {cell} is filled in, and a
// token holding {shard} or {topic} becomes "*".
func subjectFilter(tmpl, cell string) string {
	tokens := strings.Split(tmpl, ".")
	for i, t := range tokens {
		t = strings.ReplaceAll(t, "{cell}", cell)
		if strings.Contains(t, "{") {
			t = "*"
		}
		tokens[i] = t
	}
	return strings.Join(tokens, ".")
}

// covers reports whether every subject matched by b is matched by a.
func covers(a, b string) bool {
	at, bt := strings.Split(a, "."), strings.Split(b, ".")
	for i, t := range at {
		if t == ">" {
			return len(bt) > i
		}
		if i >= len(bt) || bt[i] == ">" {
			return false
		}
		if t != "*" && (t != bt[i] || bt[i] == "*") {
			return false
		}
	}
	return len(at) == len(bt)
}

// overlaps reports whether some subject matches both a and b.
func overlaps(a, b string) bool {
	at, bt := strings.Split(a, "."), strings.Split(b, ".")
	for i := 0; i < len(at) && i < len(bt); i++ {
		if at[i] == ">" || bt[i] == ">" {
			return true
		}
		if at[i] != "*" && bt[i] != "*" && at[i] != bt[i] {
			return false
		}
	}
	return len(at) == len(bt)
}

func overlapsAny(subj string, streams map[string][]string) bool {
	for _, subjects := range streams {
		for _, s := range subjects {
			if overlaps(subj, s) {
				return true
			}
		}
	}
	return false
}

// minimalSubjects drops duplicates and subjects covered by another one.
func minimalSubjects(in []string) []string {
	out := make([]string, 0, len(in))
	for i, s := range in {
		keep := true
		for j, o := range in {
			if i != j && covers(o, s) && (!covers(s, o) || j < i) {
				keep = false
				break
			}
		}
		if keep {
			out = append(out, s)
		}
	}
	slices.Sort(out)
	return out
}
