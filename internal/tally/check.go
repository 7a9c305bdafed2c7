package tally

import (
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"time"
)

// Sent is one event a load put into the source.
type Sent struct {
	ID  string
	Key string
	Seq int
	// MsgID is the Cell-Msg-Id the bridge must give its copies; "" when
	// the sender cannot know it (not checked then).
	MsgID string
	// Stored is when the source stream stored it (server clock); zero when
	// unknown (no latency then).
	Stored time.Time
}

// Arrival is one copy of a test event found in a cell stream or the DLQ.
type Arrival struct {
	Cell      string    // cell whose stream holds it; "" for the DLQ
	Stream    string    // stream name
	Subject   string    // subject it was published on
	StreamSeq uint64    // sequence in that stream
	Stored    time.Time // when the stream stored it (server clock)
	MsgID     string    // Cell-Msg-Id (the Nats-Msg-Id of a DLQ copy)
	Version   int64     // Cell-Rules-Version (0 when absent)
	Run       string    // the payload's run
	ID        string    // the payload's event id
	Key       string
	Seq       int
}

// Options tunes Check.
type Options struct {
	// Owner returns the cell whose stream must hold a ("" for the DLQ)
	// and whether it can tell; copies it cannot place are not checked for
	// their place. Nil checks no places.
	Owner func(a *Arrival) (cell string, ok bool)
	// Late lists the events whose latency exceeds it (0: none listed).
	Late time.Duration
}

// Duplicate is an id found more than once.
type Duplicate struct {
	ID     string
	Copies int
	// Where lists each copy as stream:sequence (event ids) or the event
	// ids carrying it (Cell-Msg-Ids).
	Where []string
}

// Misroute is a copy in another cell than the one it belongs to.
type Misroute struct {
	Arrival
	Want string // "" for the DLQ
}

// Reorder is a copy stored in its stream after a copy of a later event of
// the same key.
type Reorder struct {
	Key, Stream string
	Seq         int    // this copy's sequence number
	ID          string // and event id
	StreamSeq   uint64
	After       int // the highest sequence number of the key stored before it
	AfterID     string
}

// Late is an event whose copy arrived later than Options.Late after the
// source stored it.
type Late struct {
	ID, Key, Cell string
	Seq           int
	Source        time.Time // source stream store time
	Latency       time.Duration
}

// Latency summarises, over the events with both store times, the time from
// the source stream storing an event to the first copy being stored.
type Latency struct {
	N             int
	Max, P50, P99 time.Duration
	Late          []Late // by source store time
}

// Result is what Check found. Lists are complete (callers cap what they
// print).
type Result struct {
	Sent    int // events sent
	Arrived int // sent events with at least one copy
	Copies  int // copies of sent events

	Lost             []Sent
	Duplicated       []Duplicate // by event id, in id order
	DuplicatedMsgIDs []Duplicate // by Cell-Msg-Id, in id order
	NoMsgID          int         // copies without a Cell-Msg-Id
	WrongMsgID       []Arrival   // copies whose Cell-Msg-Id is not the sent one
	Misrouted        []Misroute
	Reordered        []Reorder // by key, then stream order
	ReorderedKeys    int       // keys with at least one reordering
	Unknown          []Arrival // copies of events that were not sent
	Latency          Latency
}

// ExactlyOnce reports whether every sent event has exactly one copy, in
// its place, with the right Cell-Msg-Id, and nothing else arrived.
func (r *Result) ExactlyOnce() bool {
	return len(r.Lost) == 0 && len(r.Duplicated) == 0 && len(r.DuplicatedMsgIDs) == 0 && r.NoMsgID == 0 &&
		len(r.WrongMsgID) == 0 && len(r.Misrouted) == 0 && len(r.Unknown) == 0
}

