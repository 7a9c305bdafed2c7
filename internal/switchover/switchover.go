package switchover

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/cellbridge/cellbridge/internal/deployment"
	"github.com/cellbridge/cellbridge/internal/rulesdir"
	"github.com/cellbridge/cellbridge/router"
)

// Config describes one switch.
type Config struct {
	// Old is the rules directory the deployment runs; New holds the rules
	// to switch to (their version is raised when it is not high enough).
	Old, New string
	// Writer replaces Old's files; nil opens Old (rulesdir.OpenRulesDir).
	// Not used with Print.
	Writer *rulesdir.RulesDir
	// Print prints each step's rule files to Out instead of writing them,
	// for the operator to apply (GitOps), and waits for the deployment to
	// run them as when writing.
	Print bool
	// DryRun prints the plan and changes nothing.
	DryRun bool
	// ApplyCmd, when set, runs with sh -c after each write of Old, to take
	// the files to the replicas (a ConfigMap update); a failure stops the
	// switch (run it again to resume: when Old holds the rules of a step
	// already and no replica runs their version, it runs again first).
	ApplyCmd string
	// Deployment lists the live replicas.
	Deployment deployment.Source
	// WaitCmd, when set, is step 2's catch-up check: it runs with sh -c
	// every CatchUpInterval (default 5s) until it exits 0. CatchUp, when
	// set, is called instead (the drill).
	WaitCmd         string
	CatchUpInterval time.Duration
	CatchUp         func(ctx context.Context) error
	// Poll is how often the replicas are read (default 200ms); Timeout
	// bounds each wait for them (default 10m).
	Poll, Timeout time.Duration
	// Out receives the progress and, with Print, the files; nil discards.
	Out io.Writer
	// OnStep, when set, is called at each step, synchronously.
	OnStep func(Step)
	// TempDir is scratch space for validating rules ("" = os.TempDir()).
	TempDir string
}

// Step names a moment of the switch.
type Step string

// The steps, in order.
const (
	StepBlockWritten   Step = "block written"
	StepBlockInForce   Step = "block in force"
	StepUnblockWriting Step = "unblock about to be written"
	StepUnblockWritten Step = "unblock written"
	StepDrained        Step = "drained"
)

// Report is what a switch did.
type Report struct {
	Old, New string
	// OldVersion is Old's version when the switch started; BlockVersion
	// the blocking rules' and FinalVersion the new rules'.
	OldVersion, BlockVersion, FinalVersion int64
	// Moves are the shards that change cell; Block what was blocked.
	Moves []router.Move
	Block []router.Range
	// Resumed says where an interrupted switch was taken up ("" when it
	// started from the beginning).
	Resumed string
	// Replicas are the replicas that ran the new rules.
	Replicas []string
	// HeldMax is, per replica, the most messages of the moving shards it
	// held while they were blocked; HeldAtUnblock all replicas' sum when
	// the new rules were written.
	HeldMax       map[string]int
	HeldAtUnblock int
	// The moments of the steps (zero when skipped by a resumption).
	BlockWritten, BlockInForce, UnblockWritten, Drained time.Time
	// BlockTable and FinalTable are the rules of the two versions.
	BlockTable, FinalTable *router.Table
}

// phase is where a switch starts.
type phase int

const (
	phaseStart   phase = iota // nothing done yet
	phaseBlocked              // the blocking rules are in place
	phaseFinal                // the new rules are in place
)

// switchRun is one switch.
type switchRun struct {
	cfg Config
	rep *Report
	out io.Writer
	mu  sync.Mutex // guards rep.HeldMax while sampleHeld runs
	// noted is set once a replica that does not answer was reported at
	// the start.
	noted bool
}

