package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/deployment"
)

func init() {
	register(&command{
		name:    "status",
		summary: "show the deployment's replicas, or one bridge's rules version, in-flight, held (per shard range), broadcast copies per cell, backlog and its share of each rule",
		usage: `Usage: cellbridge status [-config FILE] [-json]
       cellbridge status -addr http://127.0.0.1:9090 [-json]

Without -addr it lists the whole deployment: every live replica of the
deployment the configuration names (-config; without it the embedded
default), as each publishes itself in the KV bucket partitions.bucket
(cellbridge-leases by default): its rules version, readiness, in-flight and
held messages, and the highest rules version the deployment has run. Replicas that run different versions are
pointed out (during a cell switch no step may follow until they agree).

With -addr it reads /status of one running bridge and prints: readiness (and
why not), the rules version it routes with, and per topic rule the messages
in flight, the messages held because their shard is blocked (per shard range,
with the age of the oldest), the age of the oldest unacknowledged message and
the backlog at the source. During a cell switch this is step 2's view: the
held ranges should be exactly the blocked ones, and they drain after the
unblocking rules. For broadcast rules it lists per cell the copies on their
way, those lagging behind a failing cell, and what a down cell missed: the
time of the first missed message is where 'cellbridge replay -from-time'
starts. Last, per rule, this replica's share: for an ordered rule whether it
holds the consumer's pin (active) or waits as a standby, for a partitioned
rule the partitions it owns, and the last takeover. In Kubernetes, port-forward one pod at a time (kubectl -n cellbridge
port-forward pod/POD 9090:9090), or run it in the pod.

Exit status 0 when the bridge (or the deployment's registry) answered, ready
or not, 1 when it cannot be reached or answers with an error.`,
		flags: statusCommand,
	})
}

func statusCommand(fs *flag.FlagSet) runFunc {
	addr := fs.String("addr", "", "one bridge's HTTP `URL` (or host:port), e.g. http://127.0.0.1:9090; without it, the whole deployment")
	cfgFile := fs.String("config", "", "bridge configuration `FILE` naming the deployment and its broker (without -addr; default: the embedded default)")
	jsonOut := fs.Bool("json", false, "print /status as the bridge sends it (JSON), or the deployment's records")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after this long")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		if len(args) > 0 {
			return usageError(stderr, "status", "unexpected arguments: %s", strings.Join(args, " "))
		}
		if *addr == "" {
			return deploymentStatus(ctx, *cfgFile, *jsonOut, *timeout, stdout, stderr)
		}
		if *cfgFile != "" {
			return usageError(stderr, "status", "-config and -addr exclude each other")
		}
		base, err := bridgeBaseURL(*addr)
		if err != nil {
			return usageError(stderr, "status", "-addr: %v", err)
		}
		body, err := fetchStatus(ctx, base, *timeout)
		if err != nil {
			fmt.Fprintf(stderr, "cellbridge status: %v\n", err)
			return exitError
		}
		if *jsonOut {
			_, _ = stdout.Write(body)
			return exitOK
		}
		var st bridge.Status
		if err := json.Unmarshal(body, &st); err != nil {
			fmt.Fprintf(stderr, "cellbridge status: %s/status is not a bridge status: %v\n", base, err)
			return exitError
		}
		writeStatus(stdout, base, st, time.Now())
		return exitOK
	}
}

// deploymentStatus lists every live replica of the configuration's
// deployment from its registry.
func deploymentStatus(ctx context.Context, cfgFile string, jsonOut bool, timeout time.Duration, stdout, stderr io.Writer) int {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	src, closeSrc, err := registrySource(ctx, cfgFile)
	if err != nil {
		fmt.Fprintf(stderr, "cellbridge status: %v\n(for one bridge, pass -addr)\n", err)
		return exitError
	}
	defer closeSrc()
	recs, err := src.Replicas(ctx)
	var highest int64
	if err == nil {
		highest, err = src.Highest(ctx)
	}
	if err != nil {
		fmt.Fprintf(stderr, "cellbridge status: %s: %v\n", src.Describe(), err)
		return exitError
	}
	if jsonOut {
		b, _ := json.MarshalIndent(recs, "", "  ")
		fmt.Fprintf(stdout, "%s\n", b)
		return exitOK
	}
	writeDeployment(stdout, src.Describe(), recs, highest, time.Now())
	return exitOK
}

