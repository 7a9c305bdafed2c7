package app

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/bridge/rmq"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/router"
)

// The configuration file as the broker kinds of this package define it.

// natsOf returns the settings of NATS broker name.
func natsOf(t *testing.T, c *config.Config, name string) *NATSBroker {
	t.Helper()
	s, ok := c.Brokers[name].Settings.(*NATSBroker)
	if !ok {
		t.Fatalf("broker %s: settings %T", name, c.Brokers[name].Settings)
	}
	return s
}

// rmqOf returns the settings of RocketMQ broker name.
func rmqOf(t *testing.T, c *config.Config, name string) *RocketMQBroker {
	t.Helper()
	s, ok := c.Brokers[name].Settings.(*RocketMQBroker)
	if !ok {
		t.Fatalf("broker %s: settings %T", name, c.Brokers[name].Settings)
	}
	return s
}

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
    checkBackWait: 36s
    messageGroups: true
    persistInterval: 100ms
    ackTimeout: 4s
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
	c, err := config.Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if string(c.Rules) != filepath.Join(dir, "rules") {
		t.Errorf("rules = %q", c.Rules)
	}
	n := natsOf(t, c, "nats")
	if n.Password.Value() != "pa$$word" || n.User != "bridge" {
		t.Errorf("nats auth = %q/%q", n.User, n.Password.Value())
	}
	if string(n.TLS.CA) != filepath.Join(dir, "ca.pem") {
		t.Errorf("tls.ca = %q (want relative to the config file)", n.TLS.CA)
	}
	if edge := natsOf(t, c, "edge"); string(edge.Creds) != filepath.Join(dir, "user.creds") {
		t.Errorf("creds = %q", edge.Creds)
	}
	r := rmqOf(t, c, "rmq-hz")
	if r.AccessKey.Value() != "ak-1" || r.SecretKey.Value() != "s3cret" || r.ExactlyOnce != "transactional" ||
		len(r.Nameservers) != 2 || r.Namespace != "prod" || r.InstancePrefix != "cb" ||
		r.CheckBackWait.D() != 36*time.Second || !r.MessageGroups || r.PersistInterval.D() != 100*time.Millisecond ||
		r.AckTimeout.D() != 4*time.Second {
		t.Errorf("rocketmq broker = %+v", r)
	}
	if a := r.adapter("rmq-hz"); !a.Transactional || a.CheckBackWait != 36*time.Second || !a.MessageGroups || a.SendTimeout != 4*time.Second {
		t.Errorf("rocketmq adapter config = %+v", a)
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
	// brokerErr is the dedupe.broker problem Validate reports ("" none).
	for _, tc := range []struct {
		name, brokers, store, broker, brokerErr string
	}{
		// Every target a JetStream stream: its duplicate window covers the
		// replicas (docs/guarantees.md, section 8).
		{"embedded", "", config.DedupeMemory, "", ""},
		{"nats only", "brokers: {a: {type: nats, url: nats://a:1}, nats: {type: nats, url: nats://b:1}}", config.DedupeMemory, "", ""},
		{"nats only, broker written", "brokers: {nats: {type: nats, url: nats://b:1}}\ndedupe: {store: jetstream}", config.DedupeJetStream, "nats", ""},
		// A RocketMQ broker may be a target, which has no duplicate window.
		{"rocketmq and nats", "brokers: {a: {type: nats, url: nats://a:1}, r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}}", config.DedupeJetStream, "a", ""},
		{"rocketmq and nats named nats", "brokers: {a: {type: nats, url: nats://a:1}, nats: {type: nats, url: nats://b:1}, r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}}", config.DedupeJetStream, "nats", ""},
		// Several NATS brokers, none named nats: still the shared store,
		// and the operator is asked which broker holds it.
		{"rocketmq and two nats", "brokers: {a: {type: nats, url: nats://a:1}, b: {type: nats, url: nats://b:1}, r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}}", config.DedupeJetStream, "",
			"c.yaml:1: dedupe.broker: required for store jetstream when there is no broker named \"nats\" or several NATS brokers: name one of a, b" +
				" (the store is jetstream by default when a RocketMQ broker is configured: its targets have no duplicate window)"},
		{"rocketmq and two nats, broker written", "brokers: {a: {type: nats, url: nats://a:1}, b: {type: nats, url: nats://b:1}, r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}}\ndedupe: {broker: b}", config.DedupeJetStream, "b", ""},
		{"rocketmq only", "brokers: {r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}}", config.DedupeMemory, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := config.Parse("c.yaml", []byte(tc.brokers))
			if err != nil {
				t.Fatal(err)
			}
			if c.Dedupe.Store != tc.store || c.Dedupe.Broker != tc.broker {
				t.Errorf("dedupe = %s/%s, want %s/%s", c.Dedupe.Store, c.Dedupe.Broker, tc.store, tc.broker)
			}
			// The files name no rules directory: Validate reports that
			// too; only the dedupe.broker problem matters here.
			var got []string
			var errs config.Errors
			if errors.As(c.Validate(), &errs) {
				for _, p := range errs {
					if p.Field == "dedupe.broker" {
						got = append(got, p.String())
					}
				}
			}
			var want []string
			if tc.brokerErr != "" {
				want = []string{tc.brokerErr}
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("dedupe.broker problems %q, want %q", got, want)
			}
		})
	}
}