func (c *Config) defaults() error {
	if c.Old == "" || c.New == "" {
		return errors.New("switch: the old and the new rules directory are required")
	}
	if c.Deployment == nil {
		return errors.New("switch: no deployment to wait for")
	}
	c.Poll = cmp.Or(max(c.Poll, 0), 200*time.Millisecond)
	c.Timeout = cmp.Or(max(c.Timeout, 0), 10*time.Minute)
	c.CatchUpInterval = cmp.Or(max(c.CatchUpInterval, 0), 5*time.Second)
	c.Out = cmp.Or[io.Writer](c.Out, io.Discard)
	c.TempDir = cmp.Or(c.TempDir, os.TempDir())
	return nil
}

// Run carries out (or resumes) the switch from the rules in Old to those in
// New:
//
//  1. write Old's rules with the moving shards blocked, under a version
//     above every version the deployment has run;
//  2. wait until every live replica runs that version and publishes
//     nothing decided under an older one, then run the catch-up check;
//  3. write New's rules, under a version above the blocking one, and wait
//     until every replica runs it and holds nothing of the moving shards.
//
// Old is the state: when it already blocks the moving shards the switch
// resumes at step 2, when it already routes as New at step 3's wait (with
// Print, a deployment that runs a version blocking the moving shards
// resumes at step 2 too). The error says why a switch cannot go on; the
// report says what happened up to there.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	s := &switchRun{cfg: cfg, out: cfg.Out, rep: &Report{Old: cfg.Old, New: cfg.New, HeldMax: map[string]int{}}}
	return s.rep, s.run(ctx)
}

func (s *switchRun) printf(format string, a ...any) {
	fmt.Fprintf(s.out, format+"\n", a...)
}

func (s *switchRun) step(st Step, at time.Time) {
	if s.cfg.OnStep != nil {
		s.cfg.OnStep(st)
	}
	switch st {
	case StepBlockWritten:
		s.rep.BlockWritten = at
	case StepBlockInForce:
		s.rep.BlockInForce = at
	case StepUnblockWritten:
		s.rep.UnblockWritten = at
	case StepDrained:
		s.rep.Drained = at
	}
}

