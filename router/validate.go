package router

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// Limits and defaults of the rule schema.
const (
	// MaxShards bounds the shard space so that compiled tables stay small
	// (one entry per shard and topic rule).
	MaxShards = 100000

	StateActive = "active" // the cell serves its shards
	StateDown   = "down"   // the cell is gone; its shards go to its failover cell

	OnMissingKeyDLQ    = "dlq"    // default: events without a usable key go to the rule's dlq
	OnMissingKeyGlobal = "global" // events without a usable key go to the global cell

	ShardDigits = "digits" // characters [from:to) of the key as a decimal number
	ShardMod    = "mod"    // the whole key as an unsigned decimal integer
	ShardFNV1a  = "fnv1a"  // 32-bit FNV-1a of the key bytes

	// OrderingOrdered (the default for NATS sources): one replica forwards a
	// key at a time, and a takeover re-reads from the ack floor.
	OrderingOrdered = "ordered"
	// OrderingNone: every replica shares one durable consumer; per-key
	// order is not kept across replicas or redeliveries.
	OrderingNone = "none"

	// AcksEach: an ordered NATS source acknowledges every message (the
	// default). AcksCumulative: one acknowledgement for the settled prefix
	// of the stream at a time (JetStream AckPolicy all); less work for the
	// server per message, but while a shard is blocked the ack floor stops
	// at its first held message (docs/rules.md).
	AcksEach       = "each"
	AcksCumulative = "cumulative"

	// MaxPartitions bounds source.partitions: each partition is a durable
	// consumer and a lease renewed every few seconds.
	MaxPartitions = 1024
)

