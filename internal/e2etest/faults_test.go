//go:build unix

package e2etest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/poll"
	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// The fault matrix of docs/faults.md, as tests: a 3-node cluster of
// nats-server processes, R3 source, cell and DLQ streams and an R3 dedupe
// bucket (dedupe.store: jetstream), two bridge replicas on the three URLs,
// keyed load at faultRate, one fault per run, every event checked. Each run
// must end with nothing lost, duplicated or misrouted; its times have goals
// (asserted with CELLBRIDGE_TIMING_GOALS=strict, else logged when missed,
// see goalMissed): every event in
// its cell within faultMaxLatency of being stored in the source stream (no
// fault here takes a quorum away from a stream for longer than an
// election; the whole-source stall of TestFaultsReadyz does, and there the
// latency is reported, not bounded; its one-target stall makes the target
// unavailable on purpose for longer than the bound, and there the bound
// applies to the time an event waited outside the stall). Each run logs
// one line that starts with "FAULT " (grep it: go test -v -run
// 'TestFaults' ./internal/e2etest/ | grep 'FAULT ') with the figures
// docs/faults.md is filled from. With CELLBRIDGE_KEEP_LOGS=DIR the
// replicas' logs (debug level) and the servers' logs are kept in
// DIR/<test name>.
const (
	faultRate       = 1_000
	faultKeys       = 500
	faultTopic      = "orders"
	faultCell       = "rz01"
	faultBucket     = "faults-dedupe"
	faultMaxLatency = 10 * time.Second
	// faultReadyWithin bounds how long after a stall starts /readyz must
	// say 503, and how long after it ends 200 again.
	faultReadyWithin = 5 * time.Second
	// faultSettle bounds the wait for every copy after the load.
	faultSettle = 60 * time.Second
)

// faultRig is one cluster with its streams and two bridge replicas.
type faultRig struct {
	t       *testing.T
	c       *natstest.Cluster
	js      jetstream.JetStream
	table   *router.Table
	rule    *router.Rule
	bridges []*Bridge
	ctx     context.Context
}

// startFaultRig starts the cluster, creates the streams (R3) and starts
// two replicas; order[i] lists the servers (indexes) replica i tries, in
// that order (brokers.nats.serverOrder: listed), so that a test knows
// which server each replica is attached to.
func startFaultRig(t *testing.T, order [2][]int) *faultRig {
	t.Helper()
	if testing.Short() {
		t.Skip("cluster fault test: skipped with -short")
	}
	natstest.ServerBinary(t)
	BridgeBinary(t)
	c := natstest.StartCluster(t, 3)
	rules, table := exampleTable(t)
	_, js := c.Connect(t)
	r := &faultRig{t: t, c: c, js: js, table: table, rule: table.Rule(faultTopic), ctx: testCtx(t, 5*time.Minute)}
	if err := natsjs.EnsureStreams(r.ctx, js, table, natsjs.StreamOptions{Replicas: 3}); err != nil {
		t.Fatal(err)
	}
	dir, logCfg := t.TempDir(), ""
	if keep := os.Getenv("CELLBRIDGE_KEEP_LOGS"); keep != "" {
		// The replicas' logs (at debug level: every failed dedupe commit
		// and source ack is a line) and the servers' logs outlive the
		// test: a failed run is read from them.
		dir, logCfg = filepath.Join(keep, t.Name()), "{level: debug, format: json}"
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Logf("replica and server logs in %s", dir)
		t.Cleanup(func() {
			for i := range c.Len() {
				if b, err := os.ReadFile(c.Node(i).LogFile); err == nil {
					_ = os.WriteFile(filepath.Join(dir, c.Node(i).Name+".log"), b, 0o644)
				}
			}
		})
	}
	for i, names := range [2]string{"replica-a", "replica-b"} {
		var urls []string
		for _, n := range order[i] {
			urls = append(urls, c.Node(n).URL)
		}
		cfg := WriteConfig(t, t.TempDir(), Config{Log: logCfg, Rules: rules, URLs: urls, Broker: "serverOrder: listed",
			Partitions: "{replicas: 3}", Dedupe: "{store: jetstream, bucket: " + faultBucket + ", replicas: 3}"})
		b := StartBridge(t, BridgeOptions{Name: names, Config: cfg, Dir: dir})
		b.WaitReady()
		r.bridges = append(r.bridges, b)
	}
	for _, s := range r.streams(true) {
		st, err := js.Stream(r.ctx, s)
		if err != nil {
			t.Fatalf("stream %s: %v", s, err)
		}
		if n := st.CachedInfo().Config.Replicas; n != 3 {
			t.Fatalf("stream %s has %d replicas, want 3", s, n)
		}
	}
	for i, b := range r.bridges {
		if on := r.attachedTo(b); on != order[i][0] {
			t.Fatalf("%s is attached to n%d, want n%d (its first server)", names(i), on, order[i][0])
		}
	}
	return r
}

