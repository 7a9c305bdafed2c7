package bridge

import (
	"encoding/json"
	"net/http"
	"sort"
	"strings"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cellbridge/cellbridge/router"
)

// NewHTTP returns the bridge's HTTP handler:
//
//   - /metrics: the Prometheus metrics of p.Metrics().
//   - /healthz: 200 "ok" while the process serves HTTP.
//   - /readyz: 200 "ready", or 503 with one plain reason per line (no rules,
//     a connection down, a sink failing, a backlog without progress).
//   - /route?topic=RULE&key=KEY[&origin=CELL]: the router's Decision as
//     JSON (origin: the event's Cell-Origin, for a broadcast rule with
//     excludeOrigin); 400 with a plain message when topic is missing or
//     unknown, 503 without rules.
//   - /status: Status as JSON.
//
// The handler is safe for concurrent use and holds no goroutines.
func NewHTTP(p *Pipeline) http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(p.met.Registry, promhttp.HandlerOpts{Registry: p.met.Registry}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ok, why := p.health.Ready()
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			why = "not ready:\n" + why
		}
		_, _ = w.Write([]byte(why + "\n"))
	})
	mux.HandleFunc("/route", func(w http.ResponseWriter, r *http.Request) {
		topic := r.URL.Query().Get("topic")
		key := r.URL.Query().Get("key")
		tbl := p.rules.Load()
		if tbl == nil {
			httpError(w, http.StatusServiceUnavailable, "no rules loaded yet")
			return
		}
		if topic == "" {
			httpError(w, http.StatusBadRequest, "missing query parameter topic (a topic rule name: "+ruleNames(p)+"); usage: /route?topic=RULE&key=KEY")
			return
		}
		if tbl.Rule(topic) == nil {
			httpError(w, http.StatusBadRequest, "unknown topic rule "+quote(topic)+"; known rules: "+ruleNames(p))
			return
		}
		if _, ok := r.URL.Query()["key"]; !ok {
			httpError(w, http.StatusBadRequest, "missing query parameter key (the shard key, e.g. a user id); use key= for an event without a key")
			return
		}
		d := tbl.Resolve(topic, key)
		if tbl.Rule(topic).ExcludeOrigin && d.Reason == router.ReasonBroadcast {
			d.Origin = r.URL.Query().Get("origin")
		}
		writeJSON(w, d)
	})
	mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, p.Status())
	})
	return mux
}

func ruleNames(p *Pipeline) string {
	tbl := p.rules.Load()
	if tbl == nil {
		return "(none)"
	}
	var names []string
	for _, r := range tbl.Rules() {
		names = append(names, r.Name)
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "(none)"
	}
	return strings.Join(names, ", ")
}

func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func httpError(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write([]byte(msg + "\n"))
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}
