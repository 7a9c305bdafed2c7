package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// The broadcast comparison: every event goes to the four cells of
// bench/rules (rz00, rz01, rz10, rz11), one copy each. A-bc is the bare
// pipe doing that by hand (four publishes with the idempotency key
// <id>@<cell>, the source acked once all four are confirmed); B-bc is
// cellbridge with the same rules except that the topic rule broadcasts
// (target.cells: [rz00, rz01, rz10, rz11]) and the memory dedupe store.
// Same method and child code as the other NATS variants (runChild): events
// pre-published, timing until the cell streams hold four copies of each,
// every copy verified.

// bcSuffix marks the broadcast variants.
const bcSuffix = "-bc"

func init() {
	variantNames["A-bc"] = "A-bc  bare pipe, each event to 4 cells"
	variantNames["B-bc"] = "B-bc  cellbridge broadcast rule, each event to 4 cells, memory dedupe"
}

// broadcastRules writes a rules directory under parent ("": the system's
// temporary directory): the CellMap of dir and the orders rule broadcast to
// cells.
func broadcastRules(dir string, cells []string, parent string) (string, error) {
	out, err := os.MkdirTemp(parent, "cellbridge-bench-bc-")
	if err != nil {
		return "", err
	}
	cm, err := os.ReadFile(filepath.Join(dir, "cells.yaml"))
	if err == nil {
		err = os.WriteFile(filepath.Join(out, "cells.yaml"), cm, 0o644)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(out, "orders.yaml"), []byte(fmt.Sprintf(`kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>", group: cellbridge-orders}
key: {json: user.id}
target: {broker: nats, subject: "cell.{cell}.orders", cells: [%s]}
dlq: {broker: nats, subject: "dlq.orders"}
`, strings.Join(cells, ", "))), 0o644)
	}
	if err != nil {
		os.RemoveAll(out)
		return "", err
	}
	return out, nil
}

// copiesPerEvent is how many copies of each event a variant stores: one per
// cell of the table for the broadcast variants, else one.
func copiesPerEvent(variant string, table *cellTable) int {
	if strings.HasSuffix(variant, bcSuffix) {
		return len(table.cells)
	}
	return 1
}

// runBridgeBroadcast is B-bc: runCellbridge on the broadcast rules.
func runBridgeBroadcast(ctx context.Context, e *env) error {
	dir, err := broadcastRules(e.spec.Rules, e.table.cells, "")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	e.spec.Rules = dir
	return runCellbridge(ctx, e)
}

// verifyBroadcast reads every cell stream back: each must hold every event
// exactly once, under the idempotency key <id>@<cell>. It also records the
// copies and their rate.
func verifyBroadcast(ctx context.Context, js jetstream.JetStream, e *env, res *childResult) error {
	var notes []string
	for _, c := range e.table.cells {
		seen := make([]uint8, res.N)
		held, dups, foreign := 0, 0, 0
		s, err := js.Stream(ctx, streamOf(c))
		if err != nil {
			return err
		}
		oc, err := s.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
		if err != nil {
			return err
		}
		total := int(s.CachedInfo().State.Msgs)
		it, err := oc.Messages(jetstream.PullMaxMessages(4096))
		if err != nil {
			return err
		}
		for range total {
			m, err := it.Next()
			if err != nil {
				it.Stop()
				return fmt.Errorf("verify %s: %w", c, err)
			}
			order, _, ok := parseEvent(m.Data())
			if !ok || order < 0 || order >= res.N || m.Headers().Get(nats.MsgIdHdr) != fmt.Sprintf("o-%d@%s", order, c) {
				foreign++
				continue
			}
			if seen[order]++; seen[order] > 1 {
				dups++
			} else {
				held++
			}
		}
		it.Stop()
		res.Delivered += total
		if held != res.N || dups > 0 || foreign > 0 {
			notes = append(notes, fmt.Sprintf("cell %s holds %d of %d events, %d duplicates, %d other messages (or without the key <id>@%s)",
				c, held, res.N, dups, foreign, c))
		}
		if c == e.table.cells[0] {
			res.Unique = held
		}
	}
	if res.Extra == nil {
		res.Extra = map[string]any{}
	}
	res.Extra["copies"] = res.Delivered
	res.Extra["copies_per_s"] = res.MsgsPerS * float64(len(e.table.cells))
	res.Verified = len(notes) == 0
	res.VerifyNote = strings.Join(notes, "; ")
	return nil
}

// runPipeBroadcast is A-bc: the pipe's consume loop publishing each event to
// every cell (Nats-Msg-Id <id>@<cell>) and acking the source once all its
// copies are confirmed, in order. Tuning as the pipe's window and pull.
func runPipeBroadcast(ctx context.Context, e *env) error {
	pc, err := openPipe(ctx, e)
	if err != nil {
		return err
	}
	defer pc.close()
	e.settings = fmt.Sprintf("window=%d pull=%d, %d copies per event", pc.window, pc.pull, len(e.table.cells))
	type copies struct {
		fs  []jetstream.PubAckFuture
		src jetstream.Msg
	}
	q := make(chan copies, pc.window/len(e.table.cells)+1)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for c := range q {
			ok := true
			for _, f := range c.fs {
				select {
				case <-f.Ok():
				case <-f.Err():
					ok = false
				}
			}
			if ok {
				_ = c.src.Ack()
			} else {
				_ = c.src.Nak()
			}
		}
	}()
	err = pc.consume(ctx, func(m jetstream.Msg) {
		id := m.Headers().Get(nats.MsgIdHdr)
		c := copies{src: m}
		for _, cell := range e.table.cells {
			out := &nats.Msg{Subject: "cell." + cell + ".orders", Data: m.Data(), Header: nats.Header{nats.MsgIdHdr: []string{id + "@" + cell}}}
			f, err := pc.pjs.PublishMsgAsync(out, jetstream.WithStallWait(time.Minute))
			if err != nil {
				_ = m.Nak()
				return
			}
			c.fs = append(c.fs, f)
		}
		q <- c
	})
	close(q)
	<-done
	return err
}
