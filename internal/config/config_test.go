package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge"
)

// writeConfig writes body to dir/config.yaml with an existing rules dir next
// to it, and returns the path.
func writeConfig(t *testing.T, dir, body string) string {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, "rules"), 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigDefaults(t *testing.T) {
	c := Default()
	if err := c.Validate(); err != nil {
		t.Fatalf("built-in config invalid: %v", err)
	}
	if !c.Embedded() {
		t.Fatal("built-in config is not the embedded default")
	}
	pl := c.Pipeline
	checks := []struct {
		name      string
		got, want any
	}{
		{"http.listen", c.HTTP.Listen, ":9090"},
		{"dedupe.store", c.Dedupe.Store, DedupeMemory},
		{"dedupe.broker", c.Dedupe.Broker, ""},
		{"dedupe.bucket", c.Dedupe.Bucket, "cellbridge-dedupe"},
		{"dedupe.ttl", c.Dedupe.TTL.D(), 10 * time.Minute},
		{"dedupe.reserveTTL", c.Dedupe.ReserveTTL.D(), 30 * time.Second},
		{"dedupe.size", c.Dedupe.Size, 1000000},
		{"dedupe.requestTimeout", c.Dedupe.RequestTimeout.D(), 2 * time.Second},
		{"maxInFlight", pl.MaxInFlight, 4096},
		{"workers", pl.Workers, 0},
		{"lanes", pl.Lanes, 0},
		{"heldRecheck", pl.HeldRecheck.D(), time.Second},
		{"fetchBatch", pl.FetchBatch, 2048},
		{"holdDelay", pl.HoldDelay.D(), 5 * time.Second},
		{"retry.initial", pl.Retry.Initial.D(), 100 * time.Millisecond},
		{"retry.max", pl.Retry.Max.D(), time.Second},
		{"maxMessageBytes", pl.MaxMessageBytes, ByteSize(1 << 20)},
		{"maxHops", pl.MaxHops, 4},
		{"drainTimeout", pl.DrainTimeout.D(), 20 * time.Second},
		{"progressTimeout", pl.ProgressTimeout.D(), 60 * time.Second},
		{"stallTimeout", pl.StallTimeout.D(), 3 * time.Second},
		{"ackWait", pl.AckWait.D(), 30 * time.Second},
		{"maxHeld", pl.MaxHeld, 10000},
		{"ordering.pinnedTTL", c.Ordering.PinnedTTL.D(), 5 * time.Second},
		{"ordering.stallLimit", c.Ordering.StallLimit.D(), 30 * time.Second},
		{"partitions.bucket", c.Partitions.Bucket, "cellbridge-leases"},
		{"partitions.leaseTTL", c.Partitions.LeaseTTL.D(), 6 * time.Second},
		{"partitions.heartbeat", c.Partitions.Heartbeat.D(), 2 * time.Second},
		{"partitions.replicas", c.Partitions.Replicas, 1},
		{"partitions.replicaID", c.Partitions.ReplicaID, ""},
		{"partitions.drainTimeout", c.Partitions.DrainTimeout.D(), 10 * time.Second},
		{"log.level", c.Log.Level, "info"},
		{"log.format", c.Log.Format, "auto"},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	// Every row of the table names a real field (the broker kinds' rows are
	// checked by the kinds' tests: BrokerDefaultFields).
	for _, e := range defaults {
		if e.Value != "" && !strings.HasPrefix(e.Field, brokerRow) && !fieldByPath(reflectValue(c), e.Field).IsValid() {
			t.Errorf("defaults table names unknown field %s", e.Field)
		}
	}
}

// TestConfigDefaultsMatchBridge keeps the documented defaults equal to the
// pipeline's own (bridge.Config.WithDefaults), so that a config file that
// sets nothing behaves like a pipeline built without one.
func TestConfigDefaultsMatchBridge(t *testing.T) {
	got := Default().Pipeline.Bridge().WithDefaults()
	want := bridge.Config{}.WithDefaults()
	if got != want {
		t.Fatalf("defaults differ from the pipeline's:\n config: %+v\n bridge: %+v", got, want)
	}
}

func TestConfigEmptyFile(t *testing.T) {
	for _, body := range []string{"", "# nothing\n", "---\n"} {
		c, err := Parse("c.yaml", []byte(body))
		if err != nil {
			t.Fatalf("%q: %v", body, err)
		}
		if !c.Embedded() || c.Validate() != nil {
			t.Fatalf("%q: not a valid embedded config", body)
		}
	}
}

// TestConfigErrors checks that each mistake is reported as
// "file:line: field: message" — parse errors by Parse, the rest by
// Validate.
func TestConfigErrors(t *testing.T) {
	t.Setenv("CB_SET", "x")
	for _, tc := range []struct {
		name string
		body string
		want []string // substrings, each of one problem line
	}{
		{"yaml syntax", "rules: [", []string{"config.yaml:1: "}},
		{"unknown top field", "rule: x\n", []string{"config.yaml:1: rule: unknown field (known: rules, brokers"}},
		{"unknown nested field", "pipeline:\n  maxInflight: 3\n", []string{"config.yaml:2: pipeline.maxInflight: unknown field"}},
		{"duplicate key", "http: {listen: ':1'}\nhttp: {listen: ':2'}\n", []string{"config.yaml:2: http: duplicate key (first at line 1)"}},
		{"int wanted", "pipeline: {maxInFlight: many}\n", []string{`config.yaml:1: pipeline.maxInFlight: must be an integer, not the string "many"`}},
		{"quoted int", "pipeline: {workers: \"8\"}\n", []string{`pipeline.workers: must be an integer, not the string "8"`}},
		{"float for int", "pipeline: {workers: 1.5}\n", []string{"pipeline.workers: must be an integer, not the number 1.5"}},
		{"duration wanted", "pipeline: {holdDelay: 5}\n", []string{"pipeline.holdDelay: must be a duration"}},
		{"negative duration", "pipeline: {holdDelay: -5s}\n", []string{"pipeline.holdDelay: must not be negative"}},
		{"size wanted", "pipeline: {maxMessageBytes: big}\n", []string{"pipeline.maxMessageBytes: must be a size"}},
		{"mapping wanted", "pipeline: 3\n", []string{"config.yaml:1: pipeline: must be a mapping, not the integer 3"}},
		{"string wanted", "rules: {a: 1}\n", []string{"rules: must be a string, not a mapping"}},
		{"several at once", "pipeline:\n  workers: x\n  fetchBatch: y\n", []string{"config.yaml:2: pipeline.workers", "config.yaml:3: pipeline.fetchBatch"}},
		{"decode and validation problems together", "pipeline:\n  workers: x\n  maxHops: 0\n", []string{`config.yaml:2: pipeline.workers: must be an integer, not the string "x"`, "config.yaml:3: pipeline.maxHops: must be positive"}},
		{"env malformed", "http: {listen: \"${CB_SET\"}\n", []string{"http.listen: malformed ${...} reference"}},

		{"rules missing dir", "rules: ./nope\n", []string{"config.yaml:1: rules: rule directory: "}},
		{"dedupe store", "dedupe: {store: redis}\n", []string{"config.yaml:1: dedupe.store: unknown store \"redis\""}},
		{"dedupe embedded broker", "dedupe: {store: jetstream, broker: x}\n", []string{"dedupe.broker: the embedded default has only"}},
		{"dedupe bucket", "dedupe: {store: jetstream, bucket: \"a.b\"}\n", []string{"dedupe.bucket: invalid KV bucket name"}},
		{"dedupe replicas", "dedupe: {store: jetstream, replicas: 7}\n", []string{"dedupe.replicas: must be 1..5"}},
		{"dedupe size on jetstream", "dedupe: {store: jetstream, size: 10}\n", []string{"dedupe.size: only valid for store memory"}},
		{"dedupe bucket on the default store", "dedupe:\n  bucket: b\n", []string{"config.yaml:2: dedupe.bucket: only valid for store jetstream (the store is memory by default when every broker is NATS; write store: jetstream"}},
		{"dedupe bucket on memory", "dedupe: {store: memory, bucket: b}\n", []string{"dedupe.bucket: only valid for store jetstream"}},
		{"dedupe memory size", "dedupe: {store: memory, size: -1}\n", []string{"dedupe.size: must be positive"}},
		{"dedupe ttl", "dedupe: {ttl: 10ms}\n", []string{"dedupe.ttl: must be at least 1s"}},
		{"dedupe reserveTTL", "dedupe: {ttl: 1m, reserveTTL: 2m}\n", []string{"dedupe.reserveTTL: must be less than dedupe.ttl"}},
		{"dedupe reserveTTL rounds", "dedupe: {ttl: 2s, reserveTTL: 1500ms}\n", []string{"dedupe.reserveTTL: must be less than dedupe.ttl"}},
		{"http listen", "http: {listen: localhost}\n", []string{"config.yaml:1: http.listen: want host:port"}},
		{"http port", "http: {listen: \":99999\"}\n", []string{"http.listen: invalid port"}},
		{"pipeline zero", "pipeline: {maxInFlight: 0}\n", []string{"pipeline.maxInFlight: must be positive"}},
		{"pipeline workers", "pipeline: {workers: -1}\n", []string{"pipeline.workers: must not be negative"}},
		{"pipeline lanes", "pipeline: {lanes: -1}\n", []string{"pipeline.lanes: must not be negative"}},
		{"held recheck", "pipeline: {heldRecheck: 500us}\n", []string{"pipeline.heldRecheck: must be at least 1ms"}},
		{"drain", "pipeline: {drainTimeout: 0s}\n", []string{"pipeline.drainTimeout: must be at least 1ms"}},
		{"pipeline hops", "pipeline: {maxHops: 0}\n", []string{"pipeline.maxHops: must be positive"}},
		{"pipeline held", "pipeline: {maxHeld: 0}\n", []string{"pipeline.maxHeld: must be positive"}},
		{"in-flight huge", "pipeline: {maxInFlight: 2000000}\n", []string{"pipeline.maxInFlight: must be at most"}},
		{"hold delay", "pipeline: {holdDelay: 1ms}\n", []string{"pipeline.holdDelay: must be at least 10ms"}},
		{"retry order", "pipeline: {retry: {initial: 2s, max: 1s}}\n", []string{"pipeline.retry.initial: must not exceed pipeline.retry.max"}},
		{"retry zero", "pipeline:\n  retry:\n    max: 0s\n", []string{"config.yaml:3: pipeline.retry.max: must be at least 1ms"}},
		{"progress", "pipeline: {progressTimeout: 500us}\n", []string{"pipeline.progressTimeout: must be at least 1ms"}},
		{"ackWait", "pipeline: {ackWait: 3ms}\n", []string{"pipeline.ackWait: must be at least 4ms"}},
		{"max bytes", "pipeline: {maxMessageBytes: 1GiB}\n", []string{"pipeline.maxMessageBytes: must be between"}},
		{"pinnedTTL", "ordering:\n  pinnedTTL: 1s\n", []string{"config.yaml:2: ordering.pinnedTTL: must be at least 2s"}},
		{"check replicated", "dedupe: {store: jetstream, protocol: check, replicas: 3}\n", []string{"dedupe.protocol: check needs dedupe.replicas: 1"}},
		{"protocol unknown", "dedupe: {store: jetstream, protocol: fast}\n", []string{"dedupe.protocol: unknown protocol \"fast\""}},
		{"protocol memory", "dedupe: {store: memory, protocol: check}\n", []string{"dedupe.protocol: only valid for store jetstream"}},
		{"stallLimit", "ordering:\n  stallLimit: 8s\n", []string{"config.yaml:2: ordering.stallLimit: must be above pipeline.stallTimeout (3s) and at least 2×ordering.pinnedTTL (10s)"}},
		{"stallLimit below stallTimeout", "pipeline: {stallTimeout: 20s}\nordering: {pinnedTTL: 2s, stallLimit: 15s}\n", []string{"ordering.stallLimit: must be above pipeline.stallTimeout (20s)"}},
		{"ordering unknown", "ordering: {pinTTL: 5s}\n", []string{"config.yaml:1: ordering.pinTTL: unknown field"}},
		{"lease bucket", "partitions: {bucket: \"a.b\"}\n", []string{"partitions.bucket: invalid KV bucket name"}},
		{"lease ttl", "partitions:\n  leaseTTL: 1s\n", []string{"config.yaml:2: partitions.leaseTTL: must be at least 2s"}},
		{"lease heartbeat", "partitions:\n  leaseTTL: 6s\n  heartbeat: 3s\n", []string{"config.yaml:3: partitions.heartbeat: must be at most leaseTTL/3 (2s)"}},
		{"lease heartbeat short", "partitions: {heartbeat: 10ms}\n", []string{"partitions.heartbeat: must be at least 100ms"}},
		{"lease replicas", "partitions: {replicas: 0}\n", []string{"partitions.replicas: must be 1..5"}},
		{"replica id", "partitions: {replicaID: \"pod.1\"}\n", []string{"partitions.replicaID: invalid replica id \"pod.1\""}},
		{"partition drain", "partitions: {drainTimeout: 1ms}\n", []string{"partitions.drainTimeout: must be at least 100ms"}},
		{"log level", "log: {level: loud}\n", []string{"config.yaml:1: log.level: unknown level"}},
		{"log format", "log: {format: xml}\n", []string{"log.format: unknown format"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, t.TempDir(), tc.body)
			_, err := Load(p)
			var ce Errors
			if !errors.As(err, &ce) {
				t.Fatalf("want Errors, got %v", err)
			}
			text := strings.ReplaceAll(err.Error(), p, "config.yaml")
			lines := strings.Split(text, "\n")
			if len(lines) < len(tc.want) {
				t.Errorf("got %d problems, want at least %d:\n%s", len(lines), len(tc.want), text)
			}
			for _, w := range tc.want {
				if !strings.Contains(text, w) {
					t.Errorf("missing %q in:\n%s", w, text)
				}
			}
			for _, l := range lines {
				if !strings.HasPrefix(l, "config.yaml") {
					t.Errorf("problem does not start with the file name: %q", l)
				}
			}
		})
	}
}

