package router

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

// TestResolveReasons covers every reason and every way a key can be unusable.
func TestResolveReasons(t *testing.T) {
	base := mustParse(t, baseRules)
	down := mustParse(t, variant(t, "{name: a0, state: active", "{name: a0, state: down", "failover: a0, shards", "failover: gz00, shards", `- {key: "12345", cell: a1}`, `- {key: "12345", cell: a0}`))
	blocked := mustParse(t, variant(t, "blocked: []", `blocked: ["2-3", "5"]`))
	globalDown := mustParse(t, variant(t, "{name: gz00}", "{name: gz00, state: down, failover: a1}"))
	cases := []struct {
		name  string
		tb    *Table
		topic string
		key   string
		want  Decision
	}{
		{"owner", base, "pay", "13", Decision{Shard: 3, Cell: "a0", Reason: ReasonOwner, Target: Target{"nats", "cell.a0.pay", ""}}},
		{"owner other cell", base, "orders", "9997", Decision{Shard: 7, Cell: "a1", Reason: ReasonOwner, Target: Target{"nats", "cell.a1.orders", ""}}},
		{"pin", base, "pay", "12345", Decision{Shard: 5, Cell: "a1", Reason: ReasonPin, Target: Target{"nats", "cell.a1.pay", ""}}},
		{"pin on another cell's shard", base, "orders", "12345", Decision{Shard: 5, Cell: "a1", Reason: ReasonPin, Target: Target{"nats", "cell.a1.orders", ""}}},
		{"failover", down, "pay", "13", Decision{Shard: 3, Cell: "a1", Reason: ReasonFailover, Target: Target{"nats", "cell.a1.pay", ""}}},
		{"pinned cell down", down, "pay", "12345", Decision{Shard: 5, Cell: "a1", Reason: ReasonFailover, Target: Target{"nats", "cell.a1.pay", ""}}},
		{"held", blocked, "pay", "13", Decision{Shard: 3, Cell: "a0", Reason: ReasonHeld}},
		{"held before pin", blocked, "pay", "12345", Decision{Shard: 5, Cell: "a1", Reason: ReasonHeld}},
		{"held pin names the pinned cell", mustParse(t, variant(t, "blocked: []", `blocked: ["5"]`, `{key: "12345", cell: a1}`, `{key: "12345", cell: a0}`)), "pay", "12345", Decision{Shard: 5, Cell: "a0", Reason: ReasonHeld}},
		{"not blocked neighbour", blocked, "pay", "14", Decision{Shard: 4, Cell: "a0", Reason: ReasonOwner, Target: Target{"nats", "cell.a0.pay", ""}}},
		{"missing key global", base, "pay", "", Decision{Shard: -1, Cell: "gz00", Reason: ReasonGlobal, Cause: CauseMissingKey, Target: Target{"nats", "cell.gz00.pay", ""}}},
		{"bad key global (mod)", base, "pay", "12a", Decision{Shard: -1, Cell: "gz00", Reason: ReasonGlobal, Cause: CauseBadKey, Target: Target{"nats", "cell.gz00.pay", ""}}},
		{"overflow global (mod)", base, "pay", "99999999999999999999999", Decision{Shard: -1, Cell: "gz00", Reason: ReasonGlobal, Cause: CauseBadKey, Target: Target{"nats", "cell.gz00.pay", ""}}},
		{"global cell down", globalDown, "pay", "", Decision{Shard: -1, Cell: "a1", Reason: ReasonGlobal, Cause: CauseMissingKey, Target: Target{"nats", "cell.a1.pay", ""}}},
		{"missing key dlq", base, "orders", "", Decision{Shard: -1, Reason: ReasonDLQ, Cause: CauseMissingKey, Target: Target{"nats", "dlq.orders", ""}}},
		{"non-digit dlq", base, "orders", "12x", Decision{Shard: -1, Reason: ReasonDLQ, Cause: CauseBadKey, Target: Target{"nats", "dlq.orders", ""}}},
		{"unknown topic", base, "nope", "13", Decision{Shard: -1, Reason: ReasonDLQ, Cause: CauseNoRoute}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := c.tb.Resolve(c.topic, c.key)
			if got.Topic != c.topic || got.Key != c.key || got.Version != 3 {
				t.Errorf("topic/key/version = %q/%q/%d", got.Topic, got.Key, got.Version)
			}
			if got.Shard != c.want.Shard || got.Cell != c.want.Cell || got.Reason != c.want.Reason ||
				got.Target != c.want.Target || got.Cause != c.want.Cause {
				t.Errorf("got  %+v\nwant %+v", got, c.want)
			}
			switch got.Reason {
			case ReasonDLQ, ReasonHeld, ReasonGlobal, ReasonFailover:
				if got.Explain == "" {
					t.Errorf("no explanation for %s", got.Reason)
				}
			}
		})
	}
}

