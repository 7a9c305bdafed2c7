package tally

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/goleak"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// run is three keys with three events each, every copy in its cell ("a"
// for key k1 and k2, "b" for k3), in order, 10ms after its source.
func run() ([]Sent, []Arrival) {
	var sent []Sent
	var arr []Arrival
	n := 0
	for seq := 1; seq <= 3; seq++ {
		for _, k := range []string{"k1", "k2", "k3"} {
			n++
			id := fmt.Sprintf("e%d", n)
			src := t0.Add(time.Duration(n) * time.Millisecond)
			sent = append(sent, Sent{ID: id, Key: k, Seq: seq, MsgID: "m" + id, Stored: src})
			cell := "a"
			if k == "k3" {
				cell = "b"
			}
			arr = append(arr, Arrival{Cell: cell, Stream: "CELL_" + strings.ToUpper(cell), StreamSeq: uint64(n), Stored: src.Add(10 * time.Millisecond),
				MsgID: "m" + id, ID: id, Key: k, Seq: seq})
		}
	}
	return sent, arr
}

func owner(a *Arrival) (string, bool) {
	if a.Key == "k3" {
		return "b", true
	}
	return "a", true
}

func TestCheckClean(t *testing.T) {
	sent, arr := run()
	r := Check(sent, arr, Options{Owner: owner, Late: time.Second})
	if !r.ExactlyOnce() || r.Arrived != 9 || r.Copies != 9 || len(r.Reordered) != 0 || r.ReorderedKeys != 0 {
		t.Fatalf("clean run: %v\n%s", r, strings.Join(r.Problems(10), "\n"))
	}
	if r.Latency.N != 9 || r.Latency.Max != 10*time.Millisecond || r.Latency.P50 != 10*time.Millisecond || len(r.Latency.Late) != 0 {
		t.Fatalf("latency %+v", r.Latency)
	}
}

