package router

import (
	"fmt"
	"io"
	"reflect"
	"sort"
	"strconv"
	"strings"

	"github.com/cellbridge/cellbridge/internal/printer"
)

// Move is a set of shards whose serving cell (the owner, or its failover
// cell when the owner is down) differs between two tables.
type Move struct {
	From   string  `json:"from"` // serving cell in the old table
	To     string  `json:"to"`   // serving cell in the new table
	Ranges []Range `json:"ranges"`
	Count  int     `json:"count"`
	Share  float64 `json:"share"` // Count / shards, 0..1
	// Failover is true when From is down in the new table: the shards move
	// because their cell is gone, so there is nothing to hold them for.
	Failover bool `json:"failover"`
	// AlreadyBlocked is true when the old table already blocks every shard
	// of the move (step 1 of the switch was applied).
	AlreadyBlocked bool `json:"alreadyBlocked"`
}

// PinChange is a pinned key whose cell changes; From or To is "" when the
// pin is added or removed. Cells are serving cells (failover applied).
type PinChange struct {
	Key  string `json:"key"`
	From string `json:"from"`
	To   string `json:"to"`
	// Failover is true when From is down in the new table: nothing to hold
	// the key for (as for a Move).
	Failover bool `json:"failover"`
	// Shards are the shards of the key under the topic rules routed by
	// shard whose cell for the key changes (ascending, without repeats):
	// the switch blocks them, so that the key is held while its data
	// moves (a superset: other keys of those shards are held too). None
	// for a failover, nor when the key's cell stays (a pin removed that
	// pointed where its shard goes anyway).
	Shards []int `json:"shards,omitempty"`
}

// DiffReport is what changes between two rule tables and how to switch
// safely. It is computed by Diff and shared by the CLI and status tooling.
type DiffReport struct {
	OldVersion int64 `json:"oldVersion"`
	NewVersion int64 `json:"newVersion"`
	Shards     int   `json:"shards"` // of the new table
	// Resharded is true when the shard counts differ: shard numbers mean
	// different keys, so every shard must be treated as moving.
	Resharded bool `json:"resharded"`
	// Rekeyed lists the topic rules routed by shard whose key or shard
	// function changes: most of their keys change shard, and so cell, at
	// once. As for a reshard, every shard must be treated as moving (and
	// is in Block).
	Rekeyed   []string    `json:"rekeyed"`
	OldShards int         `json:"oldShards"`
	Moves     []Move      `json:"moves"`
	Moved     int         `json:"moved"` // shards changing serving cell, in all
	Pins      []PinChange `json:"pins"`
	Other     []string    `json:"other"` // other changes, one human-readable line each
	// Block is the blocked list to apply first (with the old owners) so that
	// nothing of a moving shard is forwarded while its data catches up: the
	// shards of every move that is not a failover and of every pin change
	// that is not one (PinChange.Shards), in the old shard space; every
	// shard when Resharded or Rekeyed.
	Block []Range `json:"block"`
}

// Changed reports whether routing differs in any way.
func (r DiffReport) Changed() bool {
	return r.Resharded || len(r.Rekeyed) > 0 || len(r.Moves) > 0 || len(r.Pins) > 0 || len(r.Other) > 0
}

// BlockedList renders Block as the rule-file value, e.g. ["40-44", "60"].
func (r DiffReport) BlockedList() string {
	s := make([]string, len(r.Block))
	for i, b := range r.Block {
		s[i] = strconv.Quote(b.String())
	}
	return "[" + strings.Join(s, ", ") + "]"
}

// Diff compares two valid tables. It does not modify them.
func Diff(prev, next *Table) DiffReport {
	r := DiffReport{OldVersion: prev.version, NewVersion: next.version, Shards: next.shards, OldShards: prev.shards}
	r.Rekeyed = rekeyed(prev, next)
	r.Pins = diffPins(prev, next)
	if prev.shards != next.shards {
		r.Resharded = true
		r.Block = []Range{{0, prev.shards - 1}}
		r.Other = append(r.Other, fmt.Sprintf("shard count %d → %d: every key may change shard", prev.shards, next.shards))
	} else {
		r.Moves = diffMoves(prev, next)
		planned := make([]bool, prev.shards)
		for _, m := range r.Moves {
			r.Moved += m.Count
			if m.Failover {
				continue
			}
			for _, rg := range m.Ranges {
				for s := rg.From; s <= rg.To; s++ {
					planned[s] = true
				}
			}
		}
		for _, p := range r.Pins {
			for _, s := range p.Shards {
				planned[s] = true
			}
		}
		if len(r.Rekeyed) > 0 {
			for s := range planned {
				planned[s] = true
			}
		}
		r.Block = runs(prev.shards, func(s int) bool { return planned[s] })
	}
	for _, name := range r.Rekeyed {
		r.Other = append(r.Other, fmt.Sprintf("topic rule %s: key or shard function changes: its keys may change shard and cell, so every shard is blocked", name))
	}
	r.Other = append(r.Other, diffOther(prev, next)...)
	return r
}

