package main

import "fmt"

// tally checks the forwarded events as they are read back from the cell
// streams or topics: every order exactly once, each in the cell its shard
// belongs to. The NATS and the RocketMQ runs share it, so that both verify
// the same way.
type tally struct {
	table *cellTable
	res   *childResult
	seen  []uint8 // copies per order, saturating
}

func newTally(table *cellTable, res *childResult, n int) *tally {
	return &tally{table: table, res: res, seen: make([]uint8, n)}
}

// add counts one forwarded event found in cell's stream or topic and
// returns its order number (ok false when the body is not one of the run's
// events).
func (t *tally) add(cell string, body []byte) (order int, ok bool) {
	t.res.Delivered++
	order, user, ok := parseEvent(body)
	if !ok || order < 0 || order >= len(t.seen) {
		t.res.Misrouted++
		return 0, false
	}
	if sh, ok := shardOf(user); !ok || t.table.byShard[sh] != cell {
		t.res.Misrouted++
	}
	if t.seen[order] < 255 {
		t.seen[order]++
	}
	return order, true
}

// notes sets res.Unique and returns what is wrong ("where" names the cell
// streams or topics in the messages); none when every order arrived once in
// its cell.
func (t *tally) notes(where string) []string {
	dups := 0
	for _, s := range t.seen {
		if s > 0 {
			t.res.Unique++
		}
		if s > 1 {
			dups += int(s) - 1
		}
	}
	n := len(t.seen)
	var notes []string
	if t.res.Delivered != n {
		notes = append(notes, fmt.Sprintf("%s hold %d, want %d", where, t.res.Delivered, n))
	}
	if dups > 0 {
		notes = append(notes, fmt.Sprintf("%d duplicates", dups))
	}
	if t.res.Unique != n {
		notes = append(notes, fmt.Sprintf("%d orders missing", n-t.res.Unique))
	}
	if t.res.Misrouted > 0 {
		notes = append(notes, fmt.Sprintf("%d in the wrong cell", t.res.Misrouted))
	}
	return notes
}