// TestConfigNullKeepsDefault checks that a null value (`key:` alone, `~`,
// `null`) keeps the field's default, as if it were not written, instead of
// leaving it zero.
func TestConfigNullKeepsDefault(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string
		got  func(c *Config) any
		want any
	}{
		{"empty duration", "dedupe:\n  ttl:\n", func(c *Config) any { return c.Dedupe.TTL.D() }, 10 * time.Minute},
		{"tilde duration", "dedupe: {reserveTTL: ~}\n", func(c *Config) any { return c.Dedupe.ReserveTTL.D() }, 30 * time.Second},
		{"null integer", "pipeline:\n  maxHops: null\n", func(c *Config) any { return c.Pipeline.MaxHops }, 4},
		{"null size", "pipeline: {maxMessageBytes: ~}\n", func(c *Config) any { return c.Pipeline.MaxMessageBytes }, ByteSize(1 << 20)},
		{"null string", "http:\n  listen:\n", func(c *Config) any { return c.HTTP.Listen }, ":9090"},
		{"null section", "partitions:\n", func(c *Config) any { return c.Partitions.LeaseTTL.D() }, 6 * time.Second},
		{"null computed", "partitions: {heartbeat: ~}\n", func(c *Config) any { return c.Partitions.Heartbeat.D() }, 2 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Load(writeConfig(t, t.TempDir(), tc.body))
			if err != nil {
				t.Fatalf("Load: %v", err)
			}
			if got := tc.got(c); got != tc.want {
				t.Errorf("got %v, want the default %v", got, tc.want)
			}
		})
	}
	// A null field without a default is still missing, and the problem
	// names its line.
	p := writeConfig(t, t.TempDir(), "log: {level: warn}\nrules:\nbrokers:\n  nats: {type: nats, url: \"nats://a:1\"}\n")
	if _, err := Load(p); !strings.Contains(fmt.Sprint(err), p+":2: rules: required when brokers are configured") {
		t.Errorf("null rules: %v", err)
	}
}