func (s *switchRun) run(ctx context.Context) error {
	cfg := s.cfg
	t0, err := router.Load(cfg.Old)
	if err != nil {
		return fmt.Errorf("switch: the running rules %s:\n%w", cfg.Old, err)
	}
	tn, err := router.Load(cfg.New)
	if err != nil {
		return fmt.Errorf("switch: the new rules %s:\n%w", cfg.New, err)
	}
	if t0.Shards() != tn.Shards() {
		return fmt.Errorf("switch: %s has %d shards and %s %d: a switch moves shards between cells of one shard space", cfg.Old, t0.Shards(), cfg.New, tn.Shards())
	}
	oldFiles, err := rulesdir.ReadRuleFiles(cfg.Old)
	if err != nil {
		return err
	}
	newFiles, err := rulesdir.ReadRuleFiles(cfg.New)
	if err != nil {
		return err
	}
	d := router.Diff(t0, tn)
	s.rep.OldVersion, s.rep.Moves, s.rep.Block = t0.Version(), d.Moves, d.Block
	ph := phaseStart
	switch {
	case len(d.Block) == 0 && !d.Changed():
		ph = phaseFinal
	case len(d.Block) == 0:
		ph = phaseBlocked // nothing to block (failovers, other changes): straight to step 3
	case allBlocked(t0, d.Block):
		ph = phaseBlocked
	}
	highest, err := s.highest(ctx)
	if err != nil {
		return err
	}
	blockV := max(t0.Version(), highest) + 1
	if ph != phaseStart {
		blockV = t0.Version()
	}
	if ph == phaseStart && highest > t0.Version() {
		v, ok, err := s.deploymentBlocks(ctx, d.Block)
		if err != nil {
			return err
		}
		if !ok {
			return fmt.Errorf("switch: the deployment has run version %d, newer than %s (version %d): bring %s up to the rules the deployment runs, then run the switch again", highest, cfg.Old, t0.Version(), cfg.Old)
		}
		ph, blockV = phaseBlocked, v
		s.rep.Resumed = fmt.Sprintf("the deployment runs version %d, which blocks %s", v, d.BlockedList())
	}
	finalV := max(tn.Version(), blockV+1)
	if ph == phaseFinal {
		blockV, finalV = 0, t0.Version()
	}
	s.rep.BlockVersion, s.rep.FinalVersion = blockV, finalV

	blockFiles, finalFiles := oldFiles, oldFiles
	if ph == phaseStart {
		if blockFiles, err = rulesdir.EditCellMap(oldFiles, rulesdir.CellMapEdit{Version: blockV, Blocked: union(t0.Blocked(), d.Block)}); err != nil {
			return err
		}
	}
	if ph != phaseFinal {
		if finalFiles, err = rulesdir.EditCellMap(newFiles, rulesdir.CellMapEdit{Version: finalV}); err != nil {
			return err
		}
	}
	if s.rep.BlockTable, err = rulesdir.LoadFiles(cfg.TempDir, blockFiles); err != nil && ph != phaseFinal {
		return fmt.Errorf("switch: the blocking rules do not validate:\n%w", err)
	}
	if s.rep.FinalTable, err = rulesdir.LoadFiles(cfg.TempDir, finalFiles); err != nil {
		return fmt.Errorf("switch: the new rules do not validate:\n%w", err)
	}
	for _, r := range d.Block {
		for sh := r.From; sh <= r.To; sh++ {
			if s.rep.FinalTable.IsBlocked(sh) {
				return fmt.Errorf("switch: %s moves shard %d but also blocks it: the new rules must not block the shards they move", cfg.New, sh)
			}
		}
	}
	s.plan(ph, t0, d)
	if cfg.DryRun {
		return nil
	}
	if err := s.reapply(ctx, ph, d); err != nil {
		return err
	}
	if ph == phaseStart {
		if err := s.write(1, "the current owners, the moving shards blocked", oldFiles, blockFiles, blockV); err != nil {
			return err
		}
		s.step(StepBlockWritten, time.Now())
	}
	if ph != phaseFinal {
		if err := s.waitBlocked(ctx, blockV, d.Block); err != nil {
			return err
		}
		// What the replicas hold of the moving shards, until they drained.
		sctx, stop := context.WithCancel(ctx)
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			s.sampleHeld(sctx, d.Block)
		}()
		defer func() { stop(); <-sampled }()
		if err := s.catchUp(ctx, d.Block); err != nil {
			return err
		}
		s.step(StepUnblockWriting, time.Now())
		s.rep.HeldAtUnblock = s.heldNow(ctx, d.Block)
		if err := s.write(3, "the new owners, nothing of the moving shards blocked", blockFiles, finalFiles, finalV); err != nil {
			return err
		}
		s.step(StepUnblockWritten, time.Now())
	}
	if err := s.waitDrained(ctx, finalV, d.Block); err != nil {
		return err
	}
	s.report(d)
	return nil
}

// reapply resumes a switch whose apply command failed (or was
// interrupted) after the files were written: when Old already holds the
// blocking or the new rules but no replica runs their version yet, nothing
// would take them to the replicas, so the apply command runs again.
func (s *switchRun) reapply(ctx context.Context, ph phase, d router.DiffReport) error {
	if s.cfg.ApplyCmd == "" || s.cfg.Print || s.rep.Resumed != "" {
		return nil
	}
	var n int
	var v int64
	switch {
	case ph == phaseFinal:
		n, v = 3, s.rep.FinalVersion
	case ph == phaseBlocked && len(d.Block) > 0:
		n, v = 1, s.rep.BlockVersion
	default:
		return nil // nothing written yet
	}
	recs, _ := s.cfg.Deployment.Replicas(ctx) // partial records count: one runs v or not
	for _, r := range recs {
		if r.RulesVersion >= v {
			return nil
		}
	}
	s.printf("resuming: %s holds version %d but no replica runs it yet: running the apply command again", s.cfg.Old, v)
	return s.apply(n)
}

