package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/fx"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/config"
)

// httpServer serves /metrics, /healthz, /readyz, /route and /status, and
// with http.pprof /debug/pprof/ and /debug/timeline. It serves from
// construction on, before anything connects, so that liveness probes pass
// while the bridge connects (which waits for unreachable brokers without
// end), and stops last. Until the pipeline runs it answers /healthz (200),
// /readyz (503 with what the start waits for), /metrics, /debug/pprof/
// (when on), and 503 "starting" for everything else.
type httpServer struct {
	addr    string
	handler atomicHandler
}

type atomicHandler struct {
	mu      sync.RWMutex
	h       http.Handler
	status  *startStatus
	metrics http.Handler
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
	switch r.URL.Path {
	case "/healthz":
		_, _ = io.WriteString(w, "ok\n")
	case "/readyz":
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusServiceUnavailable)
		_, _ = io.WriteString(w, "not ready:\n"+a.status.String()+"\n")
	case "/metrics":
		a.metrics.ServeHTTP(w, r)
	default:
		http.Error(w, "starting", http.StatusServiceUnavailable)
	}
}

func newHTTPServer(lc fx.Lifecycle, res *resources, o *Options, status *startStatus, m *bridge.Metrics, log *slog.Logger) (*httpServer, error) {
	addr := o.Config.HTTP.Listen
	l, err := net.Listen("tcp", addr)
	if err != nil && !o.Config.IsSet("http.listen") && errors.Is(err, syscall.EADDRINUSE) {
		// The default port of a bridge run for a person (the built-in
		// default, demo, drill) is taken (another bridge, a dev tool):
		// take any free port rather than failing. An address that was
		// chosen (written in the file, -http, or the default of
		// `run -config`, which the command marks as chosen: probes and
		// scrapes point at it) is never replaced.
		l, err = net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			fmt.Fprintf(o.Stdout, "port %s is taken; HTTP listens on %s\n", addr, l.Addr())
		}
	}
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			choose := "-http"
			if o.Config.File != config.BuiltIn {
				choose = "http.listen in " + o.Config.File + " or -http"
			}
			return nil, fmt.Errorf("http.listen %s: address in use: another process listens there, and the probes and scrapes of this address would reach it instead of this bridge; stop it, or choose a free address (%s): %w",
				addr, choose, err)
		}
		return nil, fmt.Errorf("http.listen %s: %w", addr, err)
	}
	hs := &httpServer{addr: l.Addr().String()}
	hs.handler.status = status
	hs.handler.metrics = promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
	var handler http.Handler = &hs.handler
	if o.Config.HTTP.Pprof {
		handler = withPprof(handler)
		log.Warn("http.pprof is on: /debug/pprof/ and /debug/timeline show the process's internals to whoever reaches " + hs.addr)
	}
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 10 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}
	log.Info("http listening", "addr", hs.addr)
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("http server failed", "err", err)
		}
	})
	res.add(lc, func(ctx context.Context) error {
		err := srv.Shutdown(ctx)
		wg.Wait()
		return err
	})
	return hs, nil
}

// withPprof serves Go's profiles under /debug/pprof/ (from start-up on, so
// that a bridge stuck connecting can be looked into) and everything else
// through next; /debug/timeline is next's (pipelineHandler).
func withPprof(next http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	mux.Handle("/", next)
	return mux
}

// pipelineHandler is what the HTTP server serves once the pipeline runs:
// bridge.NewHTTP, plus /debug/timeline when http.pprof is on.
func pipelineHandler(o *Options, p *bridge.Pipeline) http.Handler {
	h := bridge.NewHTTP(p)
	if !o.Config.HTTP.Pprof {
		return h
	}
	mux := http.NewServeMux()
	mux.Handle("/debug/timeline", bridge.TimelineHandler(p))
	mux.Handle("/", h)
	return mux
}
