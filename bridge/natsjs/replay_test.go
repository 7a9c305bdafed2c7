package natsjs

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

const replayRules = `kind: CellMap
version: 1
shards: 2
cells:
  - {name: a, failover: b, shards: ["0"]}
  - {name: b, failover: a, shards: ["1"]}
---
kind: TopicRule
name: prices
source: {broker: nats, stream: PRICES, subject: "prices.>"}
key: {header: X-Sku}
target: {broker: nats, subject: "cell.{cell}.prices", cells: all}
dlq: {broker: nats, subject: dlq.prices}
`

// A replay delivers a range of the rule's stream by sequence or store time,
// with the identity the live source gives each message, skips other
// subjects, acknowledges nothing to the server, and reports what it did.
func TestReplayRange(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	createStream(t, js, "PRICES", "prices.>", "other.>")
	tbl, err := router.Parse("r.yaml", []byte(replayRules))
	if err != nil {
		t.Fatal(err)
	}
	var stamps []time.Time
	for i := 1; i <= 10; i++ {
		m := nats.NewMsg(fmt.Sprintf("prices.p%d", i))
		m.Header.Set("X-Sku", "s")
		if i == 4 {
			m.Header.Set(jetstream.MsgIDHeader, "producer-4")
		}
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
		if i == 6 {
			if _, err := js.Publish(ctx, "other.x", nil); err != nil { // seq 7: not the rule's
				t.Fatal(err)
			}
		}
	}
	st, _ := js.Stream(ctx, "PRICES")
	for seq := uint64(1); seq <= 11; seq++ {
		raw, err := st.GetMsg(ctx, seq)
		if err != nil {
			t.Fatal(err)
		}
		stamps = append(stamps, raw.Time)
	}
	run := func(cfg ReplayConfig) ([]*bridge.Message, ReplayReport) {
		t.Helper()
		cfg.Rule = tbl.Rule("prices")
		rp, err := NewReplay(js, cfg, quiet)
		if err != nil {
			t.Fatal(err)
		}
		var got []*bridge.Message
		err = rp.Run(ctx, func(_ context.Context, m *bridge.Message, ack bridge.Ack) error {
			got = append(got, m)
			go func() { _ = ack(context.Background(), nil) }() // settled later, as the pipeline does
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return got, rp.Report()
	}
	subjects := func(ms []*bridge.Message) string {
		var s []string
		for _, m := range ms {
			s = append(s, m.Subject)
		}
		return strings.Join(s, " ")
	}

	got, rep := run(ReplayConfig{FromSeq: 3, ToSeq: 8})
	if s := subjects(got); s != "prices.p3 prices.p4 prices.p5 prices.p6 prices.p7" {
		t.Fatalf("by sequence: %s", s)
	}
	if rep != (ReplayReport{Delivered: 5, Acked: 5, First: 3, Last: 8, End: 8}) {
		t.Fatalf("report %+v", rep)
	}
	if got[0].SourceID != "PRICES:3" || got[1].SourceID != "producer-4" || got[0].Source != "nats/PRICES" ||
		got[0].Rule != "prices" || !got[0].Time.Equal(stamps[2]) {
		t.Fatalf("identity: %+v / %+v", got[0], got[1])
	}

	got, rep = run(ReplayConfig{FromTime: stamps[9]}) // seq 10: p9
	if s := subjects(got); s != "prices.p9 prices.p10" || rep.End != 11 || rep.Acked != 2 {
		t.Fatalf("by time to the end: %s, %+v", s, rep)
	}
	got, _ = run(ReplayConfig{FromTime: stamps[0], ToTime: stamps[1]})
	if s := subjects(got); s != "prices.p1 prices.p2" {
		t.Fatalf("by time range: %s", s)
	}
	if got, rep = run(ReplayConfig{FromSeq: 50}); len(got) != 0 || rep.Delivered != 0 {
		t.Fatalf("beyond the stream: %v %+v", subjects(got), rep)
	}

	// The rule's durable is never created: a replay acknowledges nothing.
	if _, err := js.Consumer(ctx, "PRICES", "cellbridge-prices"); !errors.Is(err, jetstream.ErrConsumerNotFound) {
		t.Fatalf("a replay touched the rule's durable: %v", err)
	}
}

func TestReplayConfigErrors(t *testing.T) {
	tbl, err := router.Parse("r.yaml", []byte(replayRules))
	if err != nil {
		t.Fatal(err)
	}
	r := tbl.Rule("prices")
	now := time.Now()
	for _, tc := range []struct {
		cfg  ReplayConfig
		want string
	}{
		{ReplayConfig{Rule: r}, "give a start sequence or a start time"},
		{ReplayConfig{Rule: r, FromSeq: 1, FromTime: now}, "give a start sequence or a start time"},
		{ReplayConfig{Rule: r, FromSeq: 1, ToSeq: 2, ToTime: now}, "not both"},
		{ReplayConfig{Rule: r, FromSeq: 5, ToSeq: 2}, "end sequence 2 before start 5"},
		{ReplayConfig{Rule: r, FromTime: now, ToTime: now.Add(-time.Second)}, "before start"},
		{ReplayConfig{FromSeq: 1}, "needs a topic rule with a NATS JetStream source"},
	} {
		if _, err := NewReplay(nil, tc.cfg, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.cfg, err, tc.want)
		}
	}
}

// stallingConsumer is a consumer whose Next gives nothing (as while an
// ordered consumer is made again after a fault) for stalls calls once
// after messages have come; stalls < 0: from then on.
type stallingConsumer struct {
	jetstream.Consumer
	after, stalls int
	seen          int
}

func (c *stallingConsumer) Next(opts ...jetstream.FetchOpt) (jetstream.Msg, error) {
	if c.seen == c.after && c.stalls != 0 {
		c.stalls--
		return nil, context.DeadlineExceeded
	}
	m, err := c.Consumer.Next(opts...)
	if err == nil {
		c.seen++
	}
	return m, err
}

// A replay whose consumer gives nothing for a while in the middle of the
// range waits again while messages are pending, and finishes the range;
// one whose consumer gives nothing for good ends with an error that says
// where to go on from, never as if the range were done.
func TestReplayWaitsThroughAStall(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	createStream(t, js, "PRICES", "prices.>")
	tbl, err := router.Parse("r.yaml", []byte(replayRules))
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 10; i++ {
		m := nats.NewMsg(fmt.Sprintf("prices.p%d", i))
		m.Header.Set("X-Sku", "s")
		if _, err := js.PublishMsg(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		after     int // messages before the stall; -1: 0
		stalls    int
		delivered int
		err       string
	}{
		{stalls: 2, delivered: 10},
		{stalls: -1, delivered: 4, err: "the replay is not finished; run it again from -from-seq 5"},
		{after: -1, stalls: -1, delivered: 0, err: "the replay is not finished; run it again from -from-seq 1"},
	} {
		rp, err := NewReplay(js, ReplayConfig{Rule: tbl.Rule("prices"), FromSeq: 1, RequestTimeout: 200 * time.Millisecond}, quiet)
		if err != nil {
			t.Fatal(err)
		}
		cons, err := js.OrderedConsumer(ctx, "PRICES", jetstream.OrderedConsumerConfig{FilterSubjects: []string{"prices.>"}})
		if err != nil {
			t.Fatal(err)
		}
		after := 4
		if tc.after < 0 {
			after = 0
		}
		sc := &stallingConsumer{Consumer: cons, after: after, stalls: tc.stalls}
		err = rp.deliver(ctx, sc, 10, func(_ context.Context, _ *bridge.Message, ack bridge.Ack) error {
			return ack(context.Background(), nil)
		})
		rep := rp.Report()
		switch {
		case tc.err == "" && err != nil:
			t.Fatalf("stalls %d: %v", tc.stalls, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Fatalf("stalls %d: %v, want an error with %q", tc.stalls, err, tc.err)
		case rep.Delivered != tc.delivered:
			t.Fatalf("stalls %d: delivered %d, want %d", tc.stalls, rep.Delivered, tc.delivered)
		}
	}
}
