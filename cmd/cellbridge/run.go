package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// runFlags are the flags that choose the bridge to run; `demo` and `drill`
// share them.
type runFlags struct {
	config   string
	data     string
	http     string
	rules    string
	natsPort int
}

func (f *runFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.data, "data", "./data", "embedded default: `DIR` for the JetStream store")
	fs.StringVar(&f.http, "http", "", "HTTP listen `ADDR` (overrides http.listen; default :9090)")
	fs.StringVar(&f.rules, "rules", "", "rule `DIR` (overrides rules:; embedded default: the example rules deploy/rules)")
	fs.IntVar(&f.natsPort, "nats-port", app.DefaultNATSPort, "embedded default: preferred NATS client `PORT` (a free one is used when it is taken)")
}

func init() {
	register(&command{
		name:    "run",
		summary: "run the bridge (embedded NATS server and example rules when no brokers are configured)",
		usage: `Usage: cellbridge run [-config FILE] [-data DIR] [-http ADDR] [-rules DIR] [-nats-port PORT] [-check] [-defaults]

Runs the bridge: consumes every topic rule's source, routes each event to the
cell that owns it, republishes it there with an idempotency key, and serves
/metrics, /healthz, /readyz, /route and /status over HTTP (with http.pprof:
true also /debug/pprof/ and /debug/timeline).

Without -config, or with a configuration that names no brokers, it runs the
embedded default: an in-process nats-server with JetStream (store under -data,
client port 4222 or a free one), the example rules, the streams they need, and
the memory dedupe store (each target stream's duplicate window drops repeats).

The configuration and the rules are checked before anything connects: every
problem is printed as file:line: field: message and the exit code is 1.
Once connected, and before consuming anything, it checks that every source
stream exists and every target and dead-letter subject is captured by a
stream with a long enough duplicate window, and lists every problem at once
(cellbridge streams -apply creates what is missing). -check runs the same
checks without starting: the brokers' part when it can reach them. A broker
that refuses the credentials or the TLS settings fails -check (exit 1), as it
fails run; one it cannot reach in time (a timeout, a refused connection)
is reported on stdout and -check still exits 0, since run waits for it.
SIGINT/SIGTERM stop fetching, finish in-flight messages within
pipeline.drainTimeout, then close connections (exit 0).`,
		flags: runCommand,
	})
}

func runCommand(fs *flag.FlagSet) runFunc {
	var (
		f               runFlags
		check, defaults bool
	)
	fs.StringVar(&f.config, "config", "", "bridge configuration `FILE` (YAML); without it, or without brokers in it, the embedded default runs")
	fs.BoolVar(&check, "check", false, "validate the configuration and the rules against each other and the streams on the brokers it reaches, then exit (0 valid, 1 invalid or a broker refused the credentials or TLS)")
	fs.BoolVar(&defaults, "defaults", false, "print every configuration field's default as a Markdown table, then exit")
	f.register(fs)
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		if len(args) > 0 {
			return usageError(stderr, "run", "unexpected arguments: %s", strings.Join(args, " "))
		}
		if defaults {
			config.WriteDefaults(stdout)
			return exitOK
		}
		o, code := prepareRun(&f, stderr)
		if o == nil {
			return code
		}
		if check {
			return runCheck(ctx, o, stdout, stderr)
		}
		if f.config != "" {
			// A bridge run from a configuration file listens where its
			// probes and scrapes point: http.listen, written or its
			// default, counts as chosen, so that a port another process
			// holds is an error rather than a silent move to a free
			// port (which the built-in default, demo and drill keep).
			o.Config.KeepHTTPListen()
		}
		o.Stdout = stdout
		if err := app.Run(ctx, *o); err != nil {
			fmt.Fprintf(stderr, "cellbridge run: %v\n", err)
			return exitError
		}
		return exitOK
	}
}

// prepareRun loads and cross-checks the configuration and the rules, before
// anything connects or consumes. On failure it prints every problem to stderr
// and returns nil and the exit code.
func prepareRun(f *runFlags, stderr io.Writer) (*app.Options, int) {
	fail := func(what string, err error) (*app.Options, int) {
		var ce config.Errors
		var re *router.Errors
		switch {
		case errors.As(err, &ce), errors.As(err, &re):
			fmt.Fprintf(stderr, "cellbridge: invalid %s:\n%s\n", what, indent(err.Error()))
		default:
			fmt.Fprintf(stderr, "cellbridge: %s: %v\n", what, err)
		}
		return nil, exitError
	}
	// The flags replace the file's values before they are validated: a
	// -rules DIR stands in for a rules: directory that exists only where
	// the file is deployed.
	flags := func(c *config.Config) {
		if f.http != "" {
			c.OverrideHTTPListen(f.http) // explicitly chosen: no fallback port
		}
		if f.rules != "" {
			c.OverrideRules(f.rules)
		}
	}
	cfg := config.Default()
	if f.config != "" {
		c, err := config.Load(f.config, flags)
		if err != nil {
			return fail("configuration", err)
		}
		cfg = c
	} else if f.http != "" || f.rules != "" {
		flags(cfg)
		if err := cfg.Validate(); err != nil {
			return fail("flags", err)
		}
	}
	rules := string(cfg.Rules)
	if rules == "" {
		d, err := app.ExampleRulesDir()
		if err != nil {
			return fail("rules", err)
		}
		rules = d
	}
	table, err := router.Load(rules)
	if err != nil {
		return fail("rules in "+rules, err)
	}
	if err := cfg.CheckRules(table); err != nil {
		return fail("configuration for these rules", err)
	}
	return &app.Options{Config: cfg, Rules: table, RulesDir: rules, DataDir: f.data, NATSPort: f.natsPort, Version: version}, exitOK
}

// runCheck is `run -check` after the offline checks passed: the streams
// are checked on every NATS broker it can reach. A broker that refuses the
// connection for good (credentials, TLS) fails the check as it fails `run`;
// one it cannot reach in time is only reported (exit 0): a bridge waits
// for it.
func runCheck(ctx context.Context, o *app.Options, stdout, stderr io.Writer) int {
	unreachable, err := app.CheckBrokers(ctx, o.Config, o.Rules, checkTimeout)
	var pe *app.PreflightError
	var re *app.RefusedError
	if errors.As(err, &pe) || errors.As(err, &re) {
		fmt.Fprintf(stderr, "cellbridge: %s\n", err)
		return exitError
	}
	fmt.Fprintf(stdout, "ok: config %s, rules %s version %d (%d topics, %d cells)\n",
		o.Config.File, o.Rules.Dir(), o.Rules.Version(), len(o.Rules.Rules()), len(o.Rules.Cells()))
	if err != nil {
		fmt.Fprintf(stdout, "streams not checked: %v\n", err)
	}
	for _, name := range slices.Sorted(maps.Keys(unreachable)) {
		fmt.Fprintf(stdout, "streams not checked on broker %s: %v\n", name, unreachable[name])
	}
	return exitOK
}

// checkTimeout bounds `run -check`'s wait for each broker.
const checkTimeout = 5 * time.Second

func indent(s string) string { return "  " + strings.ReplaceAll(s, "\n", "\n  ") }