// TestNATSBrokerDefaults checks that the defaults table's brokers.* rows
// name fields of the NATS kind, that a broker that sets none of them gets
// the adapter's own defaults, and that a field the file sets is kept.
func TestNATSBrokerDefaults(t *testing.T) {
	tags := map[string]bool{}
	for _, k := range kinds {
		st := reflect.TypeOf(k.NewSettings()).Elem()
		for i := range st.NumField() {
			tags[strings.Split(st.Field(i).Tag.Get("yaml"), ",")[0]] = true
		}
	}
	for _, f := range config.BrokerDefaultFields() {
		if !tags[f] {
			t.Errorf("defaults table row brokers.*.%s names no field of any broker kind", f)
		}
	}
	c, err := config.Parse("c.yaml", []byte("brokers:\n  a: {type: nats, url: nats://a:1}\n  b: {type: nats, url: nats://b:1, ackTimeout: 7s, maxPingsOut: 5}\n"))
	if err != nil {
		t.Fatal(err)
	}
	a, b := natsOf(t, c, "a"), natsOf(t, c, "b")
	got := []any{a.PingInterval.D(), a.MaxPingsOut, a.WriteTimeout.D(), a.DialTimeout.D(), a.ReconnectWait.D(), a.RequestTimeout.D(), a.AckTimeout.D()}
	want := []any{natsjs.DefaultPingInterval, natsjs.DefaultMaxPingsOut, natsjs.DefaultWriteTimeout, natsjs.DefaultDialTimeout, natsjs.DefaultReconnectWait,
		natsjs.DefaultRequestTimeout, natsjs.DefaultAckTimeout}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("defaults of a NATS broker %v, want the adapter's %v", got, want)
	}
	if b.AckTimeout.D() != 7*time.Second || b.MaxPingsOut != 5 || b.PingInterval.D() != natsjs.DefaultPingInterval {
		t.Errorf("broker b: %+v", b)
	}
	// A null keeps the default, as if not written.
	nc, err := config.Parse("c.yaml", []byte("brokers:\n  a:\n    type: nats\n    url: nats://a:1\n    ackTimeout:\n    maxPingsOut: ~\n"))
	if err != nil {
		t.Fatal(err)
	}
	if n := natsOf(t, nc, "a"); n.AckTimeout.D() != natsjs.DefaultAckTimeout || n.MaxPingsOut != natsjs.DefaultMaxPingsOut {
		t.Errorf("null ackTimeout and maxPingsOut: %v and %d, want the defaults %v and %d", n.AckTimeout, n.MaxPingsOut, natsjs.DefaultAckTimeout, natsjs.DefaultMaxPingsOut)
	}
	// The connection bounds shared with RocketMQ brokers: the same rows,
	// equal to the RocketMQ adapter's own defaults.
	rc, err := config.Parse("c.yaml", []byte("brokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}\n  s: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], writeTimeout: 5s}\n"))
	if err != nil {
		t.Fatal(err)
	}
	r, rs := rmqOf(t, rc, "r"), rmqOf(t, rc, "s")
	if r.AckTimeout.D() != rmq.DefaultSendTimeout {
		t.Errorf("rocketmq broker's ackTimeout %v, want the adapter's %v", r.AckTimeout, rmq.DefaultSendTimeout)
	}
	if r.DialTimeout.D() != rmq.DefaultDialTimeout || r.WriteTimeout.D() != rmq.DefaultWriteTimeout || rs.WriteTimeout.D() != 5*time.Second {
		t.Errorf("rocketmq brokers' dialTimeout and writeTimeout %v %v and %v, want the adapter's %v %v and the 5s set",
			r.DialTimeout, r.WriteTimeout, rs.WriteTimeout, rmq.DefaultDialTimeout, rmq.DefaultWriteTimeout)
	}
	// The embedded default's broker sets nothing: the adapter's defaults
	// apply, which are the same.
	if bc := (&NATSBroker{URL: "nats://x:1"}).adapter("nats"); bc.PingInterval != 0 || bc.DialTimeout != 0 {
		t.Errorf("embedded broker config %+v: want the adapter's defaults (zero)", bc)
	}
}

