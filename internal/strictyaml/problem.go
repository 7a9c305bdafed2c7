package strictyaml

import (
	"fmt"
	"sort"
	"strings"
)

// Problem is one error located in a YAML file.
type Problem struct {
	File  string // path of the file as the user named it; "" when not about one file
	Line  int    // 1-based; 0 when unknown
	Field string // field path, e.g. "cells[2].failover"; "" for the document or file
	Msg   string
}

// String formats the problem as "file:line: field: message", leaving out the
// line when it is 0, the field when it is "" and the file when it is "".
func (p Problem) String() string {
	var b strings.Builder
	if p.File != "" {
		b.WriteString(p.File)
		if p.Line > 0 {
			fmt.Fprintf(&b, ":%d", p.Line)
		}
		b.WriteString(": ")
	}
	if p.Field != "" {
		b.WriteString(p.Field)
		b.WriteString(": ")
	}
	b.WriteString(p.Msg)
	return b.String()
}

// Errors lists problems; it is an error whose text has one problem per line.
// A function may return Errors or *Errors: errors.As finds either with a
// target of either type (see As).
type Errors []Problem

// As lets errors.As match Errors and *Errors alike: with target *Errors it
// stores the problems, with target **Errors a pointer to them.
func (e Errors) As(target any) bool {
	switch t := target.(type) {
	case *Errors:
		*t = e
		return true
	case **Errors:
		*t = &e
		return true
	}
	return false
}

// Error returns the problems one per line, in list order.
func (e Errors) Error() string {
	lines := make([]string, len(e))
	for i, p := range e {
		lines[i] = p.String()
	}
	return strings.Join(lines, "\n")
}

// Addf appends a problem whose message is formatted from format and a.
func (e *Errors) Addf(file string, line int, field, format string, a ...any) {
	*e = append(*e, Problem{File: file, Line: line, Field: field, Msg: fmt.Sprintf(format, a...)})
}

// Sort orders the problems by file, then line, in place; problems on the same
// line keep the order in which they were found.
func (e Errors) Sort() {
	sort.SliceStable(e, func(i, j int) bool {
		if e[i].File != e[j].File {
			return e[i].File < e[j].File
		}
		return e[i].Line < e[j].Line
	})
}
