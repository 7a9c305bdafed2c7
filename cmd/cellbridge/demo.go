package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// demoFlags are the flags of `cellbridge demo`.
type demoFlags struct {
	runFlags
	n        int
	rate     int
	interval time.Duration
	keep     bool
	seed     uint64
}

func init() {
	register(&command{
		name:    "demo",
		summary: "run the embedded bridge and watch sample events being routed to their cells",
		usage: `Usage: cellbridge demo [-n N] [-rate R] [-keep=false] [-data DIR] [-http ADDR] [-config FILE]

Starts the embedded default bridge in this process (in-process NATS server
with JetStream under -data, the example rules, the KV dedupe store), publishes
N sample events to the example topics (orders: user id in the JSON body;
payments: user id in the X-User-Id header; one in fifty of the pinned user;
every 500th a poison event: no key, a non-digit key, or broken JSON), and
shows while it runs how many arrived in each cell's stream (counted in the
streams themselves), next to what the rules predict and the bridge's own
outcome counters.

When every event has arrived it prints the final table and how to check an
event with 'cellbridge route', and keeps the bridge running for curl
(/metrics, /readyz, /route, /status) until Ctrl-C; -keep=false exits instead.
The bridge's log goes to DIR/cellbridge.log. -config may tune the embedded
bridge (pipeline, dedupe, http, log) but must not name brokers; for example
'dedupe: {store: memory}' shows the bridge without the KV store round trips.`,
		flags: demoCommand,
	})
}

func demoCommand(fs *flag.FlagSet) runFunc {
	f := &demoFlags{}
	f.runFlags.register(fs)
	fs.StringVar(&f.config, "config", "", "configuration `FILE` without brokers (pipeline, dedupe, http, log settings for the embedded bridge)")
	fs.IntVar(&f.n, "n", 20000, "events to publish")
	fs.IntVar(&f.rate, "rate", 2000, "events per second (0: as fast as the server takes them)")
	fs.DurationVar(&f.interval, "interval", time.Second, "how often the table refreshes")
	fs.BoolVar(&f.keep, "keep", true, "keep the bridge running after the last event arrived, until Ctrl-C (false: exit)")
	fs.Uint64Var(&f.seed, "seed", 0, "seed of the sample events (0: from the clock)")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) int {
		if len(args) > 0 {
			return usageError(stderr, "demo", "unexpected arguments: %s", strings.Join(args, " "))
		}
		if f.n < 0 || f.rate < 0 || f.interval <= 0 {
			return usageError(stderr, "demo", "-n and -rate must not be negative, -interval must be positive")
		}
		o, code := prepareRun(&f.runFlags, stderr)
		if o == nil {
			return code
		}
		if err := runDemo(ctx, o, f, stdout); err != nil {
			fmt.Fprintf(stderr, "cellbridge demo: %v\n", err)
			return exitError
		}
		return exitOK
	}
}

// demo is one run of the demo: the publisher and the monitor.
type demo struct {
	f     *demoFlags
	o     *app.Options
	info  app.Info
	out   io.Writer
	term  bool
	js    jetstream.JetStream
	cells []string

	mu        sync.Mutex
	published int
	expected  map[string]map[string]int // cell (or "DLQ") → topic → events the rules route there
	example   *sampleEvent              // a published order to check with `cellbridge route`
	exampleD  router.Decision

	baseline map[string]map[string]uint64 // stream → subject → messages before the demo
	lines    int                          // lines of the last table (to redraw in place)
	started  time.Time
}

const dlqRow = "DLQ"

