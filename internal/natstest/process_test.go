//go:build unix

package natstest

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// A stand-alone server process serves JetStream with its store in Dir and
// the extra configuration applied; Stop ends it gracefully and a second
// process on the same Dir finds the stream again.
func TestProcess(t *testing.T) {
	dir := t.TempDir()
	p, err := StartProcess(ProcessOptions{Dir: dir, Config: "max_connections: 100", Timeout: 30 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Kill)
	if p.Pid() <= 0 || !strings.HasPrefix(p.URL, "nats://127.0.0.1:") {
		t.Fatalf("pid %d, url %s", p.Pid(), p.URL)
	}
	if b, err := os.ReadFile(p.ConfigFile); err != nil || !strings.Contains(string(b), "max_connections: 100") {
		t.Fatalf("configuration %s: %v\n%s", p.ConfigFile, err, b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	publish := func(url string) uint64 {
		nc, err := nats.Connect(url)
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		js, err := jetstream.New(nc)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := js.CreateOrUpdateStream(ctx, jetstream.StreamConfig{Name: "S", Subjects: []string{"s.>"}}); err != nil {
			t.Fatal(err)
		}
		ack, err := js.Publish(ctx, "s.x", []byte("x"))
		if err != nil {
			t.Fatal(err)
		}
		return ack.Sequence
	}
	if seq := publish(p.URL); seq != 1 {
		t.Fatalf("first publish at sequence %d", seq)
	}
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.Done():
	default:
		t.Fatal("Stop returned before the process exited")
	}
	if _, err := os.Stat(filepath.Join(p.StoreDir, "jetstream")); err != nil {
		t.Fatalf("store after stop: %v", err)
	}
	q, err := StartProcess(ProcessOptions{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(q.Kill)
	if seq := publish(q.URL); seq != 2 {
		t.Fatalf("publish after the restart at sequence %d, want 2 (the stream kept)", seq)
	}
}

// A process that cannot start (a bad configuration) is reported with its
// log, not waited for until the timeout.
func TestProcessStartFailure(t *testing.T) {
	start := time.Now()
	_, err := StartProcess(ProcessOptions{Dir: t.TempDir(), Config: "this is { not valid", Timeout: 30 * time.Second})
	if err == nil || !strings.Contains(err.Error(), "exited while starting") {
		t.Fatalf("err %v", err)
	}
	if time.Since(start) > 20*time.Second {
		t.Errorf("took %s", time.Since(start))
	}
	if _, err := StartProcess(ProcessOptions{}); err == nil {
		t.Error("StartProcess without Dir")
	}
}
