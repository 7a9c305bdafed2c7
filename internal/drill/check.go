package drill

import (
	"fmt"
	"sort"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/tally"
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
	sent := make([]tally.Sent, len(in.events))
	for i, e := range in.events {
		events[e.ID] = e
		sent[i] = tally.Sent{ID: e.ID, Key: e.Key, Seq: e.Seq, MsgID: in.msgIDs[e.ID]}
	}
	phase := map[int64]int{}
	for i, p := range in.phases {
		phase[p.Version] = i
		p.PerCell = map[string]int{}
		p.Tail = 0
	}
	rep.Published = len(in.events)

	// Lost, duplicated, Cell-Msg-Id, wrong cell and order within each
	// stream: the shared tally. A copy is placed by the rules version
	// stamped on it; the drill's own checks below report dead-lettered
	// copies, unknown versions and blocked shards.
	res := tally.Check(sent, in.arrivals, tally.Options{Owner: func(a *tally.Arrival) (string, bool) {
		t := in.tables[a.Version]
		if a.Cell == "" || t == nil {
			return "", false
		}
		d := t.Resolve(in.topic, a.Key)
		return d.Cell, d.Reason != router.ReasonHeld
	}})
	rep.Arrived = res.Arrived
	for _, a := range res.Unknown {
		violate(KindUnknownVersion, "%s in %s: not an event this drill published", a.ID, a.Stream)
	}
	for _, m := range res.Misrouted {
		violate(KindWrongCell, "event %s (key %s, shard %d) reached %s; version %d routes it to %s", m.ID, m.Key, events[m.ID].Shard, m.Cell, m.Version, m.Want)
	}
	for _, s := range res.Lost {
		violate(KindLost, "event %s (key %s, seq %d, shard %d) never arrived", s.ID, s.Key, s.Seq, events[s.ID].Shard)
	}
	for _, d := range res.Duplicated {
		e := events[d.ID]
		violate(KindDuplicate, "event %s (key %s, seq %d) arrived %d times", d.ID, e.Key, e.Seq, d.Copies)
	}
	for _, d := range res.DuplicatedMsgIDs {
		violate(KindDuplicate, "Cell-Msg-Id %s arrived %d times (events %v)", d.ID, d.Copies, d.Where)
	}
	for _, a := range res.WrongMsgID {
		violate(KindMsgID, "event %s arrived with %s %q, want %q (derived from the source)", a.ID, bridge.HeaderMsgID, a.MsgID, in.msgIDs[a.ID])
	}
	if res.NoMsgID > 0 {
		violate(KindMsgID, "%d events arrived without a Cell-Msg-Id", res.NoMsgID)
	}
	reordered := map[string]bool{}
	for _, r := range res.Reordered {
		reordered[r.Key] = true
		violate(KindOrder, "key %s: stream %s holds seq %d (%s) after seq %d (%s)", r.Key, r.Stream, r.Seq, r.ID, r.After, r.AfterID)
	}
	rep.Reorderings = len(res.Reordered)
	defer func() { rep.ReorderedKeys = len(reordered) }()

	byKey := map[string][]Arrival{}
	for _, a := range in.arrivals {
		e := events[a.ID]
		if e == nil {
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
		if t := in.tables[a.Version]; t == nil {
			violate(KindUnknownVersion, "event %s in %s carries rules version %d, which the drill never wrote", a.ID, a.Cell, a.Version)
		} else if d := t.Resolve(in.topic, a.Key); d.Reason == router.ReasonHeld {
			violate(KindBlockedForwarded, "event %s (key %s, shard %d) reached %s under version %d, which blocks its shard", a.ID, a.Key, e.Shard, a.Cell, a.Version)
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
	}

	for _, e := range in.events {
		if !in.blockEffective.IsZero() && !inRanges(e.Shard, in.blocked) && !e.Stored.Before(in.blockEffective) && e.Stored.Before(in.unblockWritten) {
			rep.Switch.OthersOffered++
		}
	}
	if !in.blockEffective.IsZero() && rep.Switch.OthersArrived == 0 {
		violate(KindOthersStalled, "no event of the other shards arrived while %s was blocked (%d offered)", rangesText(in.blocked), rep.Switch.OthersOffered)
	}

	// Per-key order across cells, by the time each copy was stored (one
	// server clock for every cell stream), for keys whose streams each kept
	// their order.
	keys := make([]string, 0, len(byKey))
	for k := range byKey {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		as := byKey[k]
		sort.SliceStable(as, func(i, j int) bool { return as[i].Stored.Before(as[j].Stored) })
		ok := !reordered[k]
		cells := map[string]bool{}
		for i, a := range as {
			cells[a.Cell] = true
			if ok && i > 0 && a.Seq <= as[i-1].Seq {
				ok = false
				reordered[k] = true
				rep.Reorderings++
				violate(KindOrder, "key %s: seq %d (%s in %s) was stored after seq %d (%s in %s)",
					k, a.Seq, a.ID, a.Cell, as[i-1].Seq, as[i-1].ID, as[i-1].Cell)
			}
		}
		if ok && len(cells) > 1 {
			rep.KeysMoved++
		}
	}
}
