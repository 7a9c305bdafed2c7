package natsjs

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

func actionOf(t *testing.T, p *Provisioning, object string) Action {
	t.Helper()
	for _, a := range p.Actions {
		if a.Object == object {
			return a
		}
	}
	t.Fatalf("no action for %s in %+v", object, p.Actions)
	return Action{}
}

// Target subjects another stream captures are left to it; its duplicate
// window is raised, and the planned cell streams are not needed.
func TestProvisionUsesCapturingStream(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "CELLS", Subjects: []string{"cell.>"}, Duplicates: 30 * time.Second}); err != nil {
		t.Fatal(err)
	}
	table := testTable(t)
	opts := ProvisionOptions{Duplicates: 2 * time.Minute}
	p, err := PlanProvision(ctx, js, PlanStreams(table, StreamOptions{}), nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	if a := actionOf(t, p, "stream CELLS"); a.Op != OpUpdate || !strings.Contains(strings.Join(a.Changes, ";"), "duplicate window 30s → 2m") {
		t.Fatalf("CELLS: %+v", a)
	}
	for _, c := range []string{"CELL_RZ00", "CELL_RZ01", "CELL_GZ00"} {
		if a := actionOf(t, p, "stream "+c); a.Op != OpSkip {
			t.Fatalf("%s: %+v, want %q", c, a, OpSkip)
		}
	}
	for _, s := range []string{"ORDERS", "PAYMENTS", "DLQ"} {
		if a := actionOf(t, p, "stream "+s); a.Op != OpCreate {
			t.Fatalf("%s: %+v, want create", s, a)
		}
	}
	if err := p.Apply(ctx); err != nil {
		t.Fatal(err)
	}
	again, err := PlanProvision(ctx, js, PlanStreams(table, StreamOptions{}), nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range again.Actions {
		if a.Op != OpOK && a.Op != OpSkip {
			t.Errorf("after apply: %s %s %v", a.Object, a.Op, a.Changes)
		}
	}
	st, err := js.Stream(ctx, "CELLS")
	if err != nil {
		t.Fatal(err)
	}
	if d := st.CachedInfo().Config.Duplicates; d != 2*time.Minute {
		t.Fatalf("CELLS duplicate window %s, want 2m", d)
	}
}

// Changes that would lose something are refused, each with its reason, and
// Apply then changes nothing.
func TestProvisionRefusesDestructive(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	for _, cfg := range []jetstream.StreamConfig{
		// overlaps cell.rz00.*.* (payments) without capturing it
		{Name: "ONE_SHARD", Subjects: []string{"cell.rz00.payments.s01"}},
		// captures the orders source subject under another name
		{Name: "ALL_ORDERS", Subjects: []string{"orders.>"}},
		// a transform cellbridge did not set
		{Name: "PAYMENTS", Subjects: []string{"payments.>"}, SubjectTransform: &jetstream.SubjectTransformConfig{Source: "payments.>", Destination: "pay.>"}},
		// keeps messages for less than the duplicate window (the server
		// refuses a longer window than the max age)
		{Name: "CELL_GZ00", Subjects: []string{"cell.gz00.*.*", "cell.gz00.orders"}, MaxAge: time.Minute},
	} {
		if _, err := js.CreateStream(ctx, cfg); err != nil {
			t.Fatal(err)
		}
	}
	p, err := PlanProvision(ctx, js, PlanStreams(testTable(t), StreamOptions{}), nil, ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for object, want := range map[string]string{
		"stream CELL_RZ00": "overlaps the subjects [cell.rz00.payments.s01] of stream ONE_SHARD",
		"stream ORDERS":    "captured by stream ALL_ORDERS, but the rules read it from stream ORDERS",
		"stream PAYMENTS":  "which cellbridge did not set",
		"stream CELL_GZ00": "keeps messages for 1m (max age), less than the duplicate window 2m",
	} {
		if a := actionOf(t, p, object); a.Op != OpRefuse || !strings.Contains(a.Refused, want) {
			t.Errorf("%s: %s %q, want refused with %q", object, a.Op, a.Refused, want)
		}
	}
	if n := len(p.Refused()); n != 4 {
		t.Errorf("%d refused, want 4", n)
	}
	if err := p.Apply(ctx); !errors.Is(err, ErrRefused) {
		t.Fatalf("Apply = %v, want ErrRefused", err)
	}
	if _, err := js.Stream(ctx, "CELL_RZ01"); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Fatalf("a refused plan created CELL_RZ01 (%v)", err)
	}
}
