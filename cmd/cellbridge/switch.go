package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/deployment"
	"github.com/cellbridge/cellbridge/internal/switchover"
	"github.com/cellbridge/cellbridge/router"
)

func init() {
	register(&command{
		name:    "switch",
		summary: "move shards between cells across every replica: block, wait, catch up, switch, drain",
		usage: `Usage: cellbridge switch [-config FILE | -addr URL ...] [-apply-cmd CMD] [-wait-cmd CMD] [-print] [-dry-run] OLD_DIR NEW_DIR

Carries out the planned switch of docs/runbook.md ("Switch shards between
cells") for the whole deployment. OLD_DIR is the rules directory the
replicas run (the ConfigMap's source, or the mounted directory itself), and
NEW_DIR the rules with the new owners:

  1. writes OLD_DIR's rules with the moving shards (cellbridge diff OLD_DIR
     NEW_DIR) blocked, under a version above every version the deployment has
     run;
  2. waits until every live replica runs that version and publishes nothing
     it decided under an older one (from then on no message of a moving shard
     reaches any cell; their messages are held), then runs -wait-cmd, if
     given, until it exits 0 (the new cell has caught up);
  3. writes NEW_DIR's rules into OLD_DIR, under a version above the blocking
     one, and waits until every replica runs them and holds nothing of the
     moving shards; then reports what moved.

OLD_DIR may be the directory the replicas read, or the source of their
ConfigMap: -apply-cmd then takes each write to them (a kubectl apply), and
the switch waits until the replicas run it.

The replicas are found in the deployment's registry (each replica publishes
its rules version, held messages and readiness in the KV bucket
partitions.bucket, cellbridge-leases by default, of the broker the
configuration names: -config), or, with
-addr, read over HTTP (/status) one by one; a URL that does not answer
counts as a replica not there yet and holds each step until it answers (or
-timeout ends); a pod restarted under another address is not found under the
old one: name the replicas again, or use the registry. A replica that sees the files later than the others (a
kubelet syncing a ConfigMap) is waited for.

With -print nothing is written: each step's files are printed for you to
apply (GitOps), and the command waits for the deployment to run them.
OLD_DIR is the state: a switch that was interrupted resumes where it stopped
when run again with the same arguments (when OLD_DIR holds a step's rules
that no replica runs yet, -apply-cmd runs again first). -dry-run prints the
plan only.

Exit status 0 when the switch is done, 1 when it failed or was interrupted
(the output says where; run it again to resume), 2 for usage errors.`,
		flags: switchCommand,
	})
}

// stringList is a repeatable flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func switchCommand(fs *flag.FlagSet) runFunc {
	var (
		cfgFile       string
		addrs         stringList
		waitCmd       string
		applyCmd      string
		waitInterval  time.Duration
		timeout       time.Duration
		print, dryRun bool
	)
	fs.StringVar(&cfgFile, "config", "", "bridge configuration `FILE`: the deployment's registry is on its broker (default: the embedded default's)")
	fs.Var(&addrs, "addr", "a replica's HTTP `URL` (repeatable): read the replicas over HTTP instead of the registry")
	fs.StringVar(&applyCmd, "apply-cmd", "", "a shell `CMD` run after each write of OLD_DIR to take it to the replicas (e.g. kubectl apply -k ...)")
	fs.StringVar(&waitCmd, "wait-cmd", "", "catch-up check: a shell `CMD` that exits 0 once the new cells have caught up (run until it does)")
	fs.DurationVar(&waitInterval, "wait-interval", 5*time.Second, "pause between two runs of -wait-cmd")
	fs.DurationVar(&timeout, "timeout", 10*time.Minute, "give up waiting for the replicas after this long (per step)")
	fs.BoolVar(&print, "print", false, "print each step's rule files for you to apply, instead of writing OLD_DIR")
	fs.BoolVar(&dryRun, "dry-run", false, "print the plan and change nothing")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		if len(args) != 2 {
			return usageError(stderr, "switch", "want OLD_DIR and NEW_DIR, got %d arguments", len(args))
		}
		if cfgFile != "" && len(addrs) > 0 {
			return usageError(stderr, "switch", "-config and -addr exclude each other")
		}
		src, closeSrc, err := switchDeployment(ctx, cfgFile, addrs)
		if err != nil {
			fmt.Fprintf(stderr, "cellbridge switch: %v\n", err)
			return exitError
		}
		defer closeSrc()
		_, err = switchover.Run(ctx, switchover.Config{
			Old: args[0], New: args[1], Print: print, DryRun: dryRun, Deployment: src, ApplyCmd: applyCmd,
			WaitCmd: waitCmd, CatchUpInterval: waitInterval, Timeout: timeout, Out: stdout,
		})
		if err != nil {
			fmt.Fprintf(stderr, "cellbridge switch: %v\n", strings.TrimPrefix(err.Error(), "switch: "))
			return exitError
		}
		return exitOK
	}
}

// switchDeployment is where the switch finds the replicas: their HTTP
// addresses, or the registry on the configuration's broker.
func switchDeployment(ctx context.Context, cfgFile string, addrs []string) (deployment.Source, func(), error) {
	if len(addrs) > 0 {
		return &deployment.HTTP{URLs: addrs}, func() {}, nil
	}
	return registrySource(ctx, cfgFile)
}

// registrySource connects to the registry broker of the configuration in
// cfgFile (the embedded default without one).
func registrySource(ctx context.Context, cfgFile string) (deployment.Source, func(), error) {
	cfg := config.Default()
	if cfgFile != "" {
		c, err := config.Load(cfgFile)
		if err != nil {
			return nil, nil, fmt.Errorf("configuration:\n%s", indent(err.Error()))
		}
		cfg = c
	}
	broker := cfg.RegistryBroker()
	if broker == "" {
		return nil, nil, fmt.Errorf("%s names no NATS broker to hold the deployment's registry: name the replicas with -addr", cfg.File)
	}
	// The replicas publish only to a broker they connect to (one the rules
	// or the dedupe store use): read the rules as they do, where they can
	// be read here.
	if cfg.Rules != "" {
		if t, err := router.Load(string(cfg.Rules)); err == nil && app.RegistryBroker(cfg, t) == "" {
			return nil, nil, fmt.Errorf("the replicas of %s publish no registry: neither its rules (%s) nor its dedupe store use broker %s; name the replicas with -addr",
				cfg.File, cfg.Rules, broker)
		}
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	nc, js, err := app.ConnectBroker(cctx, cfg, broker, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, nil, err
	}
	return app.RegistrySource(cfg, js), nc.Close, nil
}
