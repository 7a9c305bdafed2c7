package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"go.uber.org/dig"
	"go.uber.org/fx"
	"go.uber.org/fx/fxevent"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// Options is everything a command decided before the bridge is built.
type Options struct {
	Config   *config.Config
	Rules    *router.Table // loaded from RulesDir and cross-checked against Config
	RulesDir string        // watched for changes
	DataDir  string        // embedded default: JetStream store parent
	NATSPort int           // embedded default: preferred client port (-1: random)
	// NATSTune adjusts the embedded server's options (tests: TLS, auth).
	NATSTune func(*server.Options)
	// Stdout receives the start-up notices a person needs (URLs); nil
	// discards them.
	Stdout io.Writer
	// Log is the process logger; nil: built from Config.Log on stderr.
	Log *slog.Logger
	// Version labels cellbridge_build_info; "" is "dev".
	Version string
	// WrapSink, when set, wraps the sink of every target broker (fault
	// injection in the benchmark harness).
	WrapSink func(broker string, s bridge.Sink) bridge.Sink
}

// Info describes a started bridge.
type Info struct {
	HTTPAddr string // host:port the HTTP server listens on
	NATSURL  string // the embedded server's client URL ("" with configured brokers)
	Pipeline *bridge.Pipeline
	Holder   *router.Holder
}

// Outcomes returns cellbridge_messages_total by outcome, summed over every
// topic rule: what the bridge did with the messages it took.
func (i Info) Outcomes() map[string]float64 {
	out := map[string]float64{}
	mfs, err := i.Pipeline.Metrics().Registry.Gather()
	if err != nil {
		return out
	}
	for _, mf := range mfs {
		if mf.GetName() != bridge.MetricMessages {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" {
					out[l.GetValue()] += m.GetCounter().GetValue()
				}
			}
		}
	}
	return out
}

// StartTimeout bounds the OnStart hooks of the bridge, which only start
// loops. Building the bridge (connecting, creating the dedupe bucket and
// the consumers) has no deadline of its own: it waits for unreachable or
// electing brokers, each request attempt bounded and logged, until the
// caller's ctx ends (a signal), and /readyz says what it waits for.
const StartTimeout = 60 * time.Second

// StopTimeout bounds the stop of the bridge: the drain plus closing
// everything else.
func StopTimeout(c *config.Config) time.Duration { return c.Pipeline.DrainTimeout.D() + 15*time.Second }

// App is a started bridge.
type App struct {
	Info
	fx     *fx.App
	res    *resources
	failed *failure
	cfg    *config.Config
}

// failure is closed once, when a component fails for good.
type failure struct {
	once sync.Once
	ch   chan struct{}
}

func (f *failure) set() { f.once.Do(func() { close(f.ch) }) }

// Start builds the bridge of o and starts it. Building connects to the
// brokers, opens the dedupe store, the sinks and the sources and creates the
// pipeline; it retries what fails for reasons that pass (a broker not
// reachable yet, a leader election), logging each attempt, until ctx ends,
// and serves /healthz (200) and /readyz (503 with the step and its last
// failed attempt) meanwhile. Errors that retrying cannot fix (rejected
// credentials, TLS, a missing stream) end it at once. Starting only starts
// the loops (the pipeline's sources, the rules watcher), within
// StartTimeout. On failure everything opened is closed again and the error
// names what failed.
func Start(ctx context.Context, o Options) (*App, error) {
	if o.Log == nil {
		o.Log = NewLogger(o.Config.Log, os.Stderr)
	}
	if o.Stdout == nil {
		o.Stdout = io.Discard
	}
	if o.Version == "" {
		o.Version = "dev"
	}
	a := &App{res: &resources{}, failed: &failure{ch: make(chan struct{})}, cfg: o.Config}
	a.fx = fx.New(module(ctx, &o, a.res, a.failed), fx.Populate(&a.Info),
		fx.StartTimeout(StartTimeout), fx.StopTimeout(StopTimeout(o.Config)))
	// A constructor's error reaches fx.Err wrapped in the graph's
	// description; the constructor's own says what failed.
	err := dig.RootCause(a.fx.Err())
	if err == nil {
		sctx, cancel := context.WithTimeout(ctx, StartTimeout)
		err = a.fx.Start(sctx)
		cancel()
	}
	if err != nil {
		// fx runs no OnStop hook of a graph it could not build, and
		// only those it started of a start that failed: close what the
		// constructors opened.
		stopCtx, cancel := context.WithTimeout(context.Background(), StopTimeout(o.Config))
		defer cancel()
		return nil, errors.Join(err, a.res.rollback(stopCtx))
	}
	return a, nil
}

// Failed is closed when a component failed for good (a source stopped) and
// the bridge should stop.
func (a *App) Failed() <-chan struct{} { return a.failed.ch }