// rekeyed lists the topic rules routed by shard in both tables whose key
// or shard function differs, sorted by name. A rule renamed (gone from
// prev, new in next, reading the same source) counts by its new name: its
// events are the same ones, routed by another key.
func rekeyed(prev, next *Table) []string {
	var out []string
	for _, or := range prev.rules {
		nr := next.byName[or.Name]
		if nr == nil {
			nr = renamedTo(or, prev, next)
		}
		if nr == nil || or.Broadcast != nil || nr.Broadcast != nil {
			continue
		}
		if or.Key != nr.Key || or.Shard != nr.Shard {
			out = append(out, nr.Name)
		}
	}
	sort.Strings(out)
	return out
}

// Rename is a topic rule of one table that reads, under a new name, the
// source of a rule gone from the other.
type Rename struct{ Old, New *Rule }

// Renames lists the topic rules of prev that are gone from next while a rule
// new in next reads the same source (broker, stream, subject, topic and
// tags), in prev's rule order.
func Renames(prev, next *Table) []Rename {
	var out []Rename
	for _, or := range prev.rules {
		if next.byName[or.Name] != nil {
			continue
		}
		if nr := renamedTo(or, prev, next); nr != nil {
			out = append(out, Rename{Old: or, New: nr})
		}
	}
	return out
}

// renamedTo is the rule of next that reads or's source under another name,
// when or is gone from next and that rule is new in it; nil otherwise.
func renamedTo(or *Rule, prev, next *Table) *Rule {
	for _, nr := range next.rules {
		a, b := nr.Source, or.Source
		if prev.byName[nr.Name] == nil && a.Broker == b.Broker && a.Stream == b.Stream && a.Subject == b.Subject &&
			a.Topic == b.Topic && a.Tags == b.Tags {
			return nr
		}
	}
	return nil
}

// pinShards returns the shards of key under the topic rules routed by
// shard whose cell for the key differs between prev and next (its pin, or
// its shard's serving cell): a pin removed where its shard goes to the
// same cell anyway, or added to the cell the shard already goes to,
// blocks nothing. A rule in one table only has no route to compare.
func pinShards(prev, next *Table, key string) []int {
	seen := map[int]bool{}
	for _, r := range next.rules {
		if r.Broadcast != nil {
			continue
		}
		o := prev.Rule(r.Name)
		if o == nil || o.Broadcast != nil {
			continue
		}
		oc, os, ok1 := keyCell(o, key)
		nc, ns, ok2 := keyCell(r, key)
		if !ok1 || !ok2 || oc == nc {
			continue
		}
		for _, s := range []int{os, ns} {
			if s < prev.shards {
				seen[s] = true
			}
		}
	}
	out := make([]int, 0, len(seen))
	for s := range seen {
		out = append(out, s)
	}
	sort.Ints(out)
	return out
}

// keyCell is the cell r (of its table) sends key to, as Resolve decides
// it (its pin, else its shard's serving cell; held shards keep their
// cell), and its shard; false when the key has no shard.
func keyCell(r *Rule, key string) (string, int, bool) {
	d := r.resolve(key)
	if d.Shard < 0 {
		return "", 0, false
	}
	return d.Cell, d.Shard, true
}

func diffMoves(prev, next *Table) []Move {
	type pair struct{ from, to string }
	byPair := map[pair][]bool{}
	var order []pair
	for s := 0; s < next.shards; s++ {
		from, to := prev.route[s].cell, next.route[s].cell
		if from == to {
			continue
		}
		p := pair{from, to}
		if byPair[p] == nil {
			byPair[p] = make([]bool, next.shards)
			order = append(order, p)
		}
		byPair[p][s] = true
	}
	sort.Slice(order, func(i, j int) bool {
		if order[i].from != order[j].from {
			return order[i].from < order[j].from
		}
		return order[i].to < order[j].to
	})
	moves := make([]Move, 0, len(order))
	for _, p := range order {
		set := byPair[p]
		m := Move{From: p.from, To: p.to, Ranges: runs(next.shards, func(s int) bool { return set[s] })}
		m.AlreadyBlocked = true
		for _, rg := range m.Ranges {
			m.Count += rg.Len()
			for s := rg.From; s <= rg.To; s++ {
				m.AlreadyBlocked = m.AlreadyBlocked && prev.blocked[s]
			}
		}
		m.Share = float64(m.Count) / float64(next.shards)
		if c, ok := next.Cell(p.from); ok && c.State == StateDown {
			m.Failover = true
		}
		moves = append(moves, m)
	}
	return moves
}

