package drill

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/printer"
	"github.com/cellbridge/cellbridge/router"
)

// Violation kinds, one per guarantee the drill checks.
const (
	KindBlockedForwarded = "blocked_forwarded" // a blocked shard's event reached a cell while blocked
	KindLost             = "lost"              // a published event never arrived
	KindDuplicate        = "duplicate"         // an event (payload id or Cell-Msg-Id) arrived more than once
	KindMsgID            = "msg_id"            // Cell-Msg-Id is not the one derived from the source
	KindOrder            = "order"             // a key's events arrived out of sequence
	KindWrongCell        = "wrong_cell"        // an event is not in the cell its rules version routes it to
	KindOthersStalled    = "others_stalled"    // other shards did not flow while a range was blocked
	KindHeldNotGrowing   = "held_not_growing"  // the held count of the blocked range did not grow
	KindHeldOutside      = "held_outside"      // messages held in shards that are not blocked
	KindNotDrained       = "not_drained"       // held events did not arrive after unblocking
	KindDownCell         = "down_cell"         // an event reached the down cell after the failover
	KindLowerAccepted    = "lower_version"     // a lower rules version was not refused
	KindDLQ              = "dlq"               // a drill event was dead-lettered
	KindFailoverBlocks   = "failover_blocks"   // Diff asks to block a failover
	KindUnknownVersion   = "unknown_version"   // an arrival carries a rules version the drill never wrote
	KindCollect          = "stream_read"       // reading a cell stream failed
)

// Violation is one broken guarantee.
type Violation struct {
	Kind   string `json:"kind"`
	Detail string `json:"detail"`
}

// Phase is one rules version of the drill.
type Phase struct {
	Name      string    `json:"name"`
	Version   int64     `json:"version"`
	Written   time.Time `json:"written"`   // zero for the starting rules
	Effective time.Time `json:"effective"` // when /status first reported the version
	// PerCell counts the events stamped with this version, by cell.
	PerCell map[string]int `json:"perCell"`
	// Tail counts events stamped with this version that arrived after the
	// next version was running (their publish had started before).
	Tail int `json:"tail"`
}

// SwitchReport is the planned switch.
type SwitchReport struct {
	Range          string         `json:"range"`
	From           string         `json:"from"`
	To             string         `json:"to"`
	Blocked        []router.Range `json:"blocked"` // router.Diff's block list
	BlockEffective time.Time      `json:"blockEffective"`
	// Held messages of the blocked ranges in /status: at the first sample
	// of the blocked step, the largest, and at the last sample before
	// unblocking; the age of the oldest; the ranges of the last sample.
	HeldFirst         int                `json:"heldFirst"`
	HeldMax           int                `json:"heldMax"`
	HeldAtUnblock     int                `json:"heldAtUnblock"`
	HeldOldestSeconds float64            `json:"heldOldestSeconds"`
	HeldRanges        []bridge.RangeHeld `json:"heldRanges"`
	// HeldEvents is the number of events of the blocked shards that were
	// stored at the source but had not arrived anywhere when the unblocking
	// rules were written.
	HeldEvents       int       `json:"heldEvents"`
	UnblockWritten   time.Time `json:"unblockWritten"`
	UnblockEffective time.Time `json:"unblockEffective"`
	Drained          time.Time `json:"drained"` // zero when not drained
	// Others: events of the other shards stored at the source, and
	// arrived in their cells, while the range was blocked, and
	// cellbridge_forwarded_total's growth then.
	OthersOffered         int `json:"othersOffered"`
	OthersArrived         int `json:"othersArrived"`
	ForwardedWhileBlocked int `json:"forwardedWhileBlocked"`
	// TailAfterBlock counts events of the blocked shards that arrived after
	// the block was running, decided under the previous rules (their
	// publish had started), and how long after the last one arrived.
	TailAfterBlock     int           `json:"tailAfterBlock"`
	TailAfterBlockLast time.Duration `json:"tailAfterBlockLastNanos"`
}

