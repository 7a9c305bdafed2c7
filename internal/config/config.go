package config

import (
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
	"github.com/cellbridge/cellbridge/internal/strictyaml"
)

// Config is the bridge configuration file of `cellbridge run -config FILE`.
// It is built by Load or Parse (strict YAML, environment and file secrets
// resolved, defaults applied) and is read-only afterwards.
type Config struct {
	// Rules is the rule directory; a relative path is relative to the
	// directory of the config file.
	Rules    Path               `yaml:"rules"`
	Brokers  map[string]*Broker `yaml:"brokers"`
	Dedupe   DedupeConfig       `yaml:"dedupe"`
	HTTP     HTTPConfig         `yaml:"http"`
	Pipeline PipelineConfig     `yaml:"pipeline"`
	// Ordering and Partitions time the ordered and partitioned NATS
	// sources (the rules' source.ordering and source.partitions).
	Ordering   OrderingConfig   `yaml:"ordering"`
	Partitions PartitionsConfig `yaml:"partitions"`
	Log        LogConfig        `yaml:"log"`
	// Deployment names the deployment the replica belongs to
	// (deployment.go).
	Deployment DeploymentConfig `yaml:"deployment"`

	// File is the config file's path (BuiltIn for the built-in
	// configuration).
	File string `yaml:"-"`
	// pos maps a dotted field path (brokers.nats.url) to its line in File,
	// so that semantic errors found after decoding still name a line.
	pos strictyaml.Positions
	// inlineSecrets lists secret fields written in clear in the file (the
	// bridge warns about them at start-up).
	inlineSecrets []string
	// flags maps a field a command-line flag overrode to the flag, which
	// Validate names in that field's problems.
	flags map[string]string
}

// DedupeConfig selects the dedupe store.
type DedupeConfig struct {
	Store string `yaml:"store"` // jetstream | memory
	// jetstream
	Broker   string `yaml:"broker"`
	Bucket   string `yaml:"bucket"`
	Replicas int    `yaml:"replicas"`
	// memory
	Size int `yaml:"size"`
	// both
	TTL        Duration `yaml:"ttl"`
	ReserveTTL Duration `yaml:"reserveTTL"`
	// jetstream: each request to the bucket
	RequestTimeout Duration `yaml:"requestTimeout"`
	// jetstream: reserve (every target reserves, publishes, commits) or
	// check (targets whose duplicate window allows it read, publish and
	// commit: one stored write per message; dedupe/doc.go).
	Protocol string `yaml:"protocol"`
}

// Dedupe protocols of the jetstream store.
const (
	ProtocolReserve = "reserve"
	ProtocolCheck   = "check"
)

// Dedupe stores.
const (
	DedupeJetStream = "jetstream"
	DedupeMemory    = "memory"
)

// Memory is the memory store's configuration.
func (d DedupeConfig) Memory() dedupe.MemoryConfig {
	return dedupe.MemoryConfig{Size: d.Size, TTL: d.TTL.D(), ReserveTTL: d.ReserveTTL.D()}
}

// KV is the JetStream KV store's configuration.
func (d DedupeConfig) KV() dedupe.KVConfig {
	return dedupe.KVConfig{Bucket: d.Bucket, TTL: d.TTL.D(), ReserveTTL: d.ReserveTTL.D(), Replicas: d.Replicas,
		Timeout: d.RequestTimeout.D(), Broker: d.Broker}
}

// HTTPConfig is the HTTP server of /metrics, /healthz, /readyz, /route, /status.
type HTTPConfig struct {
	Listen string `yaml:"listen"`
	// Pprof also serves Go's profiles under /debug/pprof/ and the sampled
	// per-message stage timings under /debug/timeline (bridge.Timeline).
	// Off by default: a profile costs CPU while it runs, and both show the
	// process's internals to whoever reaches the port.
	Pprof bool `yaml:"pprof"`
}

// PipelineConfig holds the pipeline limits; every field has a default. Its
// fields are bridge.Config's (see there for their meaning and bounds).
type PipelineConfig struct {
	MaxInFlight     int         `yaml:"maxInFlight"`
	Workers         int         `yaml:"workers"`
	FetchBatch      int         `yaml:"fetchBatch"`
	HoldDelay       Duration    `yaml:"holdDelay"`
	Retry           RetryConfig `yaml:"retry"`
	MaxMessageBytes ByteSize    `yaml:"maxMessageBytes"`
	MaxHops         int         `yaml:"maxHops"`
	DrainTimeout    Duration    `yaml:"drainTimeout"`
	ProgressTimeout Duration    `yaml:"progressTimeout"`
	StallTimeout    Duration    `yaml:"stallTimeout"`
	AckWait         Duration    `yaml:"ackWait"`
	MaxHeld         int         `yaml:"maxHeld"`
	HeldRecheck     Duration    `yaml:"heldRecheck"`
	MaxLagging      int         `yaml:"maxLagging"`
	Lanes           int         `yaml:"lanes"`
}

