package router

import (
	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// The rule schema is decoded by internal/strictyaml, which reports every
// problem at once with its line and field path and bounds alias expansion;
// validation then works on the decoded structs and the recorded positions.

// doc is one decoded YAML document: where it is, and the line of every field
// path that was present in it (presence matters: `from: 0` differs from no
// `from`).
type doc struct {
	file  string
	line  int // line of the document's root
	pos   strictyaml.Positions
	probs *Errors
}

// present reports whether the field path was written in the document.
func (d *doc) present(path string) bool { return d.pos.Present(path) }

// lineOf returns the line of path, or of its nearest present parent, or of
// the document.
func (d *doc) lineOf(path string) int {
	if l := d.pos.Line(path); l > 0 {
		return l
	}
	return d.line
}

// errorf records a problem at the line of path.
func (d *doc) errorf(path, format string, a ...any) {
	d.probs.Addf(d.file, d.lineOf(path), path, format, a...)
}

// decode fills v (a pointer to a schema struct) from the document's root
// mapping n, recording positions and problems.
func (d *doc) decode(n *yaml.Node, v any) {
	pos, errs := strictyaml.Decode(d.file, n, v, strictyaml.Options{})
	d.pos = pos
	*d.probs = append(*d.probs, errs...)
}
