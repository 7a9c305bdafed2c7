package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"os"
	"os/signal"
	"slices"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/fx"
	"go.uber.org/fx/fxevent"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// The fx application of `cellbridge run` (and of the demo). Each component
// is provided by a constructor that only registers lifecycle hooks; the work
// happens in OnStart (bounded by the start timeout, never blocking beyond
// it: long-running loops get their own goroutines) and is undone in OnStop.
// fx runs OnStart hooks in dependency order and OnStop hooks in reverse, so
// shutdown is: stop fetching and drain the pipeline, close sources, sinks,
// the dedupe store, the connections, and last the embedded server. If a
// start hook fails, fx stops the components already started.

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
	// Started, when set, is called once the app has started.
	Started func(Info)
	// Version labels cellbridge_build_info; "" is "dev".
	Version string
}

// Info describes a started bridge.
type Info struct {
	HTTPAddr string // host:port the HTTP server listens on
	NATSURL  string // the embedded server's client URL ("" with configured brokers)
	Pipeline *bridge.Pipeline
	Holder   *router.Holder
}

// StartTimeout bounds the start of the bridge: connecting, creating the
// dedupe bucket and the consumers.
const StartTimeout = 60 * time.Second

// Run runs the bridge until ctx is cancelled (SIGINT/SIGTERM) or a
// component fails for good, then stops it gracefully.
func Run(ctx context.Context, o *Options) error {
	app := fx.New(Module(o), fx.StartTimeout(StartTimeout), fx.StopTimeout(StopTimeout(o.Config)))
	if err := app.Err(); err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, StartTimeout)
	err := app.Start(sctx)
	cancel()
	if err != nil {
		return err
	}
	var code int
	select {
	case <-ctx.Done():
		ForceOnSecondSignal(o.Log)
	case sig := <-app.Wait():
		code = sig.ExitCode
	}
	stopCtx, cancel := context.WithTimeout(context.Background(), StopTimeout(o.Config))
	defer cancel()
	if err := app.Stop(stopCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if code != 0 {
		return errors.New("stopped after a component failed (see the log)")
	}
	return nil
}

// ForceOnSecondSignal restores the default action of SIGINT and SIGTERM
// once the first one started the graceful stop, so that a second Ctrl-C
// ends a drain that takes too long.
func ForceOnSecondSignal(log *slog.Logger) {
	signal.Reset(os.Interrupt, syscall.SIGTERM)
	log.Info("stopping: draining in-flight messages (a second SIGINT/SIGTERM exits at once)")
}

// StopTimeout covers the drain plus closing everything else.
func StopTimeout(c *config.Config) time.Duration { return c.Pipeline.DrainTimeout.D() + 15*time.Second }

// Module is the fx graph; tests build it with fxtest.
func Module(o *Options) fx.Option {
	if o.Log == nil {
		o.Log = NewLogger(o.Config.Log, os.Stderr)
	}
	if o.Stdout == nil {
		o.Stdout = io.Discard
	}
	return fx.Options(
		fx.Supply(o, o.Config, o.Rules, o.Log),
		fx.WithLogger(func(log *slog.Logger) fxevent.Logger {
			// fx's own events are debug-level noise for an operator;
			// its errors are not.
			l := &fxevent.SlogLogger{Logger: log.With("component", "fx")}
			l.UseLogLevel(slog.LevelDebug)
			l.UseErrorLevel(slog.LevelError)
			return l
		}),
		fx.Provide(
			func(o *Options) *bridge.Metrics {
				v := o.Version
				if v == "" {
					v = "dev"
				}
				return bridge.NewMetrics(v)
			},
			func(m *bridge.Metrics, log *slog.Logger) *bridge.Health { return bridge.NewHealth(m, log, nil) },
			func(t *router.Table) *router.Holder { return router.NewHolder(t) },
			newEmbeddedNATS,
			newBrokers,
			newDedupe,
			newRMQ,
			newSinks,
			newSources,
			newPipeline,
			newWatcher,
			newHTTPServer,
		),
		// Parameters are resolved in order: the HTTP server is built (and
		// started) first and stopped last.
		fx.Invoke(func(h *httpServer, o *Options, lc fx.Lifecycle, e *embeddedNATS, p *pipelineComp, _ *watcherComp) {
			lc.Append(fx.StartHook(func() {
				if o.Started != nil {
					o.Started(Info{HTTPAddr: h.addr, NATSURL: e.url, Pipeline: p.p, Holder: p.holder})
				}
			}))
		}),
	)
}

