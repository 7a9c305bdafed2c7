package e2etest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

// TestStartBeforeTheBroker starts `cellbridge run` against a URL where
// nothing listens yet, as a pod that starts before its NATS cluster: the
// process keeps running and serves /healthz (200), /readyz says 503 and
// what it waits for, every failed attempt is one log line naming the
// broker, the URL and the error, it is counted in
// cellbridge_broker_request_errors_total, and no fx error line reaches
// the log. A server then starts on that port and the same process becomes
// ready within seconds.
func TestStartBeforeTheBroker(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	rules, table := exampleTable(t)
	// The streams the rules need are made beforehand in the store the
	// server will start from, so that the bridge finds them as soon as it
	// connects.
	store := t.TempDir()
	prep := natstest.StartDir(t, store)
	_, js := prep.Connect(t)
	if err := natsjs.EnsureStreams(testCtx(t, 30*time.Second), js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	prep.Shutdown()
	prep.WaitForShutdown()

	port := natstest.FreePorts(t, 1)[0]
	url := fmt.Sprintf("nats://127.0.0.1:%d", port)
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: []string{url}, Dedupe: "{store: jetstream, bucket: e2e-startup}"})
	b := StartBridge(t, BridgeOptions{Name: "early", Config: cfg})
	pid := b.Pid()

	ctx := testCtx(t, 30*time.Second)
	want := "connecting to broker nats (" + url + "): attempt "
	var why string
	b.wait("/readyz 503 naming the broker and the failed attempt", func(ctx context.Context) bool {
		ok, w, err := b.Ready(ctx)
		why = w
		return err == nil && !ok && strings.Contains(w, want) && strings.Contains(w, " failed: ") && strings.Contains(w, "; retrying in ")
	})
	t.Logf("/readyz while no server listens: %q", why)
	b.wait("two failed connect attempts in the log and the metric", func(ctx context.Context) bool {
		n, err := b.Metric(ctx, "cellbridge_broker_request_errors_total", map[string]string{"broker": "nats", "op": "connect"})
		return err == nil && n >= 2 && strings.Count(logText(t, b), `"msg":"broker request failed; retrying"`) >= 2
	})
	// The rules version is the loaded rules' while the bridge waits (0
	// would read as a replica on other rules).
	if v, err := b.Metric(ctx, "cellbridge_rules_version", nil); err != nil || v != float64(table.Version()) {
		t.Errorf("cellbridge_rules_version while waiting for the broker: %v, %v; want %d", v, err, table.Version())
	}
	log := logText(t, b)
	for _, w := range []string{`"broker":"nats"`, `"url":"` + url + `"`, `"op":"connect"`, `"attempt":2`, `"retry_in":"`, "no server at the URL accepted a connection"} {
		if !strings.Contains(log, w) {
			t.Errorf("the log lacks %s:\n%s", w, b.LogTail(20))
		}
	}

	// The server comes up on that port: the same process connects,
	// creates its bucket and consumers and becomes ready.
	natstest.StartDir(t, store, func(o *server.Options) { o.Port = port })
	up := time.Now()
	b.WaitReady()
	took := time.Since(up)
	t.Logf("ready %v after the server started", took.Round(time.Millisecond))
	if took > 10*time.Second {
		t.Errorf("ready %v after the server started, want within 10s", took)
	}
	if exited, err := b.Exited(); exited || b.Pid() != pid {
		t.Fatalf("the process exited (%v) or was replaced", err)
	}
	if ok, w, err := b.Ready(ctx); !ok || err != nil {
		t.Fatalf("/readyz after the start: %v %q %v", ok, w, err)
	}
	log = logText(t, b)
	for _, bad := range []string{"OnStart hook failed", "start failed", "rolling back", `"level":"ERROR"`} {
		if strings.Contains(log, bad) {
			t.Errorf("the log holds %q:\n%s", bad, log)
		}
	}
	if err := b.Term(); err != nil {
		t.Fatalf("SIGTERM: exit %v\n%s", err, b.LogTail(20))
	}
}

// TestStopWhileStarting: SIGTERM to a bridge that still waits for its
// broker stops it at once with exit status 0 (nothing was consumed).
func TestStopWhileStarting(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	rules, _ := exampleTable(t)
	url := fmt.Sprintf("nats://127.0.0.1:%d", natstest.FreePorts(t, 1)[0])
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: []string{url}})
	b := StartBridge(t, BridgeOptions{Name: "waiting", Config: cfg})
	b.wait("a failed connect attempt", func(context.Context) bool {
		return strings.Contains(logText(t, b), `"op":"connect"`)
	})
	start := time.Now()
	if err := b.Term(); err != nil {
		t.Fatalf("SIGTERM while starting: exit %v\n%s", err, b.LogTail(20))
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("SIGTERM while starting took %v", took)
	}
	if log := logText(t, b); !strings.Contains(log, "stopped while starting") || strings.Contains(log, `"level":"ERROR"`) {
		t.Errorf("log after SIGTERM while starting:\n%s", b.LogTail(20))
	}
}

// logText is the bridge's whole log.
func logText(t *testing.T, b *Bridge) string {
	t.Helper()
	data, err := os.ReadFile(b.Log)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestStopWhileTheBrokerIsDown: SIGTERM to a ready bridge whose only
// server went away stops it with exit status 0, within seconds: nothing
// waits for the broker to come back (a connection not connected is not
// flushed; each request the stop makes is bounded by its timeout). Before,
// the closing flush waited for a reconnect until the stop's deadline
// (drainTimeout + 15 s), and the process exited 1 ("shutdown: context
// deadline exceeded") or was killed at the end of its grace period.
func TestStopWhileTheBrokerIsDown(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	rules, table := exampleTable(t)
	store := t.TempDir()
	port := natstest.FreePorts(t, 1)[0]
	srv := natstest.StartDir(t, store, func(o *server.Options) { o.Port = port })
	_, js := srv.Connect(t)
	if err := natsjs.EnsureStreams(testCtx(t, 30*time.Second), js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: []string{srv.URL}})
	b := StartBridge(t, BridgeOptions{Name: "orphaned", Config: cfg})
	b.WaitReady()
	srv.Shutdown()
	srv.WaitForShutdown()
	b.wait("/readyz 503 once the server is gone", func(ctx context.Context) bool {
		ok, _, err := b.Ready(ctx)
		return err == nil && !ok
	})
	start := time.Now()
	err := b.Term()
	took := time.Since(start)
	t.Logf("stopped %v after SIGTERM with the server down", took.Round(time.Millisecond))
	if err != nil {
		t.Fatalf("SIGTERM with the server down: exit %v\n%s", err, b.LogTail(20))
	}
	if took > 15*time.Second {
		t.Errorf("the stop took %v with the server down, want it bounded by request timeouts (seconds), not by the stop's deadline", took)
	}
	if log := logText(t, b); !strings.Contains(log, "nats connection not flushed before closing") {
		t.Errorf("the log does not say the connection was not flushed:\n%s", b.LogTail(20))
	}
}
