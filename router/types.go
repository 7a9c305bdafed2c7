package router

import (
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
	ReasonOwner    Reason = iota + 1 // the shard's owning cell
	ReasonPin                        // the key is pinned to a cell
	ReasonFailover                   // the owner (or pinned cell) is down; its failover cell
	ReasonHeld                       // the shard is blocked: hold the event, forward nothing
	ReasonGlobal                     // no usable key; the global cell (onMissingKey: global)
	ReasonDLQ                        // no usable key, or no rule; the dead-letter target
)

var reasonNames = [...]string{"unknown", "owner", "pin", "failover", "held", "global", "dlq"}

// String returns "owner", "pin", "failover", "held", "global" or "dlq"
// ("unknown" for an invalid value).
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
	Shard   int    `json:"shard"`          // -1 when not computed
	Cell    string `json:"cell,omitempty"` // owning/target cell (for held: the current owner)
	Target  Target `json:"target"`         // the cell target; for dlq the DLQ target; empty for held
	Version int64  `json:"version"`        // rules version that decided
	Reason  Reason `json:"reason"`
	// Explain is a human explanation; always set for dlq, global and held.
	Explain string `json:"explain,omitempty"`
	// Cause is set when the key was unusable (reasons global and dlq): one of
	// the Cause* constants.
	Cause string `json:"cause,omitempty"`
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
