package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/internal/syncbuf"
	"github.com/cellbridge/cellbridge/router"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// startRun runs `cellbridge run args` in the background with ctx, and
// returns its output buffers and a channel that receives its exit code.
func startRun(t *testing.T, ctx context.Context, args ...string) (stdout, stderr *syncbuf.Buffer, code <-chan int) {
	t.Helper()
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	run := runCommand(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatal(err)
	}
	stdout, stderr = &syncbuf.Buffer{}, &syncbuf.Buffer{}
	ch := make(chan int, 1)
	go func() { ch <- run(ctx, fs.Args(), stdout, stderr) }()
	return stdout, stderr, ch
}

// TestRunHTTPListenTaken holds the default HTTP port: `run -config` with
// http.listen left at its default exits 1 naming http.listen and the
// address (the probes and scrapes of :9090 would reach the other process),
// while the built-in default (no configuration file) still moves to a free
// loopback port and says so.
func TestRunHTTPListenTaken(t *testing.T) {
	const dflt = ":9090"
	if l, err := net.Listen("tcp", dflt); err == nil {
		t.Cleanup(func() { l.Close() })
	} else if !errors.Is(err, syscall.EADDRINUSE) {
		t.Skipf("cannot hold the default port %s: %v", dflt, err)
	} // else another process holds it: taken all the same
	rules := filepath.Join("..", "..", "deploy", "rules")
	// The broker is never reached: the HTTP server is built first.
	cfg := writeFile(t, t.TempDir(), "config.yaml", "rules: "+exampleRules(t)+"\nbrokers:\n  nats: {type: nats, url: \"nats://127.0.0.1:1\"}\n")
	for _, tc := range []struct {
		name       string
		args       []string
		code       int
		stdout     string // wanted in stdout
		stderr     string // wanted in stderr
		untilReady bool   // stop the bridge once stdout holds stdout
	}{
		{name: "config file", args: []string{"-config", cfg}, code: exitError,
			stderr: "cellbridge run: http.listen :9090: address in use: another process listens there, and the probes and scrapes of this address would reach it" +
				" instead of this bridge; stop it, or choose a free address (http.listen in " + cfg + " or -http): listen tcp :9090: bind: address already in use"},
		{name: "built-in default", args: []string{"-data", t.TempDir(), "-nats-port", "-1", "-rules", rules}, code: exitOK,
			stdout: "port :9090 is taken; HTTP listens on 127.0.0.1:", untilReady: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			stdout, stderr, code := startRun(t, ctx, tc.args...)
			if tc.untilReady {
				for !strings.Contains(stdout.String(), tc.stdout) && ctx.Err() == nil {
					time.Sleep(20 * time.Millisecond)
				}
				cancel()
			}
			select {
			case c := <-code:
				if c != tc.code {
					t.Errorf("exit %d, want %d", c, tc.code)
				}
			case <-time.After(90 * time.Second):
				t.Fatal("run did not return")
			}
			if !strings.Contains(stdout.String(), tc.stdout) || !strings.Contains(stderr.String(), tc.stderr) {
				t.Errorf("stdout lacks %q or stderr lacks %q\nstdout:\n%s\nstderr:\n%s", tc.stdout, tc.stderr, stdout, stderr)
			}
		})
	}
}