func TestRouteExtraction(t *testing.T) {
	tb := mustParse(t, variant(t, "shards: 10", "shards: 100",
		`"0-4"`, `"0-49"`, `"5-9"`, `"50-99"`,
		"shard: {func: digits, from: -1}", "shard: {func: digits, from: -3, to: -1}"))
	subj := mustParse(t, variant(t, "key: {header: X-User-Id}", "key: {subjectToken: -1}"))
	rmq := mustParse(t, variant(t, `source: {broker: nats, stream: PAY, subject: "pay.*"}`, `source: {broker: rmq, topic: pay}`,
		"key: {header: X-User-Id}", "key: {rocketmqKeys: true}"))
	hdr := func(kv ...string) map[string][]string {
		h := map[string][]string{}
		for i := 0; i < len(kv); i += 2 {
			h[kv[i]] = append(h[kv[i]], kv[i+1])
		}
		return h
	}
	cases := []struct {
		name            string
		tb              *Table
		topic           string
		m               Message
		key, cause, why string
		shard           int
	}{
		{"json number keeps 19 digits", tb, "orders", Message{Body: []byte(`{"user":{"id":2088000000012345678}}`)}, "2088000000012345678", "", "", 67},
		{"json string", tb, "orders", Message{Body: []byte(`{"user":{"id":"2088000000000420"}}`)}, "2088000000000420", "", "", 42},
		{"json escaped string", tb, "orders", Message{Body: []byte(`{"user":{"id":"20880000000004\u00320"}}`)}, "2088000000000420", "", "", 42},
		{"json absent", tb, "orders", Message{Body: []byte(`{"user":{}}`)}, "", CauseMissingKey, "json field user.id is absent", -1},
		{"json null", tb, "orders", Message{Body: []byte(`{"user":{"id":null}}`)}, "", CauseMissingKey, "is null", -1},
		{"json empty string", tb, "orders", Message{Body: []byte(`{"user":{"id":""}}`)}, "", CauseMissingKey, "is empty", -1},
		{"json object", tb, "orders", Message{Body: []byte(`{"user":{"id":{"v":1}}}`)}, "", CauseBadKey, "is an object", -1},
		{"json array", tb, "orders", Message{Body: []byte(`{"user":{"id":[1]}}`)}, "", CauseBadKey, "is an array", -1},
		{"json bool", tb, "orders", Message{Body: []byte(`{"user":{"id":true}}`)}, "", CauseBadKey, "is a boolean", -1},
		{"json float", tb, "orders", Message{Body: []byte(`{"user":{"id":1.5e3}}`)}, "1.5e3", CauseBadKey, "non-digit", -1},
		{"json broken body", tb, "orders", Message{Body: []byte(`{"user":`)}, "", CauseBadBody, "body is not valid JSON", -1},
		{"json empty body", tb, "orders", Message{}, "", CauseBadBody, "body is not valid JSON", -1},
		{"json key too short", tb, "orders", Message{Body: []byte(`{"user":{"id":"12"}}`)}, "12", CauseBadKey, "too short", -1},
		{"header exact", tb, "pay", Message{Header: hdr("X-User-Id", "17", "x-user-id", "99")}, "17", "", "", 17},
		{"header case-insensitive", tb, "pay", Message{Header: hdr("x-user-id", "18")}, "18", "", "", 18},
		{"header first value", tb, "pay", Message{Header: hdr("X-User-Id", "19", "X-User-Id", "20")}, "19", "", "", 19},
		{"header absent", tb, "pay", Message{Header: hdr("Other", "1")}, "", CauseMissingKey, "header X-User-Id is absent", -1},
		{"header empty", tb, "pay", Message{Header: hdr("X-User-Id", "")}, "", CauseMissingKey, "header X-User-Id is absent or empty", -1},
		{"subject last token", subj, "pay", Message{Subject: "pay.user.23"}, "23", "", "", 3},
		{"subject no token", subj, "pay", Message{Subject: ""}, "", CauseMissingKey, "has no token -1", -1},
		{"rocketmq first key", rmq, "pay", Message{Keys: " 31 order-9"}, "31", "", "", 1},
		{"rocketmq no keys", rmq, "pay", Message{Keys: "  "}, "", CauseMissingKey, "no RocketMQ keys", -1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := c.m
			d := c.tb.Route(c.topic, &m)
			if d.Key != c.key || d.Cause != c.cause || d.Shard != c.shard {
				t.Fatalf("got key %q cause %q shard %d (%s), want %q %q %d", d.Key, d.Cause, d.Shard, d.Explain, c.key, c.cause, c.shard)
			}
			if c.why != "" && !strings.Contains(d.Explain, c.why) {
				t.Errorf("explain %q does not say %q", d.Explain, c.why)
			}
		})
	}
}