func diffPins(prev, next *Table) []PinChange {
	cellOf := func(t *Table) map[string]string {
		m := make(map[string]string, len(t.pinList))
		for i, p := range t.pinList {
			m[p.Key] = t.pinRoute[i].cell
		}
		return m
	}
	o, n := cellOf(prev), cellOf(next)
	var out []PinChange
	for k, c := range o {
		if n[k] != c {
			out = append(out, PinChange{Key: k, From: c, To: n[k]})
		}
	}
	for k, c := range n {
		if _, ok := o[k]; !ok {
			out = append(out, PinChange{Key: k, To: c})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	for i := range out {
		p := &out[i]
		if c, ok := next.Cell(p.From); ok && c.State == StateDown {
			p.Failover = true
			continue
		}
		p.Shards = pinShards(prev, next, p.Key)
	}
	return out
}

// diffOther lists changes that move no shard by themselves but matter to an
// operator: cells, failover cells, the global cell, blocked shards, topic rules.
func diffOther(prev, next *Table) []string {
	var out []string
	for _, oc := range prev.cells {
		nc, ok := next.Cell(oc.Name)
		if !ok {
			out = append(out, fmt.Sprintf("cell %s removed", oc.Name))
			continue
		}
		if oc.State != nc.State {
			out = append(out, fmt.Sprintf("cell %s: state %s → %s", oc.Name, oc.State, nc.State))
		}
		if oc.Failover != nc.Failover {
			out = append(out, fmt.Sprintf("cell %s: failover %s → %s", oc.Name, orNone(oc.Failover), orNone(nc.Failover)))
		}
	}
	for _, nc := range next.cells {
		if _, ok := prev.cellIdx[nc.Name]; !ok {
			out = append(out, fmt.Sprintf("cell %s added (%s)", nc.Name, nc.State))
		}
	}
	if prev.global != next.global {
		out = append(out, fmt.Sprintf("global cell %s → %s", orNone(prev.global), orNone(next.global)))
	}
	if ob, nb := rangesString(prev.Blocked()), rangesString(next.Blocked()); ob != nb {
		out = append(out, fmt.Sprintf("blocked [%s] → [%s]", ob, nb))
	}
	for _, or := range prev.rules {
		nr := next.byName[or.Name]
		switch {
		case nr == nil:
			out = append(out, fmt.Sprintf("topic rule %s removed", or.Name))
		case !sameRule(or, nr):
			out = append(out, fmt.Sprintf("topic rule %s changed", or.Name))
		}
		if nr != nil && or.Broadcast != nil && nr.Broadcast != nil {
			if o, n := copyCells(or), copyCells(nr); o != n {
				out = append(out, fmt.Sprintf("topic rule %s broadcasts to [%s] → [%s]", or.Name, o, n))
			}
		}
	}
	for _, nr := range next.rules {
		if prev.byName[nr.Name] == nil {
			out = append(out, fmt.Sprintf("topic rule %s added", nr.Name))
		}
	}
	return out
}

func sameRule(a, b *Rule) bool {
	return a.Source == b.Source && a.Key == b.Key && a.Shard == b.Shard && a.Target == b.Target &&
		a.OnMissingKey == b.OnMissingKey && reflect.DeepEqual(a.DLQ, b.DLQ) &&
		(a.Broadcast == nil) == (b.Broadcast == nil) && (a.Broadcast == nil || a.Broadcast.equal(*b.Broadcast)) &&
		a.ExcludeOrigin == b.ExcludeOrigin
}

// copyCells lists the cells a broadcast rule sends copies to ("rz00, rz01").
func copyCells(r *Rule) string {
	var names []string
	for _, c := range r.bcast {
		if c.Skip == "" {
			names = append(names, c.Cell)
		}
	}
	return strings.Join(names, ", ")
}

func orNone(s string) string {
	if s == "" {
		return "(none)"
	}
	return s
}

// WriteText prints the report for an operator: the moves per (old → new)
// cell pair with their share of all shards, pin changes, other changes, and
// the three-step switch plan with the blocked list to apply first.
func (r DiffReport) WriteText(w io.Writer) error {
	pr := printer.New(w)
	pr.Printf("rules version %d → %d, %d shards\n", r.OldVersion, r.NewVersion, r.Shards)
	if !r.Changed() {
		pr.Printf("no changes: every shard, pin and topic rule routes the same way\n")
		return pr.Err()
	}
	if r.NewVersion <= r.OldVersion {
		pr.Printf("warning: the new version %d is not higher than %d: a running bridge refuses it\n", r.NewVersion, r.OldVersion)
	}
	if len(r.Moves) > 0 {
		pr.Printf("\nshards changing cell (old → new):\n")
		for _, m := range r.Moves {
			note := ""
			switch {
			case m.Failover:
				note = "  (failover: " + m.From + " is down; nothing to block)"
			case m.AlreadyBlocked:
				note = "  (already blocked in the old rules)"
			}
			pr.Printf("  %-6s → %-6s  %-20s %4d %s  %5.1f%%%s\n", m.From, m.To, rangesString(m.Ranges), m.Count,
				shardWord(m.Count), 100*m.Share, note)
		}
		pr.Printf("  total: %d of %d shards (%.1f%%) change cell\n", r.Moved, r.Shards, 100*float64(r.Moved)/float64(max(r.Shards, 1)))
	} else if !r.Resharded && len(r.Rekeyed) == 0 {
		pr.Printf("\nno shard changes cell\n")
	}
	if len(r.Pins) > 0 {
		pr.Printf("\npins:\n")
		for _, p := range r.Pins {
			note := ""
			switch {
			case p.Failover:
				note = "  (failover: " + p.From + " is down; nothing to block)"
			case len(p.Shards) > 0:
				note = "  (" + shardWord(len(p.Shards)) + " " + intsString(p.Shards) + " blocked)"
			default:
				note = "  (the key's cell stays, or no rule routes it: blocks no shard)"
			}
			switch {
			case p.From == "":
				pr.Printf("  %s: added → %s%s\n", p.Key, p.To, note)
			case p.To == "":
				pr.Printf("  %s: removed (was %s)%s\n", p.Key, p.From, note)
			default:
				pr.Printf("  %s: %s → %s%s\n", p.Key, p.From, p.To, note)
			}
		}
	}
	if len(r.Other) > 0 {
		pr.Printf("\nother changes:\n")
		for _, o := range r.Other {
			pr.Printf("  %s\n", o)
		}
	}
	pr.Printf("\n")
	if len(r.Block) == 0 {
		pr.Printf("switch: nothing to block; apply the new rules directly (with a version above %d)\n", r.OldVersion)
		return pr.Err()
	}
	pr.Printf("switch plan:\n")
	pr.Printf("  1. apply the OLD rules with version %d and\n       blocked: %s\n", r.OldVersion+1, r.BlockedList())
	pr.Printf("  2. wait until the data of those shards has caught up in their new cells\n")
	pr.Printf("     (held messages stay in the bridge; cellbridge status shows them)\n")
	pr.Printf("  3. apply the NEW rules with version %d or higher, without those shards in blocked\n", r.OldVersion+2)
	if r.NewVersion < r.OldVersion+2 {
		pr.Printf("     note: the new rules say version %d; raise it to at least %d\n", r.NewVersion, r.OldVersion+2)
	}
	for _, p := range r.Pins {
		if len(p.Shards) > 0 {
			pr.Printf("  note: pinned key %s changes cell: blocked holds its %s %s too (whole shards, not single keys)\n",
				p.Key, shardWord(len(p.Shards)), intsString(p.Shards))
		}
	}
	if r.Resharded || len(r.Rekeyed) > 0 {
		pr.Printf("  note: every shard is blocked (%s): every topic rule routed by shard holds all its events\n", r.everyShardWhy())
		pr.Printf("     until step 3; size pipeline.maxHeld for their whole rate times the block's length\n")
	}
	return pr.Err()
}

// everyShardWhy says why every shard is blocked.
func (r DiffReport) everyShardWhy() string {
	if r.Resharded {
		return fmt.Sprintf("shard count %d → %d", r.OldShards, r.Shards)
	}
	return "key or shard function of " + strings.Join(r.Rekeyed, ", ") + " changes"
}

func intsString(v []int) string {
	s := make([]string, len(v))
	for i, x := range v {
		s[i] = strconv.Itoa(x)
	}
	return strings.Join(s, ", ")
}
