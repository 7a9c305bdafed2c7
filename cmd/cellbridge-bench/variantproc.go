package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"os"
	"os/signal"
	"syscall"
)

// procSpec is what the parent asks a variant process (-variant-proc) to
// run: one of the hand-written loops against the run's server until
// SIGTERM.
type procSpec struct {
	Variant string `json:"variant"`
	URL     string `json:"url"`            // NATS server
	NS      string `json:"ns,omitempty"`   // RocketMQ name server (R-A)
	Rules   string `json:"rules"`          // for the loops' inline cell table
	Tune    string `json:"tune,omitempty"` // variant tuning, k=v,...
	// Pprof, when set, is a listen address for /debug/pprof/ (profiled
	// runs).
	Pprof string `json:"pprof,omitempty"`
}

// procOutcome is what a variant process reports when it exits.
type procOutcome struct {
	Settings string `json:"settings"`
}

// variantProcMain runs one loop as its own process: the variant's
// function from the in-process harness, on the server of spec.URL, until
// SIGTERM or SIGINT; then it writes its settings to out.
func variantProcMain(specJSON, out string) int {
	var spec procSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Fprintln(os.Stderr, "variant-proc:", err)
		return 2
	}
	table, err := loadCellTable(spec.Rules)
	if err != nil {
		fmt.Fprintln(os.Stderr, "variant-proc:", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if spec.Pprof != "" {
		l, err := net.Listen("tcp", spec.Pprof)
		if err != nil {
			fmt.Fprintln(os.Stderr, "variant-proc: pprof:", err)
			return 2
		}
		mux := http.NewServeMux()
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
		srv := &http.Server{Handler: mux}
		go func() { _ = srv.Serve(l) }()
		defer srv.Close()
	}
	e := &env{url: spec.URL, table: table, spec: childSpec{Variant: spec.Variant, Rules: spec.Rules, Tune: spec.Tune}, tune: parseTune(spec.Tune)}
	switch spec.Variant {
	case "R-A":
		err = runRMQPipe(ctx, e, spec.NS)
	default:
		var fn variantFunc
		if fn, err = variantByName(spec.Variant); err == nil {
			err = fn(ctx, e)
		}
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(os.Stderr, "variant-proc %s: %v\n", spec.Variant, err)
		return 1
	}
	b, _ := json.Marshal(procOutcome{Settings: e.settings})
	if err := os.WriteFile(out, b, 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "variant-proc:", err)
		return 1
	}
	return 0
}
