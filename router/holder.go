package router

import "sync/atomic"

// Holder keeps the current table. Load is one atomic pointer load, for the
// hot path; Store swaps the table for every later Load. Safe for concurrent
// use; the zero Holder holds nil.
type Holder struct{ p atomic.Pointer[Table] }

// NewHolder returns a holder of t.
func NewHolder(t *Table) *Holder {
	h := &Holder{}
	h.p.Store(t)
	return h
}

// Load returns the current table.
func (h *Holder) Load() *Table { return h.p.Load() }

// Store makes t the current table. It does not check versions; Watcher does.
func (h *Holder) Store(t *Table) { h.p.Store(t) }
