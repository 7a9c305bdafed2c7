package natsjs

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

func TestPartitionTransform(t *testing.T) {
	cases := []struct {
		subject  string
		token, n int
		dest     string
	}{
		{"ev.*", 2, 4, "n4.{{partition(4,1)}}.ev.{{wildcard(1)}}"},
		{"ev.*", -1, 4, "n4.{{partition(4,1)}}.ev.{{wildcard(1)}}"},
		{"orders.*.>", 2, 12, "n12.{{partition(12,1)}}.orders.{{wildcard(1)}}.>"},
		{"ev.*.*", 3, 8, "n8.{{partition(8,2)}}.ev.{{wildcard(1)}}.{{wildcard(2)}}"},
		{"a.*.b.*.>", 4, 1024, "n1024.{{partition(1024,2)}}.a.{{wildcard(1)}}.b.{{wildcard(2)}}.>"},
	}
	for _, c := range cases {
		tr, err := PartitionTransform(c.subject, c.token, c.n)
		if err != nil || tr.Source != c.subject || tr.Destination != c.dest {
			t.Errorf("PartitionTransform(%q, %d, %d) = %+v, %v; want %q", c.subject, c.token, c.n, tr, err, c.dest)
			continue
		}
		// The server's own parser accepts it.
		if _, err := server.NewSubjectTransform(tr.Source, tr.Destination); err != nil {
			t.Errorf("server refuses %q → %q: %v", tr.Source, tr.Destination, err)
		}
	}
	for _, c := range []struct {
		subject  string
		token, n int
		err      string
	}{
		{"ev.*", 1, 4, `token 1 of the source subject "ev.*" is "ev", not '*'`},
		{"ev.>", 2, 4, "falls inside '>'"},
		{"ev.*", 2, 0, "partitions must be between 1 and 1024, not 0"},
		{"ev.*", 2, 1025, "not 1025"},
	} {
		if _, err := PartitionTransform(c.subject, c.token, c.n); err == nil || !strings.Contains(err.Error(), c.err) {
			t.Errorf("PartitionTransform(%q, %d, %d) error = %v, want %q", c.subject, c.token, c.n, err, c.err)
		}
	}
	if got, want := PartitionDurable("cellbridge-orders", 12, 3), "cellbridge-orders-n12-p3"; got != want {
		t.Errorf("PartitionDurable = %q, want %q", got, want)
	}
	if got, want := PartitionFilter(12, 3), "n12.3.>"; got != want {
		t.Errorf("PartitionFilter = %q, want %q", got, want)
	}
}

// TestPartitionMatchesServer checks router.Partition against the server's
// {{partition}}: the transform object of the server package for many keys,
// and the subjects a real stream stored.
func TestPartitionMatchesServer(t *testing.T) {
	tr, err := PartitionTransform("ev.*.*", 3, 12)
	if err != nil {
		t.Fatal(err)
	}
	st, err := server.NewSubjectTransform(tr.Source, tr.Destination)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 20000 {
		key := fmt.Sprintf("%d", rng.Uint64()>>(i%64))
		if i%3 == 0 {
			key = fmt.Sprintf("user-%x_%d", rng.Uint32(), i)
		}
		got, err := st.Match("ev.orders." + key)
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("n12.%d.ev.orders.%s", router.Partition(key, 12), key)
		if got != want {
			t.Fatalf("server maps key %q to %q, router.Partition gives %q", key, got, want)
		}
	}

	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	stream, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "EV", Subjects: []string{"ev.*.*"}, SubjectTransform: &tr})
	if err != nil {
		t.Fatal(err)
	}
	keys := make([]string, 500)
	for i := range keys {
		keys[i] = fmt.Sprintf("2088%012d", rng.Uint64()%1e12)
		if _, err := js.Publish(ctx, "ev.pay."+keys[i], nil); err != nil {
			t.Fatal(err)
		}
	}
	for i, key := range keys {
		m, err := stream.GetMsg(ctx, uint64(i+1))
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("n12.%d.ev.pay.%s", router.Partition(key, 12), key); m.Subject != want {
			t.Fatalf("stored subject %q, router.Partition says %q", m.Subject, want)
		}
	}
}

