package deploy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"gopkg.in/yaml.v3"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/app"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

// TestRenderedConfigRuns runs the binary the way each overlay's pod runs it: the Deployment's
// arguments, its environment (Secret values replaced by placeholders), the rendered config.yaml and
// rules ConfigMap laid out at their mount paths. The NATS server expects exactly what the manifests
// promise: the config's user with the password the Deployment passes from its Secret, and TLS with a
// certificate signed by the CA the config names, where the config asks for TLS. Only the broker's
// address is changed (to the test server). Events must then be routed, the dedupe bucket the config
// names must be used, and SIGTERM must end the process within the grace period.
func TestRenderedConfigRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("starts the bridge; not in -short")
	}
	forEachOverlay(t, func(t *testing.T, r *rendering) {
		root, config, env := podFS(t, r)
		_, cfg := configOf(t, r)
		if len(cfg.Brokers) != 1 {
			t.Fatalf("this test knows configs with one broker; %d brokers", len(cfg.Brokers))
		}
		var name string
		for name = range cfg.Brokers {
		}
		b, ok := cfg.Brokers[name].Settings.(*app.NATSBroker)
		if !ok {
			t.Fatalf("brokers.%s: this test knows NATS brokers, not %s", name, cfg.Brokers[name].Type)
		}
		password := os.Expand(b.Password.Value(), func(v string) string { return envValue(env, v) })
		if password == "" || b.User == "" {
			t.Fatalf("brokers.%s: want a user and a password from a Secret", name)
		}
		useTLS := b.TLS != nil && b.TLS.CA != ""
		srv := natstest.Start(t, func(o *server.Options) {
			o.Username, o.Password = b.User, password
			if useTLS {
				_, cert := testPKI(t)
				o.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
				o.TLS = true
			}
		})
		u, err := url.Parse(b.URL)
		if err != nil {
			t.Fatalf("brokers.%s.url: %v", name, err)
		}
		su, err := url.Parse(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		u.Host = su.Host
		setYAML(t, config, []string{"brokers", name, "url"}, u.String())

		// The streams are owned by the producers and the cells in production; create them here.
		opts := []nats.Option{nats.UserInfo(b.User, password)}
		if useTLS {
			opts = append(opts, nats.RootCAs(filepath.Join(root, string(b.TLS.CA))))
		}
		nc, js := srv.Connect(t, opts...)
		defer nc.Close()
		table, err := router.Load(filepath.Join(root, string(cfg.Rules)))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if err := natsjs.EnsureStreams(ctx, js, table, natsjs.StreamOptions{Broker: name}); err != nil {
			t.Fatal(err)
		}

		c := container(t, r)
		args := append([]string(nil), c.Args...)
		for i, a := range args {
			if i > 0 && (args[i-1] == "-config" || args[i-1] == "-data") {
				args[i] = filepath.Join(root, a)
			}
		}
		bridge := startProcess(t, env, false, append(args, "-http", "127.0.0.1:0")...)

		const n = 100
		poison := 0
		for i := range n {
			msg, id, p := event("pod", i)
			if _, err := js.PublishMsg(ctx, msg); err != nil {
				t.Fatalf("publish %s: %v", id, err)
			}
			if p {
				poison++
			}
		}
		bridge.eventually(t, time.Minute, "every event forwarded or dead-lettered", func() (bool, string) {
			mf := bridge.scrape(t)
			fwd := sum(mf, "cellbridge_messages_total", map[string]string{"outcome": "forwarded"})
			dlq := sum(mf, "cellbridge_dlq_total", nil)
			return fwd == float64(n-poison) && dlq == float64(poison), fmt.Sprintf("forwarded %v, dlq %v", fwd, dlq)
		})
		if cfg.Dedupe.Store == "jetstream" {
			if _, err := js.KeyValue(ctx, cfg.Dedupe.Bucket); err != nil {
				t.Errorf("the dedupe bucket %s the config names: %v", cfg.Dedupe.Bucket, err)
			}
		}
		grace := time.Duration(*r.deployment.Spec.Template.Spec.TerminationGracePeriodSeconds)*time.Second -
			time.Duration(c.Lifecycle.PreStop.Sleep.Seconds)*time.Second
		bridge.stop(t, grace)
	})
}

// envValue returns the value of name in a KEY=VALUE list ("" when absent).
func envValue(env []string, name string) string {
	for _, e := range env {
		if k, v, ok := strings.Cut(e, "="); ok && k == name {
			return v
		}
	}
	return ""
}

// setYAML sets the scalar at path (mapping keys) in the YAML file.
func setYAML(t *testing.T, file string, path []string, value string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	n := doc.Content[0]
	for _, key := range path {
		var next *yaml.Node
		for i := 0; i+1 < len(n.Content); i += 2 {
			if n.Content[i].Value == key {
				next = n.Content[i+1]
			}
		}
		if next == nil {
			t.Fatalf("%s: no %s", file, strings.Join(path, "."))
		}
		n = next
	}
	n.Value = value
	if b, err = yaml.Marshal(&doc); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(file, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