// TestLoadOverrides checks that a command line's -rules and -http replace
// the file's values before they are validated: the file's rules directory
// need not exist where -rules names another, and a problem of a flag's
// value names the flag.
func TestLoadOverrides(t *testing.T) {
	local := t.TempDir()
	missing := filepath.Join(local, "nope")
	for _, tc := range []struct {
		name      string
		body      string
		overrides []func(*Config)
		want      string // the problem reported; "" valid
		rules     string // the rule directory when valid
	}{
		{"file rules missing", "rules: ./prod-rules\n", nil, "config.yaml:1: rules: rule directory: ", ""},
		{"-rules instead of a missing dir", "rules: ./prod-rules\n", []func(*Config){func(c *Config) { c.OverrideRules(local) }}, "", local},
		{"-rules missing", "rules: ./rules\n", []func(*Config){func(c *Config) { c.OverrideRules(missing) }},
			// The flag, not the file, holds the value: no line.
			"config.yaml: rules: rule directory: " + missing + ": no such file or directory (set by -rules)", ""},
		{"-http instead of a bad address", "http: {listen: localhost}\n", []func(*Config){func(c *Config) { c.OverrideHTTPListen("127.0.0.1:0") }}, "", ""},
		{"-http bad", "", []func(*Config){func(c *Config) { c.OverrideHTTPListen("localhost") }},
			`config.yaml: http.listen: want host:port or :port, got "localhost" (set by -http)`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, t.TempDir(), tc.body)
			c, err := Load(p, tc.overrides...)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("Load: %v", err)
				}
				if string(c.Rules) != tc.rules && tc.rules != "" {
					t.Errorf("rules %q, want %q", c.Rules, tc.rules)
				}
				return
			}
			if text := strings.ReplaceAll(fmt.Sprint(err), p, "config.yaml"); !strings.HasPrefix(text, tc.want) {
				t.Errorf("error %q, want %q", text, tc.want)
			}
		})
	}
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]int64{"1": 1, "1B": 1, "2KiB": 2048, "1MiB": 1 << 20, "3 MB": 3e6, "1k": 1024, "4GiB": 4 << 30,
		"512KiB": 512 << 10, "1000": 1000, "2 MB": 2000000} {
		var b ByteSize
		if err := b.ParseScalar(in); err != nil || int64(b) != want {
			t.Errorf("%q = %d, %v; want %d", in, b, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "1XB", "-1", "1.5MiB", "99999999999999999999", "9999999999999GiB", "8700000000GiB"} {
		var b ByteSize
		if err := b.ParseScalar(in); err == nil {
			t.Errorf("%q accepted as %d", in, b)
		}
	}
}

func FuzzByteSize(f *testing.F) {
	for _, s := range []string{"1MiB", "512KiB", "1000", "2 MB", "", "-1", "9999999999999GiB", "8700000000GiB", "1XB"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		var b ByteSize
		if err := b.ParseScalar(s); err == nil && b < 0 {
			t.Fatalf("%q parsed to negative %d", s, b)
		}
	})
}