func TestCheckTransform(t *testing.T) {
	want, err := PartitionTransform("orders.*.>", 2, 12)
	if err != nil {
		t.Fatal(err)
	}
	cfg := jetstream.StreamConfig{Name: "ORDERS", Subjects: []string{"orders.*.>"}}
	err = CheckTransform(&cfg, want)
	wantText := `natsjs: stream subject transform mismatch: stream ORDERS has subject transform none, but needs "orders.*.>" → "n12.{{partition(12,1)}}.orders.{{wildcard(1)}}.>"; ` +
		"apply it with `cellbridge streams -apply` or `nats stream edit ORDERS --transform-source 'orders.*.>' --transform-destination 'n12.{{partition(12,1)}}.orders.{{wildcard(1)}}.>'` " +
		"(when the stream already holds events, follow the partition cut-over in docs/partitions.md)"
	if !errors.Is(err, ErrTransformMismatch) || err.Error() != wantText {
		t.Errorf("no transform:\n got %v\nwant %s", err, wantText)
	}
	old, _ := PartitionTransform("orders.*.>", 2, 8)
	cfg.SubjectTransform = &old
	err = CheckTransform(&cfg, want)
	if err == nil || !strings.Contains(err.Error(), `stream ORDERS has subject transform "orders.*.>" → "n8.{{partition(8,1)}}.orders.{{wildcard(1)}}.>", but needs "orders.*.>" → "n12.{{partition(12,1)}}.orders.{{wildcard(1)}}.>"`) {
		t.Errorf("other partition count: %v", err)
	}
	cfg.SubjectTransform = &want
	if err := CheckTransform(&cfg, want); err != nil {
		t.Errorf("matching transform refused: %v", err)
	}
}

func TestApplyStreamTransform(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	createStream(t, js, "ORDERS", "orders.*.>")
	if _, err := js.Publish(ctx, "orders.u1.created", nil); err != nil {
		t.Fatal(err)
	}
	want, _ := PartitionTransform("orders.*.>", 2, 4)
	if err := CheckStreamTransform(ctx, js, "ORDERS", want); !errors.Is(err, ErrTransformMismatch) {
		t.Fatalf("CheckStreamTransform before apply = %v, want a mismatch", err)
	}
	ch, err := ApplyStreamTransform(ctx, js, "ORDERS", want)
	if err != nil || !ch.Changed || ch.Old != nil || ch.LastSeq != 1 || ch.New != want {
		t.Fatalf("ApplyStreamTransform = %+v, %v; want changed from none at seq 1", ch, err)
	}
	if err := CheckStreamTransform(ctx, js, "ORDERS", want); err != nil {
		t.Fatalf("CheckStreamTransform after apply: %v", err)
	}
	ack, err := js.Publish(ctx, "orders.u1.created", nil)
	if err != nil {
		t.Fatal(err)
	}
	st, _ := js.Stream(ctx, "ORDERS")
	m, err := st.GetMsg(ctx, ack.Sequence)
	if err != nil {
		t.Fatal(err)
	}
	if wantSubj := fmt.Sprintf("n4.%d.orders.u1.created", router.Partition("u1", 4)); m.Subject != wantSubj {
		t.Errorf("stored %q after apply, want %q", m.Subject, wantSubj)
	}
	if ch, err := ApplyStreamTransform(ctx, js, "ORDERS", want); err != nil || ch.Changed {
		t.Errorf("second apply = %+v, %v; want unchanged", ch, err)
	}
	if _, err := ApplyStreamTransform(ctx, js, "NOPE", want); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("apply to a missing stream = %v, want stream not found", err)
	}
}

func TestEnsureStreamsPartitioned(t *testing.T) {
	rules := strings.Replace(testRules, `source: {broker: nats, stream: PAYMENTS, subject: "payments.>"}
key: {header: X-User-Id}`, `source: {broker: nats, stream: PAYMENTS, subject: "payments.*", partitions: 6}
key: {subjectToken: 2}`, 1)
	table, err := router.Parse("rules.yaml", []byte(rules))
	if err != nil {
		t.Fatal(err)
	}
	want, _ := RuleTransform(table.Rule("payments"))
	for _, p := range PlanStreams(table, StreamOptions{}) {
		switch {
		case p.Name == "PAYMENTS" && (p.Transform == nil || *p.Transform != want):
			t.Errorf("plan for PAYMENTS has transform %v, want %+v", p.Transform, want)
		case p.Name != "PAYMENTS" && p.Transform != nil:
			t.Errorf("plan for %s has a transform %+v", p.Name, *p.Transform)
		}
	}
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	createStream(t, js, "PAYMENTS", "payments.*") // an existing stream gets the transform too
	if err := EnsureStreams(ctx, js, table, StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := CheckStreamTransform(ctx, js, "PAYMENTS", want); err != nil {
		t.Error(err)
	}
	if _, err := RuleTransform(table.Rule("orders")); err == nil {
		t.Error("RuleTransform of a rule that is not partitioned succeeded")
	}
}
