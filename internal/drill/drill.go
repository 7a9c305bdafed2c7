package drill

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/deployment"
	"github.com/cellbridge/cellbridge/internal/rulesdir"
	"github.com/cellbridge/cellbridge/internal/switchover"
	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// Config describes the running bridge and the drill to run against it.
type Config struct {
	// BridgeURL is the bridge's HTTP base URL (http://127.0.0.1:9090).
	BridgeURL string
	// JetStream reaches the broker that holds the cell streams
	// (natsjs.CellStream) and the DLQ stream. The caller owns its
	// connection.
	JetStream jetstream.JetStream
	// RulesDir is the directory the bridge's watcher reloads.
	RulesDir string
	// Topic is the topic rule to load; "" picks the first rule by name.
	Topic string
	// Publisher sends the events to the rule's source; nil publishes to
	// the rule's JetStream stream with JetStream.
	Publisher Publisher

	Rate         int // events per second (default 2000)
	KeysPerShard int // keys per shard (default 2)

	// Move is the shard range of the planned switch ("22-32"); "" takes
	// the upper third of the first cell's last range. To is its new owner
	// ("" = the last active cell that owns shards). Down is the cell the
	// failover marks down ("" = To).
	Move, To, Down string

	// Phase lengths: load before the switch, the blocked step, and after
	// the switch (defaults 2s, 3s, 2s); after the failover the load goes on
	// for 2×After.
	Before, Blocked, After time.Duration
	// Settle bounds each wait for the bridge (a reload, a drain, the last
	// arrivals); default 30s.
	Settle time.Duration
	// InFlightSlack is how long after a rules change a copy decided under
	// the previous rules may still arrive (its publish had started);
	// arrivals later than that count as violations. Default 2s.
	InFlightSlack time.Duration

	// Progress receives one line per step; nil discards.
	Progress io.Writer
	// TempDir is scratch space for validating rules ("" = os.TempDir()).
	TempDir string
}

func (c *Config) defaults() {
	c.Rate = cmp.Or(max(c.Rate, 0), 2000)
	c.KeysPerShard = cmp.Or(max(c.KeysPerShard, 0), 2)
	c.Before = cmp.Or(max(c.Before, 0), 2*time.Second)
	c.Blocked = cmp.Or(max(c.Blocked, 0), 3*time.Second)
	c.After = cmp.Or(max(c.After, 0), 2*time.Second)
	c.Settle = cmp.Or(max(c.Settle, 0), 30*time.Second)
	c.InFlightSlack = cmp.Or(max(c.InFlightSlack, 0), 2*time.Second)
	c.Progress = cmp.Or[io.Writer](c.Progress, io.Discard)
	c.TempDir = cmp.Or(c.TempDir, os.TempDir())
}

// drill is one run.
type drill struct {
	cfg   Config
	run   string
	start time.Time
	bc    *deployment.BridgeClient
	rd    *rulesdir.RulesDir
	rule  *router.Rule
	col   *collector

	tables map[int64]*router.Table // by version: what each Cell-Rules-Version routed with

	mu     sync.Mutex
	events []*Event
	ids    map[string]*Event
	msgIDs map[string]string // payload id → the Cell-Msg-Id the publisher expects
	pubErr error

	rep *Report
}

// Run runs the drill against a running bridge and returns its report. The
// error is for a drill that could not be carried out (bridge unreachable,
// rules invalid, publishing failed); violations of the guarantees are in the
// report. Run leaves the rules directory at the failover version.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	cfg.defaults()
	d := &drill{cfg: cfg, run: fmt.Sprintf("drill%d", time.Now().UnixNano()%1e9), start: time.Now(),
		bc: deployment.NewBridgeClient(cfg.BridgeURL), tables: map[int64]*router.Table{},
		ids: map[string]*Event{}, msgIDs: map[string]string{}}
	return d.runAll(ctx)
}

func (d *drill) logf(format string, a ...any) {
	fmt.Fprintf(d.cfg.Progress, "[%5.1fs] %s\n", time.Since(d.start).Seconds(), fmt.Sprintf(format, a...))
}

