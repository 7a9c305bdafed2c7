package drill

import (
	"fmt"
	"sort"
	"time"

	"github.com/cellbridge/cellbridge/router"
)

// checkInput is everything the checks need: what was published, what
// arrived, and when each rules version ran.
type checkInput struct {
	topic    string
	events   []*Event
	msgIDs   map[string]string // payload id → expected Cell-Msg-Id ("" unknown)
	arrivals []Arrival
	tables   map[int64]*router.Table
	phases   []*Phase // in version order; phases[0] is the starting rules

	blocked                        []router.Range
	blockEffective, unblockWritten time.Time

	down          string
	failVersion   int64
	failEffective time.Time

	slack time.Duration
}

// maxDetails bounds the violations listed per kind; the rest are counted.
const maxDetails = 20

// checkArrivals runs every check on the arrivals and fills rep.
func checkArrivals(in checkInput, rep *Report) {
	perKind := map[string]int{}
	violate := func(kind, format string, a ...any) {
		perKind[kind]++
		if perKind[kind] <= maxDetails {
			rep.Violations = append(rep.Violations, Violation{Kind: kind, Detail: fmt.Sprintf(format, a...)})
		}
	}
	defer func() {
		for kind, n := range perKind {
			if n > maxDetails {
				rep.Violations = append(rep.Violations, Violation{Kind: kind, Detail: fmt.Sprintf("%d more like the above", n-maxDetails)})
			}
		}
	}()

	events := make(map[string]*Event, len(in.events))
	for _, e := range in.events {
		events[e.ID] = e
	}
	phase := map[int64]int{}
	for i, p := range in.phases {
		phase[p.Version] = i
		p.PerCell = map[string]int{}
		p.Tail = 0
	}
	rep.Published = len(in.events)

	byID := map[string]int{}
	byMsgID := map[string][]string{}
	byKey := map[string][]Arrival{}
	for _, a := range in.arrivals {
		byID[a.ID]++
		byMsgID[a.MsgID] = append(byMsgID[a.MsgID], a.ID)
		e := events[a.ID]
		if e == nil {
			violate(KindUnknownVersion, "%s in %s: not an event this drill published", a.ID, a.Stream)
			continue
		}
		byKey[a.Key] = append(byKey[a.Key], a)
		if a.Cell == "" {
			violate(KindDLQ, "event %s (key %s) was dead-lettered", a.ID, a.Key)
			continue
		}
		if i, ok := phase[a.Version]; ok {
			p := in.phases[i]
			p.PerCell[a.Cell]++
			if i+1 < len(in.phases) && !in.phases[i+1].Effective.IsZero() && a.Stored.After(in.phases[i+1].Effective) {
				p.Tail++
			}
		}
		t := in.tables[a.Version]
		if t == nil {
			violate(KindUnknownVersion, "event %s in %s carries rules version %d, which the drill never wrote", a.ID, a.Cell, a.Version)
		} else {
			switch d := t.Resolve(in.topic, a.Key); {
			case d.Reason == router.ReasonHeld:
				violate(KindBlockedForwarded, "event %s (key %s, shard %d) reached %s under version %d, which blocks its shard", a.ID, a.Key, e.Shard, a.Cell, a.Version)
			case d.Cell != a.Cell:
				violate(KindWrongCell, "event %s (key %s, shard %d) reached %s; version %d routes it to %s", a.ID, a.Key, e.Shard, a.Cell, a.Version, d.Cell)
			}
		}
		inBlocked := inRanges(e.Shard, in.blocked)
		if !in.blockEffective.IsZero() && inBlocked && a.Stored.After(in.blockEffective) && a.Stored.Before(in.unblockWritten) {
			rep.Switch.TailAfterBlock++
			rep.Switch.TailAfterBlockLast = max(rep.Switch.TailAfterBlockLast, a.Stored.Sub(in.blockEffective))
		}
		if !in.blockEffective.IsZero() && inBlocked && a.Stored.After(in.blockEffective.Add(in.slack)) && a.Stored.Before(in.unblockWritten) {
			violate(KindBlockedForwarded, "event %s (shard %d) reached %s %s after the block was running, before the unblock was written",
				a.ID, e.Shard, a.Cell, ms(a.Stored.Sub(in.blockEffective)))
		}
		if !inBlocked && !in.blockEffective.IsZero() && !a.Stored.Before(in.blockEffective) && a.Stored.Before(in.unblockWritten) {
			rep.Switch.OthersArrived++
		}
		if a.Cell == in.down && !in.failEffective.IsZero() && a.Stored.After(in.failEffective) {
			rep.Failover.InDownAfter++
			if a.Version >= in.failVersion || a.Stored.After(in.failEffective.Add(in.slack)) {
				violate(KindDownCell, "event %s (version %d) reached the down cell %s %s after the failover was running",
					a.ID, a.Version, in.down, ms(a.Stored.Sub(in.failEffective)))
			}
		}
		if want := in.msgIDs[a.ID]; want != "" && a.MsgID != want {
			violate(KindMsgID, "event %s arrived with %s %q, want %q (derived from the source)", a.ID, "Cell-Msg-Id", a.MsgID, want)
		}
	}
	rep.Arrived = len(byID)

	for _, e := range in.events {
		if !in.blockEffective.IsZero() && !inRanges(e.Shard, in.blocked) && !e.Stored.Before(in.blockEffective) && e.Stored.Before(in.unblockWritten) {
			rep.Switch.OthersOffered++
		}
		switch n := byID[e.ID]; {
		case n == 0:
			violate(KindLost, "event %s (key %s, seq %d, shard %d) never arrived", e.ID, e.Key, e.Seq, e.Shard)
		case n > 1:
			violate(KindDuplicate, "event %s (key %s, seq %d) arrived %d times", e.ID, e.Key, e.Seq, n)
		}
	}
	msgIDs := make([]string, 0, len(byMsgID))
	for id := range byMsgID {
		msgIDs = append(msgIDs, id)
	}
	sort.Strings(msgIDs)
	for _, id := range msgIDs {
		ids := byMsgID[id]
		if id == "" {
			violate(KindMsgID, "%d events arrived without a Cell-Msg-Id", len(ids))
			continue
		}
		if len(ids) > 1 {
			violate(KindDuplicate, "Cell-Msg-Id %s arrived %d times (events %v)", id, len(ids), ids)
		}
	}
	if !in.blockEffective.IsZero() && rep.Switch.OthersArrived == 0 {
		violate(KindOthersStalled, "no event of the other shards arrived while %s was blocked (%d offered)", rangesText(in.blocked), rep.Switch.OthersOffered)
	}

	// Per-key order: by the time each copy was stored (one server clock for
	// every cell stream), and within each stream by its sequence.
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		as := byKey[k]
		// Within each stream, by its sequence.
		sort.SliceStable(as, func(i, j int) bool {
			if as[i].Stream != as[j].Stream {
				return as[i].Stream < as[j].Stream
			}
			return as[i].StreamSeq < as[j].StreamSeq
		})
		ok := true
		for i := 1; i < len(as) && ok; i++ {
			if a, p := as[i], as[i-1]; a.Stream == p.Stream && a.Seq <= p.Seq {
				ok = false
				violate(KindOrder, "key %s: stream %s holds seq %d (%s) after seq %d (%s)", k, a.Stream, a.Seq, a.ID, p.Seq, p.ID)
			}
		}
		// Across cells, by the time each copy was stored.
		sort.SliceStable(as, func(i, j int) bool { return as[i].Stored.Before(as[j].Stored) })
		cells := map[string]bool{}
		for i, a := range as {
			cells[a.Cell] = true
			if ok && i > 0 && a.Seq <= as[i-1].Seq {
				ok = false
				violate(KindOrder, "key %s: seq %d (%s in %s) was stored after seq %d (%s in %s)",
					k, a.Seq, a.ID, a.Cell, as[i-1].Seq, as[i-1].ID, as[i-1].Cell)
			}
		}
		if ok && len(cells) > 1 {
			rep.KeysMoved++
		}
	}
}
