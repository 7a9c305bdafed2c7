package natsjs

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

const testRules = `
kind: CellMap
version: 1
shards: 100
global: gz00
cells:
  - {name: rz00, state: active, failover: rz01, shards: ["0-49"]}
  - {name: rz01, state: active, failover: rz00, shards: ["50-99"]}
  - {name: gz00, state: active}
---
kind: TopicRule
name: orders
source: {broker: nats, stream: ORDERS, subject: "orders.>", group: cellbridge-orders}
key: {json: user.id}
shard: {func: digits, from: -3, to: -1}
target: {broker: nats, subject: "cell.{cell}.orders"}
onMissingKey: dlq
dlq: {broker: nats, subject: "dlq.orders"}
---
kind: TopicRule
name: payments
source: {broker: nats, stream: PAYMENTS, subject: "payments.>"}
key: {header: X-User-Id}
shard: {func: digits, from: -3, to: -1}
target: {broker: nats, subject: "cell.{cell}.{topic}.s{shard}"}
onMissingKey: dlq
dlq: {broker: nats, subject: "dlq.payments"}
`

func testTable(t testing.TB) *router.Table {
	t.Helper()
	table, err := router.Parse("rules.yaml", []byte(testRules))
	if err != nil {
		t.Fatal(err)
	}
	return table
}

func TestPlanStreams(t *testing.T) {
	got := PlanStreams(testTable(t), StreamOptions{})
	cell := func(c string) []string {
		return []string{"targets of rule orders in cell " + c, "targets of rule payments in cell " + c}
	}
	want := []StreamPlan{
		{Name: "CELL_GZ00", Subjects: []string{"cell.gz00.*.*", "cell.gz00.orders"}, Uses: cell("gz00")},
		{Name: "CELL_RZ00", Subjects: []string{"cell.rz00.*.*", "cell.rz00.orders"}, Uses: cell("rz00")},
		{Name: "CELL_RZ01", Subjects: []string{"cell.rz01.*.*", "cell.rz01.orders"}, Uses: cell("rz01")},
		{Name: "DLQ", Subjects: []string{"dlq.>"}, Uses: []string{"dead letters of rule orders", "dead letters of rule payments"}},
		{Name: "ORDERS", Subjects: []string{"orders.>"}, Source: true, Uses: []string{"source of rule orders"}},
		{Name: "PAYMENTS", Subjects: []string{"payments.>"}, Source: true, Uses: []string{"source of rule payments"}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("PlanStreams =\n%v\nwant\n%v", got, want)
	}
	if got := PlanStreams(testTable(t), StreamOptions{Broker: "elsewhere"}); len(got) != 0 {
		t.Fatalf("PlanStreams for another broker = %v, want none", got)
	}
}

func TestSubjects(t *testing.T) {
	for _, tc := range []struct {
		a, b             string
		covers, overlaps bool
	}{
		{"a.>", "a.b", true, true},
		{"a.>", "a", false, false},
		{"a.*", "a.b", true, true},
		{"a.*", "a.b.c", false, false},
		{"a.b", "a.*", false, true},
		{"a.*.c", "a.b.*", false, true},
		{"a.b", "a.b", true, true},
		{"a.b", "a.c", false, false},
		{"a.>", "a.*.>", true, true},
		{"*.>", "a.>", true, true},
		{"a.*", "a.>", false, true},
	} {
		if got := covers(tc.a, tc.b); got != tc.covers {
			t.Errorf("covers(%q, %q) = %v", tc.a, tc.b, got)
		}
		if got := overlaps(tc.a, tc.b); got != tc.overlaps {
			t.Errorf("overlaps(%q, %q) = %v", tc.a, tc.b, got)
		}
	}
	if got := minimalSubjects([]string{"x.b", "x.>", "y", "x.>", "y"}); !reflect.DeepEqual(got, []string{"x.>", "y"}) {
		t.Errorf("minimalSubjects = %v", got)
	}
	if got := subjectFilter("cell.{cell}.{topic}.s{shard}", "rz00"); got != "cell.rz00.*.*" {
		t.Errorf("subjectFilter = %q", got)
	}
}

func TestEnsureStreamsCreatesAndUpdates(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	// An existing cell stream with an extra subject keeps it, and its
	// longer duplicate window (2m).
	createStream(t, js, "CELL_RZ00", "legacy.rz00")
	table := testTable(t)
	if err := EnsureStreams(ctx, js, table, StreamOptions{Duplicates: time.Minute}); err != nil {
		t.Fatal(err)
	}
	if err := EnsureStreams(ctx, js, table, StreamOptions{Duplicates: time.Minute}); err != nil {
		t.Fatalf("second run: %v", err)
	}
	for _, p := range PlanStreams(table, StreamOptions{}) {
		st, err := js.Stream(ctx, p.Name)
		if err != nil {
			t.Fatalf("stream %s: %v", p.Name, err)
		}
		cfg := st.CachedInfo().Config
		window := time.Minute
		if p.Name == "CELL_RZ00" {
			window = 2 * time.Minute
		}
		if cfg.Duplicates != window || cfg.Storage != jetstream.FileStorage {
			t.Errorf("stream %s: duplicates %s storage %s", p.Name, cfg.Duplicates, cfg.Storage)
		}
		if p.Name == "CELL_RZ00" {
			p.Subjects = append(p.Subjects, "legacy.rz00") // sorted
		}
		if !reflect.DeepEqual(cfg.Subjects, p.Subjects) {
			t.Errorf("stream %s subjects %v, want %v", p.Name, cfg.Subjects, p.Subjects)
		}
	}

	// The provisioned targets work end to end with the sink's dedupe.
	sink := newSink(t, map[string]jetstream.JetStream{"nats": js}, SinkConfig{})
	for _, subj := range []string{"cell.rz01.orders", "cell.gz00.payments.s07", "dlq.orders"} {
		m := out("nats", subj, "id-"+subj, "x")
		if err := bridge.Publish(ctx, sink, m); err != nil {
			t.Fatalf("publish %s: %v", subj, err)
		}
		if err := bridge.Publish(ctx, sink, m); !errors.Is(err, bridge.ErrDuplicate) {
			t.Fatalf("republish %s: err = %v, want duplicate", subj, err)
		}
	}
}

// A broadcast rule's subject goes only to the streams of the cells it
// selects, and the preflight checks only those.
func TestPlanStreamsBroadcast(t *testing.T) {
	rules := testRules + `---
kind: TopicRule
name: prices
source: {broker: nats, stream: PRICES, subject: "prices.>"}
key: {json: sku}
target: {broker: nats, subject: "cell.{cell}.prices", cells: [rz01]}
dlq: {broker: nats, subject: dlq.prices}
`
	table, err := router.Parse("rules.yaml", []byte(rules))
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range PlanStreams(table, StreamOptions{}) {
		has := slices.Contains(p.Subjects, "cell."+strings.ToLower(strings.TrimPrefix(p.Name, "CELL_"))+".prices")
		if strings.HasPrefix(p.Name, "CELL_") && has != (p.Name == "CELL_RZ01") {
			t.Errorf("stream %s subjects %v", p.Name, p.Subjects)
		}
	}
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	if err := EnsureStreams(ctx, js, table, StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	probs, err := Preflight(ctx, js, table, PreflightOptions{MinWindow: time.Minute})
	if err != nil || len(probs) != 0 {
		t.Fatalf("preflight after EnsureStreams: %v %v", probs, err)
	}
}