// TestAckTimeoutAboveReserveTTLIsAdvice: the defaults table advises an
// ackTimeout below dedupe.reserveTTL, but it is not a check (crash tests
// run ackTimeout 10s with reserveTTL 2s): such a file is valid.
func TestAckTimeoutAboveReserveTTLIsAdvice(t *testing.T) {
	for _, broker := range []string{"{type: nats, url: nats://a:1, ackTimeout: 10s}", "{type: rocketmq, nameservers: [\"127.0.0.1:1\"], ackTimeout: 10s}"} {
		p := writeConfig(t, t.TempDir(), "rules: rules\nbrokers:\n  nats: {type: nats, url: nats://b:1}\n  x: "+broker+
			"\ndedupe: {store: jetstream, ttl: 5m, reserveTTL: 2s}\n")
		if _, err := config.Load(p); err != nil {
			t.Errorf("broker %s with reserveTTL 2s: %v", broker, err)
		}
	}
}

// TestBrokerConfigErrors checks the configuration problems of broker
// settings, kinds and the brokers the dedupe store names, each reported as
// "file:line: field: message".
func TestBrokerConfigErrors(t *testing.T) {
	nats := "brokers:\n  nats: {type: nats, url: nats://127.0.0.1:4222}\n"
	for _, tc := range []struct {
		name string
		body string
		want []string // substrings, each of one problem line
	}{
		{"unknown broker field", "brokers:\n  nats:\n    type: nats\n    url: nats://a:1\n    pass: x\n", []string{"config.yaml:5: brokers.nats.pass: unknown field"}},
		{"duplicate broker", nats + "  nats: {type: nats, url: nats://b:1}\n", []string{"config.yaml:3: brokers.nats: duplicate key (first at line 2)"}},
		{"list wanted", "brokers:\n  r: {type: rocketmq, nameservers: \"a:1\"}\n", []string{`brokers.r.nameservers: must be a list, not the string "a:1"`}},
		{"env unset", nats[:len(nats)-2] + ", user: u, password: \"${CB_UNSET_PW}\"}\n", []string{"config.yaml:2: brokers.nats.password: environment variable CB_UNSET_PW is not set"}},
		{"secret file missing", nats[:len(nats)-2] + ", token: \"file:/nonexistent/tok\"}\n", []string{"brokers.nats.token: reading secret file: /nonexistent/tok: no such file"}},
		{"rules required", nats, []string{"config.yaml: rules: required when brokers are configured"}},
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
		{"rmq checkBackWait without transactions", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], checkBackWait: 30s}\n", []string{"brokers.r.checkBackWait: only applies with exactlyOnce: transactional"}},
		{"rmq checkBackWait negative", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], exactlyOnce: transactional, checkBackWait: -1s}\n", []string{"brokers.r.checkBackWait: must not be negative"}},
		{"rmq persistInterval tiny", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], persistInterval: 1ms}\n", []string{"brokers.r.persistInterval: want at least 10ms"}},
		{"nats field on rmq", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], url: nats://x:1}\n", []string{"brokers.r.url: only valid for type nats"}},
		{"nats timeouts", "rules: rules\nbrokers:\n  a:\n    type: nats\n    url: nats://a:1\n    pingInterval: 10ms\n    maxPingsOut: 0\n    dialTimeout: 0s\n    reconnectWait: 1ms\n    requestTimeout: 0s\n    ackTimeout: 1ms\n", []string{
			"config.yaml:6: brokers.a.pingInterval: must be at least 100ms, got 10ms", "config.yaml:7: brokers.a.maxPingsOut: must be 1..100, got 0",
			"config.yaml:8: brokers.a.dialTimeout: must be at least 100ms", "config.yaml:9: brokers.a.reconnectWait: must be at least 100ms",
			"config.yaml:10: brokers.a.requestTimeout: must be at least 10ms", "config.yaml:11: brokers.a.ackTimeout: must be at least 10ms"}},
		{"nats serverOrder", "rules: rules\nbrokers:\n  a: {type: nats, url: nats://a:1, serverOrder: sorted}\n", []string{"brokers.a.serverOrder: must be random or listed, got \"sorted\""}},
		{"nats timeout on rmq", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], requestTimeout: 1s}\n", []string{"brokers.r.requestTimeout: only valid for type nats"}},
		{"rmq ackTimeout tiny", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], ackTimeout: 1ms}\n", []string{"brokers.r.ackTimeout: must be at least 10ms"}},
		{"dedupe requestTimeout", "rules: rules\n" + nats + "dedupe: {store: jetstream, reserveTTL: 2s, requestTimeout: 2s}\n", []string{"config.yaml:4: dedupe.requestTimeout: must be less than dedupe.reserveTTL (2s)"}},
		{"dedupe requestTimeout memory", "rules: rules\n" + nats + "dedupe: {store: memory, requestTimeout: 1s}\n", []string{"config.yaml:4: dedupe.requestTimeout: only valid for store jetstream"}},
		{"dedupe unknown broker", "rules: rules\n" + nats + "dedupe: {store: jetstream, broker: other}\n", []string{"dedupe.broker: unknown broker \"other\""}},
		{"dedupe rmq broker", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}\ndedupe: {store: jetstream, broker: r}\n", []string{"dedupe.broker: broker \"r\" is of type rocketmq"}},
		{"rmq transactional with the memory store", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], exactlyOnce: transactional}\n  nats: {type: nats, url: nats://a:1}\ndedupe: {store: memory}\n",
			[]string{"config.yaml:5: dedupe.store: broker \"r\" has exactlyOnce: transactional"}},
		{"rmq transactional without a NATS broker", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], exactlyOnce: transactional}\n",
			[]string{"dedupe.store: broker \"r\" has exactlyOnce: transactional"}},
		{"dedupe no broker", "rules: rules\nbrokers:\n  r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"]}\ndedupe: {store: jetstream}\n", []string{"dedupe.broker: required for store jetstream"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, t.TempDir(), tc.body)
			_, err := config.Load(p)
			var ce config.Errors
			if !errors.As(err, &ce) {
				t.Fatalf("want config.Errors, got %v", err)
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
	t.Setenv("CB_EMPTY", "")
	for _, tc := range []struct {
		name, value, want string
	}{
		{"inline", "plain", "plain"},
		{"env", "${CB_TOKEN_DIR}", dir},
		{"env default", "${CB_NOPE:-fallback}", "fallback"},
		{"env set beats default", "${CB_TOKEN_DIR:-fallback}", dir},
		// As in a shell: :- also replaces a variable set to "" (a
		// Kubernetes env entry whose secret key is empty).
		{"env empty takes default", "${CB_EMPTY:-fallback}", "fallback"},
		{"env empty without default", "${CB_EMPTY}", ""},
		{"env empty default", "${CB_NOPE:-}", ""},
		{"file absolute", "file:" + tok, "tok-from-file"},
		{"file relative to config", "file:token", "tok-from-file"},
		{"file path from env", "file:${CB_TOKEN_DIR}/token", "tok-from-file"},
		{"dollar escape", "a$$b", "a$b"},
		{"lone dollar kept", "a$b", "a$b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, dir, fmt.Sprintf("rules: rules\nbrokers:\n  nats: {type: nats, url: \"${CB_URL}\", token: %q}\n", tc.value))
			c, err := config.Load(p)
			if err != nil {
				t.Fatal(err)
			}
			if inline := len(c.InlineSecrets()) > 0; inline != (tc.name == "inline" || strings.HasPrefix(tc.name, "lone") || strings.HasPrefix(tc.name, "dollar")) {
				t.Errorf("inline secrets %v", c.InlineSecrets())
			}
			if got := natsOf(t, c, "nats").Token.Value(); got != tc.want {
				t.Errorf("token = %q, want %q", got, tc.want)
			}
			if u := natsOf(t, c, "nats").URL; u != "nats://h:4222" {
				t.Errorf("url = %q", u)
			}
		})
	}
	// Numbers may come from the environment although YAML sees a string.
	t.Setenv("CB_WORKERS", "12")
	c, err := config.Parse("c.yaml", []byte("pipeline: {workers: \"${CB_WORKERS}\"}\n"))
	if err != nil || c.Pipeline.Workers != 12 {
		t.Fatalf("workers from env: %v %v", c, err)
	}
}

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
			c, err := config.Load(p)
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

