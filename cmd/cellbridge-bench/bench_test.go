package main

import (
	"bytes"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

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

// TestVariantsSmoke runs every variant once on a few events through the
// harness: a nats-server process, the variant's own processes (the
// cellbridge binary, or this package's loops), verification; and a
// latency run of B.
func TestVariantsSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers and builds binaries")
	}
	h, err := newHarness(config{seed: 3, rules: "../../bench/rules", rmqRules: "../../bench/rules-rmq"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.close)
	// The loops run as this test binary with -variant-proc: TestMain
	// dispatches to variantProcMain.
	for _, v := range []string{"A", "A-hdrs", "A-kv1", "B", "C", "D", "O", "P", "P2", "A-bc", "B-bc", "R-A", "R-B", "R-C"} {
		t.Run(v, func(t *testing.T) {
			spec := runSpec{Variant: v, N: 2000, Round: 1}
			var r *runResult
			var err error
			if strings.HasPrefix(v, "R-") {
				spec.N = 500
				r, err = h.runRMQ(spec)
			} else {
				r, err = h.runNATS(spec)
			}
			if err != nil {
				t.Fatal(err)
			}
			// CPU time comes in ticks of 10ms: a run this short may read 0.
			if !r.Verified || r.MsgsPerS <= 0 || r.CPUus < 0 {
				t.Fatalf("verified %v (%s), %.0f msg/s, %.1f µs/msg", r.Verified, r.VerifyNote, r.MsgsPerS, r.CPUus)
			}
			if want := spec.N * copiesPerEvent(v, h.table); r.Delivered != want {
				t.Fatalf("%d delivered, want %d", r.Delivered, want)
			}
			// The KV reference also checked its bucket: one key per event.
			if kvWritesOf(v) > 0 && r.Extra["kv_subjects"] != uint64(spec.N) {
				t.Fatalf("KV bucket keys = %v, want %d", r.Extra["kv_subjects"], spec.N)
			}
		})
	}
	t.Run("latency", func(t *testing.T) {
		r, err := h.runNATS(runSpec{Variant: "B", N: 1000, Rate: 2000, Round: 1})
		if err != nil {
			t.Fatal(err)
		}
		l := r.LatencyMS
		if !r.Verified || l == nil || !(l["p50"] > 0 && l["p50"] <= l["p99"] && l["p99"] <= l["max"]) {
			t.Fatalf("verified %v (%s), latency %v", r.Verified, r.VerifyNote, l)
		}
	})
}

func TestLatencyMedianAndRates(t *testing.T) {
	rs := []*runResult{{}, {}, {}}
	for i, p99 := range []float64{30, 10, 20} {
		rs[i].LatencyMS = map[string]float64{"p99": p99}
	}
	if m := latencyMedian(rs, "p99"); m != 20 {
		t.Errorf("median %v, want 20", m)
	}
	lr, err := latencyRates("2000,0.3,0.5", 80000)
	if err != nil {
		t.Fatal(err)
	}
	want := []latRate{{"2000", 2000}, {"30pct", 24000}, {"half_load", 40000}}
	if len(lr) != len(want) {
		t.Fatalf("rates %v, want %v", lr, want)
	}
	for i := range want {
		if lr[i].name != want[i].name || math.Abs(lr[i].rate-want[i].rate) > 1e-6 {
			t.Errorf("rate %d: %v, want %v", i, lr[i], want[i])
		}
	}
	if _, err := latencyRates("x", 1); err == nil {
		t.Error("latencyRates accepts x")
	}
}

// procCPU reads this process's CPU time, which grows while it works.
func TestProcCPU(t *testing.T) {
	a, err := procCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Spin until the reading grows by 50ms of CPU (on a loaded machine the
	// process gets the CPU later, not less of it); the wall limit only
	// catches a reading that never moves.
	b := a
	for end := time.Now().Add(30 * time.Second); b-a < 50*time.Millisecond && time.Now().Before(end); {
		for spin := time.Now().Add(10 * time.Millisecond); time.Now().Before(spin); {
		}
		if b, err = procCPU(os.Getpid()); err != nil {
			t.Fatal(err)
		}
	}
	if b-a < 50*time.Millisecond {
		t.Errorf("30s of spinning: CPU time %v → %v", a, b)
	}
	if procStatusMB(os.Getpid(), "VmRSS:") <= 0 {
		t.Error("no VmRSS")
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

// Figures round half away from zero, negatives included (added latency is
// often negative: truncation made −0.016 read −0.01).
func TestRounding(t *testing.T) {
	for _, c := range []struct{ got, want float64 }{
		{round2(-0.016), -0.02}, {round2(-10.935), -10.94}, {round2(0.015), 0.02}, {round1(-3.35), -3.4},
		{round0(-2.5), -3}, {ratio(-1, 3), -0.333}, {ratio(2, 3), 0.667},
	} {
		if math.Abs(c.got-c.want) > 1e-9 {
			t.Errorf("got %v, want %v", c.got, c.want)
		}
	}
}
