package router

import (
	"encoding/json"
	"fmt"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// Message is the part of an event that key extraction reads. The router never
// modifies it.
type Message struct {
	Subject string // NATS subject, or RocketMQ topic
	// Header holds NATS headers or RocketMQ user properties. Lookup is exact
	// first, then case-insensitive; the first value counts.
	Header map[string][]string
	Body   []byte
	Keys   string // RocketMQ message keys (space separated); "" on NATS
}

// Reason says why a Decision chose its destination.
type Reason uint8

// Reasons. The zero value is not a valid reason.
const (
	ReasonOwner     Reason = iota + 1 // the shard's owning cell
	ReasonPin                         // the key is pinned to a cell
	ReasonFailover                    // the owner (or pinned cell) is down; its failover cell
	ReasonHeld                        // the shard is blocked: hold the event, forward nothing
	ReasonGlobal                      // no usable key; the global cell (onMissingKey: global)
	ReasonDLQ                         // no usable key, or no rule; the dead-letter target
	ReasonBroadcast                   // a broadcast rule: one copy per selected cell (Decision.Cells)
)

var reasonNames = [...]string{"unknown", "owner", "pin", "failover", "held", "global", "dlq", "broadcast"}

// String returns "owner", "pin", "failover", "held", "global", "dlq" or
// "broadcast" ("unknown" for an invalid value).
func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "unknown"
}

// MarshalText encodes the reason as its name (used by encoding/json).
func (r Reason) MarshalText() ([]byte, error) { return []byte(r.String()), nil }

// UnmarshalText parses a name produced by MarshalText.
func (r *Reason) UnmarshalText(b []byte) error {
	for i, n := range reasonNames[1:] {
		if n == string(b) {
			*r = Reason(i + 1)
			return nil
		}
	}
	return fmt.Errorf("router: unknown reason %q", b)
}

// Cause classifies why an event had no usable key; the values are the
// `reason` label values of the bridge's cellbridge_dlq_total metric.
const (
	CauseMissingKey = "missing_key" // header/field/token absent or empty
	CauseBadKey     = "bad_key"     // present but unusable (non-digit for digits, overflow for mod, wrong JSON type)
	CauseBadBody    = "bad_body"    // the body is not valid JSON
	CauseNoRoute    = "no_route"    // no topic rule of that name
)

// Target is a rendered destination.
type Target struct {
	Broker  string `json:"broker"`            // broker name from the bridge config ({cell} rendered)
	Subject string `json:"subject,omitempty"` // NATS subject (rendered)
	Topic   string `json:"topic,omitempty"`   // RocketMQ topic (rendered)
}

// IsZero reports whether t names no destination (a held decision).
func (t Target) IsZero() bool { return t == Target{} }

// String renders "broker:subject" or "broker:topic".
func (t Target) String() string {
	if t.Subject != "" {
		return t.Broker + ":" + t.Subject
	}
	return t.Broker + ":" + t.Topic
}

// Decision is the router's answer for one event. It holds no references to
// the message.
type Decision struct {
	Topic   string `json:"topic"`          // topic rule name
	Key     string `json:"key"`            // extracted shard key ("" when missing)
	Shard   int    `json:"shard"`          // -1 when not computed (and for a broadcast)
	Cell    string `json:"cell,omitempty"` // owning/target cell (for held: the current owner; "" for a broadcast)
	Target  Target `json:"target"`         // the cell target; for dlq the DLQ target; empty for held and broadcast
	Version int64  `json:"version"`        // rules version that decided
	Reason  Reason `json:"reason"`
	// Explain is a human explanation; always set for dlq, global, held and
	// broadcast.
	Explain string `json:"explain,omitempty"`
	// Cause is set when the key was unusable (reasons global and dlq): one of
	// the Cause* constants.
	Cause string `json:"cause,omitempty"`
	// Cells lists, for reason broadcast, every cell the rule selects, in
	// the order of the CellMap, with its target; a cell with a Skip gets no
	// copy. The slice is shared by every decision of the rules version and
	// must not be modified. The origin's cell (Origin) is not marked in it;
	// Copies and the JSON encoding apply it.
	Cells []BroadcastCell `json:"cells,omitempty"`
	// Origin is the event's Cell-Origin header when the rule excludes the
	// origin (target.excludeOrigin): the cell it came from, which gets no
	// copy.
	Origin string `json:"origin,omitempty"`
}

// BroadcastCell is one cell a broadcast rule selects.
type BroadcastCell struct {
	Cell   string `json:"cell"`
	Target Target `json:"target"`
	// Skip says why the cell gets no copy: SkipDown, SkipOrigin; "" when it
	// gets one.
	Skip string `json:"skip,omitempty"`
}

// Why a selected cell gets no copy of a broadcast event.
const (
	// SkipDown: the cell is down in the CellMap. Its copies are missed, not
	// retried; `cellbridge replay` sends them once the cell is back.
	SkipDown = "down"
	// SkipOrigin: the event came from that cell (its Cell-Origin header)
	// and the rule says excludeOrigin.
	SkipOrigin = "origin"
)

// OriginHeader names the header (NATS) or user property (RocketMQ) that
// carries the cell an event came from; a broadcast rule with excludeOrigin
// sends no copy there. Bridges keep it unchanged on every copy.
const OriginHeader = "Cell-Origin"

// Copies returns the cells that get a copy of a broadcast event: Cells
// without the skipped ones and without the origin. It allocates; the
// bridge walks Cells itself.
func (d Decision) Copies() []BroadcastCell {
	var out []BroadcastCell
	for _, c := range d.explained() {
		if c.Skip == "" {
			out = append(out, c)
		}
	}
	return out
}

// explained returns Cells with the origin's cell marked SkipOrigin (a copy
// when it is marked; Cells itself otherwise).
func (d Decision) explained() []BroadcastCell {
	if d.Origin == "" {
		return d.Cells
	}
	for i, c := range d.Cells {
		if c.Cell == d.Origin && c.Skip == "" {
			out := append([]BroadcastCell(nil), d.Cells...)
			out[i].Skip = SkipOrigin
			return out
		}
	}
	return d.Cells
}

// MarshalJSON encodes the decision with its fields as tagged; for a
// broadcast whose origin is one of its cells, that cell is marked
// "skip":"origin" and the explanation says so.
func (d Decision) MarshalJSON() ([]byte, error) {
	type plain Decision
	if cells := d.explained(); len(cells) > 0 && &cells[0] != &d.Cells[0] {
		d.Cells = cells
		d.Explain += "; no copy to " + d.Origin + ", where the event came from (excludeOrigin)"
	}
	return json.Marshal(plain(d))
}

// Problem is one validation error, located in a rule file: File is the path
// of the rule file ("" for the directory as a whole), Line is 1-based (0 when
// unknown), Field is the field path such as "cells[2].failover" ("" for the
// document). String formats it as "file:line: field: message".
type Problem = strictyaml.Problem

// Errors lists every problem found in a rules directory, sorted by file and
// line; Error returns one problem per line. Load returns it as a *Errors;
// errors.As finds it with a target of type *Errors or Errors.
type Errors = strictyaml.Errors
