package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/drill"
)

// drillFlags are the flags of `cellbridge drill`.
type drillFlags struct {
	runFlags
	topic          string
	rate           int
	keysPerShard   int
	move, to, down string
	before         time.Duration
	blocked        time.Duration
	after          time.Duration
	settle         time.Duration
	jsonOut        bool
	quiet          bool
}

func init() {
	register(&command{
		name:    "drill",
		summary: "rehearse a planned cell switch and a disaster failover under load, and check the guarantees",
		usage: `Usage: cellbridge drill [-rate N] [-move RANGE -to CELL] [-down CELL] [-data DIR]

Starts the embedded default bridge in this process (in-process NATS server
with JetStream, the example rules, the KV dedupe store) with its rules in a
directory laid out like a Kubernetes ConfigMap volume, puts continuous load
on one topic rule (keyed events carrying a per-key sequence number), and
changes the rules on disk the way an operator does:

  1. planned switch of a shard range to another cell in three steps: rules
     n+1 with the current owners and the blocked list that 'cellbridge diff'
     computes; a wait while the held messages grow (/status); rules n+2 with
     the new owners and nothing blocked; the time until every held event
     arrived is measured;
  2. a rules file with a LOWER version, which the bridge must refuse;
  3. disaster failover: a cell is marked down (cells that failed over to it
     get another failover cell, so that the rules validate); its shards go
     to its failover cell at once.

Then it reads what arrived in every cell stream and checks, by key and in
order: nothing of a blocked shard reached any cell while blocked; nothing was
lost or duplicated (by Cell-Msg-Id and payload id); per-key order held across
both moves; the other shards kept flowing while the range was blocked;
nothing reached the down cell after the failover; the lower version was
refused. It prints events per cell by rules version, the held counts, the
time from unblock to drained, and the violations.

Exit status 0 when there is no violation, 1 when there is any (or the drill
could not run). The bridge's log goes to DIR/cellbridge.log.`,
		flags: drillCommand,
	})
}

func drillCommand(fs *flag.FlagSet) runFunc {
	f := &drillFlags{}
	fs.StringVar(&f.data, "data", "", "`DIR` for the embedded JetStream store, the rules copy and the bridge log (default: a temporary directory, removed afterwards)")
	fs.StringVar(&f.http, "http", "127.0.0.1:0", "HTTP listen `ADDR` of the drill's bridge (/status, /metrics)")
	fs.StringVar(&f.rules, "rules", "", "rule `DIR` to start from (copied; default: the example rules deploy/rules)")
	fs.StringVar(&f.config, "config", "", "configuration `FILE` without brokers (pipeline, dedupe, log settings for the embedded bridge)")
	fs.IntVar(&f.natsPort, "nats-port", -1, "embedded NATS client `PORT` (-1: a free one)")
	fs.StringVar(&f.topic, "topic", "", "topic `RULE` to load (default: the first by name)")
	fs.IntVar(&f.rate, "rate", 2000, "events per second")
	fs.IntVar(&f.keysPerShard, "keys", 2, "keys per shard")
	fs.StringVar(&f.move, "move", "", "shard `RANGE` of the planned switch, e.g. 22-32 (default: the upper third of the first cell's last range)")
	fs.StringVar(&f.to, "to", "", "new owner `CELL` of the range (default: the last active cell)")
	fs.StringVar(&f.down, "down", "", "`CELL` the failover marks down (default: the new owner)")
	fs.DurationVar(&f.before, "before", 2*time.Second, "load before the switch")
	fs.DurationVar(&f.blocked, "blocked", 3*time.Second, "how long the range stays blocked")
	fs.DurationVar(&f.after, "after", 2*time.Second, "load after the switch (twice as long after the failover)")
	fs.DurationVar(&f.settle, "settle", 30*time.Second, "longest wait for a reload, a drain or the last events")
	fs.BoolVar(&f.jsonOut, "json", false, "print the report as JSON")
	fs.BoolVar(&f.quiet, "q", false, "no progress lines, only the report")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		if len(args) > 0 {
			return usageError(stderr, "drill", "unexpected arguments: %s", strings.Join(args, " "))
		}
		if f.rate <= 0 || f.keysPerShard <= 0 || f.before <= 0 || f.blocked <= 0 || f.after <= 0 || f.settle <= 0 {
			return usageError(stderr, "drill", "-rate, -keys and the durations must be positive")
		}
		rep, err := runDrillCommand(ctx, f, stdout, stderr)
		if err != nil {
			fmt.Fprintf(stderr, "cellbridge drill: %v\n", err)
			return exitError
		}
		if f.jsonOut {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(rep)
		} else {
			fmt.Fprintln(stdout)
			_ = rep.WriteText(stdout)
		}
		if !rep.OK() {
			return exitError
		}
		return exitOK
	}
}

