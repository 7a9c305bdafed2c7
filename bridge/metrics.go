package bridge

import (
	"runtime"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// MetricDesc describes one exported metric. MetricList is the single source
// of truth for names, types and labels: the table in docs/metrics.md and the deploy
// tests read it.
type MetricDesc struct {
	Name   string   `json:"name"`
	Type   string   `json:"type"` // counter, gauge, histogram
	Labels []string `json:"labels"`
	Help   string   `json:"help"`
}

// Outcome label values of cellbridge_messages_total.
const (
	OutcomeForwarded = "forwarded"
	OutcomeDuplicate = "duplicate"
	OutcomeHeld      = "held"
	OutcomeDLQ       = "dlq"
	OutcomeRetried   = "retried"
	// OutcomeRevoked counts messages dropped unpublished because their
	// source's epoch was revoked (another replica took the source over).
	OutcomeRevoked = "revoked"
	// OutcomeSkipped counts broadcast messages acked without a copy: every
	// selected cell was down (at intake, or when a waiting copy was
	// decided again), or the origin (excludeOrigin).
	OutcomeSkipped = "skipped"
)

// Reasons of cellbridge_broadcast_skipped_total: router.SkipDown,
// router.SkipOrigin, and SkipRemoved.
const (
	// SkipRemoved: a copy waiting to be published whose cell the rules no
	// longer select (the cell was removed, or the rule's cells changed).
	SkipRemoved = "removed"
)

// DLQ reason label values of cellbridge_dlq_total (also the first word of
// the Cell-Error header).
const (
	DLQMissingKey  = "missing_key"
	DLQBadKey      = "bad_key"
	DLQBadBody     = "bad_body"
	DLQTooLarge    = "too_large"
	DLQTooManyHops = "too_many_hops"
	DLQNoRoute     = "no_route"
)

// DLQReasons lists every cellbridge_dlq_total reason value.
var DLQReasons = []string{DLQMissingKey, DLQBadKey, DLQBadBody, DLQTooLarge, DLQTooManyHops, DLQNoRoute}

// Connection roles of cellbridge_connection_up.
const (
	RoleSource = "source"
	RoleSink   = "sink"
	RoleDedupe = "dedupe"
)

// Metric names.
const (
	MetricMessages           = "cellbridge_messages_total"
	MetricForwarded          = "cellbridge_forwarded_total"
	MetricDLQ                = "cellbridge_dlq_total"
	MetricLatency            = "cellbridge_latency_seconds"
	MetricInFlight           = "cellbridge_in_flight"
	MetricOldestUnackedAge   = "cellbridge_oldest_unacked_age_seconds"
	MetricStallAge           = "cellbridge_stall_age_seconds"
	MetricHeldMessages       = "cellbridge_held_messages"
	MetricHeldOverflow       = "cellbridge_held_overflow_total"
	MetricHeldOldestAge      = "cellbridge_held_oldest_age_seconds"
	MetricHeldRange          = "cellbridge_held_range_messages"
	MetricHeldRangeOldest    = "cellbridge_held_range_oldest_age_seconds"
	MetricSourceBacklog      = "cellbridge_source_backlog_messages"
	MetricSinkPublishErrors  = "cellbridge_sink_publish_errors_total"
	MetricTargetFailing      = "cellbridge_target_failing"
	MetricSourceFailing      = "cellbridge_source_failing"
	MetricDedupeErrors       = "cellbridge_dedupe_errors_total"
	MetricDedupeTakeovers    = "cellbridge_dedupe_takeovers_total"
	MetricDedupeEvictions    = "cellbridge_dedupe_evictions_total"
	MetricPartitions         = "cellbridge_partitions"
	MetricPartitionsOwned    = "cellbridge_partitions_owned"
	MetricTakeovers          = "cellbridge_takeovers_total"
	MetricSourcePinned       = "cellbridge_source_pinned"
	MetricBrokerReqErrors    = "cellbridge_broker_request_errors_total"
	MetricRulesVersion       = "cellbridge_rules_version"
	MetricRulesLastReload    = "cellbridge_rules_last_reload_timestamp_seconds"
	MetricRulesReloadFails   = "cellbridge_rules_reload_failures_total"
	MetricRulesReloadFailing = "cellbridge_rules_reload_failing"
	MetricConnectionUp       = "cellbridge_connection_up"
	MetricConnectionNeeded   = "cellbridge_connection_needed"
	MetricReady              = "cellbridge_ready"
	MetricBuildInfo          = "cellbridge_build_info"
	MetricBroadcastSkipped   = "cellbridge_broadcast_skipped_total"
	MetricBroadcastPending   = "cellbridge_broadcast_pending_copies"
	MetricBroadcastLagging   = "cellbridge_broadcast_lagging_copies"
)

// MetricList is every cellbridge_ metric, in the order of docs/metrics.md. Labels never hold
// a key or a message id.
var MetricList = []MetricDesc{
	{MetricMessages, "counter", []string{"rule", "outcome"}, "Messages by topic rule and outcome (forwarded, duplicate, held, dlq, retried, revoked, skipped). A broadcast message counts once, when every copy is settled; retried counts each failed attempt of a copy."},
	{MetricForwarded, "counter", []string{"rule", "cell"}, "Messages forwarded and confirmed, by topic rule and target cell (a broadcast message once per cell)."},
	{MetricDLQ, "counter", []string{"rule", "reason"}, "Messages sent to the dead-letter target, by reason (missing_key, bad_key, bad_body, too_large, too_many_hops, no_route)."},
	{MetricLatency, "histogram", []string{"rule", "cell"}, "Seconds from the source broker storing a message to the sink confirming its copy."},
	{MetricInFlight, "gauge", []string{"rule"}, "Messages accepted and not yet settled, excluding parked (held) ones."},
	{MetricOldestUnackedAge, "gauge", []string{"rule"}, "Age in seconds of the oldest message not yet acknowledged to the source (freshness)."},
	{MetricStallAge, "gauge", []string{"rule"}, "Age in seconds of the oldest message accepted and not yet settled (or waiting for an in-flight slot), parked (held) messages excluded (a released one counts from its release): it grows while a target, the dedupe store or a retry holds messages up (/readyz fails beyond pipeline.stallTimeout)."},
	{MetricHeldMessages, "gauge", []string{"rule"}, "Messages parked because their shard is blocked (held)."},
	{MetricHeldOverflow, "counter", []string{"rule"}, "Deliveries of messages of a blocked shard not parked because pipeline.maxHeld messages were parked already (a message refused again at each redelivery counts each time): each goes back to its source and comes again after pipeline.holdDelay, and its key's per-key order is no longer guaranteed (raise maxHeld, or shorten the block)."},
	{MetricHeldOldestAge, "gauge", []string{"rule"}, "Age in seconds of the oldest parked (held) message."},
	{MetricHeldRange, "gauge", []string{"rule", "shards"}, "Messages parked per blocked shard range of the running rules (shards is a blocked: entry, e.g. 40-44)."},
	{MetricHeldRangeOldest, "gauge", []string{"rule", "shards"}, "Age in seconds of the oldest parked message per blocked shard range."},
	{MetricSourceBacklog, "gauge", []string{"rule"}, "Messages pending at the source, not yet delivered to the bridge (e.g. consumer NumPending)."},
	{MetricSinkPublishErrors, "counter", []string{"broker"}, "Failed publish attempts by target broker (each is retried)."},
	{MetricTargetFailing, "gauge", []string{"broker", "target"}, "1 while publishes to a target (a subject or topic of a broker) keep failing; 0 once one was confirmed and none failed for a second."},
	{MetricSourceFailing, "gauge", []string{"rule"}, "1 while the source of a topic rule cannot deliver (its server stopped answering, its consumer cannot be reached), also when nothing waits to be delivered (then /readyz stays 200)."},
	{MetricDedupeErrors, "counter", []string{"op"}, "Dedupe store errors by operation (reserve, check, takeover, commit, release)."},
	{MetricDedupeTakeovers, "counter", []string{"rule"}, "Reservations of another holder that an ordered rule's forwarding replica took over instead of waiting until they expire (dedupe.reserveTTL): a previous owner's, left by a crash or a cut-off (JetStream store, NATS targets)."},
	{MetricDedupeEvictions, "counter", nil, "Keys the memory dedupe store dropped before they expired, to stay within dedupe.size (least recently used first); a repeat of such a key is then caught only by its target's duplicate window. A growing count means dedupe.size is too small for the message rate times dedupe.ttl; always 0 with the jetstream store."},
	{MetricPartitions, "gauge", []string{"rule"}, "Partition count of a partitioned topic rule (source.partitions), as this replica runs it."},
	{MetricPartitionsOwned, "gauge", []string{"rule"}, "Partitions of a partitioned topic rule whose lease this replica holds; summed over the replicas it equals cellbridge_partitions once every partition has an owner."},
	{MetricTakeovers, "counter", []string{"rule"}, "Times this replica started forwarding an ordered topic rule (won its consumer's pin) or one of a partitioned rule's partitions."},
	{MetricSourcePinned, "gauge", []string{"rule"}, "1 while this replica holds the pin of an ordered topic rule's consumer (it forwards the rule, or resets the consumer to do so), 0 while it is a standby; partitioned rules report cellbridge_partitions_owned instead."},
	{MetricBrokerReqErrors, "counter", []string{"broker", "op"}, "Failed attempts of requests to a broker's control plane, by broker and request (connect, stream_info, stream_create, stream_update, consumer_info, consumer_create, consumer_reset, consumer_unpin, consumer_delete, kv_bucket); each is logged and, where the caller has time, retried."},
	{MetricRulesVersion, "gauge", nil, "Version of the rules table in use."},
	{MetricRulesLastReload, "gauge", nil, "Unix time of the last successful rules load."},
	{MetricRulesReloadFails, "counter", nil, "Rule reloads refused (invalid files or a lower version)."},
	{MetricRulesReloadFailing, "gauge", nil, "1 from a refused rules reload until one succeeds: the rules directory holds rules this replica does not run (and a replica started on them would not start)."},
	{MetricConnectionUp, "gauge", []string{"broker", "role"}, "1 while the connection to a broker is up, by role (source, sink, dedupe)."},
	{MetricConnectionNeeded, "gauge", []string{"broker", "role"}, "1 while the running rules need the connection to a broker (every source and dedupe connection; a sink connection while a rule publishes to that broker for a cell not marked down, or to a DLQ), 0 while only cells marked down would use it: its loss then holds neither readiness nor an alert."},
	{MetricReady, "gauge", nil, "1 while /readyz answers 200."},
	{MetricBuildInfo, "gauge", []string{"version", "goversion"}, "Always 1; labels carry the build version and Go version."},
	{MetricBroadcastSkipped, "counter", []string{"rule", "cell", "reason"}, "Broadcast copies not sent, by topic rule, cell and reason: down (the cell is down in the rules: missed; cellbridge replay sends them later), origin (the event came from that cell; excludeOrigin), removed (the cell left the rule's cells while the copy waited)."},
	{MetricBroadcastPending, "gauge", []string{"rule", "cell"}, "Broadcast copies accepted and not yet confirmed, by topic rule and cell (publishing, queued behind an earlier copy of their key, or lagging)."},
	{MetricBroadcastLagging, "gauge", []string{"rule", "cell"}, "Broadcast copies waiting for a failing cell outside pipeline.maxInFlight (pipeline.maxLagging bounds them over all cells)."},
}

// LatencyBuckets are the cellbridge_latency_seconds buckets: 0.5ms to ~16s.
var LatencyBuckets = prometheus.ExponentialBuckets(0.0005, 2, 16)

// Metrics holds the collectors, registered in their own Registry (plus the
// Go and process collectors). Safe for concurrent use; create one per
// process with NewMetrics and share it between the pipeline, the health
// tracker and the HTTP handler.
type Metrics struct {
	Registry *prometheus.Registry
	// evictions reads the memory dedupe store's count (SetDedupeEvictions).
	evictions atomic.Pointer[func() uint64]

	Messages          *prometheus.CounterVec
	Forwarded         *prometheus.CounterVec
	DLQ               *prometheus.CounterVec
	Latency           *prometheus.HistogramVec
	InFlight          *prometheus.GaugeVec
	OldestUnackedAge  *prometheus.GaugeVec
	StallAge          *prometheus.GaugeVec
	HeldMessages      *prometheus.GaugeVec
	HeldOverflow      *prometheus.CounterVec
	HeldOldestAge     *prometheus.GaugeVec
	HeldRange         *prometheus.GaugeVec
	HeldRangeOldest   *prometheus.GaugeVec
	SourceBacklog     *prometheus.GaugeVec
	SinkPublishErrors *prometheus.CounterVec
	TargetFailing     *prometheus.GaugeVec
	SourceFailing     *prometheus.GaugeVec
	DedupeErrors      *prometheus.CounterVec
	DedupeTakeovers   *prometheus.CounterVec
	// DedupeEvictions reads the memory store's evictions; see
	// SetDedupeEvictions.
	DedupeEvictions  prometheus.CounterFunc
	BrokerReqErrors  *prometheus.CounterVec
	RulesVersion     prometheus.Gauge
	RulesLastReload  prometheus.Gauge
	RulesReloadFails prometheus.Counter
	RulesFailing     prometheus.Gauge
	ConnectionUp     *prometheus.GaugeVec
	ConnectionNeeded *prometheus.GaugeVec
	Ready            prometheus.Gauge
	BuildInfo        *prometheus.GaugeVec
	BroadcastSkipped *prometheus.CounterVec
	BroadcastPending *prometheus.GaugeVec
	BroadcastLagging *prometheus.GaugeVec
	// Sources exports the ownership metrics (cellbridge_partitions,
	// cellbridge_partitions_owned, cellbridge_takeovers_total,
	// cellbridge_source_pinned) from the sources' statuses at every scrape
	// (SetSources).
	Sources prometheus.Collector

	rules cowMap[string, *ruleMetrics]
	// sources reads the sources' statuses (SetSources).
	sources atomic.Pointer[func() []SourceStatus]
}

// NewMetrics creates and registers every metric of MetricList. version is
// the build version for cellbridge_build_info.
func NewMetrics(version string) *Metrics {
	m := &Metrics{Registry: prometheus.NewRegistry()}
	byName := make(map[string]MetricDesc, len(MetricList))
	for _, d := range MetricList {
		byName[d.Name] = d
	}
	counter := func(name string) *prometheus.CounterVec {
		d := byName[name]
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: d.Name, Help: d.Help}, d.Labels)
	}
	gauge := func(name string) *prometheus.GaugeVec {
		d := byName[name]
		return prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: d.Name, Help: d.Help}, d.Labels)
	}
	m.Messages = counter(MetricMessages)
	m.Forwarded = counter(MetricForwarded)
	m.DLQ = counter(MetricDLQ)
	m.Latency = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: MetricLatency, Help: byName[MetricLatency].Help, Buckets: LatencyBuckets,
	}, byName[MetricLatency].Labels)
	m.InFlight = gauge(MetricInFlight)
	m.OldestUnackedAge = gauge(MetricOldestUnackedAge)
	m.StallAge = gauge(MetricStallAge)
	m.HeldMessages = gauge(MetricHeldMessages)
	m.HeldOverflow = counter(MetricHeldOverflow)
	m.HeldOldestAge = gauge(MetricHeldOldestAge)
	m.HeldRange = gauge(MetricHeldRange)
	m.HeldRangeOldest = gauge(MetricHeldRangeOldest)
	m.SourceBacklog = gauge(MetricSourceBacklog)
	m.SinkPublishErrors = counter(MetricSinkPublishErrors)
	m.TargetFailing = gauge(MetricTargetFailing)
	m.SourceFailing = gauge(MetricSourceFailing)
	m.DedupeErrors = counter(MetricDedupeErrors)
	m.DedupeTakeovers = counter(MetricDedupeTakeovers)
	m.BrokerReqErrors = counter(MetricBrokerReqErrors)
	m.RulesVersion = prometheus.NewGauge(prometheus.GaugeOpts{Name: MetricRulesVersion, Help: byName[MetricRulesVersion].Help})
	m.RulesLastReload = prometheus.NewGauge(prometheus.GaugeOpts{Name: MetricRulesLastReload, Help: byName[MetricRulesLastReload].Help})
	m.RulesReloadFails = prometheus.NewCounter(prometheus.CounterOpts{Name: MetricRulesReloadFails, Help: byName[MetricRulesReloadFails].Help})
	m.RulesFailing = prometheus.NewGauge(prometheus.GaugeOpts{Name: MetricRulesReloadFailing, Help: byName[MetricRulesReloadFailing].Help})
	m.ConnectionUp = gauge(MetricConnectionUp)
	m.ConnectionNeeded = gauge(MetricConnectionNeeded)
	m.Ready = prometheus.NewGauge(prometheus.GaugeOpts{Name: MetricReady, Help: byName[MetricReady].Help})
	m.BuildInfo = gauge(MetricBuildInfo)
	m.BroadcastSkipped = counter(MetricBroadcastSkipped)
	m.BroadcastPending = gauge(MetricBroadcastPending)
	m.BroadcastLagging = gauge(MetricBroadcastLagging)
	m.DedupeEvictions = prometheus.NewCounterFunc(prometheus.CounterOpts{Name: MetricDedupeEvictions, Help: byName[MetricDedupeEvictions].Help}, func() float64 {
		if f := m.evictions.Load(); f != nil {
			return float64((*f)())
		}
		return 0
	})
	m.Sources = newSourceCollector(m, byName)
	m.Registry.MustRegister(m.Messages, m.Forwarded, m.DLQ, m.Latency, m.InFlight, m.OldestUnackedAge, m.StallAge,
		m.HeldMessages, m.HeldOverflow, m.HeldOldestAge, m.HeldRange, m.HeldRangeOldest, m.SourceBacklog, m.SinkPublishErrors,
		m.TargetFailing, m.SourceFailing, m.DedupeErrors, m.DedupeTakeovers, m.BrokerReqErrors,
		m.RulesVersion, m.RulesLastReload, m.RulesReloadFails, m.RulesFailing, m.ConnectionUp, m.ConnectionNeeded, m.Ready, m.BuildInfo,
		m.BroadcastSkipped, m.BroadcastPending, m.BroadcastLagging, m.DedupeEvictions,
		m.Sources,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	if version == "" {
		version = "dev"
	}
	m.BuildInfo.WithLabelValues(version, runtime.Version()).Set(1)
	for _, op := range []string{"reserve", "check", "takeover", "commit", "release"} {
		m.DedupeErrors.WithLabelValues(op) // export zeros so rate() works from the start
	}
	return m
}