// TestCheckFindsEachViolation breaks one guarantee at a time and expects
// that finding, and only that kind.
func TestCheckFindsEachViolation(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mutate func(sent []Sent, arr []Arrival) ([]Sent, []Arrival)
		want   func(r *Result) bool
	}{
		{"lost", func(s []Sent, a []Arrival) ([]Sent, []Arrival) { return s, a[1:] },
			func(r *Result) bool { return len(r.Lost) == 1 && r.Lost[0].ID == "e1" && r.Arrived == 8 }},
		{"duplicated", func(s []Sent, a []Arrival) ([]Sent, []Arrival) {
			d := a[4]
			d.StreamSeq = 100
			return s, append(a, d)
		}, func(r *Result) bool {
			return len(r.Duplicated) == 1 && r.Duplicated[0].ID == "e5" && r.Duplicated[0].Copies == 2 &&
				len(r.DuplicatedMsgIDs) == 1 && r.Duplicated[0].Where[1] == "CELL_A:100"
		}},
		{"duplicated msg id", func(s []Sent, a []Arrival) ([]Sent, []Arrival) {
			s[1].MsgID, a[1].MsgID = "", a[0].MsgID // the sender does not know the id; the copy repeats another's
			return s, a
		}, func(r *Result) bool {
			return len(r.DuplicatedMsgIDs) == 1 && r.DuplicatedMsgIDs[0].ID == "me1" && len(r.Duplicated) == 0
		}},
		{"wrong msg id", func(s []Sent, a []Arrival) ([]Sent, []Arrival) { a[2].MsgID = "other"; return s, a },
			func(r *Result) bool { return len(r.WrongMsgID) == 1 && r.WrongMsgID[0].ID == "e3" }},
		{"no msg id", func(s []Sent, a []Arrival) ([]Sent, []Arrival) { a[2].MsgID = ""; return s, a },
			func(r *Result) bool { return r.NoMsgID == 1 }},
		{"misrouted", func(s []Sent, a []Arrival) ([]Sent, []Arrival) { a[0].Cell, a[0].Stream = "b", "CELL_B"; return s, a },
			func(r *Result) bool {
				return len(r.Misrouted) == 1 && r.Misrouted[0].ID == "e1" && r.Misrouted[0].Want == "a"
			}},
		{"dead-lettered", func(s []Sent, a []Arrival) ([]Sent, []Arrival) { a[0].Cell, a[0].Stream = "", "DLQ"; return s, a },
			func(r *Result) bool { return len(r.Misrouted) == 1 && r.Misrouted[0].Cell == "" }},
		{"unknown", func(s []Sent, a []Arrival) ([]Sent, []Arrival) {
			return s, append(a, Arrival{Stream: "CELL_A", ID: "x", Run: "other", Key: "k1"})
		}, func(r *Result) bool { return len(r.Unknown) == 1 && r.Copies == 9 }},
		{"reordered", func(s []Sent, a []Arrival) ([]Sent, []Arrival) {
			// k1's seq 1 (e1) stored after its seq 2 and 3: one copy
			// behind two later ones.
			a[0].StreamSeq = 50
			return s, a
		}, func(r *Result) bool {
			return len(r.Reordered) == 1 && r.ReorderedKeys == 1 && r.Reordered[0].ID == "e1" && r.Reordered[0].After == 3 && r.Reordered[0].AfterID == "e7"
		}},
		{"replayed", func(s []Sent, a []Arrival) ([]Sent, []Arrival) {
			// k1's seq 1 (e1) again after its seq 2 and 3, as a replay
			// after a crash stores it: a duplicate, its first copy in order.
			d := a[0]
			d.StreamSeq = 100
			return s, append(a, d)
		}, func(r *Result) bool {
			return len(r.Duplicated) == 1 && r.Duplicated[0].ID == "e1" && len(r.Reordered) == 0 && r.ReorderedKeys == 0
		}},
		{"late", func(s []Sent, a []Arrival) ([]Sent, []Arrival) {
			a[3].Stored = a[3].Stored.Add(5 * time.Second)
			return s, a
		},
			func(r *Result) bool {
				return len(r.Latency.Late) == 1 && r.Latency.Late[0].ID == "e4" && r.Latency.Max == 5*time.Second+10*time.Millisecond
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sent, arr := run()
			sent, arr = tc.mutate(sent, arr)
			r := Check(sent, arr, Options{Owner: owner, Late: time.Second})
			if !tc.want(r) {
				t.Fatalf("%s not found as expected: %v\n%s", tc.name, r, strings.Join(r.Problems(10), "\n"))
			}
			switch tc.name {
			case "reordered", "late":
				if !r.ExactlyOnce() {
					t.Errorf("%s broke exactly-once: %v", tc.name, r)
				}
				if tc.name == "late" && len(r.Reordered) > 0 {
					t.Errorf("late copies reported as reordered: %+v", r.Reordered)
				}
			default:
				if r.ExactlyOnce() {
					t.Errorf("%s: ExactlyOnce", tc.name)
				}
				if len(r.Problems(10)) == 0 {
					t.Errorf("%s: no problem described", tc.name)
				}
			}
		})
	}
}

// TestProblemsCapped lists max of a kind and counts the rest.
func TestProblemsCapped(t *testing.T) {
	sent, _ := run()
	r := Check(sent, nil, Options{})
	p := r.Problems(3)
	if len(p) != 4 || !strings.Contains(p[3], "6 more") {
		t.Fatalf("problems: %q", p)
	}
}