func names(i int) string { return [2]string{"replica-a", "replica-b"}[i] }

// streams lists the source stream, every cell stream and the DLQ, and with
// kv the streams of the dedupe bucket and of the deployment's registry.
func (r *faultRig) streams(kv bool) []string {
	out := []string{r.rule.Source.Stream, natsjs.DLQStream}
	for _, c := range r.table.Cells() {
		out = append(out, natsjs.CellStream(c.Name))
	}
	if kv {
		out = append(out, "KV_"+faultBucket, "KV_cellbridge-leases")
	}
	return out
}

// attachedTo returns the server replica b's connection is on, from the
// last "nats connected" or "nats reconnected" line of its current run's
// log (-1: none).
func (r *faultRig) attachedTo(b *Bridge) int {
	r.t.Helper()
	log := logText(r.t, b)
	if i := strings.LastIndex(log, "=== e2etest: "); i >= 0 {
		log = log[i:]
	}
	url := ""
	for line := range strings.SplitSeq(log, "\n") {
		if !strings.Contains(line, `"msg":"nats connected"`) && !strings.Contains(line, `"msg":"nats reconnected"`) {
			continue
		}
		if _, rest, ok := strings.Cut(line, `"url":"`); ok {
			url, _, _ = strings.Cut(rest, `"`)
		}
	}
	for i := range r.c.Len() {
		if r.c.Node(i).URL == url {
			return i
		}
	}
	return -1
}

// active returns the replica that forwards the ordered rule (holds its
// pin), waiting for one (bounded).
func (r *faultRig) active() int {
	r.t.Helper()
	idx := -1
	poll.Eventually(r.t, 20*time.Second, "a replica forwarding "+faultTopic, func() bool {
		for i, b := range r.bridges {
			ctx, cancel := context.WithTimeout(r.ctx, time.Second)
			s, err := b.Source(ctx, faultTopic)
			cancel()
			if err == nil && s != nil && s.State == "active" {
				idx = i
				return true
			}
		}
		return false
	})
	return idx
}

// moveLeadersOff moves the lead of every stream (the dedupe bucket's too)
// and of the rules' consumers off server i, so that a fault to i hits only
// the clients attached to it (and the meta group, when i leads it: the
// test's account cannot move that).
func (r *faultRig) moveLeadersOff(i int) {
	r.t.Helper()
	other := (i + 1) % r.c.Len()
	for _, s := range r.streams(true) {
		if r.c.StreamLeader(s) == i {
			r.c.MoveStreamLeader(s, other)
		}
	}
	for _, ru := range r.table.Rules() {
		if r.c.ConsumerLeader(ru.Source.Stream, ru.Source.Group) == i {
			r.c.MoveConsumerLeader(ru.Source.Stream, ru.Source.Group, other)
		}
	}
}

// faultFigures is what one run measured.
type faultFigures struct {
	fault                   string
	events, lost, dup, mis  int
	reordered               int
	max, p99                time.Duration
	late                    int
	settle                  time.Duration
	readyz                  [2]readyTrace
	pubErrs, dedupeErrs     float64
	reqErrs, takenOver      float64
	maxStall                float64
	loadRetries             int
	quorumLost              bool
	notes                   string
	firstLate, lastLateSeen string
}

// line is the grep-able summary of a run.
func (f *faultFigures) line() string {
	return fmt.Sprintf("FAULT %-34q events=%d lost=%d dup=%d misrouted=%d reordered=%d max=%v p99=%v late(>%v)=%d settle=%v "+
		"readyz[a]=%s readyz[b]=%s max_stall_age=%.1fs publish_errors=%.0f dedupe_errors=%.0f dedupe_takeovers=%.0f broker_request_errors=%.0f load_retries=%d%s",
		f.fault, f.events, f.lost, f.dup, f.mis, f.reordered, f.max.Round(time.Millisecond), f.p99.Round(time.Millisecond),
		faultMaxLatency, f.late, f.settle.Round(100*time.Millisecond), f.readyz[0], f.readyz[1], f.maxStall,
		f.pubErrs, f.dedupeErrs, f.takenOver, f.reqErrs, f.loadRetries, f.notes)
}

// readySample is one answer of /readyz.
type readySample struct {
	at  time.Time
	ok  bool
	err bool // no answer
	why string
}

// readyTrace is a replica's /readyz over a run, sampled every 250ms.
type readyTrace []readySample

// transitions counts changes between 200 and 503 (unanswered samples
// skipped).
func (tr readyTrace) transitions() int {
	n, last := 0, -1
	for _, s := range tr {
		if s.err {
			continue
		}
		v := 0
		if s.ok {
			v = 1
		}
		if last >= 0 && v != last {
			n++
		}
		last = v
	}
	return n
}