// embeddedNATS is the in-process server of the embedded default; it is
// inert when brokers are configured.
type embeddedNATS struct {
	srv *server.Server
	url string
}

func newEmbeddedNATS(lc fx.Lifecycle, o *Options, log *slog.Logger) *embeddedNATS {
	e := &embeddedNATS{}
	if !o.Config.Embedded() {
		return e
	}
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			srv, err := startEmbedded(o.DataDir, o.NATSPort, o.NATSTune)
			if err != nil {
				return err
			}
			e.srv, e.url = srv, srv.ClientURL()
			log.Info("embedded nats-server started", "url", e.url, "store", srv.StoreDir())
			if o.NATSPort > 0 && o.NATSPort != srv.Addr().(*net.TCPAddr).Port {
				fmt.Fprintf(o.Stdout, "port %d is taken; the embedded NATS server listens on %s\n", o.NATSPort, e.url)
			} else {
				fmt.Fprintf(o.Stdout, "embedded NATS server (JetStream): %s\n", e.url)
			}
			return nil
		},
		OnStop: func(context.Context) error {
			e.srv.Shutdown()
			e.srv.WaitForShutdown()
			return nil
		},
	})
	return e
}

// Roles a broker connection serves, as in cellbridge_connection_up.
const (
	roleSource = "source"
	roleSink   = "sink"
	roleDedupe = "dedupe"
)

// brokerRoles lists, per broker name, the roles the rules and the dedupe
// store give it. Brokers nothing uses are not connected.
func brokerRoles(cfg *config.Config, t *router.Table) map[string][]string {
	roles := map[string][]string{}
	add := func(b, role string) {
		if b != "" && !slices.Contains(roles[b], role) {
			roles[b] = append(roles[b], role)
		}
	}
	for _, r := range t.Rules() {
		add(r.Source.Broker, roleSource)
		for _, c := range t.Cells() {
			add(r.Render(c.Name, -1).Broker, roleSink)
		}
		if r.DLQ != nil {
			add(r.DLQ.Broker, roleSink)
		}
	}
	if cfg.Dedupe.Store == config.DedupeJetStream {
		add(cfg.Dedupe.Broker, roleDedupe)
	}
	return roles
}

// brokers holds the NATS connections by broker name.
type brokers struct {
	roles map[string][]string
	conns map[string]*nats.Conn
	js    map[string]jetstream.JetStream
}

func newBrokers(lc fx.Lifecycle, o *Options, e *embeddedNATS, health *bridge.Health, log *slog.Logger) *brokers {
	b := &brokers{roles: brokerRoles(o.Config, o.Rules), conns: map[string]*nats.Conn{}, js: map[string]jetstream.JetStream{}}
	for _, f := range o.Config.InlineSecrets() {
		log.Warn("secret written in clear in the config file; prefer ${ENV_VAR} or file:/path", "field", f)
	}
	for name := range o.Config.Brokers {
		if b.roles[name] == nil {
			log.Warn("broker not used by any rule or the dedupe store; not connecting", "broker", name)
		}
	}
	lc.Append(fx.Hook{
		OnStart: func(ctx context.Context) (err error) {
			defer func() {
				if err != nil { // fx does not call OnStop after a failed OnStart
					for _, nc := range b.conns {
						nc.Close()
					}
				}
			}()
			for _, name := range slices.Sorted(maps.Keys(b.roles)) {
				bc, typ := natsBrokerConfig(o.Config, name, e.url)
				if typ == config.BrokerRocketMQ {
					continue // RocketMQ clients belong to rmqComp (rmq.go)
				}
				if typ != config.BrokerNATS {
					return fmt.Errorf("broker %q: type %s is not supported by this build", name, typ)
				}
				roles := b.roles[name]
				bc.OnStateChange = func(up bool) {
					for _, r := range roles {
						health.ConnectionChanged(name, r, up)
					}
				}
				nc, err := natsjs.Connect(ctx, bc, log)
				if err != nil {
					return err
				}
				b.conns[name] = nc
				js, err := natsjs.NewJetStream(nc, natsjs.JetStreamConfig{MaxPending: sinkMaxPending(o.Config)})
				if err != nil {
					return err
				}
				b.js[name] = js
			}
			if o.Config.Embedded() {
				if err := natsjs.EnsureStreams(ctx, b.js["nats"], o.Rules, natsjs.StreamOptions{Broker: "nats"}); err != nil {
					return fmt.Errorf("embedded default: creating streams: %w", err)
				}
			}
			return nil
		},
		OnStop: func(ctx context.Context) error {
			var errs []error
			for name, nc := range b.conns {
				// Acks are sent without waiting for replies; flush them so
				// that what was settled is not redelivered after a restart.
				if err := nc.FlushWithContext(ctx); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
					errs = append(errs, fmt.Errorf("broker %q: flush: %w", name, err))
				}
				nc.Close()
			}
			return errors.Join(errs...)
		},
	})
	return b
}