func reflectValue(c *Config) reflect.Value { return reflect.ValueOf(c).Elem() }

// TestPipelineConfigCoversBridge: every field of bridge.Config can be set
// from the file (a pipeline limit added to the bridge only would silently
// keep its default).
func TestPipelineConfigCoversBridge(t *testing.T) {
	pt := reflect.TypeFor[PipelineConfig]()
	bt := reflect.TypeFor[bridge.Config]()
	for i := range bt.NumField() {
		name := bt.Field(i).Name
		if _, ok := pt.FieldByName(name); !ok {
			t.Errorf("bridge.Config.%s has no field in PipelineConfig (and no row in the defaults table)", name)
		}
	}
	// And the conversion sets each of them: a configuration with no field
	// at its zero value converts to a bridge.Config with none either.
	b := reflect.ValueOf(Default().Pipeline.Bridge())
	for i := range b.NumField() {
		if name := bt.Field(i).Name; b.Field(i).IsZero() && name != "Workers" && name != "Lanes" {
			t.Errorf("PipelineConfig.Bridge leaves %s at zero", name)
		}
	}
}

// The lease heartbeat follows a lease TTL written in the file (a third of
// it), unless the file writes the heartbeat too.
func TestPartitionsHeartbeatFollowsLeaseTTL(t *testing.T) {
	for body, want := range map[string]time.Duration{
		"partitions: {leaseTTL: 9s}\n":                 3 * time.Second,
		"partitions: {leaseTTL: 9s, heartbeat: 1s}\n":  time.Second,
		"partitions: {replicaID: pod-7}\n":             2 * time.Second,
		"ordering: {pinnedTTL: 2s}\n":                  2 * time.Second,
		"partitions: {leaseTTL: 3s, drainTimeout: 1s}": time.Second,
	} {
		c, err := Load(writeConfig(t, t.TempDir(), body))
		if err != nil {
			t.Fatalf("%q: %v", body, err)
		}
		if got := c.Partitions.Heartbeat.D(); got != want {
			t.Errorf("%q: heartbeat %s, want %s", body, got, want)
		}
	}
}

