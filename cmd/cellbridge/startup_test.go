package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

// TestE2ETLSAndCredentials runs the bridge against a server that requires
// TLS with a client certificate and a user/password, the password coming
// from the environment.
func TestE2ETLSAndCredentials(t *testing.T) {
	pki := natstest.NewPKI(t)
	dir := filepath.Dir(pki.CA) // the config names the PEM files relative to itself
	ca, sc, sk, cc, ck := pki.CA, pki.ServerCert, pki.ServerKey, pki.ClientCert, pki.ClientKey
	srv := natstest.Start(t, func(o *server.Options) {
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: sc, KeyFile: sk, CaFile: ca, Verify: true})
		if err != nil {
			t.Fatal(err)
		}
		o.TLSConfig, o.TLS, o.TLSVerify = tc, true, true
		o.Users = []*server.User{{Username: "bridge", Password: "pa55-from-env"}}
	})
	_, js := srv.Connect(t, nats.RootCAs(ca), nats.ClientCert(cc, ck), nats.UserInfo("bridge", "pa55-from-env"))
	rules := exampleRules(t)
	table, err := router.Load(rules)
	if err != nil {
		t.Fatal(err)
	}
	ensureStreams(t, js, table)
	t.Setenv("CB_E2E_NATS_PASSWORD", "pa55-from-env")
	body := `rules: %s
brokers:
  nats:
    type: nats
    url: %q
    tls: {ca: ca.pem, cert: client.pem, key: client-key.pem}
    user: bridge
    password: ${CB_E2E_NATS_PASSWORD}
dedupe: {store: jetstream}
http: {listen: "127.0.0.1:0"}
`
	cfg := writeFile(t, dir, "config.yaml", fmt.Sprintf(body, rules, srv.URL))
	b := startInProcess(t, cfg, nil)
	id := publishOne(t, js, orderMsg("orders.created", "2088000000012345", "e2e-tls"))
	m := findMsg(t, js, natsjs.CellStream("rz01"), id)
	if m.Headers().Get(bridge.HeaderCell) != "rz01" {
		t.Fatalf("forwarded over TLS to %q", m.Headers().Get(bridge.HeaderCell))
	}
	if v := metric(t, b.base, "cellbridge_connection_up", map[string]string{"broker": "nats", "role": "source"}); v != 1 {
		t.Errorf("connection_up = %v", v)
	}

	// The same config with a wrong password fails at start-up, naming the
	// broker and what to check.
	t.Setenv("CB_E2E_NATS_PASSWORD", "wrong")
	var stderr bytes.Buffer
	o, _ := prepareRun(&runFlags{config: cfg, natsPort: -1}, &stderr)
	if o == nil {
		t.Fatal(stderr.String())
	}
	err = app.Run(testCtx(t, 30*time.Second), *o)
	if err == nil || !strings.Contains(err.Error(), `broker "nats"`) || !strings.Contains(err.Error(), "check the broker's creds") {
		t.Fatalf("wrong password: err = %v", err)
	}
}

