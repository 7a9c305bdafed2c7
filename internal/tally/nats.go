package tally

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
)

// FromMsg reads a copy of a test event from a JetStream message of stream
// (cell "" for the DLQ); an error when the message is not a test event.
func FromMsg(cell, stream string, m jetstream.Msg) (Arrival, error) {
	p, err := Decode(m.Data())
	if err != nil {
		return Arrival{}, err
	}
	a := Arrival{Cell: cell, Stream: stream, Subject: m.Subject(), Run: p.Run, ID: p.ID, Key: p.Key, Seq: p.Seq}
	if md, err := m.Metadata(); err == nil {
		a.StreamSeq, a.Stored = md.Sequence.Stream, md.Timestamp
	}
	h := m.Headers()
	a.MsgID = h.Get(bridge.HeaderMsgID)
	if a.MsgID == "" {
		a.MsgID = h.Get(jetstream.MsgIDHeader) // DLQ copies keep the original headers
	}
	a.Version, _ = strconv.ParseInt(h.Get(bridge.HeaderRulesVersion), 10, 64)
	return a, nil
}

// ReadStream returns every message a stream holds when it is called, in
// stream order, through an ordered consumer (which recreates itself when
// its server goes). A stream that does not exist holds nothing. Each fetch
// and each API call waits at most wait (default 5s); ctx bounds the whole
// read.
func ReadStream(ctx context.Context, js jetstream.JetStream, name string, wait time.Duration) ([]jetstream.Msg, error) {
	if wait <= 0 {
		wait = 5 * time.Second
	}
	// Each API call is bounded by wait too: a request lost while the
	// cluster changes leaders is never answered.
	cctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	st, err := js.Stream(cctx, name)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("tally: stream %s: %w", name, err)
	}
	info := st.CachedInfo()
	first, last := info.State.FirstSeq, info.State.LastSeq
	if info.State.Msgs == 0 {
		return nil, nil
	}
	c, err := st.OrderedConsumer(cctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return nil, fmt.Errorf("tally: reading stream %s: %w", name, err)
	}
	var out []jetstream.Msg
	seen := first - 1 // the last stream sequence read
	for seen < last {
		if err := ctx.Err(); err != nil {
			return out, fmt.Errorf("tally: reading stream %s: %d messages read: %w", name, len(out), err)
		}
		// Never more than remain, so that the fetch completes with its
		// last message instead of waiting out its expiry.
		batch, err := c.Fetch(int(min(last-seen, 1000)), jetstream.FetchMaxWait(wait))
		if err != nil {
			return out, fmt.Errorf("tally: reading stream %s: %w", name, err)
		}
		n := 0
		for m := range batch.Messages() {
			out = append(out, m)
			n++
			if md, err := m.Metadata(); err == nil {
				seen = md.Sequence.Stream
			}
		}
		if err := batch.Error(); err != nil {
			return out, fmt.Errorf("tally: reading stream %s: %w", name, err)
		}
		if n == 0 {
			return out, fmt.Errorf("tally: reading stream %s: %d messages read, nothing more within %s (at sequence %d of %d)", name, len(out), wait, seen, last)
		}
	}
	return out, nil
}
