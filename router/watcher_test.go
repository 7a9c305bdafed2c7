package router

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// watchFixture runs a Watcher on dir and collects its events.
type watchFixture struct {
	h      *Holder
	w      *Watcher
	events chan ReloadEvent
}

func startWatcher(t *testing.T, dir string) *watchFixture {
	t.Helper()
	tb, err := Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	f := &watchFixture{h: NewHolder(tb), events: make(chan ReloadEvent, 16)}
	f.w, err = NewWatcher(dir, f.h, func(ev ReloadEvent) { f.events <- ev }, nil)
	if err != nil {
		t.Fatal(err)
	}
	f.w.debounce = 20 * time.Millisecond // keep the tests quick
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- f.w.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := f.w.Close(context.Background()); err != nil {
			t.Error(err)
		}
		if err := <-errc; err != nil {
			t.Error(err)
		}
	})
	return f
}

// next waits for the next reload event.
func (f *watchFixture) next(t *testing.T) ReloadEvent {
	t.Helper()
	select {
	case ev := <-f.events:
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no reload event within 10s")
		return ReloadEvent{}
	}
}

// writeAtomic replaces a file the way careful tools do: write, then rename.
func writeAtomic(t *testing.T, path, data string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	if err := os.WriteFile(tmp, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestWatcherReloads(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "rules.yaml")
	writeFiles(t, dir, map[string]string{"rules.yaml": baseRules})
	f := startWatcher(t, dir)

	// A valid, newer table is applied.
	writeAtomic(t, file, variant(t, "version: 3", "version: 4", `"0-4"`, `"0-3"`, `"5-9"`, `"4-9"`))
	ev := f.next(t)
	if ev.Err != nil || ev.Version != 4 || ev.Previous != 3 || ev.At.IsZero() {
		t.Fatalf("event %+v", ev)
	}
	if got := f.h.Load(); got.Version() != 4 || got.Owner(4) != "a1" {
		t.Fatalf("holder has version %d, shard 4 owner %s", got.Version(), got.Owner(4))
	}

	// Broken rules are refused with every problem; the running table stays.
	writeAtomic(t, file, variant(t, "version: 3", "version: 5", "failover: a1, shards", "failover: a9, shards"))
	ev = f.next(t)
	var pe *Errors
	if !errors.As(ev.Err, &pe) || !strings.Contains(ev.Err.Error(), `cells[0].failover: unknown cell "a9"`) || ev.Previous != 4 {
		t.Fatalf("event %+v", ev)
	}
	if f.h.Load().Version() != 4 {
		t.Fatal("broken rules replaced the table")
	}

	// A lower version is refused.
	writeAtomic(t, file, variant(t, "version: 3", "version: 2"))
	ev = f.next(t)
	if !errors.Is(ev.Err, ErrVersionNotNewer) || ev.Version != 2 || ev.Previous != 4 {
		t.Fatalf("event %+v", ev)
	}

	// The same version with different content is refused too.
	writeAtomic(t, file, variant(t, "version: 3", "version: 4"))
	ev = f.next(t)
	if !errors.Is(ev.Err, ErrVersionNotNewer) || ev.Version != 4 || f.h.Load().Owner(4) != "a1" {
		t.Fatalf("event %+v", ev)
	}

	// Putting the running rules back ends the refusal: one event says so
	// (the refused-rules gauge and alert clear), nothing is loaded.
	writeAtomic(t, file, variant(t, "version: 3", "version: 4", `"0-4"`, `"0-3"`, `"5-9"`, `"4-9"`))
	ev = f.next(t)
	if ev.Err != nil || !ev.Reverted || ev.Version != 4 || ev.Previous != 4 {
		t.Fatalf("event after reverting to the running rules: %+v", ev)
	}

	// A burst: a new file, then the version bump. Seen apart, the first half
	// is refused (new content, same version) and the second applied.
	writeFiles(t, dir, map[string]string{"extra.yml": "kind: TopicRule\nname: extra\nsource: {broker: nats, stream: X, subject: \"x.>\"}\nkey: {header: K}\nshard: {func: fnv1a}\ntarget: {broker: nats, subject: \"cell.{cell}.x\"}\nonMissingKey: global\n"})
	writeAtomic(t, file, variant(t, "version: 3", "version: 6"))
	ev = f.next(t)
	for ev.Err != nil {
		ev = f.next(t)
	}
	if f.h.Load().Rule("extra") == nil {
		t.Fatal("extra rule not loaded")
	}
	if ev.Version != 6 {
		t.Fatalf("event %+v", ev)
	}
}

// TestWatcherConfigMapSwap reproduces how the kubelet updates a ConfigMap
// volume: the files are symlinks through `..data`, which is atomically
// re-pointed to a new timestamped directory.
func TestWatcherConfigMapSwap(t *testing.T) {
	dir := t.TempDir()
	parts := strings.SplitN(baseRules, "---\n", 2)
	publish := func(stamp, cellmap string) {
		t.Helper()
		writeFiles(t, dir, map[string]string{stamp + "/cellmap.yaml": cellmap, stamp + "/rules.yaml": parts[1]})
		tmp := filepath.Join(dir, "..data_tmp")
		if err := os.Symlink(stamp, tmp); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
	}
	publish("..2026_11_25_18_00_00.1", parts[0])
	for _, name := range []string{"cellmap.yaml", "rules.yaml"} {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	f := startWatcher(t, dir)
	if n := len(f.h.Load().Files()); n != 2 {
		t.Fatalf("loaded %d files, want 2 (hidden directories must be skipped)", n)
	}

	publish("..2026_11_25_18_05_00.2", strings.Replace(parts[0], "version: 3", "version: 4", 1))
	if err := os.RemoveAll(filepath.Join(dir, "..2026_11_25_18_00_00.1")); err != nil {
		t.Fatal(err)
	}
	ev := f.next(t)
	if ev.Err != nil || ev.Version != 4 || f.h.Load().Version() != 4 {
		t.Fatalf("event %+v, holder version %d", ev, f.h.Load().Version())
	}

	// A swap to invalid content is refused like any other change.
	publish("..2026_11_25_18_10_00.3", strings.Replace(parts[0], "version: 3", "version: 0", 1))
	ev = f.next(t)
	if ev.Err == nil || !strings.Contains(ev.Err.Error(), "version: must be a positive integer") || f.h.Load().Version() != 4 {
		t.Fatalf("event %+v", ev)
	}
}

func TestWatcherLifecycle(t *testing.T) {
	dir := t.TempDir()
	writeFiles(t, dir, map[string]string{"rules.yaml": baseRules})
	if _, err := NewWatcher(filepath.Join(dir, "missing"), NewHolder(nil), nil, nil); err == nil {
		t.Fatal("watching a missing directory succeeded")
	}
	if _, err := NewWatcher(dir, nil, nil, nil); err == nil {
		t.Fatal("nil holder accepted")
	}

	// Close without Run, twice.
	w, err := NewWatcher(dir, NewHolder(nil), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}

	// An empty holder takes the first valid table at Run; a cancelled
	// context ends Run with nil.
	h := NewHolder(nil)
	events := make(chan ReloadEvent, 1)
	w, err = NewWatcher(dir, h, func(ev ReloadEvent) { events <- ev }, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- w.Run(ctx) }()
	if ev := <-events; ev.Err != nil || ev.Version != 3 || ev.Previous != 0 || h.Load() == nil {
		t.Fatalf("event %+v", ev)
	}
	if err := w.Run(ctx); err == nil {
		t.Fatal("second Run accepted")
	}
	cancel()
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if err := w.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// TestWatcherOutcomeLevel: each outcome is one log line, at Info (reloaded)
// and Warn (refused) by default, at the level OutcomeLevel sets otherwise.
func TestWatcherOutcomeLevel(t *testing.T) {
	for _, tc := range []struct {
		name             string
		opts             []WatcherOption
		reloaded, refuse string
	}{
		{"default", nil, "INFO", "WARN"},
		{"debug", []WatcherOption{OutcomeLevel(slog.LevelDebug)}, "DEBUG", "DEBUG"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			file := filepath.Join(dir, "rules.yaml")
			writeFiles(t, dir, map[string]string{"rules.yaml": baseRules})
			var buf bytes.Buffer
			log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
			w, err := NewWatcher(dir, NewHolder(nil), nil, log, tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close(context.Background())
			w.check() // the first valid table is taken
			writeAtomic(t, file, variant(t, "version: 3", "version: 2"))
			w.check() // a lower version is refused
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if len(lines) != 2 ||
				!strings.Contains(lines[0], "level="+tc.reloaded+` msg="rules reloaded"`) ||
				!strings.Contains(lines[1], "level="+tc.refuse+` msg="rules reload refused"`) {
				t.Fatalf("log:\n%s", buf.String())
			}
		})
	}
}

// TestWatcherRefusesWhatCannotLoad: rules that could crash the loader are
// refused with an error and the running table stays: an empty global
// with onMissingKey: global (refused by the validator), and, as a defence,
// any panic while loading.
func TestWatcherRefusesWhatCannotLoad(t *testing.T) {
	for _, tc := range []struct {
		name  string
		rules string
		load  func(string, []ruleFile) (*Table, error)
		want  string
	}{
		{"empty global", variant(t, "version: 3", "version: 4", "global: gz00", `global: ""`), nil,
			"global: must name a cell"},
		{"panic while loading", variant(t, "version: 3", "version: 4"),
			func(string, []ruleFile) (*Table, error) { panic("boom") },
			"loading the rules failed unexpectedly (a bug in the rules loader; please report it): boom"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			writeFiles(t, dir, map[string]string{"rules.yaml": baseRules})
			h := NewHolder(mustParse(t, baseRules))
			var got []ReloadEvent
			w, err := NewWatcher(dir, h, func(ev ReloadEvent) { got = append(got, ev) }, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close(context.Background())
			if tc.load != nil {
				w.load = tc.load
			}
			writeAtomic(t, filepath.Join(dir, "rules.yaml"), tc.rules)
			w.check()
			if len(got) != 1 || got[0].Err == nil || !strings.Contains(got[0].Err.Error(), tc.want) || got[0].Previous != 3 {
				t.Fatalf("events %+v, want one refusal with %q", got, tc.want)
			}
			if v := h.Load().Version(); v != 3 {
				t.Fatalf("holder runs version %d, want 3", v)
			}
		})
	}
}