// ruleMetrics caches the label children of one rule so that the hot path
// never hashes label values.
type ruleMetrics struct {
	forwarded, duplicate, held, dlqOut, retried, revoked prometheus.Counter
	skipped, takeovers                                   prometheus.Counter
	dlq                                                  [6]prometheus.Counter // by DLQReasons index
	heldOverflow                                         prometheus.Counter
	inFlight, oldest, stall, heldN, heldOldest           prometheus.Gauge
	backlog                                              prometheus.Gauge

	m     *Metrics
	name  string
	cells cowMap[string, *cellMetrics]
}

type cellMetrics struct {
	cell      string
	forwarded prometheus.Counter
	latency   prometheus.Observer
}

// rule returns the cached children for a rule name, creating them once.
func (m *Metrics) rule(name string) *ruleMetrics {
	return m.rules.get(name, func() *ruleMetrics {
		r := &ruleMetrics{
			m: m, name: name,
			forwarded:    m.Messages.WithLabelValues(name, OutcomeForwarded),
			duplicate:    m.Messages.WithLabelValues(name, OutcomeDuplicate),
			held:         m.Messages.WithLabelValues(name, OutcomeHeld),
			dlqOut:       m.Messages.WithLabelValues(name, OutcomeDLQ),
			retried:      m.Messages.WithLabelValues(name, OutcomeRetried),
			revoked:      m.Messages.WithLabelValues(name, OutcomeRevoked),
			skipped:      m.Messages.WithLabelValues(name, OutcomeSkipped),
			takeovers:    m.DedupeTakeovers.WithLabelValues(name),
			inFlight:     m.InFlight.WithLabelValues(name),
			oldest:       m.OldestUnackedAge.WithLabelValues(name),
			stall:        m.StallAge.WithLabelValues(name),
			heldN:        m.HeldMessages.WithLabelValues(name),
			heldOverflow: m.HeldOverflow.WithLabelValues(name),
			heldOldest:   m.HeldOldestAge.WithLabelValues(name),
			backlog:      m.SourceBacklog.WithLabelValues(name),
		}
		for i, reason := range DLQReasons {
			r.dlq[i] = m.DLQ.WithLabelValues(name, reason)
		}
		return r
	})
}

// cell returns the cached children for (rule, cell).
func (r *ruleMetrics) cell(name string) *cellMetrics {
	return r.cells.get(name, func() *cellMetrics {
		return &cellMetrics{
			cell:      name,
			forwarded: r.m.Forwarded.WithLabelValues(r.name, name),
			latency:   r.m.Latency.WithLabelValues(r.name, name),
		}
	})
}

func (r *ruleMetrics) dlqReason(reason string) prometheus.Counter {
	for i, s := range DLQReasons {
		if s == reason {
			return r.dlq[i]
		}
	}
	return r.dlq[len(r.dlq)-1]
}

// SetDedupeEvictions makes cellbridge_dedupe_evictions_total read f (the
// memory store's Evictions).
func (m *Metrics) SetDedupeEvictions(f func() uint64) { m.evictions.Store(&f) }
