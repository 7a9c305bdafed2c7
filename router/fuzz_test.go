package router

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tidwall/gjson"
)

// FuzzParse feeds arbitrary rule files to the parser: it must never panic,
// must either compile a table whose every shard is served by a live cell or
// report located problems, and never both.
func FuzzParse(f *testing.F) {
	f.Add([]byte(baseRules))
	f.Add([]byte("\r\r0")) // lone carriage returns break lines too
	for _, v := range [][]string{
		{"version: 3", "version: 0"},
		{`"5-9"`, `"3-7"`},
		{"{name: a0, state: active", "{name: a0, state: down"},
		{"blocked: []", `blocked: ["1-2", "7"]`},
		{"key: {json: user.id}", "key: {subjectToken: -2}"},
		{`"cell.{cell}.pay"`, `"cell.{cell}.{topic}.{shard}"`},
		{"shards: 10", "shards: &a 10\nx: *a"},
	} {
		f.Add([]byte(variant(f, v...)))
	}
	if files, err := filepath.Glob("../deploy/rules/*.yaml"); err == nil {
		var all []string
		for _, p := range files {
			b, err := os.ReadFile(p)
			if err == nil {
				all = append(all, string(b))
			}
		}
		f.Add([]byte(strings.Join(all, "\n---\n")))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		tb, err := Parse("f.yaml", data)
		if err != nil {
			if tb != nil {
				t.Fatal("table and error")
			}
			var pe *Errors
			if !errors.As(err, &pe) || len(*pe) == 0 {
				t.Fatalf("error %T without problems: %v", err, err)
			}
			// YAML breaks lines at \n, \r\n and a lone \r.
			text := strings.ReplaceAll(string(data), "\r\n", "\n")
			lines := strings.Count(text, "\n") + strings.Count(text, "\r") + 1
			for _, p := range *pe {
				if p.Msg == "" || p.Line < 0 || p.Line > lines+1 {
					t.Fatalf("bad problem %+v (file has %d lines)", p, lines)
				}
			}
			return
		}
		checkTable(t, tb)
		for _, r := range tb.Rules() {
			for _, k := range []string{"", "0", "123", "2088000000012345", "x", string(data[:min(len(data), 20)])} {
				checkDecision(t, tb, r.Name, tb.Resolve(r.Name, k))
			}
		}
	})
}

// checkTable asserts the invariants of a compiled table.
func checkTable(t *testing.T, tb *Table) {
	t.Helper()
	if tb.Version() <= 0 || tb.Shards() <= 0 || len(tb.Rules()) == 0 {
		t.Fatalf("version %d shards %d rules %d", tb.Version(), tb.Shards(), len(tb.Rules()))
	}
	for s := 0; s < tb.Shards(); s++ {
		c, ok := tb.Cell(tb.Serving(s))
		if !ok || c.State == StateDown {
			t.Fatalf("shard %d served by %q (known %v, state %s)", s, tb.Serving(s), ok, c.State)
		}
	}
}

