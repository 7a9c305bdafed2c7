package e2etest

import (
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

// TestBridgeProcess drives one replica through every operation: start,
// ready, /status, kill -9, restart on the same address, SIGTERM (a clean
// exit), and restart again.
func TestBridgeProcess(t *testing.T) {
	if testing.Short() {
		t.Skip("subprocess test: skipped with -short")
	}
	rules, table := exampleTable(t)
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	if err := natsjs.EnsureStreams(testCtx(t, 30*time.Second), js, table, natsjs.StreamOptions{}); err != nil {
		t.Fatal(err)
	}
	cfg := WriteConfig(t, "", Config{Rules: rules, URLs: []string{srv.URL}, Ordering: "{pinnedTTL: 2s}", Partitions: "{leaseTTL: 3s}"})
	b := StartBridge(t, BridgeOptions{Name: "replica", Config: cfg})
	b.WaitReady()
	ctx := testCtx(t, 30*time.Second)
	st, err := b.Status(ctx)
	if err != nil || !st.Ready || st.RulesVersion != table.Version() {
		t.Fatalf("/status: %+v, %v", st, err)
	}
	// The example rules are ordered: the one replica is a standby until a
	// message makes its probe win the pin.
	if src, err := b.Source(ctx, "orders"); err != nil || src == nil || src.Ordering != "ordered" || src.Pinned == nil {
		t.Fatalf("/status source of orders: %+v, %v", src, err)
	}
	if ok, why, err := b.Ready(ctx); !ok || err != nil {
		t.Fatalf("/readyz: %v %q %v", ok, why, err)
	}
	pid := b.Pid()
	b.Kill9()
	if exited, err := b.Exited(); !exited || err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("after Kill9: exited %v, %v", exited, err)
	}
	if _, _, err := b.Ready(ctx); err == nil {
		t.Fatal("a killed bridge answered /readyz")
	}
	b.Restart()
	b.WaitReady()
	if b.Pid() == pid {
		t.Fatal("Restart kept the old process")
	}
	if err := b.Term(); err != nil {
		t.Fatalf("SIGTERM: exit %v\n%s", err, b.LogTail(20))
	}
	if !strings.Contains(b.LogTail(50), "bridge stopped") {
		t.Errorf("no shutdown line after SIGTERM:\n%s", b.LogTail(20))
	}
	b.Restart()
	b.WaitReady()
	if n := strings.Count(b.LogTail(1000), "=== e2etest: replica run "); n != 3 {
		t.Errorf("%d runs in the log, want 3", n)
	}
}
