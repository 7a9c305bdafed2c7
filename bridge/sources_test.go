package bridge

import (
	"testing"
	"time"
)

// The ownership metrics are read from the sources' statuses at each scrape:
// partition counts for partitioned rules, takeovers for ordered and
// partitioned rules, the pin for ordered rules with one consumer; nothing
// for a source that has no such notion.
func TestSourceMetrics(t *testing.T) {
	m := NewMetrics("test")
	pinned := true
	part := 3
	sts := []SourceStatus{
		{Rule: "orders", Ordering: "ordered", State: "active", Pinned: &pinned, Takeovers: 2},
		{Rule: "events", Ordering: "ordered", State: "partitioned", Partitions: 12, OwnedCount: 5, Takeovers: 7,
			LastTakeover: &SourceTakeover{At: time.Now(), Partition: &part, How: "released"}},
		{Rule: "audit", Ordering: "none", State: "shared"},
		{Rule: "rmq"},
	}
	if n := ownershipSamples(t, m); n != 0 {
		t.Fatalf("%d samples before SetSources", n)
	}
	m.SetSources(func() []SourceStatus { return sts })
	for _, c := range []struct {
		metric, rule string
		want         float64
	}{
		{MetricSourcePinned, "orders", 1},
		{MetricTakeovers, "orders", 2},
		{MetricPartitions, "events", 12},
		{MetricPartitionsOwned, "events", 5},
		{MetricTakeovers, "events", 7},
	} {
		if got := sampleOf(t, m, c.metric, c.rule); got != c.want {
			t.Errorf("%s{rule=%q} = %v, want %v", c.metric, c.rule, got, c.want)
		}
	}
	// orders: pinned + takeovers; events: partitions, owned, takeovers.
	if n := ownershipSamples(t, m); n != 5 {
		t.Errorf("%d samples, want 5 (none for the unordered and the RocketMQ source)", n)
	}
	pinned = false
	if got := sampleOf(t, m, MetricSourcePinned, "orders"); got != 0 {
		t.Errorf("a standby's %s = %v", MetricSourcePinned, got)
	}
}

// ownershipSamples counts the samples of the ownership metrics.
func ownershipSamples(t *testing.T, m *Metrics) int {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, mf := range mfs {
		switch mf.GetName() {
		case MetricSourcePinned, MetricPartitions, MetricPartitionsOwned, MetricTakeovers:
			n += len(mf.GetMetric())
		}
	}
	return n
}

// sampleOf gathers the registry and returns the rule's sample of name
// (failing when it is absent).
func sampleOf(t *testing.T, m *Metrics, name, rule string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, s := range mf.GetMetric() {
			for _, l := range s.GetLabel() {
				if l.GetName() == "rule" && l.GetValue() == rule {
					if s.GetCounter() != nil {
						return s.GetCounter().GetValue()
					}
					return s.GetGauge().GetValue()
				}
			}
		}
	}
	t.Fatalf("no sample %s{rule=%q}", name, rule)
	return 0
}

// Status shows each source's report under its rule, adding rules that
// have seen no message yet (a standby), in rule order.
func TestWithSources(t *testing.T) {
	rules := []RuleStatus{{Rule: "orders", InFlight: 3}, {Rule: "payments"}}
	got := withSources(rules, []SourceStatus{{Rule: "payments", State: "standby"}, {Rule: "audit", State: "shared"}})
	if len(got) != 3 || got[0].Rule != "audit" || got[1].Rule != "orders" || got[2].Rule != "payments" {
		t.Fatalf("rules %+v", got)
	}
	if got[0].Source == nil || got[0].Source.State != "shared" || got[1].Source != nil || got[1].InFlight != 3 ||
		got[2].Source == nil || got[2].Source.State != "standby" {
		t.Errorf("sources %+v", got)
	}
}