func (d *drill) runAll(ctx context.Context) (*Report, error) {
	cfg := d.cfg
	var err error
	if d.rd, err = rulesdir.OpenRulesDir(cfg.RulesDir); err != nil {
		return nil, err
	}
	files0, err := rulesdir.ReadRuleFiles(cfg.RulesDir)
	if err != nil {
		return nil, err
	}
	t0, err := router.Load(cfg.RulesDir)
	if err != nil {
		return nil, fmt.Errorf("drill: the running rules: %w", err)
	}
	v0 := t0.Version()
	d.tables[v0] = t0
	if err := d.pickRule(t0); err != nil {
		return nil, err
	}
	plan, err := d.plan(t0)
	if err != nil {
		return nil, err
	}
	d.rep = &Report{Run: d.run, Topic: d.rule.Name, Rate: cfg.Rate, Mode: map[bool]string{true: "ConfigMap ..data symlink swap", false: "atomic rename per file"}[d.rd.ConfigMap()]}
	for _, c := range t0.Cells() {
		d.rep.Cells = append(d.rep.Cells, c.Name)
	}

	// The bridge must run the rules we start from.
	st, err := d.waitStatus(ctx, "the bridge to run rules version "+fmt.Sprint(v0), func(st bridge.Status) bool {
		return st.RulesLoaded && st.RulesVersion == v0
	})
	if err != nil {
		return nil, err
	}
	d.rep.Ordering = orderingOf(st, d.rule.Name)

	keys, err := pickKeys(t0, d.rule.Name, cfg.KeysPerShard)
	if err != nil {
		return nil, err
	}
	if d.col, err = startCollector(ctx, cfg.JetStream, d.run, cellStreams(d.rep.Cells)); err != nil {
		return nil, err
	}
	defer d.col.stop()

	pub := cfg.Publisher
	if pub == nil {
		if !d.rule.Source.IsNATS() {
			return nil, fmt.Errorf("drill: topic rule %s consumes RocketMQ; give Config.Publisher", d.rule.Name)
		}
		np := NewNATSPublisher(cfg.JetStream)
		defer np.Close(context.Background())
		pub = np
	}
	d.logf("load: %d events/s over %d keys (%d per shard) on topic rule %s, source %s",
		cfg.Rate, len(keys), cfg.KeysPerShard, d.rule.Name, sourceName(d.rule))
	lctx, stopLoad := context.WithCancel(ctx)
	loadDone := make(chan error, 1)
	go func() { loadDone <- d.load(lctx, pub, keys, t0) }()
	loadStopped := false
	stop := func() error {
		if loadStopped {
			return nil
		}
		loadStopped = true
		stopLoad()
		err := <-loadDone
		fctx, cancel := context.WithTimeout(ctx, cfg.Settle)
		defer cancel()
		if ferr := pub.Flush(fctx); ferr != nil && err == nil {
			err = fmt.Errorf("drill: flushing the publisher: %w", ferr)
		}
		return err
	}
	defer stop()

	if err := d.scenario(ctx, files0, t0, plan); err != nil {
		return nil, err
	}
	if err := stop(); err != nil {
		return nil, err
	}
	d.mu.Lock()
	perr := d.pubErr
	d.mu.Unlock()
	if perr != nil {
		return nil, perr
	}
	if err := d.waitAllArrived(ctx); err != nil {
		return nil, err
	}
	d.analyze()
	return d.rep, nil
}

// orderingOf describes how the bridge's source consumes rule, from its
// /status ("" when the source does not report it).
func orderingOf(st bridge.Status, rule string) string {
	for _, r := range st.Rules {
		if r.Rule != rule || r.Source == nil {
			continue
		}
		if r.Source.Partitions > 0 {
			return fmt.Sprintf("%s, %d partitions", r.Source.Ordering, r.Source.Partitions)
		}
		return r.Source.Ordering
	}
	return ""
}

func sourceName(r *router.Rule) string {
	if r.Source.IsNATS() {
		return "nats stream " + r.Source.Stream
	}
	return "rocketmq topic " + r.Source.Topic
}

