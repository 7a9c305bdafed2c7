package bridge

import (
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
}

var _ Reporter = (*Health)(nil)

// Health tracks what readiness depends on: connections, sink publish
// failures, backlog and progress per rule. Create one per process with
// NewHealth, pass it to adapters (as Reporter) and to New.
type Health struct {
	m     *Metrics
	log   *slog.Logger
	clock Clock

	progressTimeout atomic.Int64 // ns; set by the pipeline from its config
	rulesLoaded     atomic.Pointer[func() (int64, bool)]

	mu      sync.Mutex
	conns   map[[2]string]bool // {broker, role} → up
	failing map[string]string  // sink broker → last publish error
	rules   map[string]*ruleHealth
	ready   int // -1 unknown, 0, 1; for logging transitions
}

type ruleHealth struct {
	backlog      atomic.Int64
	lastProgress atomic.Int64 // unix ns
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
	h := &Health{m: m, log: log, clock: clock, conns: map[[2]string]bool{}, failing: map[string]string{},
		rules: map[string]*ruleHealth{}, ready: -1}
	h.progressTimeout.Store(int64(60 * time.Second))
	return h
}

// ConnectionChanged implements Reporter; it logs each change of state.
func (h *Health) ConnectionChanged(broker, role string, up bool) {
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
	}
	if !known || old != up {
		if up {
			h.log.Info("connection up", "broker", broker, "role", role)
		} else {
			h.log.Warn("connection down", "broker", broker, "role", role)
		}
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

// failed records that an operation (a sink broker's publishes, the dedupe
// store) is failing; the pipeline calls it per failure and recovered once
// on the first success after failures. Only changes are logged.
func (h *Health) failed(what string, err error) {
	h.mu.Lock()
	_, was := h.failing[what]
	h.failing[what] = err.Error()
	h.mu.Unlock()
	if !was {
		h.log.Warn(what+" failing; retrying", "err", err)
	}
}

func (h *Health) recovered(what string) {
	h.mu.Lock()
	_, was := h.failing[what]
	delete(h.failing, what)
	h.mu.Unlock()
	if was {
		h.log.Info(what + " recovered")
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
	h.mu.Lock()
	for k, up := range h.conns {
		if !up {
			reasons = append(reasons, k[1]+" connection to broker "+k[0]+" is down")
		}
	}
	for b, e := range h.failing {
		reasons = append(reasons, b+" keeps failing: "+e)
	}
	for name, r := range h.rules {
		if n := r.backlog.Load(); n > 0 {
			idle := now.Sub(time.Unix(0, r.lastProgress.Load()))
			if idle > timeout {
				reasons = append(reasons, "rule "+name+": "+itoa64(n)+" messages waiting at the source but nothing forwarded for "+
					idle.Truncate(time.Second).String()+" (progressTimeout "+timeout.String()+")")
			}
		}
	}
	h.mu.Unlock()
	sort.Strings(reasons)
	ok := len(reasons) == 0
	v := 0
	if ok {
		v = 1
	}
	h.mu.Lock()
	changed := h.ready != v
	h.ready = v
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