// String is a one-line summary.
func (r *Result) String() string {
	return fmt.Sprintf("sent %d, arrived %d (%d copies): lost %d, duplicated %d (by Cell-Msg-Id %d), misrouted %d, "+
		"wrong or missing Cell-Msg-Id %d, unknown %d; per-key reorderings %d in %d keys; latency max %v p50 %v p99 %v (%d events), %d late",
		r.Sent, r.Arrived, r.Copies, len(r.Lost), len(r.Duplicated), len(r.DuplicatedMsgIDs), len(r.Misrouted),
		len(r.WrongMsgID)+r.NoMsgID, len(r.Unknown), len(r.Reordered), r.ReorderedKeys,
		r.Latency.Max, r.Latency.P50, r.Latency.P99, r.Latency.N, len(r.Latency.Late))
}

// Problems describes the exactly-once violations, at most max of each kind
// (the rest counted), for a test failure.
func (r *Result) Problems(max int) []string {
	var out []string
	list := func(n int, item func(i int) string) {
		for i := range min(n, max) {
			out = append(out, item(i))
		}
		if n > max {
			out = append(out, fmt.Sprintf("... and %d more like the above", n-max))
		}
	}
	list(len(r.Lost), func(i int) string {
		s := r.Lost[i]
		return fmt.Sprintf("lost: event %s (key %s, seq %d) never arrived", s.ID, s.Key, s.Seq)
	})
	list(len(r.Duplicated), func(i int) string {
		d := r.Duplicated[i]
		return fmt.Sprintf("duplicated: event %s arrived %d times (%s)", d.ID, d.Copies, strings.Join(d.Where, ", "))
	})
	list(len(r.DuplicatedMsgIDs), func(i int) string {
		d := r.DuplicatedMsgIDs[i]
		return fmt.Sprintf("duplicated: Cell-Msg-Id %s arrived %d times (events %s)", d.ID, d.Copies, strings.Join(d.Where, ", "))
	})
	if r.NoMsgID > 0 {
		out = append(out, fmt.Sprintf("%d copies without a Cell-Msg-Id", r.NoMsgID))
	}
	list(len(r.WrongMsgID), func(i int) string {
		a := r.WrongMsgID[i]
		return fmt.Sprintf("wrong Cell-Msg-Id: event %s in %s:%d carries %q", a.ID, a.Stream, a.StreamSeq, a.MsgID)
	})
	list(len(r.Misrouted), func(i int) string {
		m := r.Misrouted[i]
		return fmt.Sprintf("misrouted: event %s (key %s) in %s, belongs in %s", m.ID, m.Key, place(m.Cell), place(m.Want))
	})
	list(len(r.Unknown), func(i int) string {
		a := r.Unknown[i]
		return fmt.Sprintf("unknown: %s:%d holds event %s of run %s, which was not sent", a.Stream, a.StreamSeq, a.ID, a.Run)
	})
	return out
}

func place(cell string) string {
	if cell == "" {
		return "the DLQ"
	}
	return "cell " + cell
}