func (d *drill) pickRule(t *router.Table) error {
	rules := t.Rules()
	if len(rules) == 0 {
		return errors.New("drill: the rules have no topic rule")
	}
	d.rule = rules[0]
	if d.cfg.Topic != "" {
		if d.rule = t.Rule(d.cfg.Topic); d.rule == nil {
			return fmt.Errorf("drill: no topic rule %q in the running rules", d.cfg.Topic)
		}
	}
	if d.rule.Target.Subject == "" {
		return fmt.Errorf("drill: topic rule %s targets RocketMQ; the drill reads NATS cell streams", d.rule.Name)
	}
	return nil
}

// switchPlan is what the drill will do, decided from the starting rules.
type switchPlan struct {
	move     router.Range
	from, to string
	down     string
}

func (d *drill) plan(t *router.Table) (switchPlan, error) {
	var p switchPlan
	var active []router.Cell
	for _, c := range t.Cells() {
		if c.State != router.StateDown && len(c.Shards) > 0 {
			active = append(active, c)
		}
	}
	if len(active) < 3 {
		return p, fmt.Errorf("drill: needs three active cells that own shards; the rules have %d", len(active))
	}
	if d.cfg.Move != "" {
		r, err := router.ParseRange(d.cfg.Move)
		if err != nil {
			return p, fmt.Errorf("drill: -move: %w", err)
		}
		p.move = r
	} else {
		last := active[0].Shards[len(active[0].Shards)-1]
		n := max(1, last.Len()/3)
		p.move = router.Range{From: last.To - n + 1, To: last.To}
	}
	if p.move.To >= t.Shards() {
		return p, fmt.Errorf("drill: shard range %s is outside [0, %d)", p.move, t.Shards())
	}
	p.from = t.Owner(p.move.From)
	for s := p.move.From; s <= p.move.To; s++ {
		if t.Owner(s) != p.from || t.IsBlocked(s) {
			return p, fmt.Errorf("drill: shards %s must all belong to one cell and not be blocked", p.move)
		}
	}
	p.to = d.cfg.To
	if p.to == "" {
		for i := len(active) - 1; i >= 0; i-- {
			if active[i].Name != p.from {
				p.to = active[i].Name
				break
			}
		}
	}
	if c, ok := t.Cell(p.to); !ok || c.State == router.StateDown || p.to == p.from {
		return p, fmt.Errorf("drill: new owner %q must be another active cell", p.to)
	}
	p.down = d.cfg.Down
	if p.down == "" {
		p.down = p.to
	}
	if c, ok := t.Cell(p.down); !ok || c.State == router.StateDown {
		return p, fmt.Errorf("drill: cell to fail %q must be an active cell", p.down)
	}
	return p, nil
}

// load publishes events at the configured rate until ctx ends.
func (d *drill) load(ctx context.Context, pub Publisher, keys []string, t0 *router.Table) error {
	seq := make(map[string]int, len(keys))
	shard := make(map[string]int, len(keys))
	for _, k := range keys {
		shard[k] = t0.Resolve(d.rule.Name, k).Shard
	}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	start := time.Now()
	n := 0
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		due := int(time.Since(start).Seconds() * float64(d.cfg.Rate))
		for ; n < due; n++ {
			k := keys[n%len(keys)]
			seq[k]++
			e := &Event{ID: fmt.Sprintf("%s-%07d", d.run, n+1), Key: k, Seq: seq[k], Shard: shard[k], Subject: tally.Subject(d.rule, k, "drill"), Published: time.Now()}
			if err := buildEvent(d.rule, d.run, e); err != nil {
				return err
			}
			d.mu.Lock()
			d.events = append(d.events, e)
			d.ids[e.ID] = e
			d.mu.Unlock()
			err := pub.PublishAsync(ctx, e, func(msgID string, err error) {
				now := time.Now()
				d.mu.Lock()
				defer d.mu.Unlock()
				if err != nil && d.pubErr == nil {
					d.pubErr = fmt.Errorf("drill: publishing event %s: %w", e.ID, err)
				}
				if err == nil {
					e.Stored = now
				}
				if msgID != "" {
					d.msgIDs[e.ID] = msgID
				}
			})
			if err != nil {
				d.mu.Lock()
				// Not handed over (PublishAsync's contract): not expected.
				d.events = d.events[:len(d.events)-1]
				delete(d.ids, e.ID)
				if d.pubErr == nil && ctx.Err() == nil {
					d.pubErr = err
				}
				d.mu.Unlock()
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
		}
	}
}