// RefusedReport is the lower-version check.
type RefusedReport struct {
	Version        int64   `json:"version"`      // written
	Running        int64   `json:"running"`      // running when written
	RunningAfter   int64   `json:"runningAfter"` // running afterwards
	FailuresBefore float64 `json:"failuresBefore"`
	FailuresAfter  float64 `json:"failuresAfter"`
}

// FailoverReport is the disaster failover.
type FailoverReport struct {
	Down          string        `json:"down"`
	To            string        `json:"to"`            // the down cell's failover
	FailoverFixes []string      `json:"failoverFixes"` // other cells' failovers changed to validate
	Moves         []router.Move `json:"moves"`         // router.Diff of the failover
	Effective     time.Time     `json:"effective"`
	// InDownAfter counts events that arrived in the down cell after the
	// failover was running (decided before it).
	InDownAfter int `json:"inDownAfter"`
}

// Report is the outcome of a drill.
type Report struct {
	Run       string         `json:"run"`
	Topic     string         `json:"topic"`
	Rate      int            `json:"rate"`
	Mode      string         `json:"mode"` // how rules were written
	Cells     []string       `json:"cells"`
	Published int            `json:"published"`
	Arrived   int            `json:"arrived"` // distinct events that arrived
	Foreign   int            `json:"foreign"` // other messages seen in the streams (not this run)
	Phases    []*Phase       `json:"phases"`
	Switch    SwitchReport   `json:"switch"`
	Refused   RefusedReport  `json:"refused"`
	Failover  FailoverReport `json:"failover"`
	// KeysMoved counts keys whose events arrived in more than one cell
	// (they crossed the switch or the failover) with their order kept.
	KeysMoved int `json:"keysMoved"`
	// Reorderings counts copies stored after a copy of a later event of
	// their key (within a cell stream, or across cells by store time), in
	// ReorderedKeys keys; each is also an order violation.
	Reorderings   int `json:"reorderings"`
	ReorderedKeys int `json:"reorderedKeys"`
	// Ordering is how the bridge's source consumes the rule, as its
	// /status says: "ordered" (one replica forwards at a time), "ordered,
	// N partitions", "none" (a shared consumer), or "" when it does not say.
	Ordering string `json:"ordering,omitempty"`
	// SourceAcked reports that, before the checks, no consumer of the
	// source stream held an unacknowledged delivery: no redelivery, and so
	// no late duplicate, could arrive after the drill stopped watching.
	// False when the drill does not publish to the source itself (a
	// RocketMQ source) or the acks did not settle within Settle; then
	// duplicates were watched for 0.5s after the last arrival.
	SourceAcked bool        `json:"sourceAcked"`
	Violations  []Violation `json:"violations"`
}

func (d *drill) violate(kind, format string, a ...any) {
	d.rep.Violations = append(d.rep.Violations, Violation{Kind: kind, Detail: fmt.Sprintf(format, a...)})
}

// OK reports whether the drill found no violation.
func (r *Report) OK() bool { return len(r.Violations) == 0 }

// Count returns the number of violations of a kind.
func (r *Report) Count(kind string) int {
	n := 0
	for _, v := range r.Violations {
		if v.Kind == kind {
			n++
		}
	}
	return n
}

func ms(d time.Duration) string { return d.Round(time.Millisecond).String() }

