package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/cellbridge/cellbridge/router"
)

func init() {
	register(&command{
		name:    "validate",
		summary: "check a rules directory; print every problem as file:line: field: message",
		usage: `Usage: cellbridge validate DIR

Parses and validates every *.yaml and *.yml file in DIR (one kind: CellMap
document and one or more kind: TopicRule documents), the way the bridge does
on start and on every reload.

Valid: prints a one-line summary (version, shards, cells, topics) and exits 0.
Invalid: prints every problem, one per line, as file:line: field: message, to
standard error and exits 1.

Example:
  cellbridge validate deploy/rules`,
		flags: func(*flag.FlagSet) runFunc { return runValidate },
	})
}

func runValidate(_ context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) != 1 {
		return usageError(stderr, "validate", "want exactly one rules directory, got %d arguments", len(args))
	}
	t, code := loadRules(args[0], "validate", stderr)
	if t == nil {
		return code
	}
	fmt.Fprintln(stdout, summary(t))
	return exitOK
}

// loadRules loads a rules directory for a command, printing every problem to
// stderr. It returns nil and the exit code when the rules are invalid.
func loadRules(dir, cmd string, stderr io.Writer) (*router.Table, int) {
	t, err := router.Load(dir)
	if err == nil {
		return t, exitOK
	}
	var pe *router.Errors
	if errors.As(err, &pe) {
		for _, p := range *pe {
			fmt.Fprintln(stderr, p.String())
		}
		n := len(*pe)
		fmt.Fprintf(stderr, "cellbridge %s: %s: %d %s\n", cmd, dir, n, plural(n, "problem", "problems"))
		return nil, exitError
	}
	fmt.Fprintf(stderr, "cellbridge %s: %v\n", cmd, err)
	return nil, exitError
}

// summary describes a valid table in one line.
func summary(t *router.Table) string {
	var names []string
	down := 0
	for _, c := range t.Cells() {
		names = append(names, c.Name)
		if c.State == router.StateDown {
			down++
		}
	}
	var topics []string
	for _, r := range t.Rules() {
		topics = append(topics, r.Name)
	}
	blocked := 0
	for _, r := range t.Blocked() {
		blocked += r.Len()
	}
	global := t.Global()
	if global == "" {
		global = "none"
	}
	pins := len(t.Pins())
	return fmt.Sprintf("ok: %s: version %d, %d shards, %d cells (%s; %d down; global %s), %d %s (%s), %d %s, %d blocked %s",
		t.Dir(), t.Version(), t.Shards(), len(names), strings.Join(names, ", "), down, global,
		len(topics), plural(len(topics), "topic", "topics"), strings.Join(topics, ", "),
		pins, plural(pins, "pin", "pins"), blocked, plural(blocked, "shard", "shards"))
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