// TestBrokerPaths: the files a broker's settings name, resolved against the
// configuration file, for checks such as "every file is on a Secret volume".
func TestBrokerPaths(t *testing.T) {
	c, err := config.ParseTemplate("/etc/cellbridge/config.yaml", []byte(`rules: rules
brokers:
  a: {type: nats, url: "nats://a:1", creds: a.creds, tls: {ca: /tls/ca.pem}}
  b: {type: nats, url: "nats://b:1", user: u, password: "${PW}"}
  r: {type: rocketmq, nameservers: ["127.0.0.1:1"], secretKey: "file:sk", accessKey: ak}
`))
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]map[string]string{
		"a": {"creds": "/etc/cellbridge/a.creds", "tls.ca": "/tls/ca.pem"},
		"b": {},
		"r": {},
	} {
		if got := c.Brokers[name].Paths(); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s: paths %v, want %v", name, got, want)
		}
	}
	if string(c.Rules) != "/etc/cellbridge/rules" {
		t.Errorf("rules = %q", c.Rules)
	}
	// A template keeps references as written and reads no file; only the
	// access key is inline.
	if got := fmt.Sprint(c.InlineSecrets()); got != "[brokers.r.accessKey]" {
		t.Errorf("inline secrets %s", got)
	}
	if pw := natsOf(t, c, "b").Password.Value(); pw != "${PW}" {
		t.Errorf("password = %q", pw)
	}
}

