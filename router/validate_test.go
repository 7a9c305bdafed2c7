package router

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestBaseRulesValid(t *testing.T) {
	if p := problemsOf(t, baseRules); p != nil {
		t.Fatalf("base rules invalid:\n%s", strings.Join(p, "\n"))
	}
	// One group name on two streams is two durables.
	if p := problemsOf(t, variant(t, `source: {broker: nats, stream: PAY, subject: "pay.*"}`, `source: {broker: nats, stream: PAY, subject: "pay.*", group: cellbridge-orders}`)); p != nil {
		t.Fatalf("a group name on another stream refused:\n%s", strings.Join(p, "\n"))
	}
}

// TestValidation has one case per validation rule; want lists substrings of
// the problems ("file:line: field: message"), all of which must appear.
func TestValidation(t *testing.T) {
	cases := []struct {
		name string
		src  string
		want []string
	}{
		// Syntax and strictness.
		{"syntax error", variant(t, "shards: 10", "shards: [10"), []string{"t.yaml:3: invalid YAML"}},
		{"unknown field", variant(t, "global: gz00", "global: gz00\nglobl: x"), []string{`t.yaml:5: globl: unknown field (known: kind, description, version, shards, global, cells, pins, blocked)`}},
		{"unknown nested field", variant(t, "{name: a0,", "{nmae: x, name: a0,"), []string{"t.yaml:6: cells[0].nmae: unknown field"}},
		{"duplicate key", variant(t, "shards: 10", "shards: 10\nshards: 11"), []string{"t.yaml:4: shards: duplicate key (first at line 3)"}},
		{"duplicate nested key", variant(t, "{key: \"12345\", cell: a1}", "{key: \"12345\", cell: a1, cell: a0}"), []string{"t.yaml:10: pins[0].cell: duplicate key"}},
		{"wrong type string", variant(t, "global: gz00", "global: [gz00]"), []string{"t.yaml:4: global: must be a string, not a list"}},
		{"wrong type int", variant(t, "shards: 10", `shards: "10"`), []string{`t.yaml:3: shards: must be an integer, not the string "10"`}},
		{"wrong type list", variant(t, `shards: ["0-4"]}`, `shards: "0-4"}`), []string{`t.yaml:6: cells[0].shards: must be a list`}},
		{"wrong type bool", variant(t, "key: {header: X-User-Id}", "key: {rocketmqKeys: yes}"), []string{"key.rocketmqKeys: must be true or false"}},
		{"wrong type mapping", variant(t, "key: {json: user.id}", "key: user.id"), []string{"t.yaml:16: key: must be a mapping"}},
		{"document not a mapping", baseRules + "---\n- a\n", []string{"t.yaml:30: a rule document must be a mapping"}},
		{"unknown kind", variant(t, "kind: TopicRule\nname: pay", "kind: TopicRules\nname: pay"), []string{`t.yaml:22: kind: unknown kind "TopicRules"`}},
		{"missing kind", variant(t, "kind: TopicRule\nname: pay", "name: pay"), []string{"t.yaml:22: kind: missing"}},
		{"second cellmap", baseRules + "---\nkind: CellMap\nversion: 1\nshards: 1\ncells: [{name: x, shards: [0]}]\n", []string{"t.yaml:30: kind: a second CellMap document (the first is at t.yaml:1)"}},
		{"no topic rules", strings.Split(baseRules, "---")[0], []string{"no kind: TopicRule document"}},
		{"rules checked without a cellmap", "kind: TopicRule\nname: x\n", []string{"no kind: CellMap document", "t.yaml:1: source: missing"}},

		// Version and shard space.
		{"version zero", variant(t, "version: 3", "version: 0"), []string{"t.yaml:2: version: must be a positive integer, not 0"}},
		{"version negative", variant(t, "version: 3", "version: -4"), []string{"version: must be a positive integer, not -4"}},
		{"version missing", variant(t, "version: 3\n", ""), []string{"t.yaml:1: version: missing"}},
		{"version float", variant(t, "version: 3", "version: 3.5"), []string{"t.yaml:2: version: must be an integer, not the number 3.5"}},
		{"shards zero", variant(t, "shards: 10", "shards: 0"), []string{"t.yaml:3: shards: must be between 1 and 100000, not 0"}},
		{"shards too many", variant(t, "shards: 10", "shards: 1000000"), []string{"shards: must be between 1 and 100000"}},

		// Coverage.
		{"hole", variant(t, `"5-9"`, `"5-7"`), []string{"t.yaml:5: cells: shards 8-9 not covered by any cell"}},
		{"overlap", variant(t, `"5-9"`, `"3-9"`), []string{"t.yaml:7: cells[1].shards[0]: shards 3-4 covered twice: by a0 and by a1"}},
		{"listed twice", variant(t, `["0-4"]`, `["0-4", "4"]`), []string{"t.yaml:6: cells[0].shards[1]: shard 4 listed twice for cell a0"}},
		{"range outside", variant(t, `"5-9"`, `"5-10"`), []string{"t.yaml:7: cells[1].shards[0]: range 5-10 is outside the shard space 0-9"}},
		{"range malformed", variant(t, `"5-9"`, `"5..9"`), []string{`t.yaml:7: cells[1].shards[0]: malformed shard range "5..9"`}},
		{"overlap budget", variant(t, `["0-4"]`, "["+strings.Repeat(`"0-9", `, 120)+`"0"]`), []string{"the ranges overlap too much to check further"}},
		{"range reversed", variant(t, `"5-9"`, `"9-5"`), []string{`malformed shard range "9-5": start after end`}},

		// Cells.
		{"cell name missing", variant(t, "{name: gz00}", "{state: active}"), []string{"t.yaml:8: cells[2].name: missing"}},
		{"cell name invalid", variant(t, "{name: gz00}", "{name: \"g z\"}"), []string{`cells[2].name: "g z" is not a valid cell name`}},
		{"cell duplicate", variant(t, "{name: gz00}", "{name: a0}"), []string{`t.yaml:8: cells[2].name: duplicate cell "a0" (first at cells[0].name, line 6)`}},
		{"unknown state", variant(t, "{name: a0, state: active", "{name: a0, state: up"), []string{`t.yaml:6: cells[0].state: unknown state "up"`}},
		{"failover unknown", variant(t, "failover: a1, shards", "failover: zz, shards"), []string{`t.yaml:6: cells[0].failover: unknown cell "zz"`}},
		{"failover self", variant(t, "failover: a1, shards", "failover: a0, shards"), []string{"t.yaml:6: cells[0].failover: cell a0 cannot fail over to itself"}},
		{"failover down", variant(t, "{name: a1, state: active", "{name: a1, state: down"), []string{"t.yaml:6: cells[0].failover: failover cell a1 is down"}},
		{"down without failover", variant(t, "{name: gz00}", "{name: gz00, state: down}"), []string{"t.yaml:8: cells[2].state: cell gz00 is down but has no failover cell"}},
		{"no cells", variant(t, "cells:\n  - {name: a0, state: active, failover: a1, shards: [\"0-4\"]}\n  - {name: a1, state: active, failover: a0, shards: [\"5-9\"]}\n  - {name: gz00}\n", "cells: []\n"), []string{"cells: at least one cell is required"}},

		// Global, pins, blocked.
		{"global unknown", variant(t, "global: gz00", "global: gz01"), []string{`t.yaml:4: global: unknown cell "gz01"`,
			"t.yaml:28: onMissingKey: global needs a global cell, but the CellMap's global (t.yaml:4) names none"}},
		// An empty global names no cell: reported, and the rule that sends
		// keyless events there is refused (it used to pass and panic).
		{"global empty", variant(t, "global: gz00", `global: ""`), []string{"t.yaml:4: global: must name a cell",
			"t.yaml:28: onMissingKey: global needs a global cell, but the CellMap's global (t.yaml:4) names none"}},
		{"global null", variant(t, "global: gz00", "global: ~"), []string{"t.yaml:4: global: must name a cell",
			"t.yaml:28: onMissingKey: global needs a global cell"}},
		{"onMissingKey global without global", variant(t, "global: gz00\n", ""), []string{"t.yaml:27: onMissingKey: global needs a global cell, but the CellMap names none"}},
		{"pin unknown cell", variant(t, "cell: a1}", "cell: a9}"), []string{`t.yaml:10: pins[0].cell: unknown cell "a9"`}},
		{"pin missing key", variant(t, `{key: "12345", `, "{"), []string{"t.yaml:10: pins[0].key: missing"}},
		{"pin twice", variant(t, `  - {key: "12345", cell: a1}`, "  - {key: \"12345\", cell: a1}\n  - {key: \"12345\", cell: a0}"), []string{`t.yaml:11: pins[1].key: key "12345" is pinned twice (first to a1)`}},
		{"blocked outside", variant(t, "blocked: []", `blocked: ["8-12"]`), []string{"t.yaml:11: blocked[0]: range 8-12 is outside the shard space 0-9"}},
		{"blocked malformed", variant(t, "blocked: []", `blocked: ["x"]`), []string{`blocked[0]: malformed shard range "x"`}},
		{"blocked twice", variant(t, "blocked: []", `blocked: ["1-3", "3-4"]`), []string{"t.yaml:11: blocked[1]: shard 3 already blocked by an earlier entry"}},

		// Topic rules.
		{"rule name missing", variant(t, "name: pay\n", ""), []string{"t.yaml:22: name: missing"}},
		{"rule name duplicate", variant(t, "name: pay", "name: orders"), []string{`t.yaml:23: name: duplicate topic rule "orders" (first at t.yaml:14)`}},
		// Two rules on one durable (stream and group) or one RocketMQ group
		// of a broker would take each other's messages.
		{"source group shared", variant(t, `source: {broker: nats, stream: PAY, subject: "pay.*"}`, `source: {broker: nats, stream: ORDERS, subject: "pay.*", group: cellbridge-orders}`),
			[]string{`t.yaml:24: source.group: consumer group "cellbridge-orders" on stream ORDERS is already used by rule orders (t.yaml:15)`}},
		{"source group shared rocketmq", variant(t,
			`source: {broker: nats, stream: ORDERS, subject: "orders.>"}`, `source: {broker: rmq, topic: orders}`,
			`source: {broker: nats, stream: PAY, subject: "pay.*"}`, `source: {broker: rmq, topic: pay, group: cellbridge-orders}`),
			[]string{`t.yaml:24: source.group: consumer group "cellbridge-orders" on broker rmq is already used by rule orders (t.yaml:15)`}},
		{"source missing", variant(t, "source: {broker: nats, stream: PAY, subject: \"pay.*\"}\n", ""), []string{"source: missing"}},
		{"source broker missing", variant(t, "{broker: nats, stream: PAY", "{stream: PAY"), []string{"t.yaml:24: source.broker: missing"}},
		{"source both shapes", variant(t, `stream: PAY, subject: "pay.*"`, `stream: PAY, subject: "pay.*", topic: pay`), []string{"t.yaml:24: source: has NATS fields (stream, subject) and RocketMQ fields (topic, tags)"}},
		{"source no shape", variant(t, `stream: PAY, subject: "pay.*"`, `group: g`), []string{"t.yaml:24: source: needs stream and subject (NATS JetStream) or topic (RocketMQ)"}},
		{"source stream missing", variant(t, `stream: PAY, subject`, `subject`), []string{"source.stream: missing"}},
		{"source subject bad", variant(t, `subject: "pay.*"`, `subject: "pay.>.x"`), []string{`source.subject: subject "pay.>.x": '>' must be the last token`}},
		{"source rocketmq topic bad", variant(t, `stream: PAY, subject: "pay.*"`, `topic: "pay topic"`), []string{`source.topic: "pay topic" is not a valid RocketMQ topic`}},
		{"source group bad", variant(t, `subject: "pay.*"}`, `subject: "pay.*", group: "a.b"}`), []string{`source.group: "a.b" is not a valid consumer group name`}},
		{"ordering unknown", variant(t, `subject: "pay.*"}`, `subject: "pay.*", ordering: strict}`), []string{`t.yaml:24: source.ordering: unknown value "strict": must be ordered or none`}},
		{"ordering on rocketmq", variant(t, `stream: PAY, subject: "pay.*"}`, `topic: pay, ordering: none}`, "key: {header: X-User-Id}", "key: {rocketmqKeys: true}", `target: {broker: nats, subject: "cell.{cell}.pay"}`, `target: {broker: rmq, topic: "pay_{cell}"}`), []string{"t.yaml:24: source.ordering: applies to NATS sources only"}},
		{"partitions too many", variant(t, `subject: "pay.*"}`, `subject: "pay.*", partitions: 2000}`, "key: {header: X-User-Id}", "key: {subjectToken: 2}"), []string{"t.yaml:24: source.partitions: must be between 1 and 1024, not 2000 (0 or absent: not partitioned)"}},
		{"partitions negative", variant(t, `subject: "pay.*"}`, `subject: "pay.*", partitions: -3}`), []string{"source.partitions: must be between 1 and 1024, not -3"}},
		{"partitions on rocketmq", variant(t, `stream: PAY, subject: "pay.*"}`, `topic: pay, partitions: 4}`, "key: {header: X-User-Id}", "key: {rocketmqKeys: true}", `target: {broker: nats, subject: "cell.{cell}.pay"}`, `target: {broker: rmq, topic: "pay_{cell}"}`), []string{"t.yaml:24: source.partitions: applies to NATS sources only"}},
		{"acks unknown", variant(t, `subject: "pay.*"}`, `subject: "pay.*", acks: batch}`), []string{`t.yaml:24: source.acks: unknown value "batch": must be each or cumulative`}},
		{"acks on rocketmq", variant(t, `stream: PAY, subject: "pay.*"}`, `topic: pay, acks: cumulative}`, "key: {header: X-User-Id}", "key: {rocketmqKeys: true}", `target: {broker: nats, subject: "cell.{cell}.pay"}`, `target: {broker: rmq, topic: "pay_{cell}"}`), []string{"t.yaml:24: source.acks: applies to NATS sources only"}},
		{"cumulative acks without a dlq", variant(t, `subject: "pay.*"}`, `subject: "pay.*", acks: cumulative}`), []string{"t.yaml:24: source.acks: cumulative needs a dlq"}},
		{"cumulative acks with ordering none", variant(t, `subject: "pay.*"}`, `subject: "pay.*", ordering: none, acks: cumulative}`), []string{"t.yaml:24: source.acks: cumulative needs ordering: ordered"}},
		{"partitions with ordering none", variant(t, `subject: "pay.*"}`, `subject: "pay.*", partitions: 4, ordering: none}`, "key: {header: X-User-Id}", "key: {subjectToken: 2}"), []string{"t.yaml:24: source.partitions: cannot be combined with ordering: none"}},
		{"partitions header key", variant(t, `subject: "pay.*"}`, `subject: "pay.*", partitions: 4}`), []string{"t.yaml:24: source.partitions: needs key: {subjectToken: N}"}},
		{"partitions literal token", variant(t, `subject: "pay.*"}`, `subject: "pay.*", partitions: 4}`, "key: {header: X-User-Id}", "key: {subjectToken: 1}"), []string{`t.yaml:25: key.subjectToken: with source.partitions: token 1 of the source subject "pay.*" is "pay", not '*': a stream can partition only on a wildcard token`}},
		{"partitions token beyond", variant(t, `subject: "pay.*"}`, `subject: "pay.*", partitions: 4}`, "key: {header: X-User-Id}", "key: {subjectToken: 3}"), []string{`key.subjectToken: with source.partitions: the source subject "pay.*" has only 2 tokens, no token 3`}},
		{"partitions token inside >", variant(t, `subject: "orders.>"}`, `subject: "orders.>", partitions: 8}`, "key: {json: user.id}", "key: {subjectToken: 2}"), []string{`t.yaml:16: key.subjectToken: with source.partitions: token 2 of the source subject "orders.>" falls inside '>': write a '*' at that position, e.g. "orders.*.>"`}},
		{"partitions negative token with >", variant(t, `subject: "orders.>"}`, `subject: "orders.*.>", partitions: 8}`, "key: {json: user.id}", "key: {subjectToken: -1}"), []string{`key.subjectToken: with source.partitions: token -1 counts from the end, but the source subject "orders.*.>" ends in '>'`}},
		{"partitioned stream read two ways", variant(t, `stream: PAY, subject: "pay.*"}`, `stream: ORDERS, subject: "orders.*.>", partitions: 4}`, "key: {header: X-User-Id}", "key: {subjectToken: 2}"), []string{`t.yaml:24: source.stream: stream ORDERS is read by rule orders (t.yaml:15) with subject "orders.>", not partitioned, and here with subject "orders.*.>", 4 partitions on wildcard 1`}},
		{"partitioned stream different counts", variant(t, `stream: ORDERS, subject: "orders.>"}`, `stream: PAY, subject: "pay.*", partitions: 8}`, "key: {json: user.id}", "key: {subjectToken: 2}", `subject: "pay.*"}`, `subject: "pay.*", partitions: 4}`, "key: {header: X-User-Id}", "key: {subjectToken: -1}", "dlq: {broker: nats, subject: dlq.orders}", "dlq: {broker: nats, subject: dlq.x}"), []string{`t.yaml:24: source.stream: stream PAY is read by rule orders (t.yaml:15) with subject "pay.*", 8 partitions on wildcard 1, and here with subject "pay.*", 4 partitions on wildcard 1`}},
		{"key missing", variant(t, "key: {header: X-User-Id}\n", ""), []string{"t.yaml:22: key: missing: one of header, json, subjectToken, rocketmqKeys"}},
		{"key empty", variant(t, "key: {header: X-User-Id}", "key: {}"), []string{"t.yaml:25: key: needs exactly one of"}},
		{"key conflicting", variant(t, "key: {header: X-User-Id}", "key: {header: X-User-Id, json: user.id}"), []string{"t.yaml:25: key: conflicting key sources header, json"}},
		{"key header bad", variant(t, "key: {header: X-User-Id}", `key: {header: "X User"}`), []string{`key.header: "X User" is not a valid header name`}},
		{"key json bad", variant(t, "key: {json: user.id}", `key: {json: "user..id"}`), []string{`t.yaml:16: key.json: "user..id" is not a dotted path`}},
		{"key subjectToken zero", variant(t, "key: {header: X-User-Id}", "key: {subjectToken: 0}"), []string{"key.subjectToken: must be a token position"}},
		{"key rocketmqKeys false", variant(t, "key: {header: X-User-Id}", "key: {rocketmqKeys: false}"), []string{"key.rocketmqKeys: must be true when given"}},
		{"key rocketmqKeys on nats", variant(t, "key: {header: X-User-Id}", "key: {rocketmqKeys: true}"), []string{"key.rocketmqKeys: needs a RocketMQ source"}},
		{"shard missing", variant(t, "shard: {func: mod}\n", ""), []string{"shard: missing"}},
		{"shard func missing", variant(t, "shard: {func: mod}", "shard: {from: 1}"), []string{"t.yaml:26: shard.func: missing"}},
		{"shard func unknown", variant(t, "shard: {func: mod}", "shard: {func: crc}"), []string{`shard.func: unknown function "crc"`}},
		{"shard mod with from", variant(t, "shard: {func: mod}", "shard: {func: mod, from: 1}"), []string{"shard.from: only applies to func: digits"}},
		{"shard digits no from", variant(t, "shard: {func: digits, from: -1}", "shard: {func: digits}"), []string{"shard.from: missing"}},
		{"shard digits positive no to", variant(t, "shard: {func: digits, from: -1}", "shard: {func: digits, from: 2}"), []string{"shard.to: missing: required when from is not negative"}},
		{"shard digits to before from", variant(t, "shard: {func: digits, from: -1}", "shard: {func: digits, from: 4, to: 3}"), []string{"shard.to: must be greater than from (4)"}},
		{"shard digits mixed signs", variant(t, "shard: {func: digits, from: -1}", "shard: {func: digits, from: -3, to: 0}"), []string{"shard.to: must be negative like from"}},
		{"shard digits too few", variant(t, "shards: 10", "shards: 20"), []string{"t.yaml:17: shard.from: 1 digits give 10 values, fewer than the 20 shards"}},
		{"shard digits too wide", variant(t, "shard: {func: digits, from: -1}", "shard: {func: digits, from: 0, to: 12}"), []string{"shard.from: digits takes at most 9 characters"}},
		{"target missing", variant(t, "target: {broker: nats, subject: \"cell.{cell}.pay\"}\n", ""), []string{"target: missing"}},
		{"target both", variant(t, `subject: "cell.{cell}.pay"}`, `subject: "cell.{cell}.pay", topic: x}`), []string{"t.yaml:27: target: has both subject (NATS) and topic (RocketMQ)"}},
		{"target neither", variant(t, `target: {broker: nats, subject: "cell.{cell}.pay"}`, `target: {broker: nats}`), []string{"target: needs subject (NATS) or topic (RocketMQ)"}},
		{"target broker missing", variant(t, `target: {broker: nats, subject: "cell.{cell}.pay"}`, `target: {subject: "cell.{cell}.pay"}`), []string{"target.broker: missing"}},
		{"placeholder unknown", variant(t, `"cell.{cell}.pay"`, `"cell.{cel}.pay"`), []string{"t.yaml:27: target.subject: unknown placeholder {cel} (allowed: {cell}, {shard}, {topic})"}},
		{"placeholder unmatched", variant(t, `"cell.{cell}.pay"`, `"cell.{cell.pay"`), []string{"target.subject: unmatched '{'"}},
		{"target wildcard", variant(t, `"cell.{cell}.pay"`, `"cell.{cell}.*"`), []string{`target.subject: subject "cell.a0.*": wildcard "*" is not allowed here`}},
		{"target topic bad", variant(t, `subject: "cell.{cell}.pay"`, `topic: "cell.{cell}"`), []string{`target.topic: renders to "cell.a0", not a valid RocketMQ topic`}},
		{"shard placeholder with global", variant(t, `"cell.{cell}.pay"`, `"cell.{cell}.{shard}"`), []string{"target.subject: {shard} cannot be rendered for events without a key"}},
		{"routing loop", variant(t, `"cell.{cell}.pay"`, `"pay.{cell}"`), []string{`t.yaml:27: target.subject: "pay.{cell}" for cell a0 is matched by the source subject filter "pay.*" on the same broker`}},
		{"routing loop with shard", variant(t, `subject: "orders.>"`, `subject: "cell.*.orders.7"`, `"cell.{cell}.orders"`, `"cell.{cell}.orders.{shard}"`), []string{"target.subject: \"cell.{cell}.orders.{shard}\" for cell a0 is matched"}},
		{"dlq loop", variant(t, "subject: dlq.orders", "subject: orders.dead"), []string{`t.yaml:20: dlq.subject: "orders.dead" is matched by the source subject filter "orders.>"`}},
		{"dlq missing", variant(t, "dlq: {broker: nats, subject: dlq.orders}\n", ""), []string{"dlq: missing: required when onMissingKey is dlq"}},
		{"dlq missing default", variant(t, "onMissingKey: dlq\ndlq: {broker: nats, subject: dlq.orders}\n", ""), []string{"dlq: missing: required when onMissingKey is dlq (the default"}},
		{"dlq placeholder cell", variant(t, "subject: dlq.orders", `subject: "dlq.{cell}"`), []string{"dlq.subject: only {topic} may be used here"}},
		{"onMissingKey unknown", variant(t, "onMissingKey: global", "onMissingKey: drop"), []string{`t.yaml:28: onMissingKey: unknown value "drop"`}},
		{"broker kind conflict", variant(t, `target: {broker: nats, subject: "cell.{cell}.pay"}`, `target: {broker: nats, topic: "cell_{cell}_pay"}`), []string{`t.yaml:27: target.broker: broker "nats" is used for a RocketMQ topic here but for a NATS subject at t.yaml:15 (source.broker)`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := problemsOf(t, c.src)
			if got == nil {
				t.Fatalf("no problems, want %q", c.want)
			}
			all := strings.Join(got, "\n")
			for _, w := range c.want {
				if !strings.Contains(all, w) {
					t.Errorf("missing %q in:\n%s", w, all)
				}
			}
		})
	}
}

