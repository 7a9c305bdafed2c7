package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"

	"github.com/cellbridge/cellbridge/router"
)

func init() {
	register(&command{
		name:    "diff",
		summary: "compare two rules directories: shards changing cell and the blocked list for a safe switch",
		usage: `Usage: cellbridge diff [-json] OLD_DIR NEW_DIR

Compares two rule sets and prints, for every (old cell → new cell) pair, the
shard ranges that change cell (owner, or failover cell when the owner is
down), their count and share of all shards; pins that change; other changes
(cell states, failover cells, the global cell, blocked shards, topic rules);
and the switch plan:

  1. apply the OLD rules with the next version and the printed blocked: list
     (messages of those shards are held, forwarded nowhere);
  2. wait until the data of those shards has caught up in the new cells;
  3. apply the NEW rules with a higher version, without those shards blocked.

Shards that move because their cell is down in the new rules need no
blocking (the old cell is gone). A pinned key that changes cell blocks its
shard under every rule routed by shard; a rule whose key or shard function
changes blocks every shard (docs/switching.md, "What is blocked"). Exit 0
also when nothing changes; 1 when a rule set is invalid.

Example:
  cellbridge diff deploy/rules /tmp/rules-next`,
		flags: diffCommand,
	})
}

func diffCommand(fs *flag.FlagSet) runFunc {
	jsonOut := fs.Bool("json", false, "print the report as JSON")
	return func(_ context.Context, args []string, stdout, stderr io.Writer) int {
		return runDiff(args, *jsonOut, stdout, stderr)
	}
}

func runDiff(args []string, jsonOut bool, stdout, stderr io.Writer) int {
	if len(args) != 2 {
		return usageError(stderr, "diff", "want OLD_DIR and NEW_DIR, got %d arguments", len(args))
	}
	old, code := loadRules(args[0], "diff", stderr)
	if old == nil {
		return code
	}
	next, code := loadRules(args[1], "diff", stderr)
	if next == nil {
		return code
	}
	r := router.Diff(old, next)
	if jsonOut {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			fmt.Fprintf(stderr, "cellbridge diff: %v\n", err)
			return exitError
		}
		return exitOK
	}
	if err := r.WriteText(stdout); err != nil {
		fmt.Fprintf(stderr, "cellbridge diff: %v\n", err)
		return exitError
	}
	return exitOK
}