// laughs is a "billion laughs" document: depth levels of aliases, each
// naming the level below width times, under brokers.
func laughs(depth, width int) []byte {
	var b strings.Builder
	b.WriteString("x0: &l0 {type: nats, url: \"nats://a:1\"}\n")
	for i := 1; i <= depth; i++ {
		fmt.Fprintf(&b, "x%d: &l%d [", i, i)
		for j := range width {
			if j > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, "*l%d", i-1)
		}
		b.WriteString("]\n")
	}
	b.WriteString("brokers:\n")
	for j := range width {
		fmt.Fprintf(&b, "  b%d: *l%d\n", j, depth)
	}
	return []byte(b.String())
}

// TestConfigAliasBomb: small files that expand to billions of values stop
// at the walker's budget with a clear problem, or are refused before they
// expand (an alias where the schema wants another shape); brokers that alias
// one mapping do not multiply the look-ahead for their types.
func TestConfigAliasBomb(t *testing.T) {
	// 1,000 brokers whose name servers alias one list of 100,000: 10^8
	// values after expansion, from 300 kB.
	var lists strings.Builder
	lists.WriteString("x: &a [" + strings.Repeat("1, ", 100000) + "1]\nbrokers:\n")
	for i := range 1000 {
		fmt.Fprintf(&lists, "  b%d: {type: rocketmq, nameservers: *a}\n", i)
	}
	// 20,000 brokers aliasing one mapping.
	var wide strings.Builder
	wide.WriteString("x: &m {type: nats, url: \"nats://a:1\"}\nbrokers:\n")
	for i := range 20000 {
		fmt.Fprintf(&wide, "  b%d: *m\n", i)
	}
	for _, tc := range []struct {
		name, want string
		data       []byte
	}{
		{"aliased lists under brokers", "document too large", []byte(lists.String())},
		{"many brokers", "brokers: more than 1000 brokers", []byte(wide.String())},
		{"laughs under brokers", "brokers.b0: must be a mapping, not a list", laughs(9, 10)},
		{"deep nesting", "pipeline.a: unknown field", []byte("pipeline: " + strings.Repeat("{a: ", 5000) + strings.Repeat("}", 5000) + "\n")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := config.Parse("bomb.yaml", tc.data)
			var ce config.Errors
			if !errors.As(err, &ce) {
				t.Fatalf("want config.Errors, got %v", err)
			}
			if len(ce) > 1100 {
				t.Fatalf("%d problems", len(ce))
			}
			found := false
			for _, p := range ce {
				if p.File != "bomb.yaml" || p.Line < 1 {
					t.Fatalf("problem not located in the file: %+v", p)
				}
				found = found || strings.Contains(p.String(), tc.want)
			}
			if !found {
				t.Fatalf("no problem with %q in:\n%v", tc.want, err)
			}
		})
	}
}