// Stop stops the bridge: fetching, the rules watcher, the drain of
// in-flight messages (pipeline.drainTimeout), then sources, sinks, the
// dedupe store, the connections, the embedded server and last the HTTP
// server. ctx bounds all of it.
func (a *App) Stop(ctx context.Context) error { return a.fx.Stop(ctx) }

// Shutdown stops the bridge within StopTimeout of its configuration.
func (a *App) Shutdown() error {
	ctx, cancel := context.WithTimeout(context.Background(), StopTimeout(a.cfg))
	defer cancel()
	return a.Stop(ctx)
}

// Run runs the bridge until ctx is cancelled (SIGINT/SIGTERM) or a
// component fails for good, then stops it gracefully.
func Run(ctx context.Context, o Options) error {
	if o.Log == nil {
		o.Log = NewLogger(o.Config.Log, os.Stderr)
	}
	a, err := Start(ctx, o)
	if err != nil {
		if ctx.Err() != nil {
			// A signal while the bridge was still starting (waiting for a
			// broker): nothing was consumed; a clean stop.
			o.Log.Info("stopped while starting", "err", err)
			return nil
		}
		return err
	}
	failed := false
	select {
	case <-ctx.Done():
		ForceOnSecondSignal(o.Log)
	case <-a.Failed():
		failed = true
	}
	if err := a.Shutdown(); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if failed {
		return errors.New("stopped after a component failed (see the log)")
	}
	return nil
}

// ForceOnSecondSignal restores the default action of SIGINT and SIGTERM
// once the first one started the graceful stop, so that a second Ctrl-C
// ends a drain that takes too long.
func ForceOnSecondSignal(log *slog.Logger) {
	signal.Reset(os.Interrupt, syscall.SIGTERM)
	if log != nil {
		log.Info("stopping: draining in-flight messages (a second SIGINT/SIGTERM exits at once)")
	}
}

// startCtx ends the constructors' work (connecting, creating buckets and
// consumers, each retried until it succeeds): the caller's context of
// Start, cancelled by a signal.
type startCtx struct{ context.Context }

// module is the fx graph of one bridge. Constructors build the components
// (and fail with an error naming what failed); their OnStart hooks only
// start loops. The parameters of the first Invoke are resolved in order,
// which fixes the construction order, and fx runs OnStop hooks in reverse:
// the HTTP server is built first and stopped last, so that liveness probes
// pass while the bridge connects and drains; the pipeline's fetch loops
// (runPipeline) start last and stop first.
func module(ctx context.Context, o *Options, res *resources, failed *failure) fx.Option {
	return fx.Options(
		fx.Supply(o, o.Config, o.Rules, o.Log, res, failed, startCtx{ctx}),
		fx.WithLogger(fxLogger),
		publishing,
		fx.Provide(
			newHTTPServer,
			newEmbeddedNATS,
			newPreflight,
			newRegistry,
			newSources,
			newWatcher,
			newInfo,
		),
		fx.Invoke(func(*httpServer, *embeddedNATS, *brokers, preflightDone, *registry, dedupe.Store, bridge.SinkLookup, *sources, *bridge.Pipeline, *router.Watcher) {
		}),
		fx.Invoke(runPipeline),
	)
}

// publishing is the part of the graph that `run` and `replay` share:
// metrics, health and start-up status, the rules holder, the brokers, the
// dedupe store, the sinks and the pipeline.
var publishing = fx.Provide(
	newMetrics,
	newHealth,
	func() *startStatus { return &startStatus{} },
	newRequests,
	router.NewHolder,
	newBrokers,
	newDedupe,
	newSinks,
	newPipeline,
)

// fxLogger logs fx's own events at debug level (noise for an operator) and
// its errors at error level.
func fxLogger(log *slog.Logger) fxevent.Logger {
	// fx's own events are debug-level noise for an operator, and so are
	// its errors ("OnStart hook failed", "start failed, rolling back"):
	// Start returns the error that caused them, which the command prints
	// once, naming what failed.
	l := &fxevent.SlogLogger{Logger: log.With("component", "fx")}
	l.UseLogLevel(slog.LevelDebug)
	l.UseErrorLevel(slog.LevelDebug)
	return l
}

// newMetrics makes the registry; cellbridge_rules_version shows the rules
// loaded at start from the first scrape on, also while the bridge waits
// for its brokers (0 there would read as another version than the
// running replicas'; the pipeline keeps it current from then on).
func newMetrics(o *Options) *bridge.Metrics {
	m := bridge.NewMetrics(o.Version)
	if o.Rules != nil {
		m.RulesVersion.Set(float64(o.Rules.Version()))
	}
	return m
}

func newHealth(m *bridge.Metrics, log *slog.Logger) *bridge.Health {
	return bridge.NewHealth(m, log, nil)
}

func newInfo(h *httpServer, e *embeddedNATS, p *bridge.Pipeline, holder *router.Holder) Info {
	return Info{HTTPAddr: h.addr, NATSURL: e.url, Pipeline: p, Holder: holder}
}