// notReady is the time the trace spent at 503.
func (tr readyTrace) notReady() time.Duration {
	var d time.Duration
	for i := 1; i < len(tr); i++ {
		if !tr[i-1].err && !tr[i-1].ok {
			d += tr[i].at.Sub(tr[i-1].at)
		}
	}
	return d
}

// first returns the first answered sample at or after from whose readiness
// is ok.
func (tr readyTrace) first(from time.Time, ok bool) (readySample, bool) {
	for _, s := range tr {
		if !s.err && !s.at.Before(from) && s.ok == ok {
			return s, true
		}
	}
	return readySample{}, false
}

// between counts the answered samples in [from, to) whose readiness is ok.
func (tr readyTrace) between(from, to time.Time, ok bool) int {
	n := 0
	for _, s := range tr {
		if !s.err && !s.at.Before(from) && s.at.Before(to) && s.ok == ok {
			n++
		}
	}
	return n
}

// ageSuffix matches the ages a reason carries ("(for 1.2s)", "accepted
// 3.4s ago", "cleared 0.5s ago"), which reasons leaves out when it tells
// reasons apart.
var ageSuffix = regexp.MustCompile(`\(for [0-9.a-zµ]+\)| [0-9.]+[a-zµ]+ ago`)

// reasons lists the distinct first reasons of the 503 answers from from
// until to (zero: the end), in order, each with the time after from it
// first came.
func (tr readyTrace) reasons(from, to time.Time) string {
	var out []string
	seen := map[string]bool{}
	for _, s := range tr {
		if s.err || s.ok || s.at.Before(from) || (!to.IsZero() && !s.at.Before(to)) {
			continue
		}
		if why := ageSuffix.ReplaceAllString(firstLine(s.why), ""); !seen[why] {
			seen[why] = true
			out = append(out, fmt.Sprintf("%q at +%v", why, s.at.Sub(from).Round(10*time.Millisecond)))
		}
	}
	return strings.Join(out, "; ")
}

func (tr readyTrace) String() string {
	if len(tr) == 0 {
		return "none"
	}
	return fmt.Sprintf("%d-transitions/503-for-%v", tr.transitions(), tr.notReady().Round(250*time.Millisecond))
}

// sampler asks each replica's /readyz every 250ms and its stall age every
// second until stopped.
type sampler struct {
	stop chan struct{}
	wg   sync.WaitGroup

	mu       sync.Mutex
	traces   [2]readyTrace
	maxStall float64
}

func (r *faultRig) sample() *sampler {
	s := &sampler{stop: make(chan struct{})}
	for i, b := range r.bridges {
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			tick := time.NewTicker(250 * time.Millisecond)
			defer tick.Stop()
			for n := 0; ; n++ {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				ok, why, err := b.Ready(ctx)
				smp := readySample{at: time.Now(), ok: ok, err: err != nil, why: why}
				var stall float64
				var serr error = errors.New("not sampled")
				if n%4 == 0 {
					stall, serr = b.Metric(ctx, "cellbridge_stall_age_seconds", map[string]string{"rule": faultTopic})
				}
				cancel()
				s.mu.Lock()
				s.traces[i] = append(s.traces[i], smp)
				if serr == nil {
					s.maxStall = max(s.maxStall, stall)
				}
				s.mu.Unlock()
				select {
				case <-s.stop:
					return
				case <-tick.C:
				}
			}
		}()
	}
	return s
}

// waitReady waits until every replica's trace has a 200 after from, or
// until within has passed.
func (s *sampler) waitReady(from time.Time, within time.Duration) {
	pollFor(within, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, tr := range s.traces {
			if _, ok := tr.first(from, true); !ok {
				return false
			}
		}
		return true
	})
}

// halt stops sampling and returns the traces and the highest stall age.
func (s *sampler) halt() ([2]readyTrace, float64) {
	close(s.stop)
	s.wg.Wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.traces, s.maxStall
}

// errCounters are one replica's error counters, and its count of
// reservations taken over (dedupe takeovers).
type errCounters struct{ pub, ded, req, took float64 }

// counters reads the error counters of each replica (zero for one that has
// exited).
func (r *faultRig) counters() []errCounters {
	out := make([]errCounters, len(r.bridges))
	for i, b := range r.bridges {
		if exited, _ := b.Exited(); exited {
			continue
		}
		ctx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
		out[i].pub, _ = b.Metric(ctx, "cellbridge_sink_publish_errors_total", nil)
		out[i].ded, _ = b.Metric(ctx, "cellbridge_dedupe_errors_total", nil)
		out[i].req, _ = b.Metric(ctx, "cellbridge_broker_request_errors_total", nil)
		out[i].took, _ = b.Metric(ctx, bridge.MetricDedupeTakeovers, nil)
		cancel()
	}
	return out
}