// RetryConfig is the capped exponential backoff of sink and dedupe retries.
type RetryConfig struct {
	Initial Duration `yaml:"initial"`
	Max     Duration `yaml:"max"`
}

// Bridge maps the pipeline section onto bridge.Config, field by field.
func (p PipelineConfig) Bridge() bridge.Config {
	return bridge.Config{
		MaxInFlight:     p.MaxInFlight,
		Workers:         p.Workers,
		FetchBatch:      p.FetchBatch,
		HoldDelay:       p.HoldDelay.D(),
		MaxHeld:         p.MaxHeld,
		HeldRecheck:     p.HeldRecheck.D(),
		MaxLagging:      p.MaxLagging,
		Retry:           bridge.RetryConfig{Initial: p.Retry.Initial.D(), Max: p.Retry.Max.D()},
		MaxMessageBytes: int64(p.MaxMessageBytes),
		MaxHops:         p.MaxHops,
		DrainTimeout:    p.DrainTimeout.D(),
		ProgressTimeout: p.ProgressTimeout.D(),
		StallTimeout:    p.StallTimeout.D(),
		AckWait:         p.AckWait.D(),
		Lanes:           p.Lanes,
	}
}

// SourceMaxAckPending is the number of unacknowledged messages a source must
// allow (a JetStream consumer's MaxAckPending): held messages stay
// unacknowledged while parked, and broadcast messages while a copy lags, so
// there must be room for them, for the messages in flight and for one fetch
// on top.
func (c *Config) SourceMaxAckPending() int {
	p := c.Pipeline
	return p.MaxInFlight + p.MaxHeld + p.MaxLagging + p.FetchBatch
}

// PartitionMaxAckPending is the MaxAckPending of each partition's consumer
// of a rule with n partitions, and PartitionFetchBatch its pull batch: a
// replica holding every partition may then hold as many unacknowledged
// messages as one consumer of an unpartitioned rule (SourceMaxAckPending).
// An ordered consumer takes deliveries up to its MaxAckPending whether or not
// the pipeline can take them yet (its pulls keep its pin), so the rule's
// budget is split rather than given to each partition whole, which would let
// a replica buffer n times as many messages. Held messages of blocked shards
// spread over the partitions by key like every other message.
func (c *Config) PartitionMaxAckPending(n int) int {
	p := c.Pipeline
	return ceilDiv(p.MaxInFlight+p.MaxHeld+p.MaxLagging, max(n, 1)) + c.PartitionFetchBatch(n)
}

// PartitionFetchBatch is the pull batch of each partition's consumer of a
// rule with n partitions (see PartitionMaxAckPending): the pipeline's
// fetchBatch split over the partitions, at least 16.
func (c *Config) PartitionFetchBatch(n int) int {
	return max(ceilDiv(c.Pipeline.FetchBatch, max(n, 1)), 16)
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

// SinkMaxPending bounds unconfirmed publishes per sink: the pipeline never
// has more than maxInFlight messages (or broadcast copies) between publish
// and confirm, plus lagging copies retrying.
func (c *Config) SinkMaxPending() int { return c.Pipeline.MaxInFlight + c.Pipeline.MaxLagging }

// OrderingConfig times the ordered NATS sources (source.ordering: ordered,
// the default): one replica forwards a rule (or a partition) at a time.
type OrderingConfig struct {
	// PinnedTTL is how long the server keeps the pin of a replica that
	// stopped pulling (killed, cut off, paused): a standby takes over about
	// this long after the forwarding replica died (natsjs
	// SourceConfig.PinnedTTL).
	PinnedTTL Duration `yaml:"pinnedTTL"`
	// StallLimit is how long the forwarding replica of an ordered rule may
	// hold the consumer while its oldest unsettled message is at least this
	// old (it cannot publish from where it is) before it hands the consumer
	// to a standby (natsjs SourceConfig.StallLimit).
	StallLimit Duration `yaml:"stallLimit"`
}

// PartitionsConfig configures the leases with which the replicas of a
// partitioned rule (source.partitions) share its partitions: a JetStream KV
// bucket on the rule's source broker (natsjs PartitionedConfig and
// LeaseConfig).
type PartitionsConfig struct {
	Bucket string `yaml:"bucket"`
	// LeaseTTL is how long a lease outlives its last renewal: the
	// partitions of a vanished replica move this long after its last
	// heartbeat.
	LeaseTTL Duration `yaml:"leaseTTL"`
	// Heartbeat is how often leases and memberships are renewed (default
	// LeaseTTL/3, at most that).
	Heartbeat Duration `yaml:"heartbeat"`
	// Replicas is the bucket's replica count when the bridge creates it.
	Replicas int `yaml:"replicas"`
	// ReplicaID names this replica among the rule's replicas; "" is the
	// host name with a random suffix, new on every start.
	ReplicaID string `yaml:"replicaID"`
	// DrainTimeout bounds how long a partition moving to another replica
	// waits for its messages to settle before it is handed over anyway.
	DrainTimeout Duration `yaml:"drainTimeout"`
}

// LogConfig configures log/slog.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug | info | warn | error
	Format string `yaml:"format"` // auto | json | text
}