// TestRunCheckBrokers checks `run -check` against brokers: a broker that
// refuses the credentials or the TLS settings fails the check (exit 1,
// naming the broker), as it fails `run`; a broker it cannot reach is only
// reported (exit 0), as `run` waits for it.
func TestRunCheckBrokers(t *testing.T) {
	auth := natstest.Start(t, func(o *server.Options) {
		o.Users = []*server.User{{Username: "bridge", Password: "right"}}
	})
	_, js := auth.Connect(t, nats.UserInfo("bridge", "right"))
	rules := exampleRules(t)
	table, err := router.Load(rules)
	if err != nil {
		t.Fatal(err)
	}
	ensureStreams(t, js, table)
	pki := natstest.NewPKI(t)
	tlsOnly := natstest.Start(t, func(o *server.Options) {
		tc, err := server.GenTLSConfig(&server.TLSConfigOpts{CertFile: pki.ServerCert, KeyFile: pki.ServerKey})
		if err != nil {
			t.Fatal(err)
		}
		o.TLSConfig, o.TLS = tc, true
	})
	for _, tc := range []struct {
		name, broker string
		code         int
		stdout       []string
		stderr       []string
	}{
		{"reached", fmt.Sprintf("{type: nats, url: %q, user: bridge, password: right}", auth.URL), exitOK,
			[]string{"ok: config"}, nil},
		{"wrong password", fmt.Sprintf("{type: nats, url: %q, user: bridge, password: wrong}", auth.URL), exitError,
			nil, []string{"broker nats refused the connection", "Authorization Violation", "check the broker's creds: brokers.nats.user and .password"}},
		// No tls.ca: the server's certificate does not verify.
		{"tls unverified", fmt.Sprintf("{type: nats, url: %q}", tlsOnly.URL), exitError,
			nil, []string{"broker nats refused the connection", "certificate signed by unknown authority", "check brokers.nats.tls.ca"}},
		{"unreachable", `{type: nats, url: "nats://127.0.0.1:1"}`, exitOK,
			[]string{"ok: config", "streams not checked on broker nats: "}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := writeFile(t, t.TempDir(), "config.yaml", fmt.Sprintf("rules: %s\nbrokers:\n  nats: %s\n", rules, tc.broker))
			code, stdout, stderr := runCLI(t, "run", "-check", "-config", cfg)
			if code != tc.code {
				t.Errorf("exit %d, want %d", code, tc.code)
			}
			for _, w := range tc.stdout {
				if !strings.Contains(stdout, w) {
					t.Errorf("stdout lacks %q", w)
				}
			}
			for _, w := range tc.stderr {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q", w)
				}
			}
			if tc.code == exitError && strings.Contains(stdout, "ok:") {
				t.Errorf("a failed check printed ok")
			}
			if tc.name == "reached" && strings.Contains(stdout, "not checked") {
				t.Errorf("the streams of a reached broker were not checked")
			}
			if t.Failed() {
				t.Logf("stdout:\n%s\nstderr:\n%s", stdout, stderr)
			}
		})
	}
}

// TestRunRulesFlag checks that -rules replaces the configuration's rules:
// before it is validated: `run -config prod.yaml -rules ./local` does not
// fail on prod.yaml's rule directory, which exists only where prod.yaml is
// deployed, and a -rules directory that does not exist is named as the
// flag's.
func TestRunRulesFlag(t *testing.T) {
	dir := t.TempDir()
	local := exampleRules(t)
	missing := filepath.Join(dir, "nope")
	// No brokers: the embedded default, whose check needs no server.
	prod := writeFile(t, dir, "prod.yaml", "rules: /etc/cellbridge/prod-rules\nlog: {level: warn}\n")
	for _, tc := range []struct {
		name   string
		args   []string
		code   int
		stdout string
		stderr string
	}{
		{"file's dir missing", []string{"-config", prod}, exitError, "",
			prod + ":1: rules: rule directory: /etc/cellbridge/prod-rules: no such file or directory"},
		{"-rules replaces it", []string{"-config", prod, "-rules", local}, exitOK, "ok: config " + prod + ", rules " + local + " version", ""},
		{"-rules missing", []string{"-config", prod, "-rules", missing}, exitError, "",
			prod + ": rules: rule directory: " + missing + ": no such file or directory (set by -rules)"},
		{"-rules missing, no config", []string{"-rules", missing}, exitError, "",
			"(built-in): rules: rule directory: " + missing + ": no such file or directory (set by -rules)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr := runCLI(t, append([]string{"run", "-check"}, tc.args...)...)
			if code != tc.code || !strings.Contains(stdout, tc.stdout) || !strings.Contains(stderr, tc.stderr) {
				t.Errorf("exit %d, want %d; want %q in stdout, %q in stderr\nstdout:\n%s\nstderr:\n%s", code, tc.code, tc.stdout, tc.stderr, stdout, stderr)
			}
		})
	}
}
