package natsjs

import (
	"github.com/cellbridge/cellbridge/bridge"
)

var (
	_ bridge.StatusReporter = (*Source)(nil)
	_ bridge.StatusReporter = (*PartitionedSource)(nil)
)

// SourceStatus reports the source's state for /status and the ownership
// metrics (bridge.StatusReporter): an ordered source says whether it holds
// the pin, its epoch and its takeovers.
func (s *Source) SourceStatus() bridge.SourceStatus {
	st := s.State()
	out := bridge.SourceStatus{
		Rule: st.Rule, Ordering: string(st.Ordering), State: string(st.State), Since: st.Since,
		PinID: st.PinID, EpochStart: st.EpochStart, Epochs: st.Epochs,
		Fences: st.Fences, LastFence: st.LastFence, LastFenceAt: st.LastFenceAt,
		LastWithheld: st.LastWithheld, LastWithheldAt: st.LastWithheldAt,
		Takeovers: st.Takeovers,
	}
	if st.Ordering == Ordered {
		pinned := st.State == StateActive || st.State == StateAcquiring
		out.Pinned = &pinned
		out.Acks = acksName(s.cfg.CumulativeAcks)
	}
	if !st.LastTakeover.IsZero() {
		out.LastTakeover = &bridge.SourceTakeover{At: st.LastTakeover,
			Seconds: st.LastTakeoverDuration.Seconds(), UnownedSeconds: st.LastTakeoverGap.Seconds()}
	}
	return out
}

// SourceStatus reports the partitions this replica holds, each with its
// consumer's pin and epoch, and the partitions it took over
// (bridge.StatusReporter).
func (s *PartitionedSource) SourceStatus() bridge.SourceStatus {
	st := s.Status()
	out := bridge.SourceStatus{
		Rule: st.Rule, Ordering: string(Ordered), State: "partitioned", Replica: st.Replica,
		Partitions: st.Partitions, Members: st.Members, Takeovers: st.Takeovers,
		Acks: acksName(s.cfg.Consumer.CumulativeAcks),
	}
	for _, o := range st.Owned {
		out.Owned = append(out.Owned, bridge.OwnedPartition{Partition: o.Partition, State: o.State, Since: o.Since,
			Consumer: o.Consumer, PinID: o.PinID, EpochStart: o.EpochStart})
		if o.State != ownerAcquiring {
			out.OwnedCount++
		}
	}
	if t := st.LastTakeover; t != nil {
		p := t.Partition
		out.LastTakeover = &bridge.SourceTakeover{At: t.At, Partition: &p, From: t.From, How: t.How}
	}
	return out
}

// partitionStater is implemented by partitions that can describe their
// consumer beyond State (the ordered Source's pin and epoch).
type partitionStater interface {
	SourceState() SourceState
}

// SourceState returns the partition consumer's state.
func (p orderedPartition) SourceState() SourceState { return p.src.State() }

// SourceState returns the wrapped partition's consumer state, zero when it
// cannot describe one.
func (f forgetBacklog) SourceState() SourceState {
	if ps, ok := f.Partition.(partitionStater); ok {
		return ps.SourceState()
	}
	return SourceState{}
}

// consumerDetail fills the pin and epoch of an owned partition from its
// consumer, when the consumer can say.
func consumerDetail(o *OwnedPartition, part Partition) {
	ps, ok := part.(partitionStater)
	if !ok {
		return
	}
	st := ps.SourceState()
	o.PinID, o.EpochStart = st.PinID, st.EpochStart
}

// acksName is how /status names an ordered source's acknowledgements (the
// rule's source.acks).
func acksName(cumulative bool) string {
	if cumulative {
		return "cumulative"
	}
	return "each"
}
