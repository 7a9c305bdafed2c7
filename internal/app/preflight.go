package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/retry"
	"github.com/cellbridge/cellbridge/router"
)

// PreflightError lists every problem Preflight found.
type PreflightError struct {
	Problems []natsjs.Problem
	// ConfigFile is the configuration, for the command that fixes them.
	ConfigFile string
}

func (e *PreflightError) Error() string {
	var b strings.Builder
	n := len(e.Problems)
	fmt.Fprintf(&b, "%d problem%s with the streams the rules need, found before consuming anything; create or fix them with `cellbridge streams -apply -config %s` (it shows what it changes), or by hand:",
		n, map[bool]string{true: "s", false: ""}[n != 1], e.ConfigFile)
	for _, p := range e.Problems {
		b.WriteString("\n  " + p.String())
	}
	return b.String()
}

// natsBrokers lists the NATS brokers the rules consume from or publish to.
func natsBrokers(cfg *config.Config, t *router.Table) []string {
	var out []string
	for name, roles := range brokerRoles(cfg, t) {
		nats := cfg.Embedded() && name == config.EmbeddedBroker
		if b := cfg.Brokers[name]; b != nil && b.Type == config.NATSType {
			nats = true
		}
		if nats && (slices.Contains(roles, roleSource) || slices.Contains(roles, roleSink)) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// Preflight checks on every NATS broker the rules use (natsjs.Preflight)
// that each source stream exists and every target and DLQ subject is
// captured by a stream whose duplicate window is at least the
// configuration's MinDuplicateWindow. It returns every problem at once
// (a *PreflightError), nil when there is none, or the error of a request
// that failed. jsOf returns a broker's JetStream context.
func Preflight(ctx context.Context, cfg *config.Config, t *router.Table, jsOf func(broker string) (jetstream.JetStream, error)) error {
	return preflightOn(ctx, cfg, t, natsBrokers(cfg, t), jsOf, nil)
}

// preflightOn is Preflight on the named brokers; policy, when set, gives
// the retry policy of each broker's requests (natsjs.PreflightOptions.Retry).
func preflightOn(ctx context.Context, cfg *config.Config, t *router.Table, brokers []string, jsOf func(broker string) (jetstream.JetStream, error),
	policy func(broker string) *retry.Policy) error {
	var all []natsjs.Problem
	for _, name := range brokers {
		js, err := jsOf(name)
		if err != nil {
			return err
		}
		var pol *retry.Policy
		if policy != nil {
			pol = policy(name)
		}
		p, err := natsjs.Preflight(ctx, js, t, natsjs.PreflightOptions{Broker: name, MinWindow: cfg.MinDuplicateWindow(), Retry: pol,
			Why: fmt.Sprintf("dedupe.reserveTTL %s + pipeline.ackWait %s + pipeline.retry.max %s; docs/guarantees.md",
				cfg.Dedupe.ReserveTTL, cfg.Pipeline.AckWait, cfg.Pipeline.Retry.Max)})
		if err != nil {
			return fmt.Errorf("checking the streams of broker %s: %w", name, err)
		}
		all = append(all, p...)
	}
	if len(all) == 0 {
		return nil
	}
	slices.SortStableFunc(all, func(a, b natsjs.Problem) int { return strings.Compare(a.Rule, b.Rule) })
	return &PreflightError{Problems: all, ConfigFile: cfg.File}
}

// preflightDone marks the preflight's place in the construction order:
// after the brokers are connected, before the dedupe store, the sinks and
// the sources.
type preflightDone struct{}

// Each request is bounded by the broker's requestTimeout and retried until
// the start is cancelled: a start during a leader election waits for it
// (not ready, saying so) instead of exiting.
func newPreflight(ctx startCtx, o *Options, b *brokers, status *startStatus, log *slog.Logger) (preflightDone, error) {
	names := natsBrokers(o.Config, o.Rules)
	status.begin(fmt.Sprintf("checking the streams of broker(s) %s", strings.Join(names, ", ")))
	if err := preflightOn(ctx, o.Config, o.Rules, names, b.jetStream, b.requestPolicy); err != nil {
		return preflightDone{}, err
	}
	log.Info("preflight: every source stream exists, every target and dead-letter subject is captured with a long enough duplicate window",
		"brokers", natsBrokers(o.Config, o.Rules), "min_window", o.Config.MinDuplicateWindow().String())
	return preflightDone{}, nil
}

// RefusedError lists the brokers that answered and refused the connection
// for good (RefusedConnect): `run` exits on the first of them.
type RefusedError struct {
	Brokers map[string]error // broker name → why
}

func (e *RefusedError) Error() string {
	var b strings.Builder
	for i, name := range slices.Sorted(maps.Keys(e.Brokers)) {
		if i > 0 {
			b.WriteString("\n")
		}
		fmt.Fprintf(&b, "broker %s refused the connection (no retry helps; `cellbridge run` exits on it too): %v", name, e.Brokers[name])
	}
	return b.String()
}

// RefusedConnect reports whether a failed connect is one that waiting does
// not fix: the broker refused the credentials or the TLS settings
// (retry.Permanent), or its settings cannot make a connection at all
// (natsjs.ErrConfig). Timeouts, refused connections and names that do not
// resolve yet are not: a bridge waits for them.
func RefusedConnect(err error) bool {
	return err != nil && (retry.Permanent(err) || errors.Is(err, natsjs.ErrConfig))
}

// CheckBrokers is `run -check`'s check against the brokers: it connects
// to every configured NATS broker the rules use (each within timeout) and
// runs Preflight on those it reaches. It returns, per broker it could not
// reach (timed out, connection refused), why; and the error: a
// *RefusedError for the brokers that refused the connection for good
// (RefusedConnect), Preflight's error, or both joined. The embedded default
// has no broker to reach.
func CheckBrokers(ctx context.Context, cfg *config.Config, t *router.Table, timeout time.Duration) (map[string]error, error) {
	unreachable := map[string]error{}
	if cfg.Embedded() {
		return unreachable, nil
	}
	js := map[string]jetstream.JetStream{}
	refused := map[string]error{}
	var reached []string
	for _, name := range natsBrokers(cfg, t) {
		cctx, cancel := context.WithTimeout(ctx, timeout)
		nc, j, err := ConnectBroker(cctx, cfg, name, slog.New(slog.DiscardHandler))
		cancel()
		switch {
		case RefusedConnect(err):
			refused[name] = err
			continue
		case err != nil:
			unreachable[name] = err
			continue
		}
		defer nc.Close()
		js[name] = j
		reached = append(reached, name)
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	err := preflightOn(ctx, cfg, t, reached, func(name string) (jetstream.JetStream, error) { return js[name], nil }, nil)
	if len(refused) > 0 {
		err = errors.Join(&RefusedError{Brokers: refused}, err)
	}
	return unreachable, err
}