// Load reads, parses, resolves and validates the config file at path.
// Each override (a command line's -rules, -http: OverrideRules,
// OverrideHTTPListen) is applied after the defaults and before the
// validation, so that a flag replaces the file's value before it is
// checked. The error is Errors (every problem) or an I/O error.
func Load(path string, overrides ...func(*Config)) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	c, perrs := parse(path, data, false)
	if c == nil {
		return nil, perrs // not even YAML
	}
	for _, o := range overrides {
		o(c)
	}
	verr := c.Validate()
	if len(perrs) == 0 {
		if verr != nil {
			return nil, verr
		}
		return c, nil
	}
	// Report the rest of the file's problems too, except those that only
	// follow from a field that failed to decode (it stayed zero).
	all := perrs
	var ve Errors
	if errors.As(verr, &ve) {
		for _, p := range ve {
			if !coveredBy(p.Field, perrs) {
				all = append(all, p)
			}
		}
	}
	sort.SliceStable(all, func(i, j int) bool { return all[i].Line < all[j].Line })
	return nil, all
}

// coveredBy reports whether field, or a parent or child of it, already has a
// problem in errs.
func coveredBy(field string, errs Errors) bool {
	for _, p := range errs {
		if p.Field == field || strings.HasPrefix(field, p.Field+".") || strings.HasPrefix(p.Field, field+".") ||
			strings.HasPrefix(field, p.Field+"[") {
			return true
		}
	}
	return false
}

// BuiltIn is the File of the built-in configuration (Default).
const BuiltIn = "(built-in)"

// Default is the built-in configuration (no file): the embedded default
// with every default applied.
func Default() *Config {
	c := &Config{File: BuiltIn, pos: strictyaml.Positions{}}
	c.applyDefaults()
	return c
}

// Parse decodes data strictly (unknown fields, wrong types and duplicate
// keys are errors), expands ${ENV} references, reads file: secrets and
// applies defaults. It does not run Validate. file names the source in
// errors and anchors relative paths.
func Parse(file string, data []byte) (*Config, error) {
	c, errs := parse(file, data, false)
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// ParseTemplate decodes data like Parse but leaves ${NAME} references and
// file: secrets as written, reading no environment variable and no file:
// it checks a configuration that will run elsewhere (a Kubernetes manifest)
// and shows what it refers to. Secrets written as a reference are not
// inline (InlineSecrets).
func ParseTemplate(file string, data []byte) (*Config, error) {
	c, errs := parse(file, data, true)
	if len(errs) > 0 {
		return nil, errs
	}
	return c, nil
}

// Embedded reports whether the configuration runs the embedded default (no
// brokers configured).
func (c *Config) Embedded() bool { return len(c.Brokers) == 0 }

// line returns the line of path or of its closest written parent.
func (c *Config) line(path string) int { return c.pos.Line(path) }

// set reports whether the file set path.
func (c *Config) set(path string) bool { return c.pos.Present(path) }

// IsSet reports whether path (a dotted field path such as "http.listen")
// was chosen explicitly: written in the file (a null is not), overridden,
// or kept (KeepHTTPListen).
func (c *Config) IsSet(path string) bool { return c.set(path) }

// OverrideHTTPListen sets http.listen as if the file had set it (the -http
// flag wins over the file); pass it to Load, or call Validate afterwards.
func (c *Config) OverrideHTTPListen(addr string) {
	c.HTTP.Listen = addr
	c.override("http.listen", "-http")
}

// OverrideRules sets the rule directory as if the file had set it (the
// -rules flag wins over rules:); a relative dir is relative to the working
// directory. Pass it to Load, or call Validate afterwards.
func (c *Config) OverrideRules(dir string) {
	c.Rules = Path(dir)
	c.override("rules", "-rules")
}

// KeepHTTPListen marks http.listen, written or its default, as chosen
// (IsSet): the bridge of a configuration file listens there or fails,
// since its probes and scrapes point there, instead of moving to a free
// port when another process holds it.
func (c *Config) KeepHTTPListen() {
	if !c.set("http.listen") {
		c.pos["http.listen"] = 0
	}
}

// override marks path as set by flag.
func (c *Config) override(path, flag string) {
	c.pos[path] = 0
	if c.flags == nil {
		c.flags = map[string]string{}
	}
	c.flags[path] = flag
}

// InlineSecrets lists the secret fields written in clear in the file, so
// that the bridge can warn about them.
func (c *Config) InlineSecrets() []string { return c.inlineSecrets }