// errorsSince sums, over the replicas, the errors counted between two
// readings. A counter that went down belongs to a replica restarted in
// between: all it counted since its start is new.
func errorsSince(before, after []errCounters) (pub, ded, req, took float64) {
	delta := func(b, a float64) float64 {
		if a < b {
			return a
		}
		return a - b
	}
	for i := range after {
		pub += delta(before[i].pub, after[i].pub)
		ded += delta(before[i].ded, after[i].ded)
		req += delta(before[i].req, after[i].req)
		took += delta(before[i].took, after[i].took)
	}
	return pub, ded, req, took
}

// faultRun describes one run: load for loadFor at faultRate; fault is
// called once faultAfter of the load is stored, and returns when the
// fault is over (the servers it touched are back); check, when set, looks
// at the /readyz traces with the time fault was called.
type faultRun struct {
	name       string
	loadFor    time.Duration
	faultAfter time.Duration
	fault      func()
	// quorumLost: a stream loses its quorum during the fault; the latency
	// is reported, not bounded.
	quorumLost bool
	// outage, when set, returns the period (set by fault) in which the
	// fault made a target unavailable on purpose. An event cannot arrive
	// before its target is back, so the bound applies to the time it
	// waited outside that period: its latency less the part of the outage
	// between its store and its arrival.
	outage func() (from, to time.Time)
	// recovered, when set, returns when the fault ended (set by fault):
	// /readyz is sampled until every replica answered 200 after it (at
	// most faultSettle), not only until the events settled, so that a
	// recovery slower than the events' is measured, not cut off.
	recovered func() time.Time
	// elected, when set, returns when the test saw the new leader after
	// the fault's leader kill (set by fault): the line then says how long
	// after it the last event stored before it arrived (after_leader),
	// the bridge's part of the recovery, the election left out.
	elected func() time.Time
}

// outsideOutage is how long l waited outside the outage [from, to).
func outsideOutage(l tally.Late, from, to time.Time) time.Duration {
	start, end := l.Source, l.Source.Add(l.Latency)
	if from.After(start) {
		start = from
	}
	if to.Before(end) {
		end = to
	}
	return l.Latency - max(end.Sub(start), 0)
}

// run performs one fault run and checks it; the figures are logged and
// returned.
func (r *faultRig) run(fr faultRun) *faultFigures {
	t := r.t
	t.Helper()
	r.c.WaitReady()
	for _, b := range r.bridges {
		b.WaitReady()
	}
	errs0 := r.counters()
	smp := r.sample()
	events := int(fr.loadFor.Seconds() * faultRate)
	load, err := StartLoad(LoadConfig{JetStream: r.js, Rule: r.rule, Keys: Keys(faultKeys), Rate: faultRate, Events: events,
		Run: fmt.Sprintf("f%d", time.Now().UnixNano()%1e9)})
	if err != nil {
		t.Fatal(err)
	}
	defer load.Stop()
	poll.Eventually(t, fr.faultAfter+30*time.Second, fr.name+": load under way", func() bool {
		return load.Stats().Stored >= int(fr.faultAfter.Seconds()*faultRate)
	})
	t.Logf("%s: fault begins, %d events stored", fr.name, load.Stats().Stored)
	fr.fault()
	lctx, cancel := context.WithTimeout(r.ctx, fr.loadFor+60*time.Second)
	defer cancel()
	if err := load.Wait(lctx); err != nil {
		t.Fatalf("%s: %v", fr.name, err)
	}
	sent := load.Sent()
	stored := time.Now()
	arrived := uint64(0)
	if !pollFor(faultSettle, func() bool { return r.settled(sent, &arrived) }) {
		t.Errorf("%s: not settled within %v of the load: %d of %d events arrived", fr.name, faultSettle, arrived, len(sent))
	}
	settle := time.Since(stored)
	if fr.recovered != nil {
		smp.waitReady(fr.recovered(), faultSettle)
	}
	traces, maxStall := smp.halt()
	pubErrs, dedupeErrs, reqErrs, takenOver := errorsSince(errs0, r.counters())
	// Reads can fail for a while after a fault (no responders until every
	// stream has a leader again): retried, bounded.
	var v *Verification
	verr := errors.New("not read")
	listLate := faultMaxLatency
	if fr.outage != nil || fr.elected != nil {
		listLate = time.Nanosecond // every event: the bound applies to each one's wait outside the outage; after_leader
	}
	for end := time.Now().Add(30 * time.Second); verr != nil && time.Now().Before(end); {
		if v, verr = Verify(r.ctx, r.js, r.table, faultTopic, sent, listLate); verr != nil {
			time.Sleep(500 * time.Millisecond)
		}
	}
	if verr != nil {
		t.Fatalf("%s: %v", fr.name, verr)
	}
	f := &faultFigures{fault: fr.name, events: len(sent), lost: len(v.Lost), dup: len(v.Duplicated) + len(v.DuplicatedMsgIDs),
		mis: len(v.Misrouted), reordered: len(v.Reordered), max: v.Latency.Max, p99: v.Latency.P99,
		settle: settle, readyz: traces, pubErrs: pubErrs, dedupeErrs: dedupeErrs, reqErrs: reqErrs, takenOver: takenOver, maxStall: maxStall,
		loadRetries: load.Stats().Retries, quorumLost: fr.quorumLost}
	for _, l := range v.Latency.Late {
		if l.Latency > faultMaxLatency {
			f.late++
		}
	}
	if fr.quorumLost {
		f.notes = " (a stream lost its quorum: latency not bounded)"
	}
	worst, late := v.Latency.Max, v.Latency.Late
	if fr.elected != nil {
		elected := fr.elected()
		var caughtUp time.Duration
		late = nil
		for _, l := range v.Latency.Late {
			if l.Latency > faultMaxLatency {
				late = append(late, l)
			}
			if l.Source.Before(elected) {
				caughtUp = max(caughtUp, l.Source.Add(l.Latency).Sub(elected))
			}
		}
		f.notes += fmt.Sprintf(" after_leader=%v", caughtUp.Round(10*time.Millisecond))
	}
	if fr.outage != nil {
		from, to := fr.outage()
		worst, late = 0, nil
		for _, l := range v.Latency.Late {
			d := outsideOutage(l, from, to)
			worst = max(worst, d)
			if d > faultMaxLatency {
				l.Latency = d
				late = append(late, l)
			}
		}
		f.notes += fmt.Sprintf(" outage=%v max_outside_outage=%v", to.Sub(from).Round(100*time.Millisecond), worst.Round(time.Millisecond))
	}
	t.Log(f.line())
	if !v.ExactlyOnce() || v.Arrived != len(sent) {
		t.Errorf("%s: exactly-once violated (%d of %d arrived):\n%s", fr.name, v.Arrived, len(sent), strings.Join(v.Problems(10), "\n"))
	}
	if !fr.quorumLost && worst > faultMaxLatency {
		keys := map[string]bool{}
		for _, l := range late {
			keys[l.Key] = true
		}
		outside := ""
		if fr.outage != nil {
			outside = " not counting the outage"
		}
		goalMissed(t, "%s: %d events of %d keys arrived later than %v after the source stored them%s, at worst %v (first: %s key %s seq %d after %v)",
			fr.name, len(late), len(keys), faultMaxLatency, outside, worst, late[0].ID, late[0].Key, late[0].Seq, late[0].Latency)
	}
	r.purge()
	return f
}