// A replica holding every partition of a rule may hold as many unacknowledged
// messages as the consumer of an unpartitioned rule, not n times as many.
func TestPartitionMaxAckPending(t *testing.T) {
	c := Default()
	// ceil(24096/12) + ceil(2048/12)
	if got, want := c.PartitionMaxAckPending(12), 2008+171; got != want {
		t.Errorf("12 partitions: MaxAckPending %d, want %d", got, want)
	}
	if got := c.PartitionFetchBatch(12); got != 171 {
		t.Errorf("12 partitions: fetch batch %d, want 171", got)
	}
	if got := c.PartitionFetchBatch(1024); got != 16 {
		t.Errorf("1024 partitions: fetch batch %d, want at least 16", got)
	}
	for _, n := range []int{1, 2, 3, 7, 12, 1024} {
		total := n * c.PartitionMaxAckPending(n)
		if p := c.Pipeline; total < p.MaxInFlight+p.MaxHeld+p.MaxLagging || c.PartitionMaxAckPending(n) > c.SourceMaxAckPending() {
			t.Errorf("%d partitions: %d each, %d in all; want at least maxInFlight+maxHeld+maxLagging and each at most %d", n,
				c.PartitionMaxAckPending(n), total, c.SourceMaxAckPending())
		}
	}
}

