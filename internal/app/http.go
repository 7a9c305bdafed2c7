package app

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"syscall"
	"time"

	"go.uber.org/fx"
)

// httpServer serves /metrics, /healthz, /readyz, /route and /status. It
// serves from construction on, before anything connects, so that liveness
// probes pass while the bridge connects, and stops last; until the pipeline
// runs it answers /healthz only (everything else: 503 starting).
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

func newHTTPServer(lc fx.Lifecycle, res *resources, o *Options, log *slog.Logger) (*httpServer, error) {
	addr := o.Config.HTTP.Listen
	l, err := net.Listen("tcp", addr)
	if err != nil && !o.Config.IsSet("http.listen") && errors.Is(err, syscall.EADDRINUSE) {
		// The default port is taken (another bridge, a dev tool): take
		// any free port rather than failing the demo.
		l, err = net.Listen("tcp", "127.0.0.1:0")
		if err == nil {
			fmt.Fprintf(o.Stdout, "port %s is taken; HTTP listens on %s\n", addr, l.Addr())
		}
	}
	if err != nil {
		return nil, fmt.Errorf("http.listen %s: %w", addr, err)
	}
	hs := &httpServer{addr: l.Addr().String()}
	srv := &http.Server{Handler: &hs.handler, ReadHeaderTimeout: 10 * time.Second,
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