// replicas reads the replicas; the records of those that answered count
// when some named replica did not (a *deployment.NoAnswerError), unless
// none answered.
func (s *switchRun) replicas(ctx context.Context) ([]deployment.Record, error) {
	recs, err := s.cfg.Deployment.Replicas(ctx)
	var na *deployment.NoAnswerError
	if errors.As(err, &na) && len(recs) > 0 {
		if !s.noted {
			s.printf("  note: %s (the switch waits for it at every step)", na)
			s.noted = true
		}
		return recs, nil
	}
	if err != nil {
		return nil, fmt.Errorf("switch: %s: %w", s.cfg.Deployment.Describe(), err)
	}
	return recs, nil
}

// highest is the highest version the deployment has run or runs.
func (s *switchRun) highest(ctx context.Context) (int64, error) {
	recs, err := s.replicas(ctx)
	if err != nil {
		return 0, err
	}
	h, err := s.cfg.Deployment.Highest(ctx)
	var na *deployment.NoAnswerError
	if err != nil && !errors.As(err, &na) {
		return 0, fmt.Errorf("switch: %s: %w", s.cfg.Deployment.Describe(), err)
	}
	for _, r := range recs {
		h = max(h, r.RulesVersion)
	}
	return h, nil
}

// deploymentBlocks reports whether every live replica (of those that
// answer) runs one version that blocks every shard of block, and which.
// A replica that does not answer is waited for at step 2.
func (s *switchRun) deploymentBlocks(ctx context.Context, block []router.Range) (int64, bool, error) {
	recs, err := s.replicas(ctx)
	if err != nil || len(recs) == 0 {
		return 0, false, err
	}
	v := recs[0].RulesVersion
	for _, r := range recs {
		if r.RulesVersion != v || !covers(r.Blocked, block) {
			return 0, false, nil
		}
	}
	return v, true, nil
}

func covers(blocked []string, block []router.Range) bool {
	have := map[int]bool{}
	for _, b := range blocked {
		r, err := router.ParseRange(b)
		if err != nil {
			return false
		}
		for sh := r.From; sh <= r.To; sh++ {
			have[sh] = true
		}
	}
	for _, r := range block {
		for sh := r.From; sh <= r.To; sh++ {
			if !have[sh] {
				return false
			}
		}
	}
	return true
}

func allBlocked(t *router.Table, block []router.Range) bool {
	for _, r := range block {
		for sh := r.From; sh <= r.To; sh++ {
			if !t.IsBlocked(sh) {
				return false
			}
		}
	}
	return true
}

// union merges two lists of ranges into sorted runs.
func union(a, b []router.Range) []router.Range {
	set := map[int]bool{}
	for _, rs := range [][]router.Range{a, b} {
		for _, r := range rs {
			for sh := r.From; sh <= r.To; sh++ {
				set[sh] = true
			}
		}
	}
	shards := slices.Sorted(maps.Keys(set))
	var out []router.Range
	for _, sh := range shards {
		if n := len(out); n > 0 && out[n-1].To == sh-1 {
			out[n-1].To = sh
			continue
		}
		out = append(out, router.Range{From: sh, To: sh})
	}
	return out
}

func blockedList(rs []router.Range) string {
	return router.DiffReport{Block: rs}.BlockedList()
}