func runDemo(ctx context.Context, o *app.Options, f *demoFlags, stdout io.Writer) error {
	if !o.Config.Embedded() {
		return errors.New("the demo runs the embedded default only")
	}
	if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return err
	}
	logPath := filepath.Join(o.DataDir, "cellbridge.log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer lf.Close()
	o.Log = app.NewLogger(config.LogConfig{Level: o.Config.Log.Level, Format: "text"}, lf)
	o.Stdout = stdout
	a, err := app.Start(ctx, *o)
	if err != nil {
		return err
	}
	d := &demo{f: f, o: o, info: a.Info, out: stdout, term: app.IsTerminal(stdout), expected: map[string]map[string]int{}}
	fmt.Fprintf(stdout, "bridge running (rules %s, version %d); its log: %s\n", o.RulesDir, o.Rules.Version(), logPath)
	derr := d.run(ctx)
	if derr == nil && f.keep {
		fmt.Fprintln(stdout, "\nThe bridge keeps running: press Ctrl-C to stop it.")
		select {
		case <-ctx.Done():
		case <-a.Failed():
		}
	}
	if ctx.Err() != nil {
		app.ForceOnSecondSignal(o.Log)
	}
	fmt.Fprintln(stdout, "stopping: draining in-flight messages, closing connections (Ctrl-C again to force) ...")
	if err := a.Shutdown(); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	fmt.Fprintln(stdout, "stopped cleanly.")
	if errors.Is(derr, context.Canceled) {
		return nil // Ctrl-C while publishing is a normal way to end
	}
	return derr
}

// run publishes the events and refreshes the table until every event
// arrived (or ctx ends).
func (d *demo) run(ctx context.Context) error {
	nc, err := nats.Connect(d.info.NATSURL, nats.Name("cellbridge-demo"))
	if err != nil {
		return err
	}
	defer nc.Close()
	d.js, err = jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(4096))
	if err != nil {
		return err
	}
	for _, c := range d.o.Rules.Cells() {
		d.cells = append(d.cells, c.Name)
	}
	if d.baseline, err = d.arrived(ctx); err != nil {
		return err
	}
	n, rate := d.f.n, d.f.rate
	fmt.Fprintf(d.out, "publishing %d sample events to ORDERS (orders.*) and PAYMENTS (payments.*) on %s at %s\n\n",
		n, d.info.NATSURL, rateText(rate))
	d.started = time.Now()
	pubErr := make(chan error, 1)
	go func() { pubErr <- d.publish(ctx, n, rate) }()

	// Poll often (so the end-to-end time is measured closely), redraw
	// every interval.
	poll := time.NewTicker(50 * time.Millisecond)
	defer poll.Stop()
	var doneAt, lastDraw time.Time
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-pubErr:
			if err != nil {
				return err
			}
			pubErr = nil
			continue
		case <-poll.C:
		}
		counts, err := d.arrived(ctx)
		if err != nil {
			return err
		}
		total := d.total(counts)
		if pubErr == nil && total >= uint64(n) {
			doneAt = time.Now()
			break
		}
		if time.Since(lastDraw) >= d.f.interval {
			lastDraw = time.Now()
			d.draw(counts, false)
		}
		if pubErr == nil && time.Since(d.started) > time.Duration(n/max(rate, 1)+120)*time.Second {
			return fmt.Errorf("only %d of %d events arrived; see the bridge log", total, n)
		}
	}
	counts, err := d.arrived(ctx)
	if err != nil {
		return err
	}
	d.draw(counts, true)
	secs := doneAt.Sub(d.started).Seconds()
	fmt.Fprintf(d.out, "\nall %d events arrived in %.1fs: %.0f events/s end to end (publishing %s)\n", n, secs, float64(n)/secs, rateText(rate))
	d.printHelp()
	return nil
}

func rateText(rate int) string {
	if rate == 0 {
		return "full speed"
	}
	return fmt.Sprintf("%d/s", rate)
}

