package main

import (
	"bytes"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nats-io/nats.go/jetstream"
)

func TestRulesAgreeWithRouter(t *testing.T) {
	for _, dir := range []string{"../../bench/rules", "../../bench/rules-rmq"} {
		abs, err := filepath.Abs(dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := checkRulesAgainstRouter(abs); err != nil {
			t.Errorf("%s: %v", dir, err)
		}
	}
}

func TestEventsRoundTrip(t *testing.T) {
	evs := genEvents(1000, 7)
	again := genEvents(1000, 7)
	cells := map[int]bool{}
	for i, e := range evs {
		if !bytes.Equal(e.body, again[i].body) {
			t.Fatalf("event %d differs between runs with the same seed", i)
		}
		order, user, ok := parseEvent(e.body)
		if !ok || order != i || string(user) != e.user || len(e.user) != 16 {
			t.Fatalf("event %d: parse = %d %q %v; body %s", i, order, user, ok, e.body)
		}
		if orderOfMsgID(e.id) != i {
			t.Fatalf("event %d: id %q", i, e.id)
		}
		sh, ok := shardOf(user)
		want, _ := strconv.Atoi(e.user[13:15])
		if !ok || sh != want {
			t.Fatalf("event %d: shard %d %v, want %d", i, sh, ok, want)
		}
		cells[sh/25] = true
		if n := len(e.body); n < 80 || n > 120 {
			t.Errorf("event %d is %d bytes, want about 100", i, n)
		}
	}
	if len(cells) != 4 {
		t.Errorf("1000 events reach %d of 4 cells", len(cells))
	}
}

// TestVariantsSmoke runs each NATS variant once on a few events through the
// same child code the harness uses (fresh embedded server, verification).
func TestVariantsSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers")
	}
	rules, _ := filepath.Abs("../../bench/rules")
	for _, v := range []string{"A", "A-kv1", "A-kv2", "B", "D", "B-fault", "O", "P"} {
		t.Run(v, func(t *testing.T) {
			res, err := runChild(childSpec{Variant: v, N: 3000, Seed: 3, Rules: rules, Fault: v == "B-fault"})
			if err != nil {
				t.Fatal(err)
			}
			if !res.Verified {
				t.Fatalf("not verified: %s", res.VerifyNote)
			}
			// The KV references also checked their bucket: one key per event.
			if kvWritesOf(v) > 0 && res.Extra["kv_subjects"] != uint64(3000) {
				t.Fatalf("KV bucket keys = %v, want 3000", res.Extra["kv_subjects"])
			}
		})
	}
}

// TestLatencySmoke runs a paced latency run of B: every event arrives and
// gets a latency sample, and the percentiles are ordered.
func TestLatencySmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers")
	}
	rules, _ := filepath.Abs("../../bench/rules")
	res, err := runChild(childSpec{Variant: "B", N: 2000, Seed: 4, Rules: rules, Rate: 4000})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Verified {
		t.Fatalf("not verified: %s", res.VerifyNote)
	}
	l := res.LatencyMS
	if l == nil || !(l["p50"] > 0 && l["p50"] <= l["p99"] && l["p99"] <= l["max"]) {
		t.Fatalf("latency summary %v", l)
	}
}

func TestLatencyMedianAndOrder(t *testing.T) {
	if got := strings.Join(latencyOrder(3), ""); got != "ABABAB" {
		t.Errorf("order %q", got)
	}
	rs := []*runResult{{}, {}, {}}
	for i, p99 := range []float64{30, 10, 20} {
		rs[i].LatencyMS = map[string]float64{"p99": p99}
	}
	if m := latencyMedian(rs, "p99"); m != 20 {
		t.Errorf("median %v, want 20", m)
	}
}

func TestKVNote(t *testing.T) {
	if n := kvNote("b", jetstream.StreamState{Msgs: 5, NumSubjects: 5}, 5); n != "" {
		t.Errorf("full bucket: %q", n)
	}
	for _, st := range []jetstream.StreamState{{Msgs: 4, NumSubjects: 4}, {Msgs: 5, NumSubjects: 4}, {Msgs: 6, NumSubjects: 6}} {
		if kvNote("b", st, 5) == "" {
			t.Errorf("%+v passes for 5 keys", st)
		}
	}
}

func FuzzParseEvent(f *testing.F) {
	f.Add([]byte(`{"user":{"id":"2088000000001234"},"order":17}`))
	f.Add([]byte(`{"order":`))
	f.Add([]byte(`"id":"`))
	f.Fuzz(func(t *testing.T, b []byte) {
		order, user, ok := parseEvent(b)
		if ok && (order < 0 || bytes.IndexByte(user, '"') >= 0) {
			t.Fatalf("parse(%q) = %d %q", b, order, user)
		}
		_, _ = shardOf(user)
	})
}
