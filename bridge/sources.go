package bridge

import (
	"slices"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// SourceStatus is what one replica's source of a topic rule says about its
// share of the rule: whether it forwards now, since when, and the takeovers
// that made it the forwarding replica. /status shows it per rule (the
// Source field of RuleStatus), and the ownership metrics
// (cellbridge_partitions, cellbridge_partitions_owned,
// cellbridge_takeovers_total, cellbridge_source_pinned) are read from it at
// every scrape.
type SourceStatus struct {
	Rule string `json:"rule"`
	// Ordering is the mode the running source was started in: "ordered"
	// (one replica forwards at a time), "none" (every replica shares the
	// consumer), or "" for a source without the choice (RocketMQ assigns
	// each queue to one consumer of the group).
	Ordering string `json:"ordering,omitempty"`
	// Acks is how an ordered NATS source acknowledges: "each" or
	// "cumulative" (the rule's source.acks); "" for the others.
	Acks string `json:"acks,omitempty"`
	// State is the consumer's state on this replica: "standby",
	// "acquiring", "active", "shared", "waiting" or "stopped" for a rule
	// with one consumer; "partitioned" for a partitioned rule, whose
	// partitions have their own (Owned).
	State string    `json:"state"`
	Since time.Time `json:"since,omitzero"`
	// Pinned is set for an ordered rule with one consumer: whether this
	// replica holds the consumer's pin ("acquiring" or "active"). Nil for
	// other rules.
	Pinned *bool `json:"pinned,omitempty"`
	// PinID is the pin this replica holds, EpochStart when its current (or
	// last) epoch started forwarding, Epochs how many it started.
	PinID      string    `json:"pinId,omitempty"`
	EpochStart time.Time `json:"epochStart,omitzero"`
	Epochs     uint64    `json:"epochs,omitempty"`
	// Fences counts epochs ended because the pin could no longer be
	// trusted; LastFence says why and LastFenceAt when.
	Fences      uint64    `json:"fences,omitempty"`
	LastFence   string    `json:"lastFence,omitempty"`
	LastFenceAt time.Time `json:"lastFenceAt,omitzero"`
	// LastWithheld is why this replica last kept the consumer although it
	// could not publish (a hand-over would have re-read past the targets'
	// duplicate window), LastWithheldAt when.
	LastWithheld   string    `json:"lastWithheld,omitempty"`
	LastWithheldAt time.Time `json:"lastWithheldAt,omitzero"`
	// Takeovers counts the times this replica started forwarding the rule
	// (ordered, one consumer: the consumer's pin was won from another
	// replica or from nobody) or one of its partitions (partitioned): the
	// value of cellbridge_takeovers_total. LastTakeover is the last one.
	Takeovers    uint64          `json:"takeovers"`
	LastTakeover *SourceTakeover `json:"lastTakeover,omitempty"`

	// Partitioned rules only.
	// Replica is this replica's id among the rule's replicas.
	Replica string `json:"replica,omitempty"`
	// Partitions is the rule's partition count (0: not partitioned).
	Partitions int `json:"partitions,omitempty"`
	// Members are the rule's live replicas as this replica sees them.
	Members []string `json:"members,omitempty"`
	// Owned lists the partitions this replica holds or is taking, by
	// number; OwnedCount counts those whose lease it holds (every state
	// but "acquiring"), the value of cellbridge_partitions_owned.
	Owned      []OwnedPartition `json:"owned,omitempty"`
	OwnedCount int              `json:"ownedCount,omitempty"`
}

// SourceTakeover is one takeover: when this replica started forwarding.
type SourceTakeover struct {
	At time.Time `json:"at"`
	// Partition is the partition taken over (partitioned rules).
	Partition *int `json:"partition,omitempty"`
	// From is the previous holder's replica id and How it let go
	// ("released" or "expired"), where known (partitioned rules).
	From string `json:"from,omitempty"`
	How  string `json:"how,omitempty"`
	// Seconds is the takeover's own cost (ordered, one consumer): from the
	// probe that won the pin to the first forwarding pull. UnownedSeconds
	// is how long the consumer had no owner before it, as far as the
	// server's UNPINNED advisory told (0 when unknown).
	Seconds        float64 `json:"seconds,omitempty"`
	UnownedSeconds float64 `json:"unownedSeconds,omitempty"`
}

// OwnedPartition is one partition of a partitioned rule on this replica.
type OwnedPartition struct {
	Partition int `json:"partition"`
	// State is the lease's state here ("acquiring", "starting", "active",
	// "paused", "draining", "releasing") and Since when it was entered.
	State string    `json:"state"`
	Since time.Time `json:"since"`
	// Consumer is the partition consumer's state ("standby", "acquiring",
	// "active", ...); PinID and EpochStart as in SourceStatus.
	Consumer   string    `json:"consumer,omitempty"`
	PinID      string    `json:"pinId,omitempty"`
	EpochStart time.Time `json:"epochStart,omitzero"`
}

// StatusReporter is implemented by sources that report their share of a
// rule. Its method must be safe to call from any goroutine at any time and
// must not block on the network.
type StatusReporter interface {
	SourceStatus() SourceStatus
}

// SetSources tells the metrics (and Pipeline.Status) how to read the
// sources' statuses: f is called at every scrape of /metrics and every
// /status request, from any goroutine, and must not block. Until it is set
// the ownership metrics are absent and no rule shows a Source.
func (m *Metrics) SetSources(f func() []SourceStatus) { m.sources.Store(&f) }

// sourceStatuses returns the sources' statuses (nil when none are set).
func (m *Metrics) sourceStatuses() []SourceStatus {
	if f := m.sources.Load(); f != nil {
		return (*f)()
	}
	return nil
}

// sourceCollector exports the ownership metrics from the sources' statuses
// at scrape time: the sources keep the counts, so there is one source of
// truth and nothing to update per event.
type sourceCollector struct {
	m                                      *Metrics
	partitions, owned, takeovers, pinnedDs *prometheus.Desc
}

func newSourceCollector(m *Metrics, byName map[string]MetricDesc) *sourceCollector {
	desc := func(name string) *prometheus.Desc {
		d := byName[name]
		return prometheus.NewDesc(d.Name, d.Help, d.Labels, nil)
	}
	return &sourceCollector{m: m, partitions: desc(MetricPartitions), owned: desc(MetricPartitionsOwned),
		takeovers: desc(MetricTakeovers), pinnedDs: desc(MetricSourcePinned)}
}

func (c *sourceCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.partitions
	ch <- c.owned
	ch <- c.takeovers
	ch <- c.pinnedDs
}

func (c *sourceCollector) Collect(ch chan<- prometheus.Metric) {
	for _, st := range c.m.sourceStatuses() {
		if st.Partitions > 0 {
			ch <- prometheus.MustNewConstMetric(c.partitions, prometheus.GaugeValue, float64(st.Partitions), st.Rule)
			ch <- prometheus.MustNewConstMetric(c.owned, prometheus.GaugeValue, float64(st.OwnedCount), st.Rule)
		}
		if st.Partitions > 0 || st.Ordering == "ordered" {
			ch <- prometheus.MustNewConstMetric(c.takeovers, prometheus.CounterValue, float64(st.Takeovers), st.Rule)
		}
		if st.Pinned != nil {
			v := 0.0
			if *st.Pinned {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(c.pinnedDs, prometheus.GaugeValue, v, st.Rule)
		}
	}
}

// withSources adds each source's status to its rule in rules (sorted by
// rule), adding a rule that has no messages yet: a standby replica has
// seen none.
func withSources(rules []RuleStatus, sources []SourceStatus) []RuleStatus {
	for _, src := range sources {
		i := slices.IndexFunc(rules, func(r RuleStatus) bool { return r.Rule == src.Rule })
		if i < 0 {
			rules = append(rules, RuleStatus{Rule: src.Rule})
			i = len(rules) - 1
		}
		s := src
		rules[i].Source = &s
	}
	slices.SortFunc(rules, func(a, b RuleStatus) int { return strings.Compare(a.Rule, b.Rule) })
	return rules
}
