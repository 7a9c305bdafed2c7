package natsjs

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/retry"
	"github.com/cellbridge/cellbridge/router"
)

// Problem is one thing Preflight found missing or unsafe.
type Problem struct {
	Rule string
	// Role is "source", "target" or "dead-letter target".
	Role    string
	Broker  string
	Subject string
	// Cell is the cell a target subject was rendered for.
	Cell string
	Msg  string
}

func (p Problem) String() string {
	subj := ""
	if p.Subject != "" {
		subj = " subject " + p.Subject
	}
	if p.Cell != "" {
		subj += " (cell " + p.Cell + ")"
	}
	return fmt.Sprintf("rule %s: %s%s on broker %s: %s", p.Rule, p.Role, subj, p.Broker, p.Msg)
}

// PreflightOptions tunes Preflight.
type PreflightOptions struct {
	// Broker limits the checks to the rules' sources and targets on this
	// broker.
	Broker string
	// MinWindow is the shortest duplicate window a stream capturing a
	// target or DLQ subject may have (config MinDuplicateWindow).
	MinWindow time.Duration
	// Why explains MinWindow in problems ("dedupe.reserveTTL + ...").
	Why string
	// Retry, when set, bounds, retries, logs and counts each request
	// (internal/retry) until ctx ends, so that a start during a leader
	// election waits for it instead of failing; nil makes one attempt of
	// at most 5s per request (a check that reports).
	Retry *retry.Policy
}

// Preflight checks, before anything is consumed, that the broker has what
// the table's rules on it need: every source stream exists and captures its
// rule's subject (with the partition transform of a partitioned rule), and
// every target subject (per live cell, rendered for shard 0) and DLQ
// subject is captured by a stream whose duplicate window is at least
// MinWindow. It returns every problem, in rule order; the error is for
// requests that failed (each attempt has its own timeout within ctx; see
// PreflightOptions.Retry).
func Preflight(ctx context.Context, js jetstream.JetStream, table *router.Table, opts PreflightOptions) ([]Problem, error) {
	pf := &preflight{js: js, opts: opts, captured: map[string]*jetstream.StreamConfig{}, streams: map[string]*jetstream.StreamConfig{}}
	for _, r := range table.Rules() {
		if err := pf.rule(ctx, table, r); err != nil {
			return pf.problems, err
		}
	}
	return pf.problems, nil
}

type preflight struct {
	js       jetstream.JetStream
	opts     PreflightOptions
	problems []Problem
	captured map[string]*jetstream.StreamConfig // subject → its stream (nil: none)
	streams  map[string]*jetstream.StreamConfig // name → config (nil: missing)
}

func (pf *preflight) on(broker string) bool { return pf.opts.Broker == "" || broker == pf.opts.Broker }

func (pf *preflight) add(r *router.Rule, role, broker, subject, cell, format string, a ...any) {
	pf.problems = append(pf.problems, Problem{Rule: r.Name, Role: role, Broker: broker, Subject: subject, Cell: cell, Msg: fmt.Sprintf(format, a...)})
}

func (pf *preflight) rule(ctx context.Context, table *router.Table, r *router.Rule) error {
	if r.Source.IsNATS() && pf.on(r.Source.Broker) {
		if err := pf.source(ctx, r); err != nil {
			return err
		}
	}
	if r.Target.Subject != "" {
		seen := map[string]bool{}
		for _, ct := range liveTargets(table, r) {
			t := ct.Target
			if !pf.on(t.Broker) || seen[t.Broker+" "+t.Subject] {
				continue
			}
			seen[t.Broker+" "+t.Subject] = true
			if err := pf.target(ctx, r, "target", t.Broker, t.Subject, ct.Cell); err != nil {
				return err
			}
		}
	}
	if d := r.DLQ; d != nil && d.Subject != "" && pf.on(d.Broker) {
		return pf.target(ctx, r, "dead-letter target", d.Broker, d.Subject, "")
	}
	return nil
}

