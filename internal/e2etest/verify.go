package e2etest

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// Verification is what Verify found in the streams.
type Verification struct {
	*tally.Result
	// PerCell counts the copies of test events in each cell's stream
	// ("" for the DLQ).
	PerCell map[string]int
	// Foreign counts messages in those streams that are not test events.
	Foreign int
}

// Verify reads the source stream of topic, every cell stream
// (natsjs.CellStream) and the DLQ stream back, and checks the copies
// against sent with tally.Check: each copy belongs where table routes its
// key for topic, and an event's latency is its first copy's store time
// minus its store time in the source stream (both server clocks), read by
// its Nats-Msg-Id. Events later than late are listed. ctx bounds the reads;
// each stream's read is tried up to three times.
func Verify(ctx context.Context, js jetstream.JetStream, table *router.Table, topic string, sent []tally.Sent, late time.Duration) (*Verification, error) {
	rule := table.Rule(topic)
	if rule == nil || !rule.Source.IsNATS() {
		return nil, fmt.Errorf("e2etest: verify: no topic rule %q with a NATS source", topic)
	}
	sent, err := withStoreTimes(ctx, js, rule.Source.Stream, sent)
	if err != nil {
		return nil, err
	}
	v := &Verification{PerCell: map[string]int{}}
	var arrivals []tally.Arrival
	read := func(cell, stream string) error {
		msgs, err := readStream(ctx, js, stream)
		if err != nil {
			return err
		}
		for _, m := range msgs {
			a, err := tally.FromMsg(cell, stream, m)
			if err != nil {
				v.Foreign++
				continue
			}
			v.PerCell[cell]++
			arrivals = append(arrivals, a)
		}
		return nil
	}
	for _, c := range table.Cells() {
		if err := read(c.Name, natsjs.CellStream(c.Name)); err != nil {
			return nil, err
		}
	}
	if err := read("", natsjs.DLQStream); err != nil {
		return nil, err
	}
	v.Result = tally.Check(sent, arrivals, tally.Options{Late: late, Owner: func(a *tally.Arrival) (string, bool) {
		d := table.Resolve(topic, a.Key)
		switch d.Reason {
		case router.ReasonHeld:
			return "", false // held copies belong nowhere yet
		case router.ReasonDLQ:
			return "", true
		}
		return d.Cell, true
	}})
	return v, nil
}

// withStoreTimes returns a copy of sent with each event's Stored time read
// from the source stream, by its Nats-Msg-Id.
func withStoreTimes(ctx context.Context, js jetstream.JetStream, stream string, sent []tally.Sent) ([]tally.Sent, error) {
	msgs, err := readStream(ctx, js, stream)
	if err != nil {
		return nil, err
	}
	stored := make(map[string]time.Time, len(msgs))
	for _, m := range msgs {
		id := m.Headers().Get(jetstream.MsgIDHeader)
		md, err := m.Metadata()
		if id == "" || err != nil {
			continue
		}
		if _, seen := stored[id]; !seen {
			stored[id] = md.Timestamp
		}
	}
	sent = append([]tally.Sent(nil), sent...)
	for i := range sent {
		if t, ok := stored[sent[i].MsgID]; ok && sent[i].Stored.IsZero() {
			sent[i].Stored = t
		}
	}
	return sent, nil
}

// VerifyCopies checks the copies of a broadcast rule whose source is
// stream source: streams names, per cell, the stream that holds that
// cell's copies; keep, when set, picks the copies among its messages (a
// stream that also holds other traffic). Each cell's copies are checked
// against sent with tally.Check, every copy belonging to its cell: each
// event exactly once per cell, with its Cell-Msg-Id, per key in order
// within the stream; an event's latency in a cell is its copy's store time
// there minus its store time in source (both server clocks). ctx bounds the
// reads.
func VerifyCopies(ctx context.Context, js jetstream.JetStream, source string, streams map[string]string, sent []tally.Sent,
	keep func(cell string, a *tally.Arrival) bool, late time.Duration) (map[string]*tally.Result, error) {
	sent, err := withStoreTimes(ctx, js, source, sent)
	if err != nil {
		return nil, err
	}
	out := map[string]*tally.Result{}
	for cell, stream := range streams {
		msgs, err := readStream(ctx, js, stream)
		if err != nil {
			return nil, err
		}
		var arrivals []tally.Arrival
		for _, m := range msgs {
			a, err := tally.FromMsg(cell, stream, m)
			if err != nil || (keep != nil && !keep(cell, &a)) {
				continue
			}
			arrivals = append(arrivals, a)
		}
		out[cell] = tally.Check(sent, arrivals, tally.Options{Late: late,
			Owner: func(*tally.Arrival) (string, bool) { return cell, true }})
	}
	return out, nil
}

// readStream is tally.ReadStream, tried three times: a read can fail
// while the cluster still elects a leader after a fault.
func readStream(ctx context.Context, js jetstream.JetStream, stream string) ([]jetstream.Msg, error) {
	var err error
	for range 3 {
		var msgs []jetstream.Msg
		if msgs, err = tally.ReadStream(ctx, js, stream, 0); err == nil || ctx.Err() != nil {
			return msgs, err
		}
	}
	return nil, err
}

// Arrived is the number of messages in every cell stream and the DLQ
// stream of table (streams that do not exist hold none). Each request
// waits at most 2s.
func Arrived(ctx context.Context, js jetstream.JetStream, table *router.Table) (uint64, error) {
	streams := []string{natsjs.DLQStream}
	for _, c := range table.Cells() {
		streams = append(streams, natsjs.CellStream(c.Name))
	}
	var n uint64
	for _, name := range streams {
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		st, err := js.Stream(cctx, name)
		cancel()
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			return n, err
		}
		n += st.CachedInfo().State.Msgs
	}
	return n, nil
}