// Check compares what arrived with what was sent.
func Check(sent []Sent, arrivals []Arrival, opts Options) *Result {
	r := &Result{Sent: len(sent)}
	byID := make(map[string]*Sent, len(sent))
	for i := range sent {
		byID[sent[i].ID] = &sent[i]
	}
	copies := map[string][]*Arrival{}
	msgIDs := map[string][]string{}
	for i := range arrivals {
		a := &arrivals[i]
		s := byID[a.ID]
		if s == nil {
			r.Unknown = append(r.Unknown, *a)
			continue
		}
		r.Copies++
		copies[a.ID] = append(copies[a.ID], a)
		switch {
		case a.MsgID == "":
			r.NoMsgID++
		case s.MsgID != "" && a.MsgID != s.MsgID:
			r.WrongMsgID = append(r.WrongMsgID, *a)
		default:
			msgIDs[a.MsgID] = append(msgIDs[a.MsgID], a.ID)
		}
		if opts.Owner != nil {
			if want, ok := opts.Owner(a); ok && want != a.Cell {
				r.Misrouted = append(r.Misrouted, Misroute{Arrival: *a, Want: want})
			}
		}
	}
	var lat []time.Duration
	for i := range sent {
		s := &sent[i]
		cs := copies[s.ID]
		if len(cs) == 0 {
			r.Lost = append(r.Lost, *s)
			continue
		}
		r.Arrived++
		if len(cs) > 1 {
			d := Duplicate{ID: s.ID, Copies: len(cs)}
			for _, a := range cs {
				d.Where = append(d.Where, fmt.Sprintf("%s:%d", a.Stream, a.StreamSeq))
			}
			r.Duplicated = append(r.Duplicated, d)
		}
		if s.Stored.IsZero() {
			continue
		}
		first := cs[0]
		for _, a := range cs[1:] {
			if a.Stored.Before(first.Stored) {
				first = a
			}
		}
		if first.Stored.IsZero() {
			continue
		}
		l := first.Stored.Sub(s.Stored)
		lat = append(lat, l)
		if opts.Late > 0 && l > opts.Late {
			r.Latency.Late = append(r.Latency.Late, Late{ID: s.ID, Key: s.Key, Seq: s.Seq, Cell: first.Cell, Source: s.Stored, Latency: l})
		}
	}
	sort.Slice(r.Duplicated, func(i, j int) bool { return r.Duplicated[i].ID < r.Duplicated[j].ID })
	for _, id := range slices.Sorted(maps.Keys(msgIDs)) {
		if ids := msgIDs[id]; len(ids) > 1 {
			r.DuplicatedMsgIDs = append(r.DuplicatedMsgIDs, Duplicate{ID: id, Copies: len(ids), Where: ids})
		}
	}
	r.Reordered, r.ReorderedKeys = reorderings(arrivals, byID)
	r.Latency.N = len(lat)
	if len(lat) > 0 {
		slices.Sort(lat)
		r.Latency.Max = lat[len(lat)-1]
		r.Latency.P50 = quantile(lat, 0.50)
		r.Latency.P99 = quantile(lat, 0.99)
	}
	sort.Slice(r.Latency.Late, func(i, j int) bool { return r.Latency.Late[i].Source.Before(r.Latency.Late[j].Source) })
	return r
}

// reorderings walks each key's copies in each stream in stream order: a
// copy whose sequence number is below one stored before it in that stream
// is a reordering. A repeated copy of an event already seen in that stream
// is a duplicate, reported as such, and not a reordering: what counts is
// the order of first copies, which is what a consumer that drops repeats
// by their key sees.
func reorderings(arrivals []Arrival, sent map[string]*Sent) ([]Reorder, int) {
	type streamKey struct{ stream, key string }
	groups := map[streamKey][]*Arrival{}
	for i := range arrivals {
		a := &arrivals[i]
		if sent[a.ID] != nil {
			k := streamKey{a.Stream, a.Key}
			groups[k] = append(groups[k], a)
		}
	}
	keys := make([]streamKey, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if keys[i].key != keys[j].key {
			return keys[i].key < keys[j].key
		}
		return keys[i].stream < keys[j].stream
	})
	var out []Reorder
	bad := map[string]bool{}
	for _, k := range keys {
		as := groups[k]
		sort.Slice(as, func(i, j int) bool { return as[i].StreamSeq < as[j].StreamSeq })
		top := as[0]
		seen := map[string]bool{top.ID: true}
		for _, a := range as[1:] {
			if seen[a.ID] {
				continue
			}
			seen[a.ID] = true
			if a.Seq < top.Seq {
				out = append(out, Reorder{Key: k.key, Stream: k.stream, Seq: a.Seq, ID: a.ID, StreamSeq: a.StreamSeq, After: top.Seq, AfterID: top.ID})
				bad[k.key] = true
			} else {
				top = a
			}
		}
	}
	return out, len(bad)
}

// quantile of sorted durations (nearest rank).
func quantile(sorted []time.Duration, q float64) time.Duration {
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