// plan prints what the switch will do.
func (s *switchRun) plan(ph phase, t0 *router.Table, d router.DiffReport) {
	r := s.rep
	s.printf("switch %s → %s, %d shards, deployment: %s", s.cfg.Old, s.cfg.New, t0.Shards(), s.cfg.Deployment.Describe())
	for _, m := range d.Moves {
		var rs []string
		for _, g := range m.Ranges {
			rs = append(rs, g.String())
		}
		note := ""
		if m.Failover {
			note = " (failover: nothing to block)"
		}
		s.printf("  moves %s → %s: shards %s (%d)%s", m.From, m.To, strings.Join(rs, ", "), m.Count, note)
	}
	for _, p := range d.Pins {
		note := " (failover: nothing to block)"
		if !p.Failover {
			note = " (blocks " + shardsText(p.Shards) + ")"
		}
		s.printf("  pin %s: %s → %s%s", p.Key, orNone(p.From), orNone(p.To), note)
	}
	for _, name := range d.Rekeyed {
		s.printf("  topic rule %s: its key or shard function changes: its keys may change shard and cell, so every shard is blocked (every rule routed by shard holds its events until step 3)", name)
	}
	verb := "write"
	if s.cfg.Print {
		verb = "print (apply them yourself)"
	}
	if r.Resumed != "" {
		s.printf("  resuming: %s", r.Resumed)
	}
	switch ph {
	case phaseStart:
		s.printf("  1. %s the current rules as version %d with blocked: %s", verb, r.BlockVersion, blockedList(r.BlockTable.Blocked()))
	case phaseBlocked:
		if r.Resumed == "" && len(d.Block) > 0 {
			s.printf("  1. done: %s (version %d) blocks %s", s.cfg.Old, r.BlockVersion, d.BlockedList())
		}
	case phaseFinal:
		s.printf("  %s already routes as %s (version %d): waiting until every replica runs it and holds nothing", s.cfg.Old, s.cfg.New, r.FinalVersion)
		return
	}
	if len(d.Block) > 0 {
		catchUp := "no catch-up check (-wait-cmd): step 3 follows at once"
		switch {
		case s.cfg.CatchUp != nil:
			catchUp = "the catch-up check"
		case s.cfg.WaitCmd != "":
			catchUp = fmt.Sprintf("`%s` every %s until it exits 0", s.cfg.WaitCmd, s.cfg.CatchUpInterval)
		}
		s.printf("  2. wait until every live replica runs version %d and publishes nothing decided before it; then %s", r.BlockVersion, catchUp)
	}
	s.printf("  3. %s the new rules as version %d; wait until every replica runs it and holds nothing of %s", verb, r.FinalVersion, d.BlockedList())
}

// write replaces Old's files with files (or prints those that change).
func (s *switchRun) write(n int, what string, from, files map[string][]byte, v int64) error {
	if s.cfg.Print {
		s.printf("\nstep %d: apply these rules (version %d: %s); only the files shown change:", n, v, what)
		for _, name := range slices.Sorted(maps.Keys(files)) {
			if string(from[name]) == string(files[name]) {
				continue
			}
			s.printf("# ==> %s <==\n%s", name, strings.TrimRight(string(files[name]), "\n"))
		}
		for _, name := range slices.Sorted(maps.Keys(from)) {
			if files[name] == nil {
				s.printf("# ==> %s <== remove this file", name)
			}
		}
		s.printf("waiting for the deployment to run version %d ...", v)
		return nil
	}
	w := s.cfg.Writer
	if w == nil {
		var err error
		if w, err = rulesdir.OpenRulesDir(s.cfg.Old); err != nil {
			return err
		}
		s.cfg.Writer = w
	}
	if err := w.Apply(files); err != nil {
		return fmt.Errorf("switch: writing %s: %w", s.cfg.Old, err)
	}
	s.printf("step %d: wrote %s as version %d (%s)", n, s.cfg.Old, v, what)
	return s.apply(n)
}

// apply runs the apply command, if any, after step n's write.
func (s *switchRun) apply(n int) error {
	if s.cfg.ApplyCmd == "" {
		return nil
	}
	out, err := exec.Command("sh", "-c", s.cfg.ApplyCmd).CombinedOutput()
	if err != nil {
		return fmt.Errorf("switch: step %d: the apply command failed (%v)%s\n(fix it and run the switch again to resume)", n, err, indentOut(out))
	}
	s.printf("step %d: applied (%s)", n, s.cfg.ApplyCmd)
	return nil
}