// settled reports whether every event has a copy and the source consumer
// has nothing left to deliver or settle (no copy can come later).
func (r *faultRig) settled(sent []tally.Sent, arrived *uint64) bool {
	n, err := Arrived(r.ctx, r.js, r.table)
	*arrived = n
	if err != nil || n < uint64(len(sent)) {
		return false
	}
	ctx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
	defer cancel()
	cons, err := r.js.Consumer(ctx, r.rule.Source.Stream, r.rule.Source.Group)
	return err == nil && cons.CachedInfo().NumPending == 0 && cons.CachedInfo().NumAckPending == 0
}

// purge empties the source, cell and DLQ streams after a run, so that the
// next run reads back only its own events.
func (r *faultRig) purge() {
	r.t.Helper()
	for _, s := range r.streams(false) {
		poll.Eventually(r.t, 20*time.Second, "purge "+s, func() bool {
			ctx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
			defer cancel()
			st, err := r.js.Stream(ctx, s)
			return err == nil && st.Purge(ctx) == nil
		})
	}
}

// TestFaultsKill: kill -9 the leader of a cell stream, of the dedupe
// bucket, and the server the forwarding replica is attached to; restart a
// replica while the meta group and the source consumer elect a leader;
// restart every server, one after the other.
func TestFaultsKill(t *testing.T) {
	begin := time.Now()
	r := startFaultRig(t, [2][]int{{0, 1, 2}, {1, 2, 0}})
	c := r.c
	var figs []*faultFigures
	// killLeader kills stream's leader; *notes gets the election's length
	// and when the stream stored its first message after it (firstStore),
	// *elected when the test saw the new leader.
	var elected time.Time
	killLeader := func(stream string, notes *string) func() {
		return func() {
			victim, also := isolate(t, c, r.js, r.table, stream)
			at := time.Now()
			c.Kill(victim)
			nl := c.StreamLeader(stream)
			elected = time.Now()
			after := r.firstStore(stream, elected)
			t.Logf("kill -9 %s, leader of %s%s; %s leads it %v later; the stream stored a message %v after that", c.Node(victim).Name,
				stream, also, c.Node(nl).Name, elected.Sub(at).Round(time.Millisecond), after)
			*notes = fmt.Sprintf(" election=%v first_store=%v", elected.Sub(at).Round(100*time.Millisecond), after)
			c.Restart(victim)
		}
	}
	var notes string
	electedAt := func() time.Time { return elected }
	f := r.run(faultRun{name: "kill -9 cell stream leader", loadFor: 10 * time.Second, faultAfter: 2 * time.Second,
		fault: killLeader(natsjs.CellStream(faultCell), &notes), elected: electedAt})
	f.notes += notes
	t.Logf("%s (election figure)", f.line())
	figs = append(figs, f)
	f = r.run(faultRun{name: "kill -9 dedupe bucket leader", loadFor: 10 * time.Second, faultAfter: 2 * time.Second,
		fault: killLeader("KV_"+faultBucket, &notes), elected: electedAt})
	f.notes += notes
	t.Logf("%s (election figure)", f.line())
	figs = append(figs, f)

	figs = append(figs, r.run(faultRun{name: "kill -9 the active replica's server", loadFor: 10 * time.Second, faultAfter: 2 * time.Second,
		fault: func() {
			act := r.active()
			victim := r.attachedTo(r.bridges[act])
			r.moveLeadersOff(victim)
			meta := ""
			if c.MetaLeader() == victim {
				meta = " (and the meta leader)"
			}
			at := time.Now()
			c.Kill(victim)
			poll.Eventually(t, 15*time.Second, names(act)+" reconnected", func() bool {
				on := r.attachedTo(r.bridges[act])
				return on >= 0 && on != victim
			})
			t.Logf("kill -9 %s%s, server of %s (forwarding); it is on %s %v later", c.Node(victim).Name, meta, names(act),
				c.Node(r.attachedTo(r.bridges[act])).Name, time.Since(at).Round(time.Millisecond))
			c.Restart(victim)
		}}))

	var restartFig string
	f = r.run(faultRun{name: "restart a replica during an election", loadFor: 12 * time.Second, faultAfter: 2 * time.Second,
		fault: func() {
			standby := 1 - r.active()
			b := r.bridges[standby]
			meta := c.MetaLeader()
			src := r.rule.Source
			// Only the meta group and the source consumer elect: the
			// streams' leaders (the dedupe bucket's among them) leave
			// the server first, as in the other runs (their own kills
			// are measured above).
			r.moveLeadersOff(meta)
			c.MoveConsumerLeader(src.Stream, src.Group, meta)
			pid := b.Pid()
			at := time.Now()
			c.Kill(meta)
			if err := b.Term(); err != nil {
				t.Errorf("%s: SIGTERM: exit %v", names(standby), err)
			}
			b.Restart()
			restarted := time.Since(at)
			nm := c.MetaLeader()
			nc := c.ConsumerLeader(src.Stream, src.Group)
			recovered := time.Now()
			b.WaitReady()
			ready := time.Since(recovered)
			if exited, err := b.Exited(); exited || b.Pid() == pid {
				t.Errorf("%s exited (%v) or was not restarted", names(standby), err)
			}
			restartFig = fmt.Sprintf(" ready_after_recovery=%v", ready.Round(time.Millisecond))
			t.Logf("kill -9 %s (meta leader and leader of consumer %s) and restart %s (standby) %v later; meta leader %s, consumer leader %s "+
				"%v after the kill; %s ready %v after that", c.Node(meta).Name, src.Group, names(standby), restarted.Round(time.Millisecond),
				c.Node(nm).Name, c.Node(nc).Name, recovered.Sub(at).Round(time.Millisecond), names(standby), ready.Round(time.Millisecond))
			if ready > faultMaxLatency {
				goalMissed(t, "%s ready %v after the cluster recovered, want within %v", names(standby), ready, faultMaxLatency)
			}
			c.Restart(meta)
		}})
	f.notes += restartFig
	t.Logf("%s (restart figure)", f.line())
	figs = append(figs, f)

	figs = append(figs, r.run(faultRun{name: "rolling restart of all servers", loadFor: 20 * time.Second, faultAfter: 2 * time.Second,
		fault: func() {
			at := time.Now()
			c.RollingRestart()
			t.Logf("rolling restart of 3 servers took %v", time.Since(at).Round(time.Millisecond))
		}}))
	logFigures(t, figs, begin)
}