// FuzzParseConfig feeds arbitrary files to the configuration's decoder with
// the broker kinds of this package: it must not panic, and every problem
// must be located in the file.
func FuzzParseConfig(f *testing.F) {
	f.Add([]byte("rules: x\nbrokers: {a: {type: nats, url: nats://a:1}}\n"))
	f.Add([]byte("brokers: {r: {type: rocketmq, nameservers: [\"127.0.0.1:1\"], url: x}, n: {type: nats, namespace: y}}\n"))
	f.Add([]byte("pipeline: {maxMessageBytes: 1MiB, retry: {initial: 1s}}\n"))
	f.Add([]byte("a: &x {b: 1}\nc: *x\n"))
	f.Add([]byte("x: &b {type: nats, url: \"nats://a:1\"}\nbrokers: {a: *b, b: *b, c: *b}\n"))
	f.Add([]byte("brokers: {a: {type: ${CB_FUZZ_TYPE:-nats}, url: \"${CB_FUZZ_URL:-nats://a:1}\"}}\n"))
	f.Add(laughs(4, 6))
	f.Add([]byte("---\nrules: a\n---\nrules: b\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		lines := strings.Count(string(data), "\n") + 1
		c, err := config.Parse("f.yaml", data)
		if err == nil {
			_ = c.Validate()
			return
		}
		var ce config.Errors
		if !errors.As(err, &ce) {
			t.Fatalf("not config.Errors: %v", err)
		}
		for _, p := range ce {
			if p.File != "f.yaml" || p.Line < 0 || p.Line > lines+1 || p.Msg == "" {
				t.Fatalf("bad problem %+v (file has %d lines)", p, lines)
			}
		}
	})
}
