package router

import (
	"fmt"
	"slices"
	"strings"

	"gopkg.in/yaml.v3"
)

// Broadcast rules (target.cells) send every event to every selected cell
// instead of the one cell that owns its shard: data every cell reads
// locally, such as price lists, merchant configuration or feature switches.
// They compute no shard; pins and blocked shards do not apply to them.

// CellSelector is a broadcast rule's target.cells as written: every cell
// (All), the listed cells (Cells), or the cells of one city (City). Exactly
// one is set.
type CellSelector struct {
	All   bool
	Cells []string
	City  string
}

// String renders the selector in the syntax of the rule file: "all",
// "[rz00, rz01]" or "{city: hz}".
func (s CellSelector) String() string {
	switch {
	case s.All:
		return "all"
	case s.City != "":
		return "{city: " + s.City + "}"
	}
	return "[" + strings.Join(s.Cells, ", ") + "]"
}

func (s CellSelector) equal(o CellSelector) bool {
	return s.All == o.All && s.City == o.City && slices.Equal(s.Cells, o.Cells)
}

// selects reports whether the selector picks cell c.
func (s CellSelector) selects(c Cell) bool {
	switch {
	case s.All:
		return true
	case s.City != "":
		return c.City == s.City
	}
	return slices.Contains(s.Cells, c.Name)
}

func selectorOf(cd *cellsDoc) *CellSelector {
	switch cd.kind {
	case yaml.ScalarNode:
		return &CellSelector{All: true}
	case yaml.SequenceNode:
		return &CellSelector{Cells: slices.Clone(cd.names)}
	}
	return &CellSelector{City: cd.selector.City}
}

// allCells returns the valid cells of the CellMap.
func (c *ruleChecker) allCells() []Cell { return c.t.cells }

// checkBroadcast validates target.cells and what a broadcast rule must not
// have, and returns the selected cells (all cells when target.cells is
// invalid, so that later checks still run).
func (c *ruleChecker) checkBroadcast(d *doc, r *topicRuleDoc) []Cell {
	if d.present("shard") {
		d.errorf("shard", "a broadcast rule (target.cells) sends every event to every selected cell and computes no shard: remove shard")
	}
	cd := r.Target.Cells
	if cd == nil {
		d.errorf("target.cells", "empty: write all, a list of cells or a selector such as {city: hz}")
		return c.t.cells
	}
	known := len(c.t.cells) > 0 // false when the CellMap is missing or has no valid cell
	switch cd.kind {
	case yaml.ScalarNode:
		if cd.word != "all" {
			d.errorf("target.cells", "unknown value %q: write all, a list of cells such as [rz00, rz01] or a selector such as {city: hz}", cd.word)
		}
		return c.t.cells
	case yaml.SequenceNode:
		if len(cd.names) == 0 {
			d.errorf("target.cells", "empty list: name at least one cell, or write all")
			return c.t.cells
		}
		first := map[string]int{}
		ok := true
		for i, n := range cd.names {
			p := fmt.Sprintf("target.cells[%d]", i)
			_, exists := c.t.cellIdx[n]
			switch j, dup := first[n]; {
			case n == "":
				d.errorf(p, "missing: a cell name")
				ok = false
			case dup:
				d.errorf(p, "cell %s listed twice (first at target.cells[%d])", n, j)
				ok = false
			case known && !exists:
				d.errorf(p, "unknown cell %q", n)
				ok = false
			}
			first[n] = i
		}
		if !ok {
			return c.t.cells
		}
	default:
		city := cd.selector.City
		if city == "" {
			d.errorf("target.cells", "a selector needs city (every cell of one city: {city: hz})")
			return c.t.cells
		}
		sel := CellSelector{City: city}
		if known && !slices.ContainsFunc(c.t.cells, sel.selects) {
			var cities []string
			for _, cl := range c.t.cells {
				if cl.City != "" && !slices.Contains(cities, cl.City) {
					cities = append(cities, cl.City)
				}
			}
			if len(cities) == 0 {
				d.errorf("target.cells.city", "no cell of the CellMap has city %q (no cell names a city: set cells[].city)", city)
			} else {
				d.errorf("target.cells.city", "no cell of the CellMap has city %q (cities: %s)", city, strings.Join(cities, ", "))
			}
		}
	}
	sel := selectorOf(cd)
	var out []Cell
	for _, cl := range c.t.cells {
		if sel.selects(cl) {
			out = append(out, cl)
		}
	}
	return out
}