// firstStore returns how long after elected (when the test saw the new
// leader of stream in /jsz, polled every 50ms at most) the stream stored
// its first message, or -1 if none within faultMaxLatency: the bridge's
// part of a recovery from a leader kill, the election itself left out. It
// reads the stream's last message time every 10ms; the figure is at most
// that much too long, plus one stream info round trip.
func (r *faultRig) firstStore(stream string, elected time.Time) time.Duration {
	r.t.Helper()
	for end := elected.Add(faultMaxLatency); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		ctx, cancel := context.WithTimeout(r.ctx, 500*time.Millisecond)
		st, err := r.js.Stream(ctx, stream)
		cancel()
		if err != nil {
			continue
		}
		if last := st.CachedInfo().State.LastTime; !last.Before(elected) {
			return last.Sub(elected).Round(10 * time.Millisecond)
		}
	}
	return -1
}

// TestFaultsHung freezes (SIGSTOP) a server for 15s, first with both
// replicas attached to it, then with only the forwarding one.
func TestFaultsHung(t *testing.T) {
	begin := time.Now()
	r := startFaultRig(t, [2][]int{{0, 1, 2}, {0, 2, 1}})
	c := r.c
	freeze := func(victim int, why string) {
		r.moveLeadersOff(victim)
		meta := ""
		if c.MetaLeader() == victim {
			meta = " (and the meta leader)"
		}
		c.Stop(victim)
		t.Logf("SIGSTOP %s%s, %s, for 15s", c.Node(victim).Name, meta, why)
		time.Sleep(15 * time.Second)
		c.Cont(victim)
	}
	var figs []*faultFigures
	figs = append(figs, r.run(faultRun{name: "SIGSTOP 15s, both replicas attached", loadFor: 20 * time.Second, faultAfter: 2 * time.Second,
		fault: func() { freeze(0, "server of both replicas") }}))
	figs = append(figs, r.run(faultRun{name: "SIGSTOP 15s, one replica attached", loadFor: 20 * time.Second, faultAfter: 2 * time.Second,
		fault: func() {
			act := r.active()
			victim := r.attachedTo(r.bridges[act])
			if other := r.attachedTo(r.bridges[1-act]); other == victim || victim < 0 {
				t.Fatalf("%s on n%d, %s on n%d: want them apart", names(act), victim, names(1-act), other)
			}
			freeze(victim, "server of "+names(act)+" (forwarding) only")
		}}))
	logFigures(t, figs, begin)
}