// TestValidationReportsAll checks that independent problems in several
// documents are reported together, sorted by line.
func TestValidationReportsAll(t *testing.T) {
	src := variant(t, "version: 3", "version: 0", "failover: a1, shards", "failover: a0, shards",
		`"5-9"`, `"5-8"`, "key: {json: user.id}", "key: {json: user.id, header: X}", `"cell.{cell}.pay"`, `"cell.{zone}.pay"`)
	got := problemsOf(t, src)
	want := []string{
		"t.yaml:2: version: must be a positive integer, not 0",
		"t.yaml:5: cells: shard 9 not covered by any cell",
		"t.yaml:6: cells[0].failover: cell a0 cannot fail over to itself",
		"t.yaml:16: key: conflicting key sources header, json: exactly one of header, json, subjectToken, rocketmqKeys",
		"t.yaml:27: target.subject: unknown placeholder {zone} (allowed: {cell}, {shard}, {topic})",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, data := range files {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func TestLoadDirectory(t *testing.T) {
	parts := strings.SplitN(baseRules, "---\n", 2)
	t.Run("split files, yml, hidden and other files ignored", func(t *testing.T) {
		dir := t.TempDir()
		writeFiles(t, dir, map[string]string{
			"cellmap.yaml":     parts[0],
			"rules.yml":        parts[1],
			".hidden.yaml":     "not: [valid",
			"README.md":        "# notes",
			"sub/ignored.yaml": "kind: CellMap",
		})
		tb, err := Load(dir)
		if err != nil {
			t.Fatal(err)
		}
		if len(tb.Rules()) != 2 || len(tb.Files()) != 2 {
			t.Fatalf("rules %d files %v", len(tb.Rules()), tb.Files())
		}
	})
	t.Run("problems name the file", func(t *testing.T) {
		dir := t.TempDir()
		writeFiles(t, dir, map[string]string{"cellmap.yaml": parts[0], "rules.yaml": strings.Replace(parts[1], "func: mod", "func: crc", 1)})
		_, err := Load(dir)
		want := filepath.Join(dir, "rules.yaml") + `:14: shard.func: unknown function "crc"`
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Fatalf("got %v, want %s", err, want)
		}
	})
	t.Run("empty directory", func(t *testing.T) {
		_, err := Load(t.TempDir())
		if err == nil || !strings.Contains(err.Error(), "no *.yaml or *.yml rule files") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("missing directory", func(t *testing.T) {
		_, err := Load(filepath.Join(t.TempDir(), "nope"))
		if err == nil || !strings.Contains(err.Error(), "cannot read rules directory") {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("no cellmap", func(t *testing.T) {
		dir := t.TempDir()
		writeFiles(t, dir, map[string]string{"rules.yaml": parts[1]})
		_, err := Load(dir)
		if err == nil || !strings.Contains(err.Error(), "no kind: CellMap document") || strings.Count(err.Error(), "\n") != 0 {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("example rules", func(t *testing.T) {
		tb, err := Load("../deploy/rules")
		if err != nil {
			t.Fatal(err)
		}
		if tb.Shards() != 100 || tb.Global() != "gz00" || len(tb.Cells()) != 4 || tb.Rule("orders") == nil || tb.Rule("payments") == nil {
			t.Fatalf("unexpected example: %d shards, global %q, %d cells", tb.Shards(), tb.Global(), len(tb.Cells()))
		}
	})
}