// checkDistinct reports a broadcast target that renders to the same place
// for two selected cells: both copies would land in one destination.
func (c *ruleChecker) checkDistinct(d *doc, r *topicRuleDoc, t *targetTmpl, cells []Cell) {
	seen := map[Target]string{}
	for _, cl := range cells {
		tg := Target{Broker: t.broker.render(cl.Name, "", r.Name)}
		if t.subject != nil {
			tg.Subject = t.subject.render(cl.Name, "", r.Name)
		} else {
			tg.Topic = t.topic.render(cl.Name, "", r.Name)
		}
		if other, dup := seen[tg]; dup {
			d.errorf("target", "renders to %s for both %s and %s: a broadcast target needs {cell} in broker, subject or topic", tg, other, cl.Name)
			return
		}
		seen[tg] = cl.Name
	}
}

// compileBroadcast precomputes the decision cells of a broadcast rule.
func (r *Rule) compileBroadcast(t *Table) {
	var sent, down []string
	for i, c := range t.cells {
		if !r.Broadcast.selects(c) {
			continue
		}
		bc := BroadcastCell{Cell: c.Name, Target: r.cellTargets[i]}
		if c.State == StateDown {
			bc.Skip = SkipDown
			down = append(down, c.Name)
		} else {
			sent = append(sent, c.Name)
		}
		r.bcast = append(r.bcast, bc)
	}
	r.bcastExplain = broadcastExplain(r.Broadcast, sent, down)
}

func broadcastExplain(sel *CellSelector, sent, down []string) string {
	s := fmt.Sprintf("broadcast (cells %s) to %d %s: %s", sel, len(sent), cellWord(len(sent)), strings.Join(sent, ", "))
	if len(sent) == 0 {
		s = fmt.Sprintf("broadcast (cells %s): no cell gets a copy", sel)
	}
	if len(down) > 0 {
		s += fmt.Sprintf("; skipped (down: missed, replay when back): %s", strings.Join(down, ", "))
	}
	return s
}

func cellWord(n int) string {
	if n == 1 {
		return "cell"
	}
	return "cells"
}

// broadcast is the decision of a broadcast rule for a usable key.
func (r *Rule) broadcast(key string) Decision {
	return Decision{Topic: r.Name, Key: key, Shard: -1, Version: r.t.version, Reason: ReasonBroadcast,
		Explain: r.bcastExplain, Cells: r.bcast}
}

// BroadcastCells returns a copy of the cells a broadcast rule selects under
// this table, with their targets and skips (nil for a routed rule).
func (r *Rule) BroadcastCells() []BroadcastCell { return slices.Clone(r.bcast) }

// ReplayInto returns a table that holds only topic rule rule, broadcasting
// to cell alone, and sending it a copy whatever the cell's state (a cell
// still marked down included): what `cellbridge replay` publishes with. The
// rest of the decision (target, idempotency key, excludeOrigin) is the
// rule's own, so a replayed copy is the copy the bridge would have sent.
// It fails for an unknown rule, a rule that does not broadcast and a cell
// the rule does not select.
func (t *Table) ReplayInto(rule, cell string) (*Table, error) {
	r := t.Rule(rule)
	switch {
	case r == nil:
		return nil, fmt.Errorf("no topic rule %q", rule)
	case r.Broadcast == nil:
		return nil, fmt.Errorf("topic rule %s does not broadcast (no target.cells)", rule)
	}
	i := slices.IndexFunc(r.bcast, func(c BroadcastCell) bool { return c.Cell == cell })
	if i < 0 {
		return nil, fmt.Errorf("topic rule %s does not broadcast to cell %q (target.cells: %s)", rule, cell, r.Broadcast)
	}
	nt := *t
	nr := *r
	nr.t = &nt
	nr.bcast = []BroadcastCell{{Cell: cell, Target: r.bcast[i].Target}}
	nr.bcastExplain = broadcastExplain(r.Broadcast, []string{cell}, nil) + " (replay)"
	nt.rules = []*Rule{&nr}
	nt.byName = map[string]*Rule{rule: &nr}
	return &nt, nil
}
