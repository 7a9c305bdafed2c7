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
	"github.com/cellbridge/cellbridge/router"
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
		{"dedupe.store", c.Dedupe.Store, DedupeJetStream},
		{"dedupe.broker", c.Dedupe.Broker, "nats"},
		{"dedupe.bucket", c.Dedupe.Bucket, "cellbridge-dedupe"},
		{"dedupe.ttl", c.Dedupe.TTL.D(), 10 * time.Minute},
		{"dedupe.reserveTTL", c.Dedupe.ReserveTTL.D(), 30 * time.Second},
		{"dedupe.size", c.Dedupe.Size, 1000000},
		{"maxInFlight", pl.MaxInFlight, 4096},
		{"workers", pl.Workers, 0},
		{"lanes", pl.Lanes, 0},
		{"heldRecheck", pl.HeldRecheck.D(), time.Second},
		{"fetchBatch", pl.FetchBatch, 1024},
		{"holdDelay", pl.HoldDelay.D(), 5 * time.Second},
		{"retry.initial", pl.Retry.Initial.D(), 100 * time.Millisecond},
		{"retry.max", pl.Retry.Max.D(), 5 * time.Second},
		{"maxMessageBytes", pl.MaxMessageBytes, ByteSize(1 << 20)},
		{"maxHops", pl.MaxHops, 4},
		{"drainTimeout", pl.DrainTimeout.D(), 20 * time.Second},
		{"progressTimeout", pl.ProgressTimeout.D(), 60 * time.Second},
		{"ackWait", pl.AckWait.D(), 30 * time.Second},
		{"maxHeld", pl.MaxHeld, 10000},
		{"log.level", c.Log.Level, "info"},
		{"log.format", c.Log.Format, "auto"},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s = %v, want %v", ch.name, ch.got, ch.want)
		}
	}
	// Every row of the table names a real field.
	for _, e := range configDefaults {
		if e.Value != "" && !fieldByPath(reflectValue(c), e.Field).IsValid() {
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

func TestConfigFull(t *testing.T) {
	dir := t.TempDir()
	for _, f := range []string{"ca.pem", "cert.pem", "key.pem", "user.creds"} {
		if err := os.WriteFile(filepath.Join(dir, f), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "sk"), []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CB_TEST_PASSWORD", "pa$$word")
	t.Setenv("CB_TEST_AK", "ak-1")
	p := writeConfig(t, dir, `
rules: ./rules
brokers:
  nats:
    type: nats
    url: "nats://127.0.0.1:4222, tls://10.0.0.2:4222"
    tls: {ca: ca.pem, cert: cert.pem, key: key.pem}
    user: bridge
    password: ${CB_TEST_PASSWORD}
  edge:
    type: nats
    url: nats://edge:4222
    creds: user.creds
  rmq-hz:
    type: rocketmq
    nameservers: ["10.1.0.5:9876", "10.1.0.6:9876"]
    accessKey: ${CB_TEST_AK}
    secretKey: file:sk
    namespace: prod
    instancePrefix: cb
    exactlyOnce: transactional
dedupe: {store: jetstream, broker: nats, bucket: dd, ttl: 15m, replicas: 3}
http: {listen: "127.0.0.1:9191"}
pipeline:
  maxInFlight: 1_000
  workers: 8
  fetchBatch: 100
  holdDelay: 250ms
  retry: {initial: 10ms, max: 1s}
  maxMessageBytes: 512KiB
  maxHops: 2
  drainTimeout: 5s
  progressTimeout: 30s
  ackWait: 1m
  maxHeld: 50
log: {level: debug, format: json}
`)
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.Rules != filepath.Join(dir, "rules") {
		t.Errorf("rules = %q", c.Rules)
	}
	n := c.Brokers["nats"]
	if n.Password.Value() != "pa$$word" || n.User != "bridge" {
		t.Errorf("nats auth = %q/%q", n.User, n.Password.Value())
	}
	if n.TLS.CA != filepath.Join(dir, "ca.pem") {
		t.Errorf("tls.ca = %q (want relative to the config file)", n.TLS.CA)
	}
	if c.Brokers["edge"].Creds != filepath.Join(dir, "user.creds") {
		t.Errorf("creds = %q", c.Brokers["edge"].Creds)
	}
	r := c.Brokers["rmq-hz"]
	if r.AccessKey.Value() != "ak-1" || r.SecretKey.Value() != "s3cret" || r.ExactlyOnce != "transactional" ||
		len(r.Nameservers) != 2 || r.Namespace != "prod" || r.InstancePrefix != "cb" {
		t.Errorf("rocketmq broker = %+v", r)
	}
	if got := fmt.Sprintf("%v %+v %#v", r.SecretKey, r.SecretKey, r.SecretKey); strings.Contains(got, "s3cret") {
		t.Errorf("secret leaks through fmt: %s", got)
	}
	if c.Dedupe.Bucket != "dd" || c.Dedupe.TTL.D() != 15*time.Minute || c.Dedupe.Replicas != 3 {
		t.Errorf("dedupe = %+v", c.Dedupe)
	}
	pl := c.Pipeline
	if pl.MaxInFlight != 1000 || pl.MaxMessageBytes != 512<<10 || pl.Retry.Initial.D() != 10*time.Millisecond ||
		pl.AckWait.D() != time.Minute || pl.MaxHeld != 50 || pl.HoldDelay.D() != 250*time.Millisecond {
		t.Errorf("pipeline = %+v", pl)
	}
	if c.Embedded() {
		t.Error("config with brokers is embedded")
	}
}

func TestConfigDedupeDefaults(t *testing.T) {
	for _, tc := range []struct {
		name, brokers, store, broker string
	}{
		{"embedded", "", DedupeJetStream, "nats"},
		{"broker named nats", "brokers: {a: {type: nats, url: nats://a:1}, nats: {type: nats, url: nats://b:1}}", DedupeJetStream, "nats"},
		{"only nats broker", "brokers: {a: {type: nats, url: nats://a:1}, r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}}", DedupeJetStream, "a"},
		{"rocketmq only", "brokers: {r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}}", DedupeMemory, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := Parse("c.yaml", []byte(tc.brokers))
			if err != nil {
				t.Fatal(err)
			}
			if c.Dedupe.Store != tc.store || c.Dedupe.Broker != tc.broker {
				t.Errorf("dedupe = %s/%s, want %s/%s", c.Dedupe.Store, c.Dedupe.Broker, tc.store, tc.broker)
			}
		})
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
	nats := "brokers:\n  nats: {type: nats, url: nats://127.0.0.1:4222}\n"
	for _, tc := range []struct {
		name string
		body string
		want []string // substrings, each of one problem line
	}{
		{"yaml syntax", "rules: [", []string{"config.yaml:1: "}},
		{"unknown top field", "rule: x\n", []string{"config.yaml:1: rule: unknown field (known: rules, brokers"}},
		{"unknown nested field", "pipeline:\n  maxInflight: 3\n", []string{"config.yaml:2: pipeline.maxInflight: unknown field"}},
		{"unknown broker field", "brokers:\n  nats:\n    type: nats\n    url: nats://a:1\n    pass: x\n", []string{"config.yaml:5: brokers.nats.pass: unknown field"}},
		{"duplicate key", "http: {listen: ':1'}\nhttp: {listen: ':2'}\n", []string{"config.yaml:2: http: duplicate key (first at line 1)"}},
		{"duplicate broker", nats + "  nats: {type: nats, url: nats://b:1}\n", []string{"config.yaml:3: brokers.nats: duplicate key (first at line 2)"}},
		{"int wanted", "pipeline: {maxInFlight: many}\n", []string{"config.yaml:1: pipeline.maxInFlight: want an integer"}},
		{"quoted int", "pipeline: {workers: \"8\"}\n", []string{"pipeline.workers: want an integer, got a string"}},
		{"float for int", "pipeline: {workers: 1.5}\n", []string{"pipeline.workers: want an integer"}},
		{"duration wanted", "pipeline: {holdDelay: 5}\n", []string{"pipeline.holdDelay: want a duration"}},
		{"negative duration", "pipeline: {holdDelay: -5s}\n", []string{"pipeline.holdDelay: must not be negative"}},
		{"size wanted", "pipeline: {maxMessageBytes: big}\n", []string{"pipeline.maxMessageBytes: want a size"}},
		{"mapping wanted", "pipeline: 3\n", []string{"config.yaml:1: pipeline: want a mapping, got an integer"}},
		{"list wanted", "brokers:\n  r: {type: rocketmq, nameservers: \"a:1\"}\n", []string{"brokers.r.nameservers: want a list"}},
		{"string wanted", "rules: {a: 1}\n", []string{"rules: want a string, got a mapping"}},
		{"several at once", "pipeline:\n  workers: x\n  fetchBatch: y\n", []string{"config.yaml:2: pipeline.workers", "config.yaml:3: pipeline.fetchBatch"}},
		{"decode and validation problems together", "pipeline:\n  workers: x\n  maxHops: 0\n", []string{"config.yaml:2: pipeline.workers: want an integer", "config.yaml:3: pipeline.maxHops: must be positive"}},
		{"env unset", nats[:len(nats)-2] + ", user: u, password: \"${CB_UNSET_PW}\"}\n", []string{"config.yaml:2: brokers.nats.password: environment variable CB_UNSET_PW is not set"}},
		{"env malformed", "http: {listen: \"${CB_SET\"}\n", []string{"http.listen: malformed ${...} reference"}},
		{"secret file missing", nats[:len(nats)-2] + ", token: \"file:/nonexistent/tok\"}\n", []string{"brokers.nats.token: reading secret file: /nonexistent/tok: no such file"}},

		{"rules required", nats, []string{"config.yaml: rules: required when brokers are configured"}},
		{"rules missing dir", "rules: ./nope\n", []string{"config.yaml:1: rules: rule directory: "}},
		{"broker type missing", "rules: rules\nbrokers:\n  a: {url: nats://a:1}\n", []string{"config.yaml:3: brokers.a.type: required"}},
		{"broker type unknown", "rules: rules\nbrokers:\n  a: {type: kafka}\n", []string{"brokers.a.type: unknown broker type \"kafka\""}},
		{"broker empty", "rules: rules\nbrokers:\n  a:\n", []string{"config.yaml:3: brokers.a: empty broker"}},
		{"broker name", "rules: rules\nbrokers:\n  \"a b\": {type: nats, url: nats://a:1}\n", []string{"brokers.a b: broker names use"}},
		{"nats url missing", "rules: rules\nbrokers:\n  a: {type: nats}\n", []string{"brokers.a.url: required for type nats"}},
		{"nats url scheme", "rules: rules\nbrokers:\n  a: {type: nats, url: \"http://a:1\"}\n", []string{"brokers.a.url: unsupported scheme \"http\""}},
		{"nats url bad", "rules: rules\nbrokers:\n  a: {type: nats, url: \"a:1\"}\n", []string{"brokers.a.url: "}},
		{"nats url empty item", "rules: rules\nbrokers:\n  a: {type: nats, url: \"nats://a:1,\"}\n", []string{"brokers.a.url: empty URL in list"}},
		{"rmq field on nats", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, namespace: x}\n", []string{"brokers.a.namespace: only valid for type rocketmq"}},
		{"tls cert without key", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, tls: {cert: /etc/hostname}}\n", []string{"brokers.a.tls: cert and key go together"}},
		{"tls empty", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, tls: {}}\n", []string{"brokers.a.tls: empty"}},
		{"tls file missing", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, tls: {ca: /nonexistent/ca.pem}}\n", []string{"brokers.a.tls.ca: cannot read file: /nonexistent/ca.pem"}},
		{"creds missing", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, creds: /nonexistent/u.creds}\n", []string{"brokers.a.creds: cannot read file"}},
		{"user without password", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, user: u}\n", []string{"brokers.a.password: required with user"}},
		{"password without user", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, password: p}\n", []string{"brokers.a.user: required with password"}},
		{"two auth methods", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, token: t, user: u, password: p}\n", []string{"brokers.a: choose one authentication"}},
		{"rmq nameservers missing", "rules: rules\nbrokers:\n  r: {type: rocketmq}\n", []string{"brokers.r.nameservers: required"}},
		{"rmq nameserver bad", "rules: rules\nbrokers:\n  r:\n    type: rocketmq\n    nameservers:\n      - 10.0.0.1:9876\n      - nohost\n", []string{"config.yaml:7: brokers.r.nameservers[1]: want IP:port"}},
		{"rmq nameserver host name", "rules: rules\nbrokers:\n  r:\n    type: rocketmq\n    nameservers:\n      - namesrv.local:9876\n", []string{"config.yaml:6: brokers.r.nameservers[0]: want IP:port (the RocketMQ client refuses host names)"}},
		{"rmq keys pair", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], accessKey: a}\n", []string{"brokers.r.secretKey: required with accessKey"}},
		{"rmq exactlyOnce", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], exactlyOnce: always}\n", []string{"brokers.r.exactlyOnce: unknown mode"}},
		{"nats field on rmq", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], url: nats://x:1}\n", []string{"brokers.r.url: only valid for type nats"}},
		{"dedupe store", "dedupe: {store: redis}\n", []string{"config.yaml:1: dedupe.store: unknown store \"redis\""}},
		{"dedupe unknown broker", "rules: rules\n" + nats + "dedupe: {store: jetstream, broker: other}\n", []string{"dedupe.broker: unknown broker \"other\""}},
		{"dedupe rmq broker", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}\ndedupe: {store: jetstream, broker: r}\n", []string{"dedupe.broker: broker \"r\" is of type rocketmq"}},
		{"dedupe no broker", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}\ndedupe: {store: jetstream}\n", []string{"dedupe.broker: required for store jetstream"}},
		{"dedupe embedded broker", "dedupe: {store: jetstream, broker: x}\n", []string{"dedupe.broker: the embedded default has only"}},
		{"dedupe bucket", "dedupe: {bucket: \"a.b\"}\n", []string{"dedupe.bucket: invalid KV bucket name"}},
		{"dedupe replicas", "dedupe: {replicas: 7}\n", []string{"dedupe.replicas: must be 1..5"}},
		{"dedupe size on jetstream", "dedupe: {size: 10}\n", []string{"dedupe.size: only valid for store memory"}},
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

func TestConfigSecrets(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	if err := os.WriteFile(tok, []byte("tok-from-file\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("CB_TOKEN_DIR", dir)
	t.Setenv("CB_URL", "nats://h:4222")
	for _, tc := range []struct {
		name, value, want string
	}{
		{"inline", "plain", "plain"},
		{"env", "${CB_TOKEN_DIR}", dir},
		{"env default", "${CB_NOPE:-fallback}", "fallback"},
		{"env set beats default", "${CB_TOKEN_DIR:-fallback}", dir},
		{"file absolute", "file:" + tok, "tok-from-file"},
		{"file relative to config", "file:token", "tok-from-file"},
		{"file path from env", "file:${CB_TOKEN_DIR}/token", "tok-from-file"},
		{"dollar escape", "a$$b", "a$b"},
		{"lone dollar kept", "a$b", "a$b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, dir, fmt.Sprintf("rules: rules\nbrokers:\n  nats: {type: nats, url: \"${CB_URL}\", token: %q}\n", tc.value))
			c, err := Load(p)
			if err != nil {
				t.Fatal(err)
			}
			if inline := len(c.inlineSecrets) > 0; inline != (tc.name == "inline" || strings.HasPrefix(tc.name, "lone") || strings.HasPrefix(tc.name, "dollar")) {
				t.Errorf("inline secrets %v", c.inlineSecrets)
			}
			if got := c.Brokers["nats"].Token.Value(); got != tc.want {
				t.Errorf("token = %q, want %q", got, tc.want)
			}
			if c.Brokers["nats"].URL != "nats://h:4222" {
				t.Errorf("url = %q", c.Brokers["nats"].URL)
			}
		})
	}
	// Numbers may come from the environment although YAML sees a string.
	t.Setenv("CB_WORKERS", "12")
	c, err := Parse("c.yaml", []byte("pipeline: {workers: \"${CB_WORKERS}\"}\n"))
	if err != nil || c.Pipeline.Workers != 12 {
		t.Fatalf("workers from env: %v %v", c, err)
	}
}

func TestByteSize(t *testing.T) {
	for in, want := range map[string]int64{"1": 1, "1B": 1, "2KiB": 2048, "1MiB": 1 << 20, "3 MB": 3e6, "1k": 1024, "4GiB": 4 << 30,
		"512KiB": 512 << 10, "1000": 1000, "2 MB": 2000000} {
		var b ByteSize
		if err := b.parseScalar(in); err != nil || int64(b) != want {
			t.Errorf("%q = %d, %v; want %d", in, b, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "1XB", "-1", "1.5MiB", "99999999999999999999", "9999999999999GiB", "8700000000GiB"} {
		var b ByteSize
		if err := b.parseScalar(in); err == nil {
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
		if err := b.parseScalar(s); err == nil && b < 0 {
			t.Fatalf("%q parsed to negative %d", s, b)
		}
	})
}

func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("rules: x\nbrokers: {a: {type: nats, url: nats://a:1}}\n"))
	f.Add([]byte("pipeline: {maxMessageBytes: 1MiB, retry: {initial: 1s}}\n"))
	f.Add([]byte("a: &x {b: 1}\nc: *x\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("f.yaml", data)
		if err == nil {
			_ = c.Validate()
		}
	})
}

func reflectValue(c *Config) reflect.Value { return reflect.ValueOf(c).Elem() }

// exampleRules copies deploy/rules into a temp dir, applying the given
// old→new replacements to every file, and returns the dir.
func exampleRules(t testing.TB, replace ...string) string {
	t.Helper()
	src := filepath.Join("..", "..", "deploy", "rules")
	dst := t.TempDir()
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	r := strings.NewReplacer(replace...)
	used := make([]bool, len(replace)/2)
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(replace); i += 2 {
			used[i/2] = used[i/2] || strings.Contains(string(b), replace[i])
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), []byte(r.Replace(string(b))), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// The example rules may be edited; a replacement that no longer
	// matches would silently test the unmodified rules.
	for i, ok := range used {
		if !ok {
			t.Fatalf("deploy/rules no longer contains %q; update the test", replace[2*i])
		}
	}
	return dst
}

func TestConfigCheckRules(t *testing.T) {
	natsB := "  nats: {type: nats, url: nats://127.0.0.1:4222}\n"
	rmqB := "  rmq: {type: rocketmq, nameservers: [\"127.0.0.1:9876\"]}\n"
	cellB := "  nats-rz00: {type: nats, url: nats://a:1}\n  nats-rz01: {type: nats, url: nats://a:1}\n  nats-rz10: {type: nats, url: nats://a:1}\n  nats-gz00: {type: nats, url: nats://a:1}\n"
	for _, tc := range []struct {
		name    string
		brokers string
		replace []string
		want    []string // empty: valid
	}{
		{"valid", natsB, nil, nil},
		{"embedded valid", "", nil, nil},
		{"source broker unknown", natsB, []string{"broker: nats               #", "broker: nats-src #"},
			[]string{"orders.yaml:", "orders.source.broker: broker \"nats-src\" is not defined in config"}},
		{"source broker wrong type", natsB + rmqB, []string{"broker: nats               #", "broker: rmq #"},
			[]string{"orders.source.broker: broker \"rmq\" is of type rocketmq", "needs a nats broker"}},
		{"dlq broker unknown", natsB, []string{"broker: nats\n  subject: dlq.payments", "broker: gone\n  subject: dlq.payments"},
			[]string{"payments.dlq.broker: broker \"gone\" is not defined"}},
		{"cell broker template ok", natsB + cellB, []string{"broker: nats\n  subject: \"cell.{cell}.orders\"", "broker: \"nats-{cell}\"\n  subject: \"cell.{cell}.orders\""}, nil},
		{"cell broker template missing", natsB + "  nats-rz00: {type: nats, url: nats://a:1}\n",
			[]string{"broker: nats\n  subject: \"cell.{cell}.orders\"", "broker: \"nats-{cell}\"\n  subject: \"cell.{cell}.orders\""},
			[]string{"orders.target.broker: broker \"nats-rz01\" (target broker \"nats-{cell}\" for cell rz01) is not defined",
				"broker \"nats-rz10\"", "broker \"nats-gz00\""}},
		{"embedded only has nats", "", []string{"broker: nats               #", "broker: other #"},
			[]string{"the embedded default has only the broker \"nats\""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rules := exampleRules(t, tc.replace...)
			body := "rules: " + rules + "\n"
			if tc.brokers != "" {
				body += "brokers:\n" + tc.brokers
			}
			p := writeConfig(t, t.TempDir(), body)
			c, err := Load(p)
			if err != nil {
				t.Fatal(err)
			}
			tbl, err := router.Load(rules)
			if err != nil {
				t.Fatalf("rules: %v", err)
			}
			err = c.CheckRules(tbl)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("unexpected: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("missing %q in:\n%v", w, err)
				}
			}
		})
	}
}