// TestFaultsReadyz samples /readyz every 250ms through a stall of one
// target (its stream stops capturing its subject: publishes get no
// responders) and of the whole source (two of three servers frozen: the
// source stream and its consumer lose their quorum): 503 within 5s of the
// stall, no 200 while it lasts, 200 within 5s of its end.
func TestFaultsReadyz(t *testing.T) {
	begin := time.Now()
	// Both replicas on n2, the server that stays up.
	r := startFaultRig(t, [2][]int{{2, 0, 1}, {2, 1, 0}})
	c := r.c
	const stallFor = 12 * time.Second
	var from, to time.Time
	var act int
	cell := natsjs.CellStream(faultCell)
	figs := []*faultFigures{r.run(faultRun{name: "one target stalled 12s", loadFor: 18 * time.Second, faultAfter: 2 * time.Second,
		outage:    func() (time.Time, time.Time) { return from, to },
		recovered: func() time.Time { return to },
		fault: func() {
			act = r.active()
			from = time.Now()
			subjects := r.setSubjects(cell, []string{"stalled." + faultCell})
			time.Sleep(stallFor)
			to = time.Now()
			r.setSubjects(cell, subjects)
		}})}
	r.checkStall(figs[0], []int{act}, from, to, "publishing to broker nats subject cell."+faultCell+".orders keeps failing")

	// The source's leaders go to n0 (stopped with n1) before the run: a
	// consumer leader's move clears the pin, and the hand-over it causes
	// (a fence, then a second of "recovering" on the fenced replica) must
	// be over before the stall, or the stall's first 503 is the fence's
	// and the fenced replica's 200 between its end and the first
	// unanswered consumer info looks like a flap.
	r.leadersTo(0)
	figs = append(figs, r.run(faultRun{name: "whole source stalled 12s", loadFor: 18 * time.Second, faultAfter: 2 * time.Second, quorumLost: true,
		recovered: func() time.Time { return to },
		fault: func() {
			if l := c.ConsumerLeader(r.rule.Source.Stream, r.rule.Source.Group); l != 0 {
				t.Fatalf("the source consumer's leader moved to n%d before the stall", l)
			}
			from = time.Now()
			c.Stop(0)
			c.Stop(1)
			time.Sleep(stallFor)
			to = time.Now()
			c.Cont(0)
			c.Cont(1)
		}}))
	r.checkStall(figs[1], []int{0, 1}, from, to, "source of rule "+faultTopic)
	logFigures(t, figs, begin)
}