// The window a stall hand-over's re-read must stay within: the NATS targets'
// guaranteed duplicate window, the shared store's ttl where it protects
// more, and only the store's ttl (or nothing) for a broker without windows.
func TestHandOverWindow(t *testing.T) {
	nats := &Broker{Type: NATSType}
	rmq := &Broker{Type: "rocketmq"}
	for _, c := range []struct {
		name    string
		brokers map[string]*Broker
		store   string
		ttl     time.Duration
		want    time.Duration
	}{
		{"nats, memory", map[string]*Broker{"n": nats}, DedupeMemory, 10 * time.Minute, 61 * time.Second},
		{"nats, jetstream", map[string]*Broker{"n": nats}, DedupeJetStream, 10 * time.Minute, 10 * time.Minute},
		{"nats, jetstream, short ttl", map[string]*Broker{"n": nats}, DedupeJetStream, 40 * time.Second, 61 * time.Second},
		{"rocketmq, jetstream", map[string]*Broker{"n": nats, "r": rmq}, DedupeJetStream, 10 * time.Minute, 10 * time.Minute},
		{"rocketmq, jetstream, short ttl", map[string]*Broker{"n": nats, "r": rmq}, DedupeJetStream, 40 * time.Second, 40 * time.Second},
		{"rocketmq, memory", map[string]*Broker{"n": nats, "r": rmq}, DedupeMemory, 10 * time.Minute, -1},
	} {
		cfg := Default()
		cfg.Brokers, cfg.Dedupe.Store, cfg.Dedupe.TTL = c.brokers, c.store, Duration(c.ttl)
		if got := cfg.HandOverWindow(); got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
}