// snapshotEvents returns the events published so far.
func (d *drill) snapshotEvents() []*Event {
	d.mu.Lock()
	defer d.mu.Unlock()
	return slices.Clone(d.events)
}

// waitStatus polls /status every 20ms until ok holds or Settle passes.
func (d *drill) waitStatus(ctx context.Context, what string, ok func(bridge.Status) bool) (bridge.Status, error) {
	deadline := time.Now().Add(d.cfg.Settle)
	var last error
	for {
		st, err := d.bc.Status(ctx)
		if err == nil && ok(st) {
			return st, nil
		}
		if err != nil {
			last = err
		}
		if time.Now().After(deadline) {
			if last != nil {
				return st, fmt.Errorf("drill: waiting for %s: %w", what, last)
			}
			return st, fmt.Errorf("drill: waiting for %s: not within %s (bridge runs version %d)", what, d.cfg.Settle, st.RulesVersion)
		}
		select {
		case <-ctx.Done():
			return st, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// apply writes files and records the phase; it returns when the bridge runs
// version v.
func (d *drill) apply(ctx context.Context, name string, v int64, files map[string][]byte) (*Phase, error) {
	t, err := rulesdir.LoadFiles(d.cfg.TempDir, files)
	if err != nil {
		return nil, fmt.Errorf("drill: rules for %s do not validate:\n%w", name, err)
	}
	ph := &Phase{Name: name, Version: v}
	d.tables[v] = t
	ph.Written = time.Now()
	if err := d.rd.Apply(files); err != nil {
		return nil, err
	}
	if _, err := d.waitStatus(ctx, fmt.Sprintf("rules version %d (%s)", v, name), func(st bridge.Status) bool {
		return st.RulesVersion == v
	}); err != nil {
		return nil, err
	}
	ph.Effective = time.Now()
	d.rep.Phases = append(d.rep.Phases, ph)
	d.logf("%s: rules version %d written, running after %s", name, v, ph.Effective.Sub(ph.Written).Round(time.Millisecond))
	return ph, nil
}

func sleepCtx(ctx context.Context, dur time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(dur):
		return nil
	}
}

// heldIn sums the held messages of the rule's ranges that overlap blocked.
func heldIn(st bridge.Status, rule string, blocked []router.Range) (n int, oldest float64, outside []string) {
	for _, r := range st.Rules {
		if r.Rule != rule {
			continue
		}
		for _, h := range r.HeldShards {
			in := false
			for _, b := range blocked {
				in = in || (h.Shard >= b.From && h.Shard <= b.To)
			}
			if !in {
				outside = append(outside, fmt.Sprint(h.Shard))
				continue
			}
			n += h.Held
			oldest = max(oldest, h.OldestAgeSeconds)
		}
	}
	return n, oldest, outside
}

func (d *drill) scenario(ctx context.Context, files0 map[string][]byte, t0 *router.Table, p switchPlan) error {
	v0 := t0.Version()
	d.rep.Phases = append(d.rep.Phases, &Phase{Name: "start", Version: v0})
	d.logf("before: rules version %d; running %s", v0, d.cfg.Before)
	if err := sleepCtx(ctx, d.cfg.Before); err != nil {
		return err
	}
	targetFiles, target, err := d.switchRange(ctx, files0, t0, p)
	if err != nil {
		return err
	}
	if err := sleepCtx(ctx, d.cfg.After); err != nil {
		return err
	}
	if err := d.refuseLower(ctx, targetFiles, target, p.down, v0); err != nil {
		return err
	}
	if err := d.failover(ctx, targetFiles, target, p.down); err != nil {
		return err
	}
	d.logf("after the failover: load for %s more", 2*d.cfg.After)
	return sleepCtx(ctx, 2*d.cfg.After)
}

// switchRange moves p.move to p.to in the three steps, with the switch
// operators run (internal/switchover, `cellbridge switch`): the target
// rules go to a scratch directory, and the switch writes the blocking and
// then the target rules into the bridge's directory, waiting for the
// bridge at each step; step 2's catch-up is watchBlocked. It returns the
// switched rule files and table (version n+2).
func (d *drill) switchRange(ctx context.Context, files0 map[string][]byte, t0 *router.Table, p switchPlan) (map[string][]byte, *router.Table, error) {
	v0 := t0.Version()
	// The target mapping first, so that router.Diff says what to block.
	owners := rulesdir.Owners(t0)
	for s := p.move.From; s <= p.move.To; s++ {
		owners[s] = p.to
	}
	targetFiles, err := rulesdir.EditCellMap(files0, rulesdir.CellMapEdit{Version: v0 + 2, Owner: owners, Blocked: []router.Range{}})
	if err != nil {
		return nil, nil, err
	}
	newDir, err := os.MkdirTemp(d.cfg.TempDir, "rules-target-")
	if err != nil {
		return nil, nil, fmt.Errorf("drill: %w", err)
	}
	defer os.RemoveAll(newDir)
	nd, err := rulesdir.OpenRulesDir(newDir)
	if err == nil {
		err = nd.Apply(targetFiles)
	}
	if err != nil {
		return nil, nil, err
	}
	target, err := router.Load(newDir)
	if err != nil {
		return nil, nil, fmt.Errorf("drill: the switched rules do not validate:\n%w", err)
	}
	diff := router.Diff(t0, target)
	if len(diff.Block) == 0 {
		return nil, nil, errors.New("drill: router.Diff finds nothing to block for the switch")
	}
	sw := &d.rep.Switch
	sw.Range, sw.From, sw.To, sw.Blocked = p.move.String(), p.from, p.to, diff.Block

	block := &Phase{Name: "switch step 1: block " + diff.BlockedList(), Version: v0 + 1}
	unblock := &Phase{Name: "switch step 3: new owners, unblock", Version: v0 + 2}
	var heldIDs []string
	onStep := func(st switchover.Step) {
		now := time.Now()
		switch st {
		case switchover.StepBlockWritten:
			block.Written = now
		case switchover.StepBlockInForce:
			block.Effective, sw.BlockEffective = now, now
			d.rep.Phases = append(d.rep.Phases, block)
			d.logf("%s: rules version %d written, in force after %s", block.Name, block.Version, now.Sub(block.Written).Round(time.Millisecond))
		case switchover.StepUnblockWriting:
			heldIDs = d.heldEvents(diff)
		case switchover.StepUnblockWritten:
			unblock.Written, sw.UnblockWritten = now, now
		case switchover.StepDrained:
			unblock.Effective, sw.UnblockEffective = now, now
			d.rep.Phases = append(d.rep.Phases, unblock)
			d.logf("%s: rules version %d written, running with nothing held after %s", unblock.Name, unblock.Version, now.Sub(unblock.Written).Round(time.Millisecond))
		}
	}
	rep, err := switchover.Run(ctx, switchover.Config{
		Old: d.rd.Dir, Writer: d.rd, New: newDir, TempDir: d.cfg.TempDir,
		Deployment: &deployment.HTTP{URLs: []string{d.cfg.BridgeURL}},
		CatchUp:    func(ctx context.Context) error { return d.watchBlocked(ctx, diff) },
		Poll:       20 * time.Millisecond, Timeout: d.cfg.Settle, OnStep: onStep,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("drill: %w", err)
	}
	if rep.BlockVersion != v0+1 || rep.FinalVersion != v0+2 {
		return nil, nil, fmt.Errorf("drill: the switch used versions %d and %d, want %d and %d", rep.BlockVersion, rep.FinalVersion, v0+1, v0+2)
	}
	d.tables[v0+1], d.tables[v0+2] = rep.BlockTable, rep.FinalTable
	d.awaitHeld(ctx, diff, heldIDs)
	return targetFiles, rep.FinalTable, nil
}

// watchBlocked is step 2: for Config.Blocked it samples /status, expecting
// the held messages of the blocked ranges (and nothing else) to grow and the
// other shards to keep being forwarded.
func (d *drill) watchBlocked(ctx context.Context, diff router.DiffReport) error {
	sw := &d.rep.Switch
	forwarded := func() float64 {
		v, _ := d.bc.Metric(ctx, bridge.MetricForwarded, map[string]string{"rule": d.rule.Name})
		return v
	}
	fwdAtBlock := forwarded()
	end := time.Now().Add(d.cfg.Blocked)
	var first, last int
	samples := 0
	for time.Now().Before(end) {
		st, err := d.bc.Status(ctx)
		if err == nil {
			n, oldest, outside := heldIn(st, d.rule.Name, diff.Block)
			if samples == 0 {
				first = n
			}
			samples++
			last = n
			sw.HeldMax = max(sw.HeldMax, n)
			sw.HeldOldestSeconds = max(sw.HeldOldestSeconds, oldest)
			if len(outside) > 0 {
				d.violate(KindHeldOutside, "held messages in shards %s, which are not blocked", strings.Join(outside, ","))
			}
			for _, r := range st.Rules {
				if r.Rule == d.rule.Name {
					sw.HeldRanges = r.HeldRanges
				}
			}
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	sw.HeldFirst, sw.HeldAtUnblock = first, last
	d.logf("switch step 2: held in %s grew %d → %d (oldest %.1fs) while blocked for %s",
		diff.BlockedList(), first, last, sw.HeldOldestSeconds, d.cfg.Blocked)
	if samples < 2 || last <= first || last == 0 {
		d.violate(KindHeldNotGrowing, "held messages of the blocked shards did not grow while blocked (%d → %d over %d samples)", first, last, samples)
	}
	fwdAtUnblock := forwarded()
	sw.ForwardedWhileBlocked = int(fwdAtUnblock - fwdAtBlock)
	if fwdAtUnblock <= fwdAtBlock {
		d.violate(KindOthersStalled, "%s{rule=%q} did not grow while the range was blocked (%.0f → %.0f)", bridge.MetricForwarded, d.rule.Name, fwdAtBlock, fwdAtUnblock)
	}
	return nil
}

// heldEvents lists the events of the blocked shards that the source had
// stored and that had not arrived anywhere: those the bridge holds when
// the unblocking rules are written.
func (d *drill) heldEvents(diff router.DiffReport) []string {
	var ids []string
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, e := range d.events {
		if inRanges(e.Shard, diff.Block) && !e.Stored.IsZero() && d.col.countArrived([]string{e.ID}) == 0 {
			ids = append(ids, e.ID)
		}
	}
	d.rep.Switch.HeldEvents = len(ids)
	return ids
}

// awaitHeld is the end of step 3: drained is when every held event has
// arrived (the switch already saw the bridge hold nothing).
func (d *drill) awaitHeld(ctx context.Context, diff router.DiffReport, heldIDs []string) {
	sw := &d.rep.Switch
	deadline := time.Now().Add(d.cfg.Settle)
	for d.col.countArrived(heldIDs) < len(heldIDs) {
		if time.Now().After(deadline) {
			d.violate(KindNotDrained, "%d of %d events of the blocked shards arrived within %s of unblocking",
				d.col.countArrived(heldIDs), len(heldIDs), d.cfg.Settle)
			return
		}
		if sleepCtx(ctx, 10*time.Millisecond) != nil {
			return
		}
	}
	sw.Drained = time.Now()
	d.logf("switch step 3: drained %d events of %s to %s %s after writing the rules (%s after the bridge ran them)",
		len(heldIDs), diff.BlockedList(), sw.To, sw.Drained.Sub(sw.UnblockWritten).Round(time.Millisecond),
		sw.Drained.Sub(sw.UnblockEffective).Round(time.Millisecond))
}

// refuseLower writes the failover rules with version lower (below the
// running n+2, as a stale file would be) and expects a refusal: the
// running version stays and the reload-failure counter grows. Then it puts
// the running rules back, as an operator undoes a mistake.
func (d *drill) refuseLower(ctx context.Context, running map[string][]byte, target *router.Table, down string, lower int64) error {
	rf := &d.rep.Refused
	rf.Version, rf.Running = lower, target.Version()
	lowFiles, err := rulesdir.EditCellMap(running, rulesdir.CellMapEdit{Version: lower, State: map[string]string{down: router.StateDown},
		Failover: failoverFixes(target, down)})
	if err != nil {
		return err
	}
	rf.FailuresBefore, err = d.bc.Metric(ctx, bridge.MetricRulesReloadFails, nil)
	if err != nil {
		return fmt.Errorf("drill: reading %s: %w", bridge.MetricRulesReloadFails, err)
	}
	if err := d.rd.Apply(lowFiles); err != nil {
		return err
	}
	deadline := time.Now().Add(d.cfg.Settle)
	for {
		rf.FailuresAfter, _ = d.bc.Metric(ctx, bridge.MetricRulesReloadFails, nil)
		if rf.FailuresAfter > rf.FailuresBefore || time.Now().After(deadline) {
			break
		}
		if err := sleepCtx(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
	if st, err := d.bc.Status(ctx); err == nil {
		rf.RunningAfter = st.RulesVersion
	}
	if rf.FailuresAfter <= rf.FailuresBefore {
		d.violate(KindLowerAccepted, "no refusal counted in %s within %s of writing version %d", bridge.MetricRulesReloadFails, d.cfg.Settle, lower)
	}
	if rf.RunningAfter != rf.Running {
		d.violate(KindLowerAccepted, "after writing version %d the bridge runs version %d, want %d", lower, rf.RunningAfter, rf.Running)
	}
	d.logf("lower version: rules version %d written over %d: refused (%s %.0f → %.0f), still running %d",
		lower, rf.Running, bridge.MetricRulesReloadFails, rf.FailuresBefore, rf.FailuresAfter, rf.RunningAfter)
	return d.rd.Apply(running)
}

// failover marks down as down (every cell that failed over to it gets
// another failover) with the next version; router.Diff must see failovers
// only, nothing to block.
func (d *drill) failover(ctx context.Context, running map[string][]byte, target *router.Table, down string) error {
	fo := &d.rep.Failover
	fo.Down = down
	if c, ok := target.Cell(down); ok {
		fo.To = c.Failover
	}
	fixes := failoverFixes(target, down)
	for _, c := range target.Cells() {
		if f, ok := fixes[c.Name]; ok {
			fo.FailoverFixes = append(fo.FailoverFixes, fmt.Sprintf("%s: failover %s → %s", c.Name, c.Failover, f))
		}
	}
	v := target.Version() + 1
	failFiles, err := rulesdir.EditCellMap(running, rulesdir.CellMapEdit{Version: v, State: map[string]string{down: router.StateDown}, Failover: fixes})
	if err != nil {
		return err
	}
	failT, err := rulesdir.LoadFiles(d.cfg.TempDir, failFiles)
	if err != nil {
		return fmt.Errorf("drill: the failover rules do not validate:\n%w", err)
	}
	fd := router.Diff(target, failT)
	fo.Moves = fd.Moves
	if len(fd.Block) != 0 {
		d.violate(KindFailoverBlocks, "router.Diff wants %s blocked for a failover", fd.BlockedList())
	}
	ph, err := d.apply(ctx, "failover: "+down+" down", v, failFiles)
	if err != nil {
		return err
	}
	fo.Effective = ph.Effective
	return nil
}

// failoverFixes returns, for every cell whose failover is down, a live
// replacement: down's own failover cell, or else another active cell.
func failoverFixes(t *router.Table, down string) map[string]string {
	dc, _ := t.Cell(down)
	fixes := map[string]string{}
	for _, c := range t.Cells() {
		if c.Name == down || c.Failover != down {
			continue
		}
		repl := dc.Failover
		if repl == "" || repl == c.Name || repl == down {
			repl = ""
			for _, o := range t.Cells() {
				if o.Name != c.Name && o.Name != down && o.State != router.StateDown && len(o.Shards) > 0 {
					repl = o.Name
					break
				}
			}
		}
		if repl != "" {
			fixes[c.Name] = repl
		}
	}
	return fixes
}

func inRanges(s int, rs []router.Range) bool {
	for _, r := range rs {
		if s >= r.From && s <= r.To {
			return true
		}
	}
	return false
}

// waitAllArrived waits until every published event arrived somewhere and
// the bridge holds nothing in flight, then a moment longer for stragglers
// (a duplicate would arrive after its original).
func (d *drill) waitAllArrived(ctx context.Context) error {
	events := d.snapshotEvents()
	deadline := time.Now().Add(d.cfg.Settle)
	for d.col.distinct() < len(events) && time.Now().Before(deadline) {
		if err := sleepCtx(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
	// Not an error when it does not settle: what is missing is reported
	// as lost by the checks.
	_, _ = d.waitStatus(ctx, "nothing in flight", func(st bridge.Status) bool { return st.InFlight == 0 && st.Held == 0 })
	d.logf("load stopped: %d events published, %d arrived", len(events), d.col.distinct())
	if d.cfg.Publisher == nil {
		// The source stream is on the drill's own JetStream: once its
		// consumers have nothing unacknowledged, no redelivery (and so no
		// late duplicate) can come.
		if err := d.waitSourceAcked(ctx); err != nil {
			d.logf("source: %v; duplicates are watched for 0.5s only", err)
		} else {
			d.rep.SourceAcked = true
			d.logf("source: every delivery acknowledged")
		}
	}
	return sleepCtx(ctx, 500*time.Millisecond)
}

// waitSourceAcked waits, up to Settle, until none of the rule's consumers
// of its source stream has an unacknowledged delivery.
func (d *drill) waitSourceAcked(ctx context.Context) error {
	stream := d.rule.Source.Stream
	src := d.rule.Source
	ours := map[string]bool{src.Group: true}
	for p := range src.Partitions {
		ours[natsjs.PartitionDurable(src.Group, src.Partitions, p)] = true
	}
	deadline := time.Now().Add(d.cfg.Settle)
	last := errors.New("not checked")
	for {
		pending, found, err := sourceAckPending(ctx, d.cfg.JetStream, stream, ours)
		switch {
		case err != nil:
			last = err
		case found == 0:
			last = fmt.Errorf("no consumer of group %s on stream %s", src.Group, stream)
		case pending == 0:
			return nil
		default:
			last = fmt.Errorf("%d deliveries of stream %s unacknowledged after %s", pending, stream, d.cfg.Settle)
		}
		if time.Now().After(deadline) {
			return last
		}
		if err := sleepCtx(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
}

// sourceAckPending sums NumAckPending over the consumers of stream named
// in ours (the rule's own: other consumers, an operator's or a former
// partition count's, are not the bridge's to settle); found counts them.
func sourceAckPending(ctx context.Context, js jetstream.JetStream, stream string, ours map[string]bool) (pending, found int, err error) {
	rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	s, err := js.Stream(rctx, stream)
	if err != nil {
		return 0, 0, fmt.Errorf("stream %s: %w", stream, err)
	}
	l := s.ListConsumers(rctx)
	for ci := range l.Info() {
		if ours[ci.Name] {
			pending += ci.NumAckPending
			found++
		}
	}
	if err := l.Err(); err != nil {
		return 0, 0, fmt.Errorf("consumers of stream %s: %w", stream, err)
	}
	return pending, found, nil
}

// analyze checks everything that arrived and completes the report.
func (d *drill) analyze() {
	in := checkInput{
		topic: d.rule.Name, arrivals: d.col.snapshot(), tables: d.tables, phases: d.rep.Phases,
		blocked: d.rep.Switch.Blocked, blockEffective: d.rep.Switch.BlockEffective, unblockWritten: d.rep.Switch.UnblockWritten,
		down: d.rep.Failover.Down, failEffective: d.rep.Failover.Effective, slack: d.cfg.InFlightSlack,
	}
	if n := len(d.rep.Phases); n > 0 {
		in.failVersion = d.rep.Phases[n-1].Version
	}
	d.mu.Lock()
	in.events = slices.Clone(d.events)
	in.msgIDs = maps.Clone(d.msgIDs)
	d.mu.Unlock()
	checkArrivals(in, d.rep)
	d.col.mu.Lock()
	d.rep.Foreign = d.col.foreign
	errs := slices.Clone(d.col.errs)
	d.col.mu.Unlock()
	for _, err := range errs {
		d.violate(KindCollect, "%v", err)
	}
}