// stream reads a stream's configuration once (nil: it does not exist).
func (pf *preflight) stream(ctx context.Context, name string) (*jetstream.StreamConfig, error) {
	if cfg, ok := pf.streams[name]; ok {
		return cfg, nil
	}
	st, err := retried(ctx, pf.opts.Retry, retry.OpStreamInfo, name, func(ctx context.Context) (jetstream.Stream, error) { return pf.js.Stream(ctx, name) })
	switch {
	case errors.Is(err, jetstream.ErrStreamNotFound):
		pf.streams[name] = nil
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("natsjs: preflight: stream %s: %w", name, err)
	}
	cfg := st.CachedInfo().Config
	pf.streams[name] = &cfg
	return &cfg, nil
}

func (pf *preflight) source(ctx context.Context, r *router.Rule) error {
	cfg, err := pf.stream(ctx, r.Source.Stream)
	if err != nil {
		return err
	}
	b := r.Source.Broker
	if cfg == nil {
		pf.add(r, "source", b, "", "", "stream %s does not exist", r.Source.Stream)
		return nil
	}
	if subj := r.Source.Subject; subj != "" && !capturedBy(cfg.Subjects, subj) {
		pf.add(r, "source", b, subj, "", "stream %s does not capture it (its subjects: %v)", r.Source.Stream, cfg.Subjects)
	}
	if r.Source.Partitions > 0 {
		tr, err := RuleTransform(r)
		if err == nil {
			err = CheckTransform(cfg, tr)
		}
		if err != nil {
			pf.add(r, "source", b, "", "", "%v", err)
		}
	}
	return nil
}

// target checks that a stream captures subj, with a long enough window.
func (pf *preflight) target(ctx context.Context, r *router.Rule, role, broker, subj, cell string) error {
	cfg, ok := pf.captured[broker+" "+subj]
	if !ok {
		var err error
		cfg, err = retried(ctx, pf.opts.Retry, retry.OpStreamInfo, "listening on "+subj, func(ctx context.Context) (*jetstream.StreamConfig, error) {
			var cfg *jetstream.StreamConfig
			l := pf.js.ListStreams(ctx, jetstream.WithStreamListSubject(subj))
			for info := range l.Info() {
				if cfg == nil && capturedBy(info.Config.Subjects, subj) {
					c := info.Config
					cfg = &c
				}
			}
			return cfg, l.Err()
		})
		if err != nil {
			return fmt.Errorf("natsjs: preflight: streams listening on %s: %w", subj, err)
		}
		pf.captured[broker+" "+subj] = cfg
	}
	switch {
	case cfg == nil:
		pf.add(r, role, broker, subj, cell, "no stream captures it: every publish would fail with \"no responders\"")
	case windowOf(*cfg) < pf.opts.MinWindow:
		pf.add(r, role, broker, subj, cell, "stream %s drops repeats only within %s, less than the %s the configuration needs (%s)",
			cfg.Name, FormatDuration(windowOf(*cfg)), FormatDuration(pf.opts.MinWindow), pf.opts.Why)
	}
	return nil
}

// liveTargets are the targets a rule publishes to under table: per cell
// that is not down, the rule's target rendered for shard 0 (a routed rule),
// or the cells a broadcast rule sends copies to.
func liveTargets(table *router.Table, r *router.Rule) []router.BroadcastCell {
	var out []router.BroadcastCell
	if r.Broadcast != nil {
		for _, c := range r.BroadcastCells() {
			if c.Skip != router.SkipDown {
				out = append(out, router.BroadcastCell{Cell: c.Cell, Target: c.Target})
			}
		}
		return out
	}
	for _, c := range table.Cells() {
		if c.State != router.StateDown {
			out = append(out, router.BroadcastCell{Cell: c.Name, Target: r.Render(c.Name, 0)})
		}
	}
	return out
}