// natsBrokerConfig maps a configured (or the embedded) broker onto the
// adapter's connection config.
func natsBrokerConfig(cfg *config.Config, name, embeddedURL string) (natsjs.BrokerConfig, string) {
	if cfg.Embedded() {
		return natsjs.BrokerConfig{Name: name, URL: embeddedURL}, config.BrokerNATS
	}
	b := cfg.Brokers[name]
	bc := natsjs.BrokerConfig{Name: name, URL: b.URL, Creds: b.Creds, User: b.User,
		Password: b.Password.Value(), Token: b.Token.Value()}
	if b.TLS != nil {
		bc.TLS = &natsjs.TLSConfig{CA: b.TLS.CA, Cert: b.TLS.Cert, Key: b.TLS.Key}
	}
	return bc, b.Type
}

// sinkMaxPending bounds unconfirmed publishes per broker: the pipeline
// never has more than maxInFlight messages between publish and confirm.
func sinkMaxPending(c *config.Config) int { return c.Pipeline.MaxInFlight }

// dedupeComp owns the dedupe store.
type dedupeComp struct{ store dedupe.Store }

func newDedupe(lc fx.Lifecycle, o *Options, b *brokers, health *bridge.Health, log *slog.Logger) *dedupeComp {
	d := &dedupeComp{}
	c := o.Config.Dedupe
	lc.Append(fx.Hook{
		OnStart: func(ctx context.Context) error {
			switch c.Store {
			case config.DedupeMemory:
				d.store = dedupe.NewMemory(dedupe.MemoryConfig{Size: c.Size, TTL: c.TTL.D(), ReserveTTL: c.ReserveTTL.D()})
			case config.DedupeJetStream:
				s, err := newKVStore(ctx, b.js[c.Broker], c)
				if err != nil {
					return fmt.Errorf("dedupe store (jetstream bucket %s on broker %s): %w", c.Bucket, c.Broker, err)
				}
				d.store = s
			}
			log.Info("dedupe store ready", "store", c.Store, "bucket", c.Bucket, "ttl", c.TTL.String())
			return nil
		},
		OnStop: func(ctx context.Context) error { return d.store.Close(ctx) },
	})
	return d
}

// sinksComp owns the sinks, one per broker kind.
type sinksComp struct {
	nats   *natsjs.Sink
	lookup bridge.SinkLookup
}

func newSinks(lc fx.Lifecycle, o *Options, b *brokers, rq *rmqComp, log *slog.Logger) *sinksComp {
	s := &sinksComp{}
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			js := map[string]jetstream.JetStream{}
			for name, roles := range b.roles {
				if slices.Contains(roles, roleSink) && b.js[name] != nil {
					js[name] = b.js[name]
				}
			}
			m := map[string]bridge.Sink{}
			if len(js) > 0 {
				sink, err := natsjs.NewSink(js, natsjs.SinkConfig{MaxPending: sinkMaxPending(o.Config)}, log.With("component", "sink"))
				if err != nil {
					return err
				}
				s.nats = sink
				for name := range js {
					m[name] = sink
				}
			}
			rq.addSinks(m)
			s.lookup = bridge.StaticSinks(m)
			return nil
		},
		OnStop: func(ctx context.Context) error {
			if s.nats == nil {
				return nil
			}
			return s.nats.Close(ctx)
		},
	})
	return s
}

// sourcesComp owns one source per topic rule.
type sourcesComp struct {
	rules []string
	list  []bridge.Source
}

