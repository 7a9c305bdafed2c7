// Package printer writes a text report to an io.Writer one Printf at a
// time and keeps the first write error, so that a report made of many
// lines checks for a failed write once, at its end (Err), instead of after
// every line. The rules diff (router) and the drill report
// (internal/drill) print through it.
package printer