// checkDecision asserts that d is a documented outcome.
func checkDecision(t *testing.T, tb *Table, topic string, d Decision) {
	t.Helper()
	r := tb.Rule(topic)
	if d.Topic != topic || d.Version != tb.Version() {
		t.Fatalf("topic/version %q/%d", d.Topic, d.Version)
	}
	live := func() {
		c, ok := tb.Cell(d.Cell)
		if !ok || c.State == StateDown {
			t.Fatalf("%s decision to cell %q (known %v, state %s): %+v", d.Reason, d.Cell, ok, c.State, d)
		}
	}
	switch d.Reason {
	case ReasonOwner, ReasonPin, ReasonFailover:
		live()
		if d.Shard < 0 || d.Shard >= tb.Shards() || d.Key == "" || d.Target.IsZero() || d.Cause != "" {
			t.Fatalf("bad %s decision %+v", d.Reason, d)
		}
		if d.Reason == ReasonOwner && d.Cell != tb.Owner(d.Shard) {
			t.Fatalf("owner decision to %s, owner of shard %d is %s", d.Cell, d.Shard, tb.Owner(d.Shard))
		}
		if tb.IsBlocked(d.Shard) {
			t.Fatalf("blocked shard %d forwarded: %+v", d.Shard, d)
		}
	case ReasonHeld:
		if !tb.IsBlocked(d.Shard) || !d.Target.IsZero() || d.Explain == "" {
			t.Fatalf("bad held decision %+v", d)
		}
	case ReasonGlobal:
		live()
		if r == nil || r.OnMissingKey != OnMissingKeyGlobal || d.Shard != -1 || d.Target.IsZero() || d.Cause == "" || d.Explain == "" {
			t.Fatalf("bad global decision %+v", d)
		}
	case ReasonDLQ:
		switch {
		case r == nil:
			if d.Cause != CauseNoRoute {
				t.Fatalf("bad no-route decision %+v", d)
			}
		case r.OnMissingKey != OnMissingKeyDLQ || d.Target != *r.DLQ || d.Shard != -1 || d.Explain == "":
			t.Fatalf("bad dlq decision %+v", d)
		}
		switch d.Cause {
		case CauseMissingKey, CauseBadKey, CauseBadBody, CauseNoRoute:
		default:
			t.Fatalf("undocumented cause %q", d.Cause)
		}
	default:
		t.Fatalf("undocumented reason %d", d.Reason)
	}
}

func fuzzTables(f *testing.F) []*Table {
	ex, err := Load("../deploy/rules")
	if err != nil {
		f.Fatal(err)
	}
	// The example during a switch and a disaster: blocked shards and a down
	// cell, so that every reason can come up.
	dir := f.TempDir()
	for _, name := range []string{"orders.yaml", "payments.yaml", "cellmap.yaml"} {
		b, err := os.ReadFile(filepath.Join("../deploy/rules", name))
		if err != nil {
			f.Fatal(err)
		}
		s := string(b)
		if name == "cellmap.yaml" {
			s = strings.Replace(s, "blocked: []", `blocked: ["30-35", "70"]`, 1)
			s = strings.Replace(s, "name: rz10\n    city: sh\n    state: active", "name: rz10\n    city: sh\n    state: down", 1)
			s = strings.Replace(s, "failover: rz10", "failover: rz00", 1)
		}
		if err := os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644); err != nil {
			f.Fatal(err)
		}
	}
	sw, err := Load(dir)
	if err != nil {
		f.Fatal(err)
	}
	return []*Table{ex, sw}
}

// FuzzRoute extracts keys from arbitrary messages and resolves them: no
// panic, and every decision is a live cell or a documented error outcome.
func FuzzRoute(f *testing.F) {
	tables := fuzzTables(f)
	f.Add("2088000000012345", []byte(`{"user":{"id":2088000000012345678}}`), "orders.created", "k1 k2")
	f.Add("2088000000000042", []byte(`{"user":{"id":"2088000000000042"}}`), "", "")
	f.Add("", []byte(`{"user":{"id":null}}`), "a.b", " ")
	f.Add("12a", []byte(`{"user":`), "", "")
	f.Add("7", []byte(`{"user":{"id":-1.5e3}}`), "x", "")
	f.Add("99999999999999999999999", []byte(`[{"user":1}]`), "", "")
	f.Fuzz(func(t *testing.T, key string, body []byte, subject, keys string) {
		for _, tb := range tables {
			for _, topic := range []string{"orders", "payments", "unknown"} {
				checkDecision(t, tb, topic, tb.Resolve(topic, key))
				m := &Message{Subject: subject, Body: body, Keys: keys, Header: map[string][]string{"x-user-id": {key}}}
				d := tb.Route(topic, m)
				checkDecision(t, tb, topic, d)
				if r := tb.Resolve(topic, key); topic == "payments" && (d.Key != r.Key || d.Reason != r.Reason || d.Cell != r.Cell || d.Target != r.Target || d.Shard != r.Shard) {
					t.Fatalf("header route %+v differs from resolve of %q", d, key)
				}
				if topic == "orders" && gjson.ValidBytes(body) {
					if res := gjson.GetBytes(body, "user.id"); res.Type == gjson.Number && d.Key != res.Raw {
						t.Fatalf("number key %q, raw %q", d.Key, res.Raw)
					}
				}
			}
		}
	})
}