func newSources(lc fx.Lifecycle, o *Options, b *brokers, rq *rmqComp, health *bridge.Health, log *slog.Logger) *sourcesComp {
	s := &sourcesComp{}
	pl := o.Config.Pipeline
	lc.Append(fx.Hook{
		OnStart: func(ctx context.Context) error {
			for _, r := range o.Rules.Rules() {
				if !r.Source.IsNATS() {
					src, err := rq.newSource(r)
					if err != nil {
						return err
					}
					s.rules = append(s.rules, r.Name)
					s.list = append(s.list, src)
					continue
				}
				rule := r.Name
				src, err := natsjs.NewSource(ctx, b.js[r.Source.Broker], natsjs.SourceConfig{
					Rule:    rule,
					Broker:  r.Source.Broker,
					Stream:  r.Source.Stream,
					Subject: r.Source.Subject,
					Durable: r.Source.Group,
					// Held messages stay unacknowledged while parked: leave
					// room for them and for one fetch on top of in-flight.
					MaxAckPending: pl.MaxInFlight + pl.MaxHeld + pl.FetchBatch,
					AckWait:       pl.AckWait.D(),
					FetchBatch:    pl.FetchBatch,
					Backlog:       func(n uint64) { health.Backlog(rule, int64(n)) },
				}, log.With("component", "source"))
				if err != nil {
					return fmt.Errorf("rule %s: %w", rule, err)
				}
				s.rules = append(s.rules, rule)
				s.list = append(s.list, src)
			}
			return nil
		},
		OnStop: func(ctx context.Context) error {
			var errs []error
			for _, src := range s.list {
				errs = append(errs, src.Close(ctx))
			}
			return errors.Join(errs...)
		},
	})
	return s
}

// pipelineComp runs the pipeline over every source.
type pipelineComp struct {
	p      *bridge.Pipeline
	holder *router.Holder
}

func newPipeline(lc fx.Lifecycle, sd fx.Shutdowner, o *Options, holder *router.Holder, m *bridge.Metrics,
	health *bridge.Health, d *dedupeComp, sinks *sinksComp, srcs *sourcesComp, hs *httpServer, log *slog.Logger) *pipelineComp {
	pc := &pipelineComp{holder: holder}
	var (
		cancel context.CancelFunc
		wg     sync.WaitGroup
	)
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			p, err := bridge.New(o.Config.Pipeline.Bridge(), bridge.Deps{Rules: holder, Dedupe: d.store, Sinks: sinks.lookup,
				Metrics: m, Health: health, Log: log})
			if err != nil {
				return err
			}
			pc.p = p
			hs.handler.set(bridge.NewHTTP(p))
			var ctx context.Context
			ctx, cancel = context.WithCancel(context.Background())
			for i, src := range srcs.list {
				rule := srcs.rules[i]
				wg.Go(func() {
					if err := p.Run(ctx, src); err != nil {
						log.Error("source stopped; shutting down", "rule", rule, "err", err)
						_ = sd.Shutdown(fx.ExitCode(1))
					}
				})
			}
			log.Info("bridge running", "rules_version", o.Rules.Version(), "topics", srcs.rules, "dedupe", o.Config.Dedupe.Store)
			return nil
		},
		OnStop: func(ctx context.Context) error {
			// Stop fetching first, then finish what is in flight. A Handle
			// blocked on a full sink can hold a source's Run past the
			// cancel; the wait is bounded by the stop deadline, and Close
			// below settles whatever is still in flight.
			cancel()
			ran := make(chan struct{})
			go func() { wg.Wait(); close(ran) }()
			select {
			case <-ran:
			case <-ctx.Done():
				log.Warn("sources did not stop before the stop deadline; draining anyway")
			}
			dctx, dcancel := context.WithTimeout(ctx, o.Config.Pipeline.DrainTimeout.D())
			defer dcancel()
			err := pc.p.Close(dctx)
			log.Info("bridge stopped")
			return err
		},
	})
	return pc
}

// watcherComp reloads the rules on change.
type watcherComp struct{ w *router.Watcher }

func newWatcher(lc fx.Lifecycle, o *Options, pc *pipelineComp, log *slog.Logger) *watcherComp {
	wc := &watcherComp{}
	var wg sync.WaitGroup
	var cancel context.CancelFunc
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			onReload := func(ev router.ReloadEvent) {
				pc.p.RulesReloaded(ev.Version, ev.Previous, ev.Err, ev.At) // metrics and the one log line
				if ev.Err == nil {
					checkReloaded(o, pc.holder.Load(), log)
				}
			}
			// The pipeline logs each outcome (one line per reload); the
			// watcher's own lines about the same outcome drop to debug.
			wlog := slog.New(&demoteHandler{Handler: log.Handler(), msgs: []string{"rules reloaded", "rules reload refused"}})
			w, err := router.NewWatcher(o.RulesDir, pc.holder, onReload, wlog.With("component", "rules"))
			if err != nil {
				return fmt.Errorf("watching rules %s: %w", o.RulesDir, err)
			}
			wc.w = w
			var ctx context.Context
			ctx, cancel = context.WithCancel(context.Background())
			wg.Go(func() {
				if err := w.Run(ctx); err != nil && ctx.Err() == nil {
					log.Error("rules watcher stopped; reloads are off until restart", "err", err)
				}
			})
			return nil
		},
		OnStop: func(ctx context.Context) error {
			cancel()
			err := wc.w.Close(ctx)
			wg.Wait()
			return err
		},
	})
	return wc
}

