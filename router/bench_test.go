package router

import (
	"fmt"
	"strings"
	"testing"
)

func benchTable(b *testing.B) *Table {
	b.Helper()
	t, err := Load("../deploy/rules")
	if err != nil {
		b.Fatal(err)
	}
	return t
}

// BenchmarkResolve is the hot path with a header-keyed rule: the key is
// already extracted. Target: ≤ 100 ns/op, 0 allocs/op.
func BenchmarkResolve(b *testing.B) {
	t := benchTable(b)
	keys := make([]string, 1024)
	for i := range keys {
		keys[i] = fmt.Sprintf("2088%012d", i*7919)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		d := t.Resolve("payments", keys[i&1023])
		if d.Reason == 0 {
			b.Fatal("no decision")
		}
	}
}

// BenchmarkRouteHeader is extraction from a header plus Resolve.
func BenchmarkRouteHeader(b *testing.B) {
	t := benchTable(b)
	m := &Message{Subject: "payments.created", Header: map[string][]string{
		"X-User-Id": {"2088000000012345"}, "Nats-Msg-Id": {"abc"}, "Content-Type": {"application/json"}}}
	b.ReportAllocs()
	for b.Loop() {
		if d := t.Route("payments", m); d.Reason != ReasonOwner {
			b.Fatal(d.Explain)
		}
	}
}

// body1KiB builds a realistic ~1 KiB order event with the user id after
// most of the payload, so that the extractor has to scan it.
func body1KiB() []byte {
	var items []string
	for i := 0; i < 8; i++ {
		items = append(items, fmt.Sprintf(`{"sku":"SKU-%06d","name":"item number %d with a longer name","qty":%d,"price":"%d.99"}`, i*31, i, i+1, i*10))
	}
	s := fmt.Sprintf(`{"orderId":"o-20261125-000123","createdAt":"2026-11-25T18:00:00Z","items":[%s],"shipping":{"city":"Hangzhou","street":"1 West Lake Road"},"user":{"name":"someone","id":2088000000012345678}}`,
		strings.Join(items, ","))
	for len(s) < 1024 {
		s = strings.Replace(s, `"orderId"`, `"note":"padding padding padding",`+`"orderId"`, 1)
	}
	return []byte(s)
}

// BenchmarkRouteJSON is key extraction from a 1 KiB JSON body plus Resolve.
// Target: ≤ 1 µs/op.
func BenchmarkRouteJSON(b *testing.B) {
	t := benchTable(b)
	m := &Message{Subject: "orders.created", Body: body1KiB()}
	b.SetBytes(int64(len(m.Body)))
	b.ReportAllocs()
	for b.Loop() {
		if d := t.Route("orders", m); d.Reason != ReasonOwner {
			b.Fatal(d.Explain)
		}
	}
}

// BenchmarkLoad compiles the example rules (what a reload costs).
func BenchmarkLoad(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load("../deploy/rules"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRouteJSONFront is the same body with the user first: the common
// case where the key is near the start costs a fraction of the worst case.
func BenchmarkRouteJSONFront(b *testing.B) {
	t := benchTable(b)
	body := body1KiB()
	user := `"user":{"name":"someone","id":2088000000012345678}`
	s := strings.Replace(string(body), ","+user, "", 1)
	m := &Message{Subject: "orders.created", Body: []byte("{" + user + "," + s[1:])}
	b.SetBytes(int64(len(m.Body)))
	b.ReportAllocs()
	for b.Loop() {
		if d := t.Route("orders", m); d.Reason != ReasonOwner {
			b.Fatal(d.Explain)
		}
	}
}

// BenchmarkResolveBroadcast is a broadcast rule's decision for a header
// key: the rules
// version's precomputed cells, and the origin header when the rule
// excludes it. Target: 0 allocs/op.
func BenchmarkResolveBroadcast(b *testing.B) {
	src := strings.Replace(bcastRules, "cells: all}", "cells: all, excludeOrigin: true}", 1)
	t, err := Parse("b.yaml", []byte(strings.Replace(src, "key: {json: sku}", "key: {header: X-Sku}", 1)))
	if err != nil {
		b.Fatal(err)
	}
	m := &Message{Header: map[string][]string{"X-Sku": {"A-1"}, OriginHeader: {"hz1"}}}
	b.ReportAllocs()
	for b.Loop() {
		if d := t.Route("prices", m); d.Reason != ReasonBroadcast || d.Origin != "hz1" {
			b.Fatal(d.Explain)
		}
	}
}