// leadersTo moves the lead of the ordered rule's source stream and
// consumer to server i. A consumer leader's move clears the pin: it then
// waits (bounded) until the replica that forwarded was fenced, so that the
// hand-over is over when the next run waits for both replicas' readiness
// (no load runs between runs: the pin goes to whichever replica takes the
// next run's first message). Should the pin survive the move, its holder
// forwarding in the same epoch 5s after it does as well.
func (r *faultRig) leadersTo(i int) {
	r.t.Helper()
	src := r.rule.Source
	r.c.MoveStreamLeader(src.Stream, i)
	if r.c.ConsumerLeader(src.Stream, src.Group) == i {
		return
	}
	act := r.active()
	before := r.source(act)
	moved := time.Now()
	r.c.MoveConsumerLeader(src.Stream, src.Group, i)
	var st *bridge.SourceStatus
	ok := pollFor(20*time.Second, func() bool {
		st = r.source(act)
		return st.Fences != before.Fences ||
			(time.Since(moved) > 5*time.Second && st.State == "active" && st.EpochStart.Equal(before.EpochStart))
	})
	if !ok {
		r.t.Fatalf("the source consumer's lead moved to n%d at %s; 20s later %s is %s since %s, %d fences, the last %q at %s",
			i, moved.Format(time.StampMilli), names(act), st.State, st.Since.Format(time.StampMilli), st.Fences,
			st.LastFence, st.LastFenceAt.Format(time.StampMilli))
	}
	r.t.Logf("the source consumer's lead moved to n%d: %s, which forwarded, is %s (%d fences, the last %q %v after the move)",
		i, names(act), st.State, st.Fences, st.LastFence, st.LastFenceAt.Sub(moved).Round(time.Millisecond))
}

// source returns the /status of the ordered rule's source on replica i
// (bounded wait while /status does not answer).
func (r *faultRig) source(i int) *bridge.SourceStatus {
	r.t.Helper()
	var s *bridge.SourceStatus
	poll.Eventually(r.t, 10*time.Second, names(i)+" /status", func() bool {
		ctx, cancel := context.WithTimeout(r.ctx, time.Second)
		defer cancel()
		var err error
		s, err = r.bridges[i].Source(ctx, faultTopic)
		return err == nil && s != nil
	})
	return s
}

// setSubjects replaces the subjects of stream and returns the old ones.
func (r *faultRig) setSubjects(stream string, subjects []string) []string {
	r.t.Helper()
	var old []string
	poll.Eventually(r.t, 20*time.Second, "subjects of "+stream+" changed", func() bool {
		ctx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
		defer cancel()
		st, err := r.js.Stream(ctx, stream)
		if err != nil {
			return false
		}
		cfg := st.CachedInfo().Config
		old = cfg.Subjects
		cfg.Subjects = subjects
		_, err = r.js.UpdateStream(ctx, cfg)
		return err == nil
	})
	return old
}

// checkStall checks the /readyz traces of the replicas that must see a
// stall from from to to: 503 within faultReadyWithin of from, with a
// reason that contains why; no 200 from then until to; 200 within
// faultReadyWithin of to.
func (r *faultRig) checkStall(f *faultFigures, replicas []int, from, to time.Time, why string) {
	t := r.t
	t.Helper()
	for _, i := range replicas {
		tr := f.readyz[i]
		down, ok := tr.first(from, false)
		switch {
		case !ok:
			t.Errorf("%s: %s never answered 503", f.fault, names(i))
			continue
		case down.at.Sub(from) > faultReadyWithin:
			goalMissed(t, "%s: %s answered 503 %v after the stall began, want within %v", f.fault, names(i), down.at.Sub(from), faultReadyWithin)
		}
		if !strings.Contains(down.why, why) {
			t.Errorf("%s: %s's first 503 says %q, want %q in it", f.fault, names(i), down.why, why)
		}
		if n := tr.between(down.at, to, true); n > 0 {
			t.Errorf("%s: %s flapped: %d answers of 200 while the stall lasted", f.fault, names(i), n)
		}
		up, ok := tr.first(to, true)
		switch {
		case !ok:
			t.Errorf("%s: %s not ready again after the stall; it said: %s", f.fault, names(i), tr.reasons(to, time.Time{}))
		case up.at.Sub(to) > faultReadyWithin:
			goalMissed(t, "%s: %s answered 200 %v after the stall ended, want within %v; before, it said: %s", f.fault, names(i),
				up.at.Sub(to), faultReadyWithin, tr.reasons(to, up.at))
		}
		upAfter, held := "never", tr.reasons(to, time.Time{})
		if ok {
			upAfter, held = up.at.Sub(to).Round(time.Millisecond).String(), tr.reasons(to, up.at)
		}
		if held == "" {
			held = "nothing"
		}
		t.Logf("READYZ %-26q %s: 503 %v after the stall began (%q), 200 %s after it ended; %d answers of 200 in between; %s; held after the end by: %s",
			f.fault, names(i), down.at.Sub(from).Round(time.Millisecond), firstLine(down.why), upAfter,
			tr.between(down.at, to, true), tr, held)
	}
}

// firstLine is the first reason of a /readyz body ("not ready:" comes
// first on a line of its own).
func firstLine(s string) string {
	s = strings.TrimPrefix(strings.TrimSpace(s), "not ready:")
	line, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return line
}

// logFigures logs the runs of a test again, together, as a table.
func logFigures(t *testing.T, figs []*faultFigures, begin time.Time) {
	var b strings.Builder
	for _, f := range figs {
		b.WriteString("\n" + f.line())
	}
	t.Logf("%s ran %v:%s", t.Name(), time.Since(begin).Round(time.Second), b.String())
}