// writeDeployment prints a deployment's replicas for an operator.
func writeDeployment(w io.Writer, what string, recs []deployment.Record, highest int64, now time.Time) {
	fmt.Fprintf(w, "%s: %d live replica(s); highest rules version run: %d\n", what, len(recs), highest)
	if len(recs) == 0 {
		fmt.Fprintln(w, "  none has published itself within the registry's TTL: none runs, or none reaches the broker")
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	fmt.Fprint(tw, "replica\thttp\tversion\tready\tin flight\theld\tblocked\tup\tupdated\n")
	versions := map[int64][]string{}
	for _, r := range recs {
		ready := "yes"
		if !r.Ready {
			ready = "NO"
		}
		blocked := strings.Join(r.Blocked, ",")
		if blocked == "" {
			blocked = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%d\t%d\t%s\t%s\t%s ago\n", r.Replica, r.HTTP, r.RulesVersion, ready, r.InFlight, r.Held,
			blocked, age(now.Sub(r.Started).Seconds()), age(now.Sub(r.Updated).Seconds()))
		versions[r.RulesVersion] = append(versions[r.RulesVersion], r.Replica)
	}
	_ = tw.Flush()
	if len(versions) > 1 {
		var parts []string
		for _, v := range slices.Sorted(maps.Keys(versions)) {
			parts = append(parts, fmt.Sprintf("version %d on %s", v, strings.Join(versions[v], ", ")))
		}
		fmt.Fprintf(w, "\nthe replicas run different rules versions: %s\n", strings.Join(parts, "; "))
	}
	for _, r := range recs {
		if !r.Ready && r.NotReady != "" {
			for _, l := range strings.Split(strings.TrimSpace(r.NotReady), "\n") {
				fmt.Fprintf(w, "  %s not ready: %s\n", r.Replica, l)
			}
		}
	}
	fmt.Fprintln(w, "\nheld by shard range:")
	found := false
	tw = tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	for _, r := range recs {
		for _, rs := range r.Rules {
			for _, h := range rs.HeldRanges {
				found = true
				fmt.Fprintf(tw, "  %s\t%s\tshards %s\t%d held\toldest %s\n", r.Replica, rs.Rule, h.Shards, h.Held, age(h.OldestAgeSeconds))
			}
		}
	}
	_ = tw.Flush()
	if !found {
		fmt.Fprintln(w, "  none")
	}
}

// bridgeBaseURL accepts http(s)://host:port[/prefix] or host:port.
func bridgeBaseURL(addr string) (string, error) {
	if !strings.Contains(addr, "://") {
		addr = "http://" + addr
	}
	u, err := url.Parse(addr)
	if err != nil {
		return "", err
	}
	if u.Host == "" {
		return "", fmt.Errorf("no host in %q", addr)
	}
	return strings.TrimRight(u.String(), "/"), nil
}

// fetchStatus GETs base/status within timeout; its errors say what an
// operator should check.
func fetchStatus(ctx context.Context, base string, timeout time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/status", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		var op *net.OpError
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			return nil, fmt.Errorf("no answer from the bridge at %s within %s", base, timeout)
		case errors.As(err, &op):
			return nil, fmt.Errorf("cannot reach the bridge at %s: %v\n(is it running, and is this its HTTP address? pass -addr; in Kubernetes port-forward a pod first)", base, op.Err)
		}
		return nil, fmt.Errorf("cannot reach the bridge at %s: %w", base, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("reading %s/status: %w", base, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s/status answered %s: %s", base, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

// writeStatus prints st for an operator.
func writeStatus(w io.Writer, base string, st bridge.Status, now time.Time) {
	switch {
	case !st.RulesLoaded:
		fmt.Fprintf(w, "bridge %s: NOT READY, no rules loaded\n", base)
	case st.Ready:
		fmt.Fprintf(w, "bridge %s: ready, rules version %d\n", base, st.RulesVersion)
	default:
		fmt.Fprintf(w, "bridge %s: NOT READY, rules version %d\n", base, st.RulesVersion)
	}
	if !st.Ready && st.NotReady != "" {
		for _, l := range strings.Split(strings.TrimSpace(st.NotReady), "\n") {
			fmt.Fprintf(w, "  not ready: %s\n", l)
		}
	}
	fmt.Fprintf(w, "in flight %d of %d, held %d of %d, lagging %d of %d\n", st.InFlight, st.MaxInFlight, st.Held, st.MaxHeld, st.Lagging, st.MaxLagging)
	for _, tg := range slices.Sorted(maps.Keys(st.DedupeProtocols)) {
		fmt.Fprintf(w, "dedupe %s: %s\n", tg, st.DedupeProtocols[tg])
	}
	if len(st.Rules) == 0 {
		fmt.Fprintln(w, "\nno topic rule has seen a message yet")
		return
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "rule\tin flight\theld\toldest held\toldest unacked\tbacklog\tlast forward\t\n")
	for _, r := range st.Rules {
		oldestHeld := "-"
		if r.Held > 0 {
			oldestHeld = age(r.HeldOldestAgeSeconds)
		}
		last := "never"
		if !r.LastProgress.IsZero() && r.LastProgress.Unix() > 0 {
			last = age(now.Sub(r.LastProgress).Seconds()) + " ago"
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%d\t%s\t\n", r.Rule, r.InFlight, r.Held, oldestHeld,
			age(r.OldestUnackedAgeSeconds), r.Backlog, last)
	}
	_ = tw.Flush()

	fmt.Fprintln(w, "\nheld by shard range (blocked shards; they flow when the rules unblock them):")
	found := false
	tw = tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	for _, r := range st.Rules {
		for _, h := range r.HeldRanges {
			found = true
			fmt.Fprintf(tw, "  %s\tshards %s\t%d held\toldest %s\n", r.Rule, h.Shards, h.Held, age(h.OldestAgeSeconds))
		}
	}
	_ = tw.Flush()
	if !found {
		fmt.Fprintln(w, "  none")
	}
	writeBroadcast(w, st)
	writeSources(w, st, now)
}

// writeBroadcast prints the cells of broadcast rules: copies pending and
// lagging, and what each missed while down, with the replay to run.
func writeBroadcast(w io.Writer, st bridge.Status) {
	found := false
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	for _, r := range st.Rules {
		for _, c := range r.Broadcast {
			if !found {
				fmt.Fprintln(w, "\nbroadcast copies per cell:")
				found = true
			}
			missed := "none missed"
			if c.Missed.Count > 0 {
				state := "down, missing since"
				if !c.Missed.Ongoing {
					state = "back; the last streak missed from"
				}
				first := c.Missed.First.UTC().Format(time.RFC3339Nano)
				missed = fmt.Sprintf("%d missed (%s %s to %s): cellbridge replay -rule %s -cell %s -from-time %s",
					c.Missed.Count, state, first, c.Missed.Last.UTC().Format(time.RFC3339Nano), r.Rule, c.Cell, first)
			}
			fmt.Fprintf(tw, "  %s\t%s\t%d pending\t%d lagging\t%s\n", r.Rule, c.Cell, c.Pending, c.Lagging, missed)
		}
	}
	_ = tw.Flush()
}

// writeSources prints this replica's share of each rule: for an ordered
// rule whether it holds the consumer's pin, for a partitioned rule the
// partitions it owns, and the last takeover.
func writeSources(w io.Writer, st bridge.Status, now time.Time) {
	fmt.Fprintln(w, "\nthis replica's share of each rule (ordered: one replica forwards; partitioned: one per partition):")
	found := false
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', 0)
	ago := func(t time.Time) string { return age(now.Sub(t).Seconds()) + " ago" }
	for _, r := range st.Rules {
		src := r.Source
		if src == nil {
			continue
		}
		found = true
		mode := src.Ordering
		if mode == "" {
			mode = "-"
		}
		var what []string
		switch {
		case src.Partitions > 0:
			mode = "partitioned"
			var active []string
			for _, o := range src.Owned {
				state := o.State
				if o.Consumer != "" && o.Consumer != o.State {
					state += "/" + o.Consumer
				}
				active = append(active, fmt.Sprintf("%d %s", o.Partition, state))
			}
			what = append(what, fmt.Sprintf("owns %d of %d", src.OwnedCount, src.Partitions))
			if len(active) > 0 {
				what[0] += " (" + strings.Join(active, ", ") + ")"
			}
			what = append(what, fmt.Sprintf("replica %s, %d members", src.Replica, len(src.Members)))
		default:
			state := src.State
			if !src.Since.IsZero() {
				state += " since " + ago(src.Since)
			}
			what = append(what, state)
			if src.PinID != "" {
				what = append(what, "pin "+src.PinID)
			}
			if !src.EpochStart.IsZero() && src.State == "active" {
				what = append(what, "forwarding since "+ago(src.EpochStart))
			}
		}
		if src.Acks == "cumulative" {
			what = append(what, "cumulative acks")
		}
		if src.Partitions > 0 || src.Ordering == "ordered" {
			t := fmt.Sprintf("takeovers %d", src.Takeovers)
			if lt := src.LastTakeover; lt != nil {
				t += " (last " + ago(lt.At)
				if lt.Partition != nil {
					t += fmt.Sprintf(", partition %d", *lt.Partition)
				}
				if lt.From != "" {
					t += " from " + lt.From
				}
				if lt.How != "" {
					t += ", " + lt.How
				}
				if lt.UnownedSeconds > 0 {
					t += ", unowned " + age(lt.UnownedSeconds)
				}
				t += ")"
			}
			what = append(what, t)
		}
		if src.Fences > 0 {
			what = append(what, fmt.Sprintf("fences %d (last %s: %s)", src.Fences, ago(src.LastFenceAt), src.LastFence))
		}
		if src.LastWithheld != "" {
			what = append(what, fmt.Sprintf("hand-over withheld %s: %s", ago(src.LastWithheldAt), src.LastWithheld))
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", r.Rule, mode, strings.Join(what, "; "))
	}
	_ = tw.Flush()
	if !found {
		fmt.Fprintln(w, "  no source reports one")
	}
}

// age renders seconds as 0.4s, 12s, 3m05s or 2h10m.
func age(sec float64) string {
	d := time.Duration(sec * float64(time.Second))
	switch {
	case d < 10*time.Second:
		return fmt.Sprintf("%.1fs", sec)
	case d < time.Minute:
		return fmt.Sprintf("%.0fs", sec)
	case d < time.Hour:
		return fmt.Sprintf("%dm%02ds", int(d.Minutes()), int(d.Seconds())%60)
	default:
		return fmt.Sprintf("%dh%02dm", int(d.Hours()), int(d.Minutes())%60)
	}
}