// TestRunBadStartup checks that a bad configuration or bad rules stop
// `cellbridge run` before it connects: every problem on stderr as
// file:line: field: message, exit 1, and nothing consumed from the sources.
func TestRunBadStartup(t *testing.T) {
	env := newTestEnv(t)
	for i := range 10 {
		publishOne(t, env.js, orderMsg("orders.created", "2088000000012345", fmt.Sprintf("bad-start-%d", i)))
	}
	broken := exampleRules(t, "failover: rz01\n    shards: [\"0-32\"]", "failover: rz99\n    shards: [\"0-32\"]")
	t.Setenv("CB_BAD_UNSET", "")
	os.Unsetenv("CB_BAD_UNSET")
	good := fmt.Sprintf("rules: %s\nbrokers:\n  nats: {type: nats, url: %q}\nhttp: {listen: \"127.0.0.1:0\"}\n", env.rules, env.url)
	for _, tc := range []struct {
		name string
		body string
		want []string
	}{
		{"unknown field", good + "pipeline:\n  maxInflight: 10\n", []string{"config.yaml:6: pipeline.maxInflight: unknown field"}},
		{"several problems", good + "pipeline:\n  workers: -1\n  holdDelay: soon\n", []string{
			"config.yaml:6: pipeline.workers", "config.yaml:7: pipeline.holdDelay: must be a duration"}},
		{"secret from unset env", strings.Replace(good, "url: ", "token: \"${CB_BAD_UNSET}\", url: ", 1), []string{
			"config.yaml:3: brokers.nats.token: environment variable CB_BAD_UNSET is not set"}},
		{"bad rules", strings.Replace(good, env.rules, broken, 1), []string{
			"invalid rules", "cellmap.yaml:", "failover", "rz99"}},
		{"rule names a missing broker", strings.Replace(good, "  nats: {", "  other: {", 1), []string{
			"orders.yaml:", "orders.source.broker: broker \"nats\" is not defined", "payments.source.broker"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := writeFile(t, t.TempDir(), "config.yaml", tc.body)
			var stdout, stderr bytes.Buffer
			code := realMain([]string{"run", "-config", cfg}, &stdout, &stderr)
			if code != exitError {
				t.Fatalf("exit %d, want 1; stderr:\n%s", code, stderr.String())
			}
			text := strings.ReplaceAll(stderr.String(), cfg, "config.yaml")
			for _, w := range tc.want {
				if !strings.Contains(text, w) {
					t.Errorf("stderr lacks %q:\n%s", w, text)
				}
			}
		})
	}
	for _, r := range env.table.Rules() {
		_, err := env.js.Consumer(testCtx(t, 10*time.Second), r.Source.Stream, r.Source.Group)
		if !errors.Is(err, jetstream.ErrConsumerNotFound) {
			t.Errorf("consumer %s/%s exists after failed starts (err %v): something connected", r.Source.Stream, r.Source.Group, err)
		}
	}
	if n := streamCount(t, env.js, "ORDERS"); n != 10 {
		t.Errorf("ORDERS holds %d messages, want the 10 published", n)
	}
	if c, d := arrived(t, env.js, env.table); c+d != 0 {
		t.Errorf("%d messages forwarded by a bridge that should not have started", c+d)
	}
}

// TestGracefulShutdownThenRestart stops a bridge (fx OnStop: stop fetching,
// drain) while it is busy, starts another, and checks that every event
// arrived exactly once: nothing was acknowledged that was not forwarded.
func TestGracefulShutdownThenRestart(t *testing.T) {
	env := newTestEnv(t)
	exp := publishEvents(t, env.js, env.table, 7, 5000, 100)
	cfg := writeFile(t, t.TempDir(), "config.yaml", fmt.Sprintf(`rules: %s
brokers:
  nats: {type: nats, url: %q}
dedupe: {store: memory}
http: {listen: "127.0.0.1:0"}
pipeline: {ackWait: 2s, drainTimeout: 10s}
`, env.rules, env.url))
	first := startInProcess(t, cfg, nil)
	eventually(t, 30*time.Second, "some progress", func() bool {
		c, d := arrived(t, env.js, env.table)
		return c+d >= 500
	})
	first.stop(t)
	c, d := arrived(t, env.js, env.table)
	t.Logf("stopped at %d of %d arrived", c+d, len(exp))
	if !strings.Contains(first.logs.String(), `"msg":"bridge stopped"`) {
		t.Error("no shutdown log line")
	}

	second := startInProcess(t, cfg, nil)
	fwd, dlq := exp.counts()
	eventually(t, 60*time.Second, "all events arrived", func() bool {
		c, d := arrived(t, env.js, env.table)
		return c >= uint64(fwd) && d >= uint64(dlq) && consumersIdle(t, env.js, env.table)
	})
	second.stop(t)
	v := verifyExactlyOnce(t, env.js, env.table, exp)
	if len(v.Problems) > 0 {
		t.Fatalf("after a graceful restart:\n%s", strings.Join(v.Problems, "\n"))
	}
	t.Logf("arrived: %v", v)
}

// TestDemo runs `cellbridge demo` for a few hundred events to the end.
func TestDemo(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := realMain([]string{"demo", "-n", "300", "-rate", "0", "-keep=false", "-interval", "100ms",
		"-data", t.TempDir(), "-http", "127.0.0.1:0", "-nats-port", "-1", "-rules", filepath.Join("..", "..", "deploy", "rules")},
		&stdout, &stderr)
	out := stdout.String()
	if code != exitOK {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out, stderr.String())
	}
	for _, w := range []string{"all 300 events arrived", "CELL_RZ00", "DLQ", "route -rules", "-topic orders -key 2088", "→ expect cell rz", "/metrics", "stopped cleanly"} {
		if !strings.Contains(out, w) {
			t.Errorf("demo output lacks %q:\n%s", w, out)
		}
	}
}