// runDrillCommand prepares the embedded bridge of `cellbridge drill` from
// its flags, runs the drill against it and stops it.
func runDrillCommand(ctx context.Context, f *drillFlags, stdout, stderr io.Writer) (*drill.Report, error) {
	data := f.data
	if data == "" {
		tmp, err := os.MkdirTemp("", "cellbridge-drill-")
		if err != nil {
			return nil, err
		}
		defer os.RemoveAll(tmp)
		data = tmp
	}
	progress := stdout
	if f.quiet || f.jsonOut {
		progress = io.Discard
	}
	rf := f.runFlags
	rf.data = filepath.Join(data, "nats")
	dc := drill.Config{
		Topic: f.topic, Rate: f.rate, KeysPerShard: f.keysPerShard, Move: f.move, To: f.to, Down: f.down,
		Before: f.before, Blocked: f.blocked, After: f.after, Settle: f.settle, Progress: progress, TempDir: data,
	}
	return runDrill(ctx, &rf, data, dc, stderr)
}

// runDrill runs the drill of `cellbridge drill`: the embedded default bridge
// (rules copied from rf.rules, default the example rules), with dc's load,
// publishing to the topic rule's JetStream stream.
func runDrill(ctx context.Context, rf *runFlags, data string, dc drill.Config, stderr io.Writer) (*drill.Report, error) {
	o, err := prepareDrill(rf, data, stderr)
	if err != nil {
		return nil, err
	}
	if !o.Config.Embedded() {
		return nil, errors.New("the drill runs the embedded default only: -config must not name brokers")
	}
	return drillApp(ctx, o, data, func(info app.Info) (drill.Config, func(), error) {
		nc, err := nats.Connect(info.NATSURL, nats.Name("cellbridge-drill"))
		if err != nil {
			return dc, nil, err
		}
		js, err := jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(2048))
		if err != nil {
			nc.Close()
			return dc, nil, err
		}
		dc.JetStream = js
		return dc, nc.Close, nil
	})
}

// prepareDrill copies the rules named by rf (default: the example rules)
// into a ConfigMap-style directory data/rules, which the bridge then
// watches, and prepares the bridge as `cellbridge run` does (rf.config may
// name brokers).
func prepareDrill(rf *runFlags, data string, stderr io.Writer) (*app.Options, error) {
	src := rf.rules
	if src == "" {
		cfgRules := ""
		if rf.config != "" {
			if c, err := config.Load(rf.config); err == nil {
				cfgRules = string(c.Rules)
			}
		}
		src = cfgRules
	}
	if src == "" {
		d, err := app.ExampleRulesDir()
		if err != nil {
			return nil, err
		}
		src = d
	}
	files, err := drill.ReadRuleFiles(src)
	if err != nil {
		return nil, err
	}
	rulesDir := filepath.Join(data, "rules")
	if _, err := drill.NewConfigMapDir(rulesDir, files); err != nil {
		return nil, err
	}
	run := *rf
	run.rules = rulesDir
	o, code := prepareRun(&run, stderr)
	if o == nil {
		return nil, fmt.Errorf("cannot start the bridge (exit %d)", code)
	}
	return o, nil
}

// drillApp starts the app of o (logging to data/cellbridge.log), lets
// prepare fill in the drill's connections from the started bridge, runs the
// drill, and stops the app. prepare's cleanup runs before the app stops.
func drillApp(ctx context.Context, o *app.Options, data string, prepare func(app.Info) (drill.Config, func(), error)) (*drill.Report, error) {
	logPath := filepath.Join(data, "cellbridge.log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer lf.Close()
	if o.Log == nil {
		o.Log = app.NewLogger(config.LogConfig{Level: o.Config.Log.Level, Format: "json"}, lf)
	}
	a, err := app.Start(ctx, *o)
	if err != nil {
		return nil, err
	}
	info := a.Info
	dc, cleanup, err := prepare(info)
	if err != nil {
		_ = a.Shutdown()
		return nil, err
	}
	dc.BridgeURL = "http://" + info.HTTPAddr
	dc.RulesDir = o.RulesDir
	pw := dc.Progress
	if pw == nil {
		pw = io.Discard
	}
	fmt.Fprintf(pw, "bridge running: HTTP %s (cellbridge status -addr %s), rules %s, log %s\n",
		dc.BridgeURL, dc.BridgeURL, o.RulesDir, logPath)
	rep, derr := drill.Run(ctx, dc)
	if cleanup != nil {
		cleanup()
	}
	if err := a.Shutdown(); err != nil && derr == nil {
		derr = fmt.Errorf("stopping the bridge: %w", err)
	}
	return rep, derr
}
