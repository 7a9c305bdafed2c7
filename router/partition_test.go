package router

import (
	"strings"
	"testing"
)

func TestKeyWildcard(t *testing.T) {
	cases := []struct {
		subject string
		token   int
		want    int
		err     string
	}{
		{"orders.*", 2, 1, ""},
		{"orders.*", -1, 1, ""},
		{"ev.*.*", 3, 2, ""},
		{"ev.*.*", -2, 1, ""},
		{"ev.*.x.*.>", 4, 2, ""},
		{"*.x", 1, 1, ""},
		{"ev.*.*", 1, 0, `token 1 of the source subject "ev.*.*" is "ev", not '*'`},
		{"ev.*.*", 4, 0, `the source subject "ev.*.*" has only 3 tokens, no token 4`},
		{"ev.*.*", -4, 0, `the source subject "ev.*.*" has only 3 tokens, no token -4`},
		{"ev.>", 2, 0, `token 2 of the source subject "ev.>" falls inside '>': write a '*' at that position, e.g. "ev.*.>"`},
		{"ev.>", 3, 0, `e.g. "ev.*.*.>"`},
		{"ev.*.>", -2, 0, "counts from the end, but the source subject"},
		{"ev.*", 0, 0, "token 0 does not exist"},
	}
	for _, c := range cases {
		got, err := KeyWildcard(c.subject, c.token)
		switch {
		case c.err == "" && (err != nil || got != c.want):
			t.Errorf("KeyWildcard(%q, %d) = %d, %v; want %d", c.subject, c.token, got, err, c.want)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("KeyWildcard(%q, %d) error = %v; want it to contain %q", c.subject, c.token, err, c.err)
		}
	}
}

// TestPartitionKnownValues pins the hash to values measured on a
// nats-server stream with {{partition(4,1)}} (the natsjs tests compare it
// with the server for many keys).
func TestPartitionKnownValues(t *testing.T) {
	for key, want := range map[string]int{"u1": 3, "u2": 2} {
		if got := Partition(key, 4); got != want {
			t.Errorf("Partition(%q, 4) = %d, want %d", key, got, want)
		}
	}
}

func TestPartitionedRuleCompiles(t *testing.T) {
	tb := mustParse(t, variant(t, `subject: "pay.*"}`, `subject: "pay.*", partitions: 12}`, "key: {header: X-User-Id}", "key: {subjectToken: -1}"))
	pay, orders := tb.Rule("pay"), tb.Rule("orders")
	if pay.Source.Partitions != 12 || pay.Source.Ordering != OrderingOrdered {
		t.Errorf("pay source = %+v, want 12 partitions, ordered", pay.Source)
	}
	if orders.Source.Partitions != 0 || orders.Source.Ordering != OrderingOrdered {
		t.Errorf("orders source = %+v, want not partitioned, ordered by default", orders.Source)
	}
	if got, want := pay.Partition("2088000000000042"), Partition("2088000000000042", 12); got != want {
		t.Errorf("pay.Partition = %d, want %d", got, want)
	}
	if got := orders.Partition("2088000000000042"); got != -1 {
		t.Errorf("orders.Partition = %d, want -1 (not partitioned)", got)
	}
	cum := mustParse(t, variant(t, `subject: "pay.*"}`, `subject: "pay.*", acks: cumulative}`, "onMissingKey: global\n", "onMissingKey: global\ndlq: {broker: nats, subject: dlq.pay}\n"))
	if got := cum.Rule("pay").Source.Acks; got != AcksCumulative {
		t.Errorf("acks = %q, want cumulative", got)
	}
	none := mustParse(t, variant(t, `subject: "pay.*"}`, `subject: "pay.*", ordering: none}`))
	if got := none.Rule("pay").Source.Ordering; got != OrderingNone {
		t.Errorf("ordering = %q, want none", got)
	}
	// Two rules may read one partitioned stream when they agree on it.
	two := variant(t, `stream: ORDERS, subject: "orders.>"}`, `stream: PAY, subject: "pay.*", partitions: 4}`, "key: {json: user.id}", "key: {subjectToken: 2}",
		`subject: "pay.*"}`, `subject: "pay.*", partitions: 4}`, "key: {header: X-User-Id}", "key: {subjectToken: -1}")
	if p := problemsOf(t, two); p != nil {
		t.Errorf("two rules on one partitioned stream:\n%s", strings.Join(p, "\n"))
	}
}
