package config

import (
	"fmt"
	"io"
	"reflect"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// defaultRow is one row of the defaults table.
type defaultRow struct {
	Field string // dotted field path, e.g. "pipeline.maxInFlight"
	Value string // as written in the file; "" for a computed default (Doc says how)
	Doc   string
}

// defaults is the single table of defaults: applyDefaults reads it,
// `cellbridge run -defaults` prints it (WriteDefaults), and the README copies
// it (a test compares them).
var defaults = []defaultRow{
	{"rules", "", "rule directory; required with brokers; built-in: the example rules (deploy/rules)"},
	{"brokers", "", "none: the embedded default (in-process nats-server with JetStream, broker name `nats`)"},
	{"dedupe.store", "", "`jetstream` when a NATS broker exists (and for the embedded default), else `memory`"},
	{"dedupe.broker", "", "the broker named `nats`, else the only NATS broker"},
	{"dedupe.bucket", "cellbridge-dedupe", "JetStream KV bucket, shared by all replicas"},
	{"dedupe.replicas", "1", "KV bucket replicas"},
	{"dedupe.size", "1000000", "memory store: max keys (LRU beyond)"},
	{"dedupe.ttl", "10m", "how long a committed key suppresses a repeat"},
	{"dedupe.reserveTTL", "30s", "a reservation of a crashed worker/replica frees itself after this"},
	{"http.listen", ":9090", "/metrics, /healthz, /readyz, /route, /status"},
	{"pipeline.maxInFlight", "4096", "messages accepted and not yet settled, held ones excluded (a broadcast message takes one per copy; the NATS consumer's MaxAckPending is maxInFlight+maxHeld+maxLagging+fetchBatch)"},
	{"pipeline.lanes", "", "ordering lanes: maxInFlight/4, at least 1 (one key always uses one lane; one message per key between publish and confirm; keys sharing a lane do not wait for each other)"},
	{"pipeline.workers", "", "goroutines that reserve/commit/ack: GOMAXPROCS with the memory store, 256 with jetstream (each KV round trip holds one)"},
	{"pipeline.fetchBatch", "1024", "messages requested ahead from the source (pull batch)"},
	{"pipeline.holdDelay", "5s", "redelivery delay of held messages that could not be parked"},
	{"pipeline.retry.initial", "100ms", "first sink/dedupe retry delay (doubles each time)"},
	{"pipeline.retry.max", "5s", "retry delay cap"},
	{"pipeline.maxMessageBytes", "1MiB", "larger messages go to the DLQ (too_large)"},
	{"pipeline.maxHops", "4", "messages with more Cell-Hops go to the DLQ (too_many_hops)"},
	{"pipeline.drainTimeout", "20s", "on shutdown: time to finish in-flight messages"},
	{"pipeline.progressTimeout", "60s", "/readyz fails when a backlog exists and nothing was forwarded for this long"},
	{"pipeline.stallTimeout", "3s", "/readyz fails while a rule's oldest accepted, unparked, unsettled message is older than this (a target, the dedupe store or a retry holds it up)"},
	{"pipeline.ackWait", "30s", "source redelivery timeout (longer than the worst processing time)"},
	{"pipeline.maxHeld", "10000", "held messages parked in memory (in order per key); beyond it they are redelivered after holdDelay"},
	{"pipeline.heldRecheck", "1s", "how often parked messages are re-resolved without a rules change"},
	{"pipeline.maxLagging", "10000", "broadcast copies kept outside maxInFlight while their cell fails or is slow (not confirmed within stallTimeout), so that the other cells go on; beyond it they hold in-flight slots (back-pressure)"},
	{"log.level", "info", "debug | info | warn | error"},
	{"log.format", "auto", "auto (JSON when stderr is not a terminal) | json | text"},
}

// WriteDefaults writes the defaults table as Markdown: the README's table
// and the output of `cellbridge run -defaults`.
func WriteDefaults(w io.Writer) {
	fmt.Fprintln(w, "| field | default | meaning |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, e := range defaults {
		v := "`" + e.Value + "`"
		if e.Value == "" {
			v = "(computed)"
		}
		fmt.Fprintf(w, "| `%s` | %s | %s |\n", e.Field, v, strings.ReplaceAll(e.Doc, "|", "\\|"))
	}
}

// applyDefaults fills every field the file did not set from the defaults
// table and computes the dedupe store defaults.
func (c *Config) applyDefaults() {
	root := reflect.ValueOf(c).Elem()
	for _, e := range defaults {
		if e.Value == "" || c.set(e.Field) {
			continue
		}
		f := fieldByPath(root, e.Field)
		if !f.IsValid() || !f.IsZero() {
			continue
		}
		n := &yaml.Node{Kind: yaml.ScalarNode, Value: e.Value}
		if _, errs := strictyaml.Decode("(defaults)", n, f.Addr().Interface(), strictyaml.Options{}); len(errs) > 0 {
			panic(fmt.Sprintf("config default %s=%q: %v", e.Field, e.Value, errs)) // a bug in the table
		}
	}
	d := &c.Dedupe
	if d.Store == "" {
		d.Store = DedupeMemory
		if c.Embedded() || c.natsBrokerDefault() != "" {
			d.Store = DedupeJetStream
		}
	}
	if d.Store == DedupeJetStream && d.Broker == "" {
		if c.Embedded() {
			d.Broker = EmbeddedBroker
		} else {
			d.Broker = c.natsBrokerDefault()
		}
	}
}

// natsBrokerDefault is the broker named nats, else the only NATS broker.
func (c *Config) natsBrokerDefault() string {
	if b := c.Brokers["nats"]; b != nil && b.Type == NATSType {
		return "nats"
	}
	var only string
	for name, b := range c.Brokers {
		if b != nil && b.Type == NATSType {
			if only != "" {
				return ""
			}
			only = name
		}
	}
	return only
}
