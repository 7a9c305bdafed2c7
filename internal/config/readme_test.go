package config

import (
	"os"
	"strings"
	"testing"
)

// docs/configuration.md lists every configuration field with its default, as
// `cellbridge run -defaults` prints it; it must not drift from the table
// applyDefaults reads.
func TestConfigDocListsEveryDefault(t *testing.T) {
	b, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	var table strings.Builder
	WriteDefaults(&table)
	if !strings.Contains(string(b), table.String()) {
		t.Errorf("docs/configuration.md's configuration table differs from the defaults; replace it with the output of `cellbridge run -defaults`:\n%s", table.String())
	}
}

// TestDefaultsRowsSayWhatTheCodeDoes pins the words of the rows whose
// meaning the code fixes elsewhere: the pipeline dead-letters a message
// whose Cell-Hops is at or over maxHops (bridge.Config.MaxHops), ackTimeout
// against reserveTTL is advice that Validate does not enforce (a crash test
// runs ackTimeout 10s with reserveTTL 2s), and the RocketMQ store default
// does not depend on which NATS broker holds the bucket (applyDefaults).
func TestDefaultsRowsSayWhatTheCodeDoes(t *testing.T) {
	rows := map[string]string{}
	for _, e := range defaults {
		rows[e.Field] = e.Doc
	}
	for _, tc := range []struct {
		field     string
		says, not string
	}{
		{"pipeline.maxHops", "with at least this many Cell-Hops go to the DLQ", "more Cell-Hops"},
		{"brokers.*.ackTimeout", "(keep it below dedupe.reserveTTL, for rocketmq three times it plus 0.2s: a reservation that expires while its publish waits lets another attempt of the key in)", "(below dedupe.reserveTTL)"},
		{"dedupe.store", "`jetstream` when a RocketMQ broker is configured and any NATS broker exists", ""},
	} {
		doc, ok := rows[tc.field]
		if !ok {
			t.Errorf("no row %s", tc.field)
			continue
		}
		if !strings.Contains(doc, tc.says) || tc.not != "" && strings.Contains(doc, tc.not) {
			t.Errorf("row %s: %q; want it to say %q (and not %q)", tc.field, doc, tc.says, tc.not)
		}
	}
}
