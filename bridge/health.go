package bridge

import (
	"errors"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Clock tells the time; tests may replace it. Timers and tickers always use
// real time.
type Clock interface {
	Now() time.Time
}

type systemClock struct{}

func (systemClock) Now() time.Time { return time.Now() }

// SystemClock is the real clock.
var SystemClock Clock = systemClock{}

// Reporter takes health facts from sources, sinks and stores. *Health
// implements it; adapters accept a Reporter (nil means: report nothing).
// Calls are cheap and safe from any goroutine.
type Reporter interface {
	// ConnectionChanged records that the connection to broker for role
	// (RoleSource, RoleSink, RoleDedupe) went up or down. Repeating the same
	// state is fine.
	ConnectionChanged(broker, role string, up bool)
	// Backlog records how many messages of rule are pending at the source.
	Backlog(rule string, pending int64)
	// SourceFailing records why the source of rule cannot deliver now
	// (err nil: it can again). An err that wraps ErrNothingPending says
	// that nothing waits to be delivered: it is shown, but does not make
	// the bridge unready.
	SourceFailing(rule string, err error)
}

// ErrNothingPending is wrapped into a source failure (Reporter.SourceFailing)
// when the source knows that nothing waits to be delivered: its consumer
// showed nothing pending and nothing unacknowledged, nothing was delivered
// since, and its stream stored no message for the rule since (or cannot be
// asked, so it stores none either). Such a failure (an idle consumer
// without a leader after an election) delays no message: readiness ignores
// it; cellbridge_source_failing still shows it. The source reports the
// failure again without it as soon as that is no longer known.
var ErrNothingPending = errors.New("nothing waits to be delivered")

var _ Reporter = (*Health)(nil)

// Health tracks what readiness depends on: connections, sink publish
// failures, backlog and progress per rule. Create one per process with
// NewHealth, pass it to adapters (as Reporter) and to New.
type Health struct {
	m     *Metrics
	log   *slog.Logger
	clock Clock

	progressTimeout atomic.Int64 // ns; set by the pipeline from its config
	stallTimeout    atomic.Int64 // ns; likewise
	rulesLoaded     atomic.Pointer[func() (int64, bool)]
	// sinkNeeded reports whether the running rules publish to a broker
	// (set by the pipeline; nil: every broker counts). A sink connection
	// down to a broker only cells marked down use holds no readiness:
	// in a data centre's loss every replica would answer 503 for as
	// long as it lasts, with nothing waiting for that broker.
	sinkNeeded atomic.Pointer[func(broker string) bool]

	mu      sync.Mutex
	conns   map[[2]string]bool   // {broker, role} → up
	failing map[string]*failRec  // what ("publishing to broker B subject S", "dedupe store") → its failure streak
	targets map[string][2]string // what → {broker, target} of a publish target, for cellbridge_target_failing
	sources map[string]srcFail   // rule → why its source cannot deliver (stalled, not connected)
	rules   map[string]*ruleHealth
	ready   int // -1 unknown, 0, 1; for logging transitions
	// wasReady is set once Ready first answered ready; after that, Ready
	// answers ready again only recoverHold after the last answer that
	// found a reason (lastBad, lastWhy): the parts one fault touches (a
	// leader election: the source, the store, a target) fail and recover
	// one after the other, and a moment between two of them is no
	// recovery.
	wasReady bool
	lastBad  time.Time
	lastWhy  string
}

// failRec is one failure streak of a publish target or of the dedupe store.
type failRec struct {
	err         string
	since, last time.Time // first and latest failure of the streak
	// ok: a success came after the latest failure. The streak ends once
	// no failure followed it for recoverHold, so that a target whose
	// publishes fail and succeed by turns (a stream leader election) does
	// not flap between ready and not ready.
	ok bool
}

// recoverHold is how long a failing target or store must go without a
// failure after a success before readiness reports it recovered.
const recoverHold = time.Second

// srcFail is a rule's source failure as last reported.
type srcFail struct {
	why string
	// idle: the failure wraps ErrNothingPending and does not count
	// against readiness.
	idle bool
}

type ruleHealth struct {
	backlog      atomic.Int64
	lastProgress atomic.Int64 // unix ns
	stall        atomic.Int64 // ns; the stall age, sampled by the pipeline's sweeper
	stallSlot    atomic.Bool  // the stall age's message waits for an in-flight slot
	unacked      atomic.Int64 // ns; the oldest unacknowledged message's age, sampled likewise
}

// NewHealth returns a Health reporting into m (may be nil) and logging
// changes to log (nil: slog.Default()).
func NewHealth(m *Metrics, log *slog.Logger, clock Clock) *Health {
	if log == nil {
		log = slog.Default()
	}
	if clock == nil {
		clock = SystemClock
	}
	h := &Health{m: m, log: log, clock: clock, conns: map[[2]string]bool{}, failing: map[string]*failRec{},
		targets: map[string][2]string{}, sources: map[string]srcFail{}, rules: map[string]*ruleHealth{}, ready: -1}
	h.progressTimeout.Store(int64(60 * time.Second))
	h.stallTimeout.Store(int64(3 * time.Second))
	return h
}

// ConnectionChanged implements Reporter; it logs each change of state.
func (h *Health) ConnectionChanged(broker, role string, up bool) {
	if !h.setConn(broker, role, up) {
		return
	}
	if up {
		h.log.Info("connection up", "broker", broker, "role", role)
	} else {
		h.log.Warn("connection down", "broker", broker, "role", role)
	}
}

// ConnectionClosed records that the process closed its own connection to
// broker (a stop): down, as for a connection that failed, but the change
// is logged at info, since nothing failed.
func (h *Health) ConnectionClosed(broker, role string) {
	if h.setConn(broker, role, false) {
		h.log.Info("connection closed", "broker", broker, "role", role)
	}
}

// setConn records the connection's state and its gauge; it reports whether
// the state changed (or was not known).
func (h *Health) setConn(broker, role string, up bool) bool {
	h.mu.Lock()
	old, known := h.conns[[2]string{broker, role}]
	h.conns[[2]string{broker, role}] = up
	h.mu.Unlock()
	if h.m != nil {
		v := 0.0
		if up {
			v = 1
		}
		h.m.ConnectionUp.WithLabelValues(broker, role).Set(v)
		h.setNeeded(broker, role, h.sinkNeeded.Load())
	}
	return !known || old != up
}

// connNeeded reports whether the running rules need the connection (see
// MetricConnectionNeeded); needed is the pipeline's sink check, nil before
// it started (everything is needed then).
func connNeeded(broker, role string, needed *func(string) bool) bool {
	return role != RoleSink || needed == nil || (*needed)(broker)
}

func (h *Health) setNeeded(broker, role string, needed *func(string) bool) {
	v := 0.0
	if connNeeded(broker, role, needed) {
		v = 1
	}
	h.m.ConnectionNeeded.WithLabelValues(broker, role).Set(v)
}

// updateNeeded sets cellbridge_connection_needed for every connection
// seen, after the rules changed which brokers they publish to (the
// pipeline's sweeper calls it with the gauges).
func (h *Health) updateNeeded() {
	if h.m == nil {
		return
	}
	needed := h.sinkNeeded.Load()
	h.mu.Lock()
	keys := make([][2]string, 0, len(h.conns))
	for k := range h.conns {
		keys = append(keys, k)
	}
	h.mu.Unlock()
	for _, k := range keys {
		h.setNeeded(k[0], k[1], needed)
	}
}

// Backlog implements Reporter.
func (h *Health) Backlog(rule string, pending int64) {
	r := h.rule(rule)
	if old := r.backlog.Swap(pending); old <= 0 && pending > 0 {
		// A backlog that just appeared starts the progress window now, so an
		// idle rule is not reported stuck the moment traffic resumes.
		now := h.clock.Now().UnixNano()
		if r.lastProgress.Load() < now {
			r.lastProgress.Store(now)
		}
	}
	if h.m != nil {
		h.m.rule(rule).backlog.Set(float64(pending))
	}
}

// StallAge returns rule's stall age as the pipeline last sampled it
// (twice a second): how long the oldest message of rule that it accepted
// and has not settled, parked (held) ones excluded, or that waits for an
// in-flight slot, has waited; 0 when
// there is none or the pipeline has not seen the rule. An ordered source
// uses it to give its consumer up when this replica cannot publish.
func (h *Health) StallAge(rule string) time.Duration {
	if r := h.known(rule); r != nil {
		return time.Duration(r.stall.Load())
	}
	return 0
}

// UnackedAge returns the age of rule's oldest message that the pipeline
// holds unacknowledged (parked ones included), from when the source stored
// it or the pipeline accepted it, whichever is earlier, as last sampled
// (twice a second; the gauge cellbridge_oldest_unacked_age_seconds); 0
// when there is none. An ordered source uses it to bound how old the
// copies a hand-over would re-forward are.
func (h *Health) UnackedAge(rule string) time.Duration {
	if r := h.known(rule); r != nil {
		return time.Duration(r.unacked.Load())
	}
	return 0
}

// known returns rule's health record, nil if the pipeline has not seen
// the rule.
func (h *Health) known(rule string) *ruleHealth {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.rules[rule]
}

func (h *Health) rule(name string) *ruleHealth {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.rules[name]
	if r == nil {
		r = &ruleHealth{}
		r.lastProgress.Store(h.clock.Now().UnixNano())
		h.rules[name] = r
	}
	return r
}

// target registers what as the failure name of the publish target
// broker/target (a subject or topic), so that its failures also show in
// cellbridge_target_failing.
func (h *Health) target(what, broker, target string) {
	h.mu.Lock()
	h.targets[what] = [2]string{broker, target}
	h.mu.Unlock()
	if h.m != nil {
		h.m.TargetFailing.WithLabelValues(broker, target).Set(0)
	}
}

// failed records that an operation (a publish target, the dedupe store) is
// failing; the pipeline calls it per failure and recovered once on the first
// success after failures. Only the start of a streak is logged here; its end
// is logged by Ready once it holds (recoverHold).
func (h *Health) failed(what string, err error) {
	now := h.clock.Now()
	h.mu.Lock()
	r := h.failing[what]
	start := r == nil
	if start {
		r = &failRec{since: now}
		h.failing[what] = r
	}
	r.err, r.last, r.ok = err.Error(), now, false
	// The gauge follows the streaks under mu: Ready ends them and sets 0
	// under it too, so a streak started between the two cannot be hidden.
	if tg, isTarget := h.targets[what]; start && isTarget && h.m != nil {
		h.m.TargetFailing.WithLabelValues(tg[0], tg[1]).Set(1)
	}
	h.mu.Unlock()
	if start {
		h.log.Warn(what+" failing; retrying", "err", err)
	}
}

// recovered records a success of what after failures.
func (h *Health) recovered(what string) {
	h.mu.Lock()
	if r := h.failing[what]; r != nil {
		r.ok = true
	}
	h.mu.Unlock()
}

// SourceFailing records why the source of rule cannot deliver (its server
// stopped answering, it is not connected, it cannot create its consumer);
// err nil clears it. A failure that wraps ErrNothingPending is recorded
// and logged but leaves readiness alone. Adapters call it on changes;
// repeating is fine.
func (h *Health) SourceFailing(rule string, err error) {
	h.mu.Lock()
	old, was := h.sources[rule]
	if err != nil {
		h.sources[rule] = srcFail{why: err.Error(), idle: errors.Is(err, ErrNothingPending)}
	} else {
		delete(h.sources, rule)
	}
	h.mu.Unlock()
	if h.m != nil {
		v := 0.0
		if err != nil {
			v = 1
		}
		h.m.SourceFailing.WithLabelValues(rule).Set(v)
	}
	switch {
	case err != nil && (!was || old.why != err.Error()):
		h.log.Warn("source cannot deliver", "rule", rule, "err", err, "holds_readiness", !errors.Is(err, ErrNothingPending))
	case err == nil && was:
		h.log.Info("source delivering again", "rule", rule)
	}
}

// Ready reports whether the bridge is ready and, when not, why in plain
// words (one reason per line). It also sets cellbridge_ready.
func (h *Health) Ready() (bool, string) {
	var reasons []string
	if f := h.rulesLoaded.Load(); f != nil {
		if _, ok := (*f)(); !ok {
			reasons = append(reasons, "no rules loaded")
		}
	} else {
		reasons = append(reasons, "pipeline not started")
	}
	now := h.clock.Now()
	timeout := time.Duration(h.progressTimeout.Load())
	needed := h.sinkNeeded.Load()
	h.mu.Lock()
	for k, up := range h.conns {
		if !up {
			if !connNeeded(k[0], k[1], needed) {
				continue // still logged and in cellbridge_connection_up (cellbridge_connection_needed 0)
			}
			reasons = append(reasons, k[1]+" connection to broker "+k[0]+" is down")
		}
	}
	var ended []string
	for what, r := range h.failing {
		if r.ok && now.Sub(r.last) >= recoverHold {
			delete(h.failing, what)
			ended = append(ended, what)
			continue
		}
		reasons = append(reasons, what+" keeps failing: "+r.err+" (for "+now.Sub(r.since).Truncate(time.Second/10).String()+")")
	}
	for rule, f := range h.sources {
		if !f.idle {
			reasons = append(reasons, "source of rule "+rule+": "+f.why)
		}
	}
	stallTimeout := time.Duration(h.stallTimeout.Load())
	for name, r := range h.rules {
		if s := time.Duration(r.stall.Load()); s > stallTimeout && r.stallSlot.Load() {
			reasons = append(reasons, "rule "+name+": a message has waited "+s.Truncate(time.Second/10).String()+
				" for an in-flight slot (pipeline.maxInFlight is taken, by this or another rule's messages; stallTimeout "+stallTimeout.String()+")")
		} else if s > stallTimeout {
			reasons = append(reasons, "rule "+name+": the oldest message accepted "+s.Truncate(time.Second/10).String()+
				" ago is not settled yet (stallTimeout "+stallTimeout.String()+")")
		}
		if n := r.backlog.Load(); n > 0 {
			idle := now.Sub(time.Unix(0, r.lastProgress.Load()))
			if idle > timeout {
				reasons = append(reasons, "rule "+name+": "+itoa64(n)+" messages waiting at the source but nothing forwarded for "+
					idle.Truncate(time.Second).String()+" (progressTimeout "+timeout.String()+")")
			}
		}
	}
	if h.m != nil {
		for _, what := range ended {
			if tg, ok := h.targets[what]; ok {
				h.m.TargetFailing.WithLabelValues(tg[0], tg[1]).Set(0)
			}
		}
	}
	h.mu.Unlock()
	for _, what := range ended {
		h.log.Info(what + " recovered")
	}
	sort.Strings(reasons)
	h.mu.Lock()
	switch {
	case len(reasons) > 0:
		h.lastBad, h.lastWhy = now, reasons[0]
	case h.wasReady && !h.lastBad.IsZero() && now.Sub(h.lastBad) < recoverHold:
		reasons = append(reasons, "recovering: "+h.lastWhy+" (cleared "+now.Sub(h.lastBad).Truncate(time.Second/10).String()+
			" ago; ready "+recoverHold.String()+" after the last problem)")
	}
	h.mu.Unlock()
	ok := len(reasons) == 0
	v := 0
	if ok {
		v = 1
	}
	h.mu.Lock()
	changed := h.ready != v
	h.ready = v
	h.wasReady = h.wasReady || ok
	h.mu.Unlock()
	if h.m != nil {
		h.m.Ready.Set(float64(v))
	}
	if changed {
		if ok {
			h.log.Info("ready")
		} else {
			h.log.Warn("not ready", "why", strings.Join(reasons, "; "))
		}
	}
	if ok {
		return true, "ready"
	}
	return false, strings.Join(reasons, "\n")
}

func itoa64(n int64) string {
	if n >= 0 && n < 100 {
		return itoa(int(n))
	}
	var b [20]byte
	i := len(b)
	neg := n < 0
	if neg {
		n = -n
	}
	for n > 0 {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
	}
	if neg {
		i--
		b[i] = '-'
	}
	return string(b[i:])
}