func orNone(c string) string {
	if c == "" {
		return "(none)"
	}
	return c
}

func shardsText(shards []int) string {
	if len(shards) == 0 {
		return "nothing: the key's cell stays, or no rule routes it"
	}
	s := make([]string, len(shards))
	for i, sh := range shards {
		s[i] = fmt.Sprint(sh)
	}
	word := "shards "
	if len(shards) == 1 {
		word = "shard "
	}
	return word + strings.Join(s, ", ")
}

// wait polls the replicas until ok holds for every live one (and there is
// at least one), failing after Timeout with what the lagging ones say, or
// at once when a replica runs a version above limit.
func (s *switchRun) wait(ctx context.Context, what string, limit int64, ok func(deployment.Record) (bool, string)) ([]deployment.Record, error) {
	deadline := time.Now().Add(s.cfg.Timeout)
	lastSay := time.Now()
	var lag []string
	for {
		recs, err := s.cfg.Deployment.Replicas(ctx)
		lag = lag[:0]
		var na *deployment.NoAnswerError
		switch {
		case errors.As(err, &na):
			// A replica named but silent may still run older rules: it
			// counts as not there yet.
			lag = append(lag, na.Missing...)
		case err != nil:
			lag = append(lag, err.Error())
		case len(recs) == 0:
			lag = append(lag, "no live replica in "+s.cfg.Deployment.Describe())
		}
		for _, r := range recs {
			if r.RulesVersion > limit {
				return nil, fmt.Errorf("switch: replica %s runs rules version %d, newer than this switch's %d: another change was applied meanwhile; bring %s up to it and run the switch again", r.Replica, r.RulesVersion, limit, s.cfg.Old)
			}
			if good, why := ok(r); !good {
				lag = append(lag, r.Replica+": "+why)
			}
		}
		if len(lag) == 0 {
			return recs, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("switch: not within %s: %s; waiting for:\n  %s\n(run the switch again to resume)", s.cfg.Timeout, what, strings.Join(lag, "\n  "))
		}
		if time.Since(lastSay) >= 5*time.Second {
			s.printf("  still waiting for %s: %s", what, strings.Join(lag, "; "))
			lastSay = time.Now()
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("switch: interrupted while waiting for %s (run the switch again to resume): %w", what, ctx.Err())
		case <-time.After(s.cfg.Poll):
		}
	}
}

func describe(r deployment.Record, v int64) string {
	switch {
	case r.RulesVersion != v:
		return fmt.Sprintf("runs version %d, not %d", r.RulesVersion, v)
	case r.PublishingVersion != 0 && r.PublishingVersion < v:
		return fmt.Sprintf("still publishing a copy decided under version %d", r.PublishingVersion)
	}
	return ""
}

// waitBlocked is step 2's first part.
func (s *switchRun) waitBlocked(ctx context.Context, v int64, block []router.Range) error {
	recs, err := s.wait(ctx, fmt.Sprintf("every replica to run version %d with nothing older in publication", v), v, func(r deployment.Record) (bool, string) {
		return r.Settled(v), describe(r, v)
	})
	if err != nil {
		return err
	}
	s.step(StepBlockInForce, time.Now())
	var held []string
	for _, r := range recs {
		n, _ := r.HeldIn(block)
		held = append(held, fmt.Sprintf("%s %d", r.Replica, n))
	}
	s.printf("step 2: the block is in force on %d replica(s); held of the moving shards: %s", len(recs), strings.Join(held, ", "))
	return nil
}