func TestSubjectToken(t *testing.T) {
	for _, c := range []struct {
		s    string
		n    int
		want string
		ok   bool
	}{
		{"a.b.c", 1, "a", true}, {"a.b.c", 3, "c", true}, {"a.b.c", 4, "", false},
		{"a.b.c", -1, "c", true}, {"a.b.c", -3, "a", true}, {"a.b.c", -4, "", false}, {"a", -1, "a", true},
	} {
		if got, ok := subjectToken(c.s, c.n); got != c.want || ok != c.ok {
			t.Errorf("subjectToken(%q, %d) = %q %v", c.s, c.n, got, ok)
		}
	}
}

func TestShardFunctions(t *testing.T) {
	fnv := mustParse(t, variant(t, "shard: {func: mod}", "shard: {func: fnv1a}"))
	// FNV-1a 32 of "a" is 0xe40c292c = 3826002220.
	if d := fnv.Resolve("pay", "a"); d.Shard != 3826002220%10 {
		t.Fatalf("fnv1a shard %d", d.Shard)
	}
	positive := mustParse(t, variant(t, "shard: {func: digits, from: -1}", "shard: {func: digits, from: 1, to: 2}"))
	if d := positive.Resolve("orders", "x7yz"); d.Shard != 7 {
		t.Fatalf("digits [1:2] shard %d (%s)", d.Shard, d.Explain)
	}
	mod := mustParse(t, baseRules)
	if d := mod.Resolve("pay", "18446744073709551615"); d.Shard != 5 { // max uint64 % 10
		t.Fatalf("mod max uint64 shard %d (%s)", d.Shard, d.Explain)
	}
}

func TestShardPlaceholder(t *testing.T) {
	tb := mustParse(t, variant(t, `"cell.{cell}.orders"`, `"cell.{cell}.{topic}.{shard}"`))
	if d := tb.Resolve("orders", "17"); d.Target.Subject != "cell.a1.orders.7" {
		t.Fatalf("got %q", d.Target.Subject)
	}
	if d := tb.Resolve("orders", "12345"); d.Target.Subject != "cell.a1.orders.5" || d.Reason != ReasonPin {
		t.Fatalf("pin got %+v", d)
	}
}

func TestDecisionJSON(t *testing.T) {
	d := mustParse(t, baseRules).Resolve("pay", "13")
	b, err := json.Marshal(d)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"topic":"pay","key":"13","shard":3,"cell":"a0","target":{"broker":"nats","subject":"cell.a0.pay"},"version":3,"reason":"owner","explain":"shard 3 is owned by a0"}`
	if string(b) != want {
		t.Fatalf("got  %s\nwant %s", b, want)
	}
	var back Decision
	if err := json.Unmarshal(b, &back); err != nil || !reflect.DeepEqual(back, d) {
		t.Fatalf("round trip: %v %+v", err, back)
	}
}

func TestResolveDoesNotAllocate(t *testing.T) {
	tb, err := Load("../deploy/rules")
	if err != nil {
		t.Fatal(err)
	}
	m := &Message{Header: map[string][]string{"X-User-Id": {"2088000000012345"}}}
	if n := testing.AllocsPerRun(100, func() { tb.Resolve("payments", "2088000000012345") }); n != 0 {
		t.Errorf("Resolve allocates %v times", n)
	}
	if n := testing.AllocsPerRun(100, func() { tb.Route("payments", m) }); n != 0 {
		t.Errorf("Route with a header key allocates %v times", n)
	}
}

func TestHolder(t *testing.T) {
	a, b := mustParse(t, baseRules), mustParse(t, variant(t, "version: 3", "version: 4"))
	h := NewHolder(a)
	if h.Load() != a {
		t.Fatal("load")
	}
	h.Store(b)
	if h.Load().Version() != 4 {
		t.Fatal("store")
	}
	var zero Holder
	if zero.Load() != nil {
		t.Fatal("zero holder")
	}
}