// WriteText prints the report for an operator.
func (r *Report) WriteText(w io.Writer) error {
	pr := printer.New(w)
	pr.Printf("cellbridge drill %s: topic rule %s, %d events/s, rules written by %s\n", r.Run, r.Topic, r.Rate, r.Mode)
	pr.Printf("published %d events, %d arrived\n\n", r.Published, r.Arrived)

	pr.Printf("events per cell by the rules version stamped on them (Cell-Rules-Version):\n")
	tw := tabwriter.NewWriter(w, 2, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "version\t")
	for _, c := range r.Cells {
		fmt.Fprintf(tw, "%s\t", c)
	}
	fmt.Fprint(tw, "after next\t \tphase\n")
	for _, p := range r.Phases {
		fmt.Fprintf(tw, "%d\t", p.Version)
		for _, c := range r.Cells {
			fmt.Fprintf(tw, "%d\t", p.PerCell[c])
		}
		lag := ""
		if !p.Written.IsZero() {
			lag = " (running " + ms(p.Effective.Sub(p.Written)) + " after the write)"
		}
		fmt.Fprintf(tw, "%d\t \t%s\n", p.Tail, p.Name+lag)
	}
	_ = tw.Flush()
	pr.Printf("  (after next: arrived after the next version was running; their publish had started before)\n")

	s := r.Switch
	pr.Printf("\nplanned switch of shards %s: %s → %s\n", s.Range, s.From, s.To)
	pr.Printf("  blocked (router.Diff): %s\n", rangesText(s.Blocked))
	pr.Printf("  held while blocked (/status): %d → %d (max %d), oldest %.1fs", s.HeldFirst, s.HeldAtUnblock, s.HeldMax, s.HeldOldestSeconds)
	for _, h := range s.HeldRanges {
		pr.Printf("; range %s: %d", h.Shards, h.Held)
	}
	pr.Printf("\n")
	pr.Printf("  arrived after the block was running, decided before it (publish in flight): %d", s.TailAfterBlock)
	if s.TailAfterBlock > 0 {
		pr.Printf(", the last %s after", ms(s.TailAfterBlockLast))
	}
	pr.Printf("\n")
	pr.Printf("  other shards while blocked: %d events arrived (%d stored at the source meanwhile); %s grew by %d\n",
		s.OthersArrived, s.OthersOffered, bridge.MetricForwarded, s.ForwardedWhileBlocked)
	if !s.Drained.IsZero() {
		pr.Printf("  unblock → drained: %s after writing the rules, %s after the bridge ran them (%d held events, all in %s)\n",
			ms(s.Drained.Sub(s.UnblockWritten)), ms(s.Drained.Sub(s.UnblockEffective)), s.HeldEvents, s.To)
	} else {
		pr.Printf("  unblock → drained: NOT DRAINED\n")
	}

	f := r.Refused
	pr.Printf("\nlower version: wrote version %d while %d ran: running %d afterwards, %s %.0f → %.0f\n",
		f.Version, f.Running, f.RunningAfter, bridge.MetricRulesReloadFails, f.FailuresBefore, f.FailuresAfter)

	fo := r.Failover
	pr.Printf("\nfailover: %s down → %s\n", fo.Down, fo.To)
	for _, x := range fo.FailoverFixes {
		pr.Printf("  failover fixed so the rules validate: %s\n", x)
	}
	for _, m := range fo.Moves {
		pr.Printf("  %s → %s: shards %s (failover: %v)\n", m.From, m.To, rangesText(m.Ranges), m.Failover)
	}
	pr.Printf("  arrived in %s after the failover was running: %d (decided before it)\n", fo.Down, fo.InDownAfter)
	pr.Printf("\nkeys that moved cell with their order kept: %d\n", r.KeysMoved)
	ordering := r.Ordering
	if ordering == "" {
		ordering = "not reported"
	}
	pr.Printf("per-key reorderings: %d in %d keys (source ordering: %s)\n", r.Reorderings, r.ReorderedKeys, ordering)
	if r.SourceAcked {
		pr.Printf("source: every delivery acknowledged before the checks (no redelivery could follow)\n")
	} else {
		pr.Printf("source: acknowledgements not confirmed; duplicates watched for 0.5s after the last arrival\n")
	}

	if len(r.Violations) == 0 {
		pr.Printf("\nviolations: none\n")
		return pr.Err()
	}
	pr.Printf("\nviolations: %d\n", len(r.Violations))
	kinds := map[string]int{}
	for _, v := range r.Violations {
		kinds[v.Kind]++
	}
	names := make([]string, 0, len(kinds))
	for k := range kinds {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		pr.Printf("  %s: %d\n", k, kinds[k])
	}
	for i, v := range r.Violations {
		if i == 30 {
			pr.Printf("  ... %d more\n", len(r.Violations)-i)
			break
		}
		pr.Printf("  - %s: %s\n", v.Kind, v.Detail)
	}
	return pr.Err()
}

func rangesText(rs []router.Range) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ", ")
}
