package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/cellbridge/cellbridge/router"
)

// stringFlag is a string flag that remembers whether it was given, so that
// `-key ""` (an explicitly empty key) differs from no -key.
type stringFlag struct {
	v   string
	set bool
}

func (f *stringFlag) String() string     { return f.v }
func (f *stringFlag) Set(s string) error { f.v, f.set = s, true; return nil }

// headerFlag collects repeated -header K=V flags.
type headerFlag struct{ h map[string][]string }

func (f *headerFlag) String() string { return "" }
func (f *headerFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("want NAME=VALUE, got %q", s)
	}
	if f.h == nil {
		f.h = map[string][]string{}
	}
	f.h[k] = append(f.h[k], v)
	return nil
}

// routeFlags are the flags of `cellbridge route`.
type routeFlags struct {
	rules, topic, body, subject, keys string
	origin                            string
	key                               stringFlag
	header                            headerFlag
	pretty                            bool
}

func init() {
	register(&command{
		name:    "route",
		summary: "show where an event goes: the routing decision as JSON",
		usage: `Usage: cellbridge route [-rules DIR] -topic NAME -key KEY
       cellbridge route [-rules DIR] -topic NAME [-header NAME=VALUE]... [-body FILE] [-subject S] [-keys K]

Prints the router's decision for one event as one JSON object: topic, key,
shard, cell, target (broker and subject or topic), rules version, reason
(owner, pin, failover, held, global, dlq, broadcast) and an explanation. With
-key the key is taken as given; with the message flags it is extracted
exactly as the bridge does (header, JSON body field, subject token or
RocketMQ keys, as the topic rule says). A decision to dead-letter is still a
decision: exit 0.

For a broadcast rule (target.cells) the decision lists every selected cell
with its target ("cells"), and marks the cells that get no copy and why:
"skip":"down" (the cell is down: missed, replay it when it is back) or
"skip":"origin" (the event came from that cell: its Cell-Origin header, or
-origin with -key, when the rule says excludeOrigin).

Examples:
  cellbridge route -topic payments -key 2088000000012345
  cellbridge route -topic payments -header X-User-Id=2088000000012345
  echo '{"user":{"id":2088000000012345}}' > /tmp/order.json
  cellbridge route -topic orders -body /tmp/order.json
  cellbridge route -topic prices -key SKU-1 -origin rz01`,
		flags: routeCommand,
	})
}

func routeCommand(fs *flag.FlagSet) runFunc {
	f := &routeFlags{}
	fs.StringVar(&f.rules, "rules", "deploy/rules", "rules `DIR`")
	fs.StringVar(&f.topic, "topic", "", "topic rule `NAME` (required)")
	fs.Var(&f.key, "key", "the shard `KEY`, already extracted (\"\" = no key)")
	fs.Var(&f.header, "header", "message header `NAME=VALUE` (repeatable); instead of -key")
	fs.StringVar(&f.body, "body", "", "message body from `FILE`; instead of -key")
	fs.StringVar(&f.subject, "subject", "", "message `SUBJECT` (NATS subject or RocketMQ topic); instead of -key")
	fs.StringVar(&f.keys, "keys", "", "RocketMQ message `KEYS` (space separated); instead of -key")
	fs.StringVar(&f.origin, "origin", "", "with -key: the `CELL` the event came from (its Cell-Origin header), for a broadcast rule with excludeOrigin")
	fs.BoolVar(&f.pretty, "pretty", false, "indent the JSON")
	return func(_ context.Context, args []string, stdout, stderr io.Writer) int {
		return runRoute(f, args, stdout, stderr)
	}
}

func runRoute(f *routeFlags, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 {
		return usageError(stderr, "route", "unexpected arguments: %s", strings.Join(args, " "))
	}
	if f.topic == "" {
		return usageError(stderr, "route", "-topic is required")
	}
	fromMessage := f.header.h != nil || f.body != "" || f.subject != "" || f.keys != ""
	if f.key.set == fromMessage {
		return usageError(stderr, "route", "give either -key or the message (-header, -body, -subject, -keys)")
	}
	t, code := loadRules(f.rules, "route", stderr)
	if t == nil {
		return code
	}
	if t.Rule(f.topic) == nil {
		var names []string
		for _, r := range t.Rules() {
			names = append(names, r.Name)
		}
		fmt.Fprintf(stderr, "cellbridge route: no topic rule %q in %s (known: %s)\n", f.topic, f.rules, strings.Join(names, ", "))
		return exitError
	}
	var d router.Decision
	if f.origin != "" && !f.key.set {
		return usageError(stderr, "route", "-origin goes with -key; with the message flags give -header %s=CELL", router.OriginHeader)
	}
	if f.key.set {
		d = t.Resolve(f.topic, f.key.v)
		if r := t.Rule(f.topic); r.ExcludeOrigin && d.Reason == router.ReasonBroadcast {
			d.Origin = f.origin
		}
	} else {
		m := &router.Message{Subject: f.subject, Header: f.header.h, Keys: f.keys}
		if f.body != "" {
			b, err := os.ReadFile(f.body)
			if err != nil {
				fmt.Fprintf(stderr, "cellbridge route: %v\n", err)
				return exitError
			}
			m.Body = b
		}
		d = t.Route(f.topic, m)
	}
	enc := json.NewEncoder(stdout)
	enc.SetEscapeHTML(false)
	if f.pretty {
		enc.SetIndent("", "  ")
	}
	if err := enc.Encode(d); err != nil {
		fmt.Fprintf(stderr, "cellbridge route: %v\n", err)
		return exitError
	}
	return exitOK
}