func TestEncodeDecode(t *testing.T) {
	table, err := router.Load("../../deploy/rules")
	if err != nil {
		t.Fatal(err)
	}
	p := Payload{ID: "r-1", Key: "2088000000012345", Seq: 7, Run: "r"}
	for _, topic := range []string{"orders", "payments"} {
		rule := table.Rule(topic)
		h, body, err := Encode(rule, p)
		if err != nil {
			t.Fatal(err)
		}
		key, cause, why := rule.Extract(&router.Message{Header: h, Body: body})
		if key != p.Key || cause != "" {
			t.Errorf("%s: the rule reads key %q (%s %s) from %s %v", topic, key, cause, why, body, h)
		}
		got, err := Decode(body)
		if err != nil || got != p {
			t.Errorf("%s: decoded %+v, %v", topic, got, err)
		}
	}
	if _, err := Decode([]byte(`{"id":"x"}`)); err == nil {
		t.Error("a body without a run decoded")
	}
	if _, err := Decode([]byte(`not json`)); err == nil {
		t.Error("not JSON decoded")
	}
}

// TestSubject puts the key where a subject-token rule reads it, fills the
// filter's other wildcards, and leaves rules keyed elsewhere alone.
func TestSubject(t *testing.T) {
	rule := func(subject string, token int) *router.Rule {
		return &router.Rule{Name: "r", Source: router.Source{Stream: "S", Subject: subject}, Key: router.KeySource{SubjectToken: token}}
	}
	for _, c := range []struct {
		r    *router.Rule
		want string
	}{
		{rule("orders.*.>", 2), "orders.k1.x"},
		{rule("orders.>", 2), "orders.k1"},
		{rule("orders.>", 3), "orders.x.k1"},
		{rule("orders.*.*", -1), "orders.x.k1"},
		{rule("orders.>", 0), "orders.x"},
		{&router.Rule{Source: router.Source{Topic: "T"}}, "T"},
	} {
		got := Subject(c.r, "k1", "x")
		if got != c.want {
			t.Errorf("%s token %d: %q, want %q", c.r.Source.Subject, c.r.Key.SubjectToken, got, c.want)
		}
		if c.r.Key.SubjectToken == 0 {
			continue
		}
		h, body, err := Encode(c.r, Payload{ID: "r-1", Key: "k1", Seq: 1, Run: "r"})
		if err != nil {
			t.Fatal(err)
		}
		if key, cause, why := c.r.Extract(&router.Message{Subject: got, Header: h, Body: body}); key != "k1" {
			t.Errorf("%s: the rule reads %q (%s %s)", got, key, cause, why)
		}
	}
}

// TestReadStream reads a stream back in order, copies of test events
// included, and a missing stream as empty.
func TestReadStream(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "CELL_A", Subjects: []string{"cell.a.>"}}); err != nil {
		t.Fatal(err)
	}
	const n = 2500 // more than one fetch
	for i := range n {
		m := nats.NewMsg("cell.a.orders")
		m.Header.Set("Cell-Msg-Id", fmt.Sprintf("ORDERS:%d", i+1))
		m.Header.Set("Cell-Rules-Version", "3")
		m.Data = fmt.Appendf(nil, `{"id":"r-%d","key":"k%d","seq":%d,"run":"r"}`, i+1, i%7, i/7+1)
		if _, err := js.PublishMsgAsync(m); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		t.Fatal("publish: timeout")
	}
	msgs, err := ReadStream(ctx, js, "CELL_A", time.Second)
	if err != nil || len(msgs) != n {
		t.Fatalf("read %d of %d: %v", len(msgs), n, err)
	}
	for i, m := range msgs {
		a, err := FromMsg("a", "CELL_A", m)
		if err != nil {
			t.Fatal(err)
		}
		if a.StreamSeq != uint64(i+1) || a.ID != fmt.Sprintf("r-%d", i+1) || a.MsgID != fmt.Sprintf("ORDERS:%d", i+1) || a.Version != 3 || a.Stored.IsZero() || a.Run != "r" {
			t.Fatalf("message %d: %+v", i, a)
		}
	}
	if msgs, err := ReadStream(ctx, js, "NONE", time.Second); err != nil || len(msgs) != 0 {
		t.Fatalf("missing stream: %d messages, %v", len(msgs), err)
	}
}
