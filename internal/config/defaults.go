package config

import (
	"fmt"
	"io"
	"reflect"
	"strings"

	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// defaultRow is one row of the defaults table.
type defaultRow struct {
	Field string // dotted field path, e.g. "pipeline.maxInFlight"
	Value string // as written in the file; "" for a computed default (Doc says how)
	Doc   string
}

// defaults is the single table of defaults: applyDefaults reads it,
// `cellbridge run -defaults` prints it (WriteDefaults), and docs/configuration.md copies
// it (a test compares them).
var defaults = []defaultRow{
	{"rules", "", "rule directory; required with brokers; built-in: the example rules (deploy/rules)"},
	{"brokers", "", "none: the embedded default (in-process nats-server with JetStream, broker name `nats`)"},
	{"brokers.*.pingInterval", "1s", "type nats: the client pings the server this often and reconnects once more than maxPingsOut pings are unanswered (a frozen server is left after 2-3s with the defaults); at least 100ms"},
	{"brokers.*.maxPingsOut", "2", "type nats: unanswered pings before the link counts as dead; 1..100"},
	{"brokers.*.writeTimeout", "2s", "type nats and rocketmq: each write to a server's socket that has no deadline of its own; a server that stops reading (frozen, a hung VM) blocks the client's writes once the socket's buffers are full, and with them the pings above (nats) or every later request on that connection (rocketmq: end-transactions, offset updates); after this the write fails and the client reconnects (rocketmq: the client keeps one value per process, the smallest of the rocketmq brokers'); at least 100ms"},
	{"brokers.*.dialTimeout", "2s", "type nats and rocketmq: one connection attempt to one server (TCP, TLS, the server's greeting; rocketmq: one value per process, the smallest of the rocketmq brokers'); at least 100ms"},
	{"brokers.*.reconnectWait", "2s", "type nats: longest wait between two rounds of reconnect attempts over the server list (doubles from 100ms, plus jitter); at least 100ms"},
	{"brokers.*.requestTimeout", "2s", "type nats: each attempt of a JetStream API request (streams, consumers, consumer reset/unpin/info); failed attempts are logged, counted and retried with backoff; at least 10ms"},
	{"brokers.*.serverOrder", "random", "type nats: the order in which the client tries the servers of url when it connects and reconnects: `random` spreads the replicas over the cluster; `listed` tries them as written (a server in the replica's own zone first)"},
	{"brokers.*.ackTimeout", "3s", "type nats and rocketmq: a publish to a target stream (nats) or topic (rocketmq: one send attempt; the sink tries twice more, then the pipeline retries) whose ack has not come this long fails and is retried (keep it below dedupe.reserveTTL, for rocketmq three times it plus 0.2s: a reservation that expires while its publish waits lets another attempt of the key in); at least 10ms"},
	{"dedupe.store", "", "`memory` when every broker is NATS (and for the embedded default): each target stream's duplicate window drops repeats across replicas (docs/guarantees.md, section 8, says when to choose `jetstream` anyway); `jetstream` when a RocketMQ broker is configured and any NATS broker exists (RocketMQ targets have no duplicate window; with several NATS brokers and none named `nats`, dedupe.broker must name one); else `memory`"},
	{"dedupe.broker", "", "the broker named `nats`, else the only NATS broker"},
	{"dedupe.bucket", "cellbridge-dedupe", "JetStream KV bucket, shared by all replicas"},
	{"dedupe.replicas", "1", "KV bucket replicas; 1..5"},
	{"dedupe.size", "1000000", "memory store: max keys (LRU beyond: above size ÷ ttl messages per second, 1,700/s with the defaults, keys leave before ttl, counted in cellbridge_dedupe_evictions_total, and a repeat older than that is dropped by its target's duplicate window alone; a key of 30 characters costs roughly 100 bytes); not allowed with the jetstream store"},
	{"dedupe.ttl", "10m", "how long a committed key suppresses a repeat; at least 1s"},
	{"dedupe.reserveTTL", "30s", "a reservation of a crashed worker/replica frees itself after this (an ordered rule's next owner takes a dead owner's reservations over at once where the target is a NATS stream: docs/guarantees.md, section 8, T1); with `dedupe.protocol: check`, a target stream whose duplicate window is at least this long is deduplicated with one KV write per message; at least 100ms, and below ttl after rounding up to whole seconds"},
	{"dedupe.protocol", "reserve", "jetstream store: `reserve` (every message reserves its key, is published, then commits: two stored writes) or `check` (a target whose stream's duplicate window is at least reserveTTL reads the key in batches, publishes and commits: one stored write; the others reserve; a second attempt at a key in flight publishes a copy the target drops instead of waiting: docs/guarantees.md, section 2; `check` needs `dedupe.replicas: 1`)"},
	{"dedupe.requestTimeout", "", "jetstream store: each request to the KV bucket (reserve, commit, release, and each attempt of the bucket's set-up): 2s, or half of reserveTTL when that is less; at least 10ms and below reserveTTL"},
	{"http.listen", ":9090", "/metrics, /healthz, /readyz, /route, /status; a port another process holds ends `cellbridge run -config` (exit 1, naming http.listen and the address: the probes and scrapes point there); only the built-in default without -config, `demo` and `drill` move to a free loopback port then, and say so"},
	{"http.pprof", "false", "also serve /debug/pprof/ (Go's CPU, heap, goroutine, mutex, block profiles and execution trace) and /debug/timeline (sampled per-message stage timings, docs/metrics.md) on http.listen; off by default: a profile costs CPU while it runs and the endpoints show the process's internals"},
	{"pipeline.maxInFlight", "4096", "messages accepted and not yet settled, held ones excluded (a broadcast message takes one per copy; the NATS consumer's MaxAckPending is maxInFlight+maxHeld+maxLagging+fetchBatch; with `source.partitions: N` each partition's consumer gets (maxInFlight+maxHeld+maxLagging)/N plus fetchBatch/N, each rounded up, the pull batch at least 16); at most 1000000"},
	{"pipeline.lanes", "", "ordering lanes: maxInFlight/4, at least 1 (one key always uses one lane; one message per key between publish and confirm; keys sharing a lane do not wait for each other)"},
	{"pipeline.workers", "", "goroutines that reserve/commit/ack: GOMAXPROCS (at least 2) with the memory store, 256 with jetstream (each KV round trip of a Reserve holds one; messages to check targets need none)"},
	{"pipeline.fetchBatch", "2048", "messages requested ahead from the source (pull batch; a NATS source asks for more when half are taken)"},
	{"pipeline.holdDelay", "5s", "redelivery delay of held messages that could not be parked; at least 10ms"},
	{"pipeline.retry.initial", "100ms", "first sink/dedupe retry delay (doubles each time; each delay is drawn between half of it and all of it, so that the keys one fault holds up do not retry in lockstep); at least 1ms and at most retry.max"},
	{"pipeline.retry.max", "1s", "retry delay cap; the first success of a target or of the dedupe store after failures wakes every retry waiting for it, so a key retries at most this long after the target answers again only when its own attempt failed after that first success; at least 1ms"},
	{"pipeline.maxMessageBytes", "1MiB", "larger messages go to the DLQ (too_large); 1 byte to 64MiB"},
	{"pipeline.maxHops", "4", "messages arriving with at least this many Cell-Hops go to the DLQ (too_many_hops)"},
	{"pipeline.drainTimeout", "20s", "on shutdown: time to finish in-flight messages"},
	{"pipeline.progressTimeout", "60s", "/readyz fails when a backlog exists and nothing was forwarded for this long"},
	{"pipeline.stallTimeout", "3s", "/readyz fails while a rule's oldest accepted, unparked, unsettled message is older than this (a target, the dedupe store or a retry holds it up)"},
	{"pipeline.ackWait", "30s", "source redelivery timeout (longer than the worst processing time); at least 4ms"},
	{"pipeline.maxHeld", "10000", "held messages parked in memory (in order per key); beyond it they are redelivered after holdDelay"},
	{"pipeline.heldRecheck", "1s", "how often parked messages are re-resolved without a rules change"},
	{"pipeline.maxLagging", "10000", "broadcast copies kept outside maxInFlight while their cell fails or is slow (not confirmed within stallTimeout), so that the other cells go on; beyond it they hold in-flight slots (back-pressure)"},
	{"ordering.pinnedTTL", "5s", "ordered NATS rules (`source.ordering: ordered`, the default): how long the server keeps the pin of a replica that stopped pulling; a standby takes over this long after the forwarding replica died (at least 2s; a graceful stop hands over at once)"},
	{"ordering.stallLimit", "30s", "ordered NATS rules, not partitioned: the forwarding replica hands the consumer to a standby once it has held it this long while its oldest unsettled message is at least this old (a target or the dedupe store unreachable from it); repeated hand-overs double it, up to 8×; a hand-over whose re-read would reach messages older than the guaranteed duplicate window (reserveTTL + ackWait + retry.max for NATS targets; dedupe.ttl with the jetstream store; docs/guarantees.md) minus pinnedTTL and 5s is withheld; above pipeline.stallTimeout and at least 2×ordering.pinnedTTL"},
	{"partitions.bucket", "cellbridge-leases", "partitioned rules (`source.partitions`): the JetStream KV bucket on the rule's source broker in which replicas announce themselves and lease partitions; created when missing"},
	{"partitions.leaseTTL", "6s", "the partitions of a replica that vanished move this long after its last renewal (at least 2s)"},
	{"partitions.heartbeat", "", "how often leases and memberships are renewed: leaseTTL/3 (at least 100ms, at most leaseTTL/3)"},
	{"partitions.replicas", "1", "lease bucket replicas when the bridge creates it (3 on a 3-node cluster); 1..5"},
	{"partitions.replicaID", "", "this replica among a rule's replicas: the host (pod) name and a random suffix, new on every start (letters, digits, `_`, `-`; at most 128)"},
	{"partitions.drainTimeout", "10s", "a partition moving to another replica waits this long for its messages to settle before it is handed over anyway; at least 100ms"},
	{"log.level", "info", "debug | info | warn | error"},
	{"log.format", "auto", "auto (JSON when stderr is not a terminal) | json | text"},
	{"deployment.name", "", "the dedupe bucket with the jetstream store, else `cellbridge`: replicas of one name publish the rules version they run (in the lease bucket, `partitions.bucket`: `cellbridge-leases` unless set), and a replica refuses to start on a version lower than the highest its deployment has run; letters, digits, '_' and '-', at most 100"},
}

// WriteDefaults writes the defaults table as Markdown: the table of docs/configuration.md
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

// brokerRow prefixes the rows of the defaults table that apply to the
// settings of every broker whose kind has the field ("brokers.*.url").
const brokerRow = "brokers.*."

// applyDefaults fills every field the file did not set from the defaults
// table and computes the dedupe store defaults. A brokers.*.<field> row
// applies to each broker whose settings have that field.
func (c *Config) applyDefaults() {
	root := reflect.ValueOf(c).Elem()
	for _, e := range defaults {
		if e.Value == "" {
			continue
		}
		if field, ok := strings.CutPrefix(e.Field, brokerRow); ok {
			for name, b := range c.Brokers {
				if b != nil && b.Settings != nil && !c.set("brokers."+name+"."+field) {
					setDefault(fieldByPath(reflect.ValueOf(b.Settings), field), e)
				}
			}
			continue
		}
		if !c.set(e.Field) {
			setDefault(fieldByPath(root, e.Field), e)
		}
	}
	defer c.defaultDeployment()
	if p := &c.Partitions; p.Heartbeat == 0 && !c.set("partitions.heartbeat") {
		p.Heartbeat = p.LeaseTTL / 3
	}
	d := &c.Dedupe
	if !c.set("dedupe.requestTimeout") && d.RequestTimeout == 0 {
		d.RequestTimeout = Duration(min(dedupe.DefaultKVTimeout, d.ReserveTTL.D()/2))
	}
	if d.Store == "" {
		// Every target is a JetStream stream when every broker is NATS: the
		// stream's duplicate window drops a repeat from any replica, and with
		// one forwarding replica per key (ordered sources) a takeover's
		// re-reads fall inside it (docs/guarantees.md, section 8). A RocketMQ
		// target has no such window (and its transactions check back through
		// the store), so it keeps the store every replica shares.
		// Which NATS broker holds the bucket is not part of that choice:
		// with several and none named nats, dedupe.broker is left empty
		// and Validate asks for it rather than falling back to a store
		// each process keeps for itself.
		d.Store = DedupeMemory
		if c.hasNonNATSBroker() && c.hasNATSBroker() {
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

// hasNonNATSBroker reports whether a broker of another type than nats is
// configured.
func (c *Config) hasNonNATSBroker() bool {
	for _, b := range c.Brokers {
		if b != nil && b.Type != NATSType {
			return true
		}
	}
	return false
}

// hasNATSBroker reports whether a broker of type nats is configured.
func (c *Config) hasNATSBroker() bool {
	for _, b := range c.Brokers {
		if b != nil && b.Type == NATSType {
			return true
		}
	}
	return false
}

// natsBrokerNames lists the NATS brokers by name.
func (c *Config) natsBrokerNames() []string {
	var out []string
	for _, name := range c.brokerNames() {
		if b := c.Brokers[name]; b != nil && b.Type == NATSType {
			out = append(out, name)
		}
	}
	return out
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

// setDefault decodes row e's value into f when f is a field left zero.
func setDefault(f reflect.Value, e defaultRow) {
	if !f.IsValid() || !f.IsZero() {
		return
	}
	n := &yaml.Node{Kind: yaml.ScalarNode, Value: e.Value}
	if _, errs := strictyaml.Decode("(defaults)", n, f.Addr().Interface(), strictyaml.Options{}); len(errs) > 0 {
		panic(fmt.Sprintf("config default %s=%q: %v", e.Field, e.Value, errs)) // a bug in the table
	}
}

// BrokerDefaultFields lists the fields of the brokers.*.<field> rows of the
// defaults table, for the tests of the kinds that own them.
func BrokerDefaultFields() []string {
	var out []string
	for _, e := range defaults {
		if f, ok := strings.CutPrefix(e.Field, brokerRow); ok {
			out = append(out, f)
		}
	}
	return out
}
