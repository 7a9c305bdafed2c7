package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
)

// `cellbridge status` names the dedupe protocol of each target.
func TestStatusDedupeProtocols(t *testing.T) {
	st := bridge.Status{RulesLoaded: true, Ready: true, RulesVersion: 1, DedupeProtocols: map[string]string{
		"publishing to broker nats subject cell.rz00.orders": "check (duplicate window 2m0s)",
		"publishing to broker rmq topic cell_rz01":           "reserve (the sink reports no duplicate window)",
	}}
	var b bytes.Buffer
	writeStatus(&b, "http://x", st, time.Now())
	out := b.String()
	want := "dedupe publishing to broker nats subject cell.rz00.orders: check (duplicate window 2m0s)\n" +
		"dedupe publishing to broker rmq topic cell_rz01: reserve (the sink reports no duplicate window)\n"
	if !strings.Contains(out, want) {
		t.Errorf("status lacks, in this order:\n%s\ngot:\n%s", want, out)
	}
}