// publish sends n events at rate per second (0: flat out), waiting for the
// server's acks in windows.
func (d *demo) publish(ctx context.Context, n, rate int) error {
	gen := newEventGen(d.seed(), 500)
	const window = 1000
	var futs []jetstream.PubAckFuture
	wait := func() error {
		for _, f := range futs {
			select {
			case <-f.Ok():
			case err := <-f.Err():
				return fmt.Errorf("publishing sample events: %w", err)
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		futs = futs[:0]
		return nil
	}
	start := time.Now()
	for i := range n {
		if rate > 0 {
			if due := start.Add(time.Duration(i) * time.Second / time.Duration(rate)); time.Until(due) > 0 {
				if err := wait(); err != nil {
					return err
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(time.Until(due)):
				}
			}
		}
		ev := gen.next()
		dec := d.o.Rules.Route(ev.Topic, &router.Message{Subject: ev.Subject, Header: ev.Header, Body: ev.Body})
		f, err := d.js.PublishMsgAsync(ev.Msg())
		if err != nil {
			return fmt.Errorf("publishing sample events: %w", err)
		}
		futs = append(futs, f)
		row := dec.Cell
		if dec.Reason == router.ReasonDLQ {
			row = dlqRow
		}
		d.mu.Lock()
		if d.expected[row] == nil {
			d.expected[row] = map[string]int{}
		}
		d.expected[row][ev.Topic]++
		d.published++
		if ev.Topic == "orders" && ev.Poison == "" && ev.Key != pinnedKey && (d.example == nil || i%97 == 0) {
			e := ev
			d.example, d.exampleD = &e, dec
		}
		d.mu.Unlock()
		if len(futs) >= window {
			if err := wait(); err != nil {
				return err
			}
		}
	}
	return wait()
}

func (d *demo) seed() uint64 {
	if d.f.seed != 0 {
		return d.f.seed
	}
	return uint64(time.Now().UnixNano())
}

// arrived counts the messages per subject in every cell stream and the DLQ
// stream: what actually reached the cells, independent of the bridge's
// counters.
func (d *demo) arrived(ctx context.Context) (map[string]map[string]uint64, error) {
	out := map[string]map[string]uint64{}
	streams := []string{natsjs.DLQStream}
	for _, c := range d.cells {
		streams = append(streams, natsjs.CellStream(c))
	}
	for _, name := range streams {
		st, err := d.js.Stream(ctx, name)
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		info, err := st.Info(ctx, jetstream.WithSubjectFilter(">"))
		if err != nil {
			return nil, err
		}
		m := map[string]uint64{}
		for subj, n := range info.State.Subjects {
			m[subj] = n
		}
		out[name] = m
	}
	return out, nil
}

// total is the number of messages that arrived in the cell and DLQ streams
// since the demo started.
func (d *demo) total(counts map[string]map[string]uint64) uint64 {
	var n uint64
	for stream, subjects := range counts {
		for subj, c := range subjects {
			n += c - d.baseline[stream][subj]
		}
	}
	return n
}

// draw prints the table; on a terminal it redraws in place, otherwise it
// prints one summary line per refresh (and the full table at the end). It
// returns the number of demo events that arrived (cells and DLQ).
func (d *demo) draw(counts map[string]map[string]uint64, final bool) uint64 {
	d.mu.Lock()
	published := d.published
	expected := map[string]map[string]int{}
	for k, v := range d.expected {
		expected[k] = map[string]int{}
		for t, n := range v {
			expected[k][t] = n
		}
	}
	d.mu.Unlock()

	topics := []string{}
	for _, r := range d.o.Rules.Rules() {
		topics = append(topics, r.Name)
	}
	sort.Strings(topics)
	delta := func(stream string) map[string]uint64 {
		m := map[string]uint64{}
		for subj, n := range counts[stream] {
			m[subj] = n - d.baseline[stream][subj]
		}
		return m
	}
	// A cell stream's subjects are cell.<cell>.<topic>; the DLQ's dlq.<topic>.
	topicOf := func(subj string) string { return subj[strings.LastIndexByte(subj, '.')+1:] }

	var b strings.Builder
	tw := tabwriter.NewWriter(&b, 4, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "cell\tstream\t")
	for _, t := range topics {
		fmt.Fprintf(tw, "%s\t", t)
	}
	fmt.Fprint(tw, "arrived\texpected\t\n")
	var total, cellTotal uint64
	rows := append(append([]string{}, d.cells...), dlqRow)
	for _, row := range rows {
		stream := natsjs.DLQStream
		if row != dlqRow {
			stream = natsjs.CellStream(row)
		}
		per := map[string]uint64{}
		var sum uint64
		for subj, n := range delta(stream) {
			per[topicOf(subj)] += n
			sum += n
		}
		exp := 0
		fmt.Fprintf(tw, "%s\t%s\t", row, stream)
		for _, t := range topics {
			fmt.Fprintf(tw, "%d\t", per[t])
			exp += expected[row][t]
		}
		fmt.Fprintf(tw, "%d\t%d\t\n", sum, exp)
		total += sum
		if row != dlqRow {
			cellTotal += sum
		}
	}
	tw.Flush()

	outcomes := d.info.Outcomes()
	elapsed := time.Since(d.started)
	rate := float64(total) / max(elapsed.Seconds(), 0.001)
	head := fmt.Sprintf("published %d/%d  arrived %d (cells %d, DLQ %d)  %.0f msgs/s  %s",
		published, d.f.n, total, cellTotal, total-cellTotal, rate, elapsed.Truncate(100*time.Millisecond))
	var oc []string
	for _, k := range []string{"forwarded", "duplicate", "held", "dlq", "retried"} {
		oc = append(oc, fmt.Sprintf("%s %.0f", k, outcomes[k]))
	}
	outcomeLine := "bridge outcomes (cellbridge_messages_total): " + strings.Join(oc, ", ")

	if !d.term && !final {
		fmt.Fprintf(d.out, "%s | %s\n", head, strings.Join(oc, ", "))
		return total
	}
	text := head + "\n\n" + b.String() + "\n" + outcomeLine + "\n"
	if d.term && d.lines > 0 {
		fmt.Fprintf(d.out, "\033[%dA\033[J", d.lines) // back to the table's first line, clear below
	}
	fmt.Fprint(d.out, text)
	d.lines = strings.Count(text, "\n")
	return total
}

// printHelp says how to check the numbers by hand.
func (d *demo) printHelp() {
	bin := "cellbridge"
	if strings.Contains(os.Args[0], "go-build") {
		bin = "go run ./cmd/cellbridge" // started with go run / make run
	}
	httpBase := "http://" + d.info.HTTPAddr
	if strings.HasPrefix(d.info.HTTPAddr, "[::]:") || strings.HasPrefix(d.info.HTTPAddr, "0.0.0.0:") {
		httpBase = "http://localhost:" + d.info.HTTPAddr[strings.LastIndexByte(d.info.HTTPAddr, ':')+1:]
	}
	d.mu.Lock()
	ex, dec := d.example, d.exampleD
	d.mu.Unlock()
	rules := d.o.RulesDir
	if wd, err := os.Getwd(); err == nil {
		if rel, err := filepath.Rel(wd, rules); err == nil && !strings.HasPrefix(rel, "..") {
			rules = rel
		}
	}
	fmt.Fprintln(d.out, "\nCheck an event yourself:")
	if ex != nil {
		fmt.Fprintf(d.out, "  %s route -rules %s -topic orders -key %s\n", bin, rules, ex.Key)
		fmt.Fprintf(d.out, "  → expect cell %s (shard %d, subject %s), reason %s\n", dec.Cell, dec.Shard, dec.Target.Subject, dec.Reason)
		fmt.Fprintf(d.out, "  curl '%s/route?topic=orders&key=%s'\n", httpBase, ex.Key)
	}
	fmt.Fprintf(d.out, "  curl %s/metrics | grep cellbridge_forwarded_total\n", httpBase)
	fmt.Fprintf(d.out, "  curl %s/readyz ; curl %s/status\n", httpBase, httpBase)
	fmt.Fprintf(d.out, "  NATS: %s (streams ORDERS, PAYMENTS, CELL_<CELL>, DLQ)\n", d.info.NATSURL)
}
