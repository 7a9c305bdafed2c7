package printer

import (
	"fmt"
	"io"
)

// Printer formats text to a writer until a write fails; from then on its
// Printf calls write nothing. Not safe for concurrent use.
type Printer struct {
	w   io.Writer
	err error
}

// New returns a Printer that writes to w.
func New(w io.Writer) *Printer { return &Printer{w: w} }

// Printf writes as fmt.Fprintf does, unless an earlier write failed.
func (p *Printer) Printf(format string, a ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format, a...)
	}
}

// Err returns the error of the first write that failed, or nil when every
// write succeeded.
func (p *Printer) Err() error { return p.err }