// catchUp runs the catch-up check while sampling what the replicas hold.
func (s *switchRun) catchUp(ctx context.Context, block []router.Range) error {
	if len(block) == 0 {
		return nil
	}
	switch {
	case s.cfg.CatchUp != nil:
		if err := s.cfg.CatchUp(ctx); err != nil {
			return fmt.Errorf("switch: catch-up check: %w", err)
		}
	case s.cfg.WaitCmd != "":
		for n := 1; ; n++ {
			cmd := exec.CommandContext(ctx, "sh", "-c", s.cfg.WaitCmd)
			out, err := cmd.CombinedOutput()
			if err == nil {
				s.printf("step 2: catch-up check passed (attempt %d)", n)
				break
			}
			if ctx.Err() != nil {
				return fmt.Errorf("switch: interrupted during the catch-up check (run the switch again to resume): %w", ctx.Err())
			}
			s.printf("  catch-up check: not yet (%v)%s", err, indentOut(out))
			select {
			case <-ctx.Done():
				return fmt.Errorf("switch: interrupted during the catch-up check (run the switch again to resume): %w", ctx.Err())
			case <-time.After(s.cfg.CatchUpInterval):
			}
		}
	}
	return nil
}

func indentOut(b []byte) string {
	t := strings.TrimSpace(string(b))
	if t == "" {
		return ""
	}
	return "\n    " + strings.ReplaceAll(t, "\n", "\n    ")
}

// sampleHeld records the most each replica held of the moving shards.
func (s *switchRun) sampleHeld(ctx context.Context, block []router.Range) {
	for {
		if recs, _ := s.cfg.Deployment.Replicas(ctx); len(recs) > 0 {
			s.mu.Lock()
			for _, r := range recs {
				n, _ := r.HeldIn(block)
				s.rep.HeldMax[r.Replica] = max(s.rep.HeldMax[r.Replica], n)
			}
			s.mu.Unlock()
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(s.cfg.Poll):
		}
	}
}

// heldNow sums what the replicas hold of the moving shards.
func (s *switchRun) heldNow(ctx context.Context, block []router.Range) int {
	recs, _ := s.cfg.Deployment.Replicas(ctx)
	total := 0
	for _, r := range recs {
		n, _ := r.HeldIn(block)
		total += n
	}
	return total
}

// waitDrained is step 3's wait.
func (s *switchRun) waitDrained(ctx context.Context, v int64, block []router.Range) error {
	recs, err := s.wait(ctx, fmt.Sprintf("every replica to run version %d and hold nothing of the moving shards", v), v, func(r deployment.Record) (bool, string) {
		if r.RulesVersion != v {
			return false, describe(r, v)
		}
		if n, oldest := r.HeldIn(block); n > 0 {
			return false, fmt.Sprintf("holds %d messages of the moving shards (oldest %.1fs)", n, oldest)
		}
		return true, ""
	})
	if err != nil {
		return err
	}
	s.step(StepDrained, time.Now())
	for _, r := range recs {
		s.rep.Replicas = append(s.rep.Replicas, r.Replica)
	}
	return nil
}

// report prints what moved.
func (s *switchRun) report(d router.DiffReport) {
	r := s.rep
	s.printf("\nswitch done: %d replica(s) run version %d (%s)", len(r.Replicas), r.FinalVersion, strings.Join(r.Replicas, ", "))
	for _, m := range d.Moves {
		var rs []string
		for _, g := range m.Ranges {
			rs = append(rs, g.String())
		}
		s.printf("  moved %s → %s: shards %s (%d)", m.From, m.To, strings.Join(rs, ", "), m.Count)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(r.HeldMax) > 0 {
		var parts []string
		for _, id := range slices.Sorted(maps.Keys(r.HeldMax)) {
			parts = append(parts, fmt.Sprintf("%s %d", id, r.HeldMax[id]))
		}
		s.printf("  held while blocked (most per replica): %s; %d when the new rules were written", strings.Join(parts, ", "), r.HeldAtUnblock)
	}
	if !r.BlockWritten.IsZero() && !r.BlockInForce.IsZero() {
		s.printf("  block in force %s after it was written", r.BlockInForce.Sub(r.BlockWritten).Round(time.Millisecond))
	}
	if !r.UnblockWritten.IsZero() {
		s.printf("  drained %s after the new rules were written", r.Drained.Sub(r.UnblockWritten).Round(time.Millisecond))
	}
}