// demoteHandler logs records with one of msgs at debug level.
type demoteHandler struct {
	slog.Handler
	msgs []string
}

func (d *demoteHandler) Handle(ctx context.Context, r slog.Record) error {
	if slices.Contains(d.msgs, r.Message) {
		if !d.Handler.Enabled(ctx, slog.LevelDebug) {
			return nil
		}
		r.Level = slog.LevelDebug
	}
	return d.Handler.Handle(ctx, r)
}

func (d *demoteHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &demoteHandler{Handler: d.Handler.WithAttrs(as), msgs: d.msgs}
}

func (d *demoteHandler) WithGroup(name string) slog.Handler {
	return &demoteHandler{Handler: d.Handler.WithGroup(name), msgs: d.msgs}
}

// checkReloaded warns about what a reloaded table asks for that the running
// bridge cannot do without a restart: new topic rules (no source consumes
// them) and brokers the configuration does not define.
func checkReloaded(o *Options, t *router.Table, log *slog.Logger) {
	if t == nil {
		return
	}
	for _, r := range t.Rules() {
		if o.Rules.Rule(r.Name) == nil {
			log.Warn("reloaded rules add a topic rule; restart the bridge to consume it", "rule", r.Name)
		}
	}
	if err := o.Config.CheckRules(t); err != nil {
		log.Error("reloaded rules name brokers the configuration lacks; their messages cannot be published", "problems", err.Error())
	}
}

// httpServer serves /metrics, /healthz, /readyz, /route and /status. It
// starts before everything else, so that liveness probes pass while the
// bridge connects, and stops last; until the pipeline runs it answers
// /healthz only (everything else: 503 starting).
type httpServer struct {
	addr    string
	handler atomicHandler
}

type atomicHandler struct {
	mu sync.RWMutex
	h  http.Handler
}

func (a *atomicHandler) set(h http.Handler) { a.mu.Lock(); a.h = h; a.mu.Unlock() }

func (a *atomicHandler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.mu.RLock()
	h := a.h
	a.mu.RUnlock()
	if h != nil {
		h.ServeHTTP(w, r)
		return
	}
	if r.URL.Path == "/healthz" {
		_, _ = io.WriteString(w, "ok\n")
		return
	}
	http.Error(w, "starting", http.StatusServiceUnavailable)
}

func newHTTPServer(lc fx.Lifecycle, o *Options, log *slog.Logger) *httpServer {
	hs := &httpServer{}
	srv := &http.Server{Handler: &hs.handler, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	var wg sync.WaitGroup
	lc.Append(fx.Hook{
		OnStart: func(context.Context) error {
			addr := o.Config.HTTP.Listen
			l, err := net.Listen("tcp", addr)
			if err != nil && !o.Config.IsSet("http.listen") && isAddrInUse(err) {
				// The default port is taken (another bridge, a dev tool):
				// take any free port rather than failing the demo.
				l, err = net.Listen("tcp", "127.0.0.1:0")
				if err == nil {
					fmt.Fprintf(o.Stdout, "port %s is taken; HTTP listens on %s\n", addr, l.Addr())
				}
			}
			if err != nil {
				return fmt.Errorf("http.listen %s: %w", addr, err)
			}
			hs.addr = l.Addr().String()
			log.Info("http listening", "addr", hs.addr)
			wg.Go(func() {
				if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
					log.Error("http server failed", "err", err)
				}
			})
			return nil
		},
		OnStop: func(ctx context.Context) error {
			err := srv.Shutdown(ctx)
			wg.Wait()
			return err
		},
	})
	return hs
}

func isAddrInUse(err error) bool { return errors.Is(err, syscall.EADDRINUSE) }

// newKVStore opens the JetStream KV dedupe store.
func newKVStore(ctx context.Context, js jetstream.JetStream, c config.DedupeConfig) (dedupe.Store, error) {
	return dedupe.NewJetStream(ctx, js, dedupe.KVConfig{Bucket: c.Bucket, TTL: c.TTL.D(), ReserveTTL: c.ReserveTTL.D(), Replicas: c.Replicas})
}