var (
	reName       = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$`)
	reRange      = regexp.MustCompile(`^([0-9]+)(?:-([0-9]+))?$`)
	reHeaderName = regexp.MustCompile("^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
	reJSONPath   = regexp.MustCompile(`^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$`)
	reRMQTopic   = regexp.MustCompile(`^[%|A-Za-z0-9_-]{1,127}$`)
	reBroker     = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
)

// Range is an inclusive range of shard numbers.
type Range struct{ From, To int }

// String renders "7" or "40-44", the syntax of rule files.
func (r Range) String() string {
	if r.From == r.To {
		return strconv.Itoa(r.From)
	}
	return strconv.Itoa(r.From) + "-" + strconv.Itoa(r.To)
}

// MarshalText renders the range like String (JSON: "40-44").
func (r Range) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText parses the syntax of ParseRange.
func (r *Range) UnmarshalText(b []byte) error {
	v, err := ParseRange(string(b))
	if err == nil {
		*r = v
	}
	return err
}

// Len is the number of shards in r.
func (r Range) Len() int { return r.To - r.From + 1 }

// ParseRange parses "7" or "40-44".
func ParseRange(s string) (Range, error) {
	m := reRange.FindStringSubmatch(s)
	if m == nil {
		return Range{}, fmt.Errorf("malformed shard range %q: want N or N-M", s)
	}
	from, err1 := strconv.Atoi(m[1])
	to, err2 := from, error(nil)
	if m[2] != "" {
		to, err2 = strconv.Atoi(m[2])
	}
	if err1 != nil || err2 != nil {
		return Range{}, fmt.Errorf("shard range %q out of range", s)
	}
	if from > to {
		return Range{}, fmt.Errorf("malformed shard range %q: start after end", s)
	}
	return Range{from, to}, nil
}

// runs groups the indices i in [0,n) with ok(i) into ranges.
func runs(n int, ok func(i int) bool) []Range {
	var out []Range
	for i := 0; i < n; i++ {
		if !ok(i) {
			continue
		}
		j := i
		for j+1 < n && ok(j+1) {
			j++
		}
		out = append(out, Range{i, j})
		i = j
	}
	return out
}

func rangesString(rs []Range) string {
	s := make([]string, len(rs))
	for i, r := range rs {
		s[i] = r.String()
	}
	return strings.Join(s, ", ")
}

func shardWord(n int) string {
	if n == 1 {
		return "shard"
	}
	return "shards"
}

// validateCellMap checks the CellMap document and returns a table holding
// what is valid of it, so that topic rules can be checked against it even
// when the map has problems.
func validateCellMap(d *doc, cm *cellMapDoc) *Table {
	t := &Table{cellIdx: map[string]int{}, globalIdx: -1, pins: map[string]int{}, cm: d}
	switch {
	case !d.present("version"):
		d.errorf("version", "missing: a positive integer that increases with every change")
	case cm.Version <= 0:
		d.errorf("version", "must be a positive integer, not %d", cm.Version)
	}
	t.version = cm.Version
	switch {
	case !d.present("shards"):
		d.errorf("shards", "missing: the size of the shard space, e.g. 100")
	case cm.Shards < 1 || cm.Shards > MaxShards:
		d.errorf("shards", "must be between 1 and %d, not %d", MaxShards, cm.Shards)
	default:
		t.shards = cm.Shards
	}

	if len(cm.Cells) == 0 {
		d.errorf("cells", "at least one cell is required")
	}
	firstAt := map[string]string{}
	for i, c := range cm.Cells {
		p := fmt.Sprintf("cells[%d]", i)
		switch {
		case c.Name == "":
			d.errorf(p+".name", "missing")
			continue
		case !reName.MatchString(c.Name):
			d.errorf(p+".name", "%q is not a valid cell name (letters, digits, '_' and '-', at most 64)", c.Name)
			continue
		}
		if first, dup := firstAt[c.Name]; dup {
			d.errorf(p+".name", "duplicate cell %q (first at %s)", c.Name, first)
			continue
		}
		firstAt[c.Name] = fmt.Sprintf("%s.name, line %d", p, d.lineOf(p+".name"))
		state := c.State
		if state == "" {
			state = StateActive
		}
		if state != StateActive && state != StateDown {
			d.errorf(p+".state", "unknown state %q: must be %s or %s", c.State, StateActive, StateDown)
			state = StateActive
		}
		t.cellIdx[c.Name] = len(t.cells)
		t.cells = append(t.cells, Cell{Name: c.Name, City: c.City, State: state, Failover: c.Failover})
		t.cellPath = append(t.cellPath, p)
	}
	for i := range t.cells {
		c, p := &t.cells[i], t.cellPath[i]
		if c.Failover == "" {
			if c.State == StateDown {
				d.errorf(p+".state", "cell %s is down but has no failover cell", c.Name)
			}
			continue
		}
		fi, ok := t.cellIdx[c.Failover]
		switch {
		case c.Failover == c.Name:
			d.errorf(p+".failover", "cell %s cannot fail over to itself", c.Name)
		case !ok:
			d.errorf(p+".failover", "unknown cell %q", c.Failover)
		case t.cells[fi].State == StateDown:
			d.errorf(p+".failover", "failover cell %s is down: name a live failover cell for %s (or none)", c.Failover, c.Name)
		}
	}

	switch gi, ok := t.cellIdx[cm.Global]; {
	case cm.Global == "":
		if d.present("global") {
			d.errorf("global", "must name a cell (omit global for none)")
		}
	case ok:
		t.global, t.globalIdx = cm.Global, gi
	default:
		d.errorf("global", "unknown cell %q", cm.Global)
	}

	t.validateCoverage(d, cm)

	for i, pn := range cm.Pins {
		p := fmt.Sprintf("pins[%d]", i)
		if pn.Key == "" {
			d.errorf(p+".key", "missing")
		}
		ci, ok := t.cellIdx[pn.Cell]
		switch {
		case pn.Cell == "":
			d.errorf(p+".cell", "missing")
		case !ok:
			d.errorf(p+".cell", "unknown cell %q", pn.Cell)
		}
		if pn.Key == "" || !ok {
			continue
		}
		if first, dup := t.pins[pn.Key]; dup {
			d.errorf(p+".key", "key %q is pinned twice (first to %s)", pn.Key, t.pinList[first].Cell)
			continue
		}
		t.pins[pn.Key] = len(t.pinList)
		t.pinList = append(t.pinList, Pin{Key: pn.Key, Cell: pn.Cell})
		t.pinCell = append(t.pinCell, int32(ci))
	}

	if t.shards > 0 {
		t.blocked = make([]bool, t.shards)
	}
	budget := 4*t.shards + 1000
	for i, s := range cm.Blocked {
		p := fmt.Sprintf("blocked[%d]", i)
		r, ok := t.checkRange(d, p, s, true, &budget)
		if !ok {
			continue
		}
		var twice []Range
		n := 0
		for s := r.From; s <= r.To; s++ {
			if !t.blocked[s] {
				t.blocked[s] = true
				continue
			}
			n++
			if k := len(twice); k > 0 && twice[k-1].To == s-1 {
				twice[k-1].To = s
			} else {
				twice = append(twice, Range{s, s})
			}
		}
		if n > 0 {
			d.errorf(p, "%s %s already blocked by an earlier entry", shardWord(n), rangesString(twice))
		}
	}
	return t
}

// checkRange parses the shard range s at path p and checks it against the
// shard space. use is false when the range belongs to an entry already
// reported as invalid: it is parsed but not used. Marking shards is linear in
// the range, so budget cuts a file of many huge overlapping ranges short
// instead of letting it take minutes.
func (t *Table) checkRange(d *doc, p, s string, use bool, budget *int) (Range, bool) {
	r, err := ParseRange(s)
	switch {
	case err != nil:
		d.errorf(p, "%v", err)
		return r, false
	case t.shards == 0 || !use:
		return r, false
	case r.To >= t.shards:
		d.errorf(p, "range %s is outside the shard space 0-%d", r, t.shards-1)
		return r, false
	}
	if *budget -= r.Len(); *budget < 0 {
		if *budget+r.Len() >= 0 {
			d.errorf(p, "the ranges overlap too much to check further; fix the overlaps reported above")
		}
		return r, false
	}
	return r, true
}

// validateCoverage checks that every shard has exactly one owner.
func (t *Table) validateCoverage(d *doc, cm *cellMapDoc) {
	if t.shards > 0 {
		t.owner = make([]int32, t.shards)
		for i := range t.owner {
			t.owner[i] = -1
		}
	}
	budget := 4*t.shards + 1000
	for i, c := range cm.Cells {
		ci, known := t.cellIdx[c.Name]
		if known && t.cellPath[ci] != fmt.Sprintf("cells[%d]", i) {
			known = false // a duplicate entry; already reported
		}
		for j, s := range c.Shards {
			p := fmt.Sprintf("cells[%d].shards[%d]", i, j)
			r, ok := t.checkRange(d, p, s, known, &budget)
			if !ok {
				continue
			}
			// Shards already owned, grouped by their previous owner.
			var twice map[int32][]Range
			for s := r.From; s <= r.To; s++ {
				prev := t.owner[s]
				if prev < 0 {
					t.owner[s] = int32(ci)
					continue
				}
				if twice == nil {
					twice = map[int32][]Range{}
				}
				rs := twice[prev]
				if n := len(rs); n > 0 && rs[n-1].To == s-1 {
					rs[n-1].To = s
				} else {
					rs = append(rs, Range{s, s})
				}
				twice[prev] = rs
			}
			for prev := range t.cells {
				rs := twice[int32(prev)]
				if len(rs) == 0 {
					continue
				}
				n := 0
				for _, x := range rs {
					n += x.Len()
				}
				if prev == ci {
					d.errorf(p, "%s %s listed twice for cell %s", shardWord(n), rangesString(rs), c.Name)
				} else {
					d.errorf(p, "%s %s covered twice: by %s and by %s", shardWord(n), rangesString(rs), t.cells[prev].Name, c.Name)
				}
			}
		}
	}
	for s, o := range t.owner {
		if o < 0 {
			continue
		}
		c := &t.cells[o]
		if n := len(c.Shards); n > 0 && c.Shards[n-1].To == s-1 {
			c.Shards[n-1].To = s
		} else {
			c.Shards = append(c.Shards, Range{s, s})
		}
	}
	if t.shards > 0 && len(t.cells) > 0 {
		if holes := runs(t.shards, func(s int) bool { return t.owner[s] < 0 }); len(holes) > 0 {
			n := 0
			for _, x := range holes {
				n += x.Len()
			}
			d.errorf("cells", "%s %s not covered by any cell", shardWord(n), rangesString(holes))
		}
	}
}
