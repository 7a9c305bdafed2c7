package router

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
)

// ErrVersionNotNewer is wrapped by a ReloadEvent's Err when the new rules
// have a lower version than the running table, or the same version with
// different content: versions must increase with every change, so that every
// bridge replica agrees on which table is newer.
var ErrVersionNotNewer = errors.New("rules version is not newer than the running one")

// ReloadEvent reports one reload attempt.
type ReloadEvent struct {
	Version  int64     // version of the new table; 0 when the rules could not be loaded
	Previous int64     // version running before the attempt (0 when none)
	Err      error     // nil: the new table is running; otherwise it was refused (*Errors or ErrVersionNotNewer)
	At       time.Time // when the attempt finished
	// Reverted reports, with Err nil and Version == Previous, that the
	// directory holds the running table's rules again after a refused
	// content: nothing was loaded, and the refusal is over.
	Reverted bool
}

// Timing of the watcher. Kubernetes updates a ConfigMap volume with several
// filesystem operations (new directory, symlink, rename, removal) and editors
// write files in steps, so a reload waits for a quiet period; a periodic
// re-check catches events that a filesystem failed to deliver.
const (
	reloadDebounce = 150 * time.Millisecond
	reloadMaxDelay = time.Second
	reloadResync   = 30 * time.Second
)

// Watcher reloads a rules directory into a Holder when it changes.
//
// It watches the directory itself (not the files), so it sees files being
// added, replaced or renamed, and the `..data` symlink swap with which
// Kubernetes updates ConfigMap volumes. A change is loaded after a short
// quiet period. The new table replaces the running one only when it is valid
// and its version is higher; otherwise the running table stays and the
// refusal is reported. Each outcome is logged (see OutcomeLevel) and passed
// to onReload once per distinct content of the directory (unchanged content
// is not reported).
//
// Run must be called at most once; Close stops it. onReload runs on the
// watcher's goroutine and must not block for long.
type Watcher struct {
	dir      string
	h        *Holder
	onReload func(ReloadEvent)
	log      *slog.Logger
	fsw      *fsnotify.Watcher

	debounce, maxDelay, resync time.Duration

	outcomeLevel *slog.Level // nil: Info for a reload, Warn for a refusal

	lastTried string // content key of the last attempt, so a refusal is reported once

	// load validates and compiles the files read (loadFiles; tests
	// replace it).
	load func(dir string, files []ruleFile) (*Table, error)

	mu      sync.Mutex
	started bool
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// WatcherOption configures a Watcher.
type WatcherOption func(*Watcher)

// OutcomeLevel sets the level of the watcher's one log line per reload
// outcome. By default a reload is logged at Info and a refusal at Warn; a
// caller that reports each outcome itself (from onReload) passes
// slog.LevelDebug, so that an operator reads every outcome once.
func OutcomeLevel(l slog.Level) WatcherOption {
	return func(w *Watcher) { w.outcomeLevel = &l }
}

// NewWatcher starts watching dir for changes; nothing is reloaded before
// Run. h must hold the table loaded from dir (or nil to accept any valid
// table). onReload may be nil; log nil discards logs. It fails when dir cannot
// be watched.
func NewWatcher(dir string, h *Holder, onReload func(ReloadEvent), log *slog.Logger, opts ...WatcherOption) (*Watcher, error) {
	if h == nil {
		return nil, errors.New("router: NewWatcher needs a Holder")
	}
	if onReload == nil {
		onReload = func(ReloadEvent) {}
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	fsw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("router: watching %s: %w", dir, err)
	}
	if err := fsw.Add(dir); err != nil {
		_ = fsw.Close()
		return nil, fmt.Errorf("router: watching %s: %w", dir, err)
	}
	w := &Watcher{
		dir: dir, h: h, onReload: onReload, log: log, fsw: fsw,
		debounce: reloadDebounce, maxDelay: reloadMaxDelay, resync: reloadResync, load: loadFiles,
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	for _, o := range opts {
		o(w)
	}
	return w, nil
}

// Run reloads on every change until ctx is done or Close is called, and then
// returns nil. It first checks the directory once, in case it changed since
// the running table was loaded.
func (w *Watcher) Run(ctx context.Context) error {
	w.mu.Lock()
	if w.started {
		w.mu.Unlock()
		return errors.New("router: Watcher.Run called twice")
	}
	w.started = true
	w.mu.Unlock()
	defer close(w.done)

	w.check()
	quiet := time.NewTimer(time.Hour)
	quiet.Stop()
	defer quiet.Stop()
	resync := time.NewTicker(w.resync)
	defer resync.Stop()
	var pendingSince time.Time // zero: no change pending

	for {
		select {
		case <-ctx.Done():
			return nil
		case <-w.stop:
			return nil
		case ev, ok := <-w.fsw.Events:
			if !ok {
				return nil
			}
			w.log.Debug("rules directory changed", "dir", w.dir, "event", ev.String())
			now := time.Now()
			if pendingSince.IsZero() {
				pendingSince = now
			}
			// Wait for a quiet period, but not forever while events keep coming.
			quiet.Reset(min(w.debounce, max(0, w.maxDelay-now.Sub(pendingSince))))
		case err, ok := <-w.fsw.Errors:
			if !ok {
				return nil
			}
			// Typically a queue overflow: events were lost, so look again.
			w.log.Warn("rules watcher error; re-checking the directory", "dir", w.dir, "err", err)
			quiet.Reset(w.debounce)
		case <-quiet.C:
			pendingSince = time.Time{}
			w.check()
		case <-resync.C:
			w.check()
		}
	}
}

// Close stops Run and releases the filesystem watch. It waits for Run to
// return until ctx is done. It is safe to call more than once.
func (w *Watcher) Close(ctx context.Context) error {
	var err error
	w.once.Do(func() {
		close(w.stop)
		err = w.fsw.Close()
	})
	w.mu.Lock()
	started := w.started
	w.mu.Unlock()
	if !started {
		return err
	}
	select {
	case <-w.done:
		return err
	case <-ctx.Done():
		return fmt.Errorf("router: closing watcher: %w", ctx.Err())
	}
}

// check loads the directory when its content differs from the running
// table's and was not tried before.
func (w *Watcher) check() {
	cur := w.h.Load()
	var prev int64
	if cur != nil {
		prev = cur.Version()
	}
	files, probs := readDir(w.dir)
	var key string
	if len(probs) == 0 {
		key = fingerprint(files)
		if cur != nil && key == cur.Fingerprint() {
			refused := w.lastTried != "" && w.lastTried != key
			w.lastTried = key
			if refused {
				w.log.Log(context.Background(), w.level(slog.LevelInfo), "rules directory holds the running rules again; the refused rules are gone",
					"dir", w.dir, "version", prev)
				w.onReload(ReloadEvent{Version: prev, Previous: prev, At: time.Now(), Reverted: true})
			}
			return
		}
	} else {
		key = "unreadable:" + (&Errors{probs[0]}).Error()
	}
	if key == w.lastTried {
		return // this content was refused before and is already reported
	}
	w.lastTried = key

	var t *Table
	var err error
	if len(probs) > 0 {
		e := Errors(probs)
		err = &e
	} else {
		t, err = w.loadGuarded(files)
	}
	ev := ReloadEvent{Previous: prev}
	switch {
	case err != nil:
		ev.Err = fmt.Errorf("rules in %s are invalid; keeping version %d:\n%w", w.dir, prev, err)
	case cur != nil && t.Version() < prev:
		ev.Version = t.Version()
		ev.Err = fmt.Errorf("%w: version %d is lower than the running %d; keeping %d", ErrVersionNotNewer, t.Version(), prev, prev)
	case cur != nil && t.Version() == prev:
		ev.Version = t.Version()
		ev.Err = fmt.Errorf("%w: the rules changed but version %d did not; keeping the running table (raise the version)", ErrVersionNotNewer, prev)
	default:
		ev.Version = t.Version()
		w.h.Store(t)
	}
	ev.At = time.Now()
	if ev.Err != nil {
		w.log.Log(context.Background(), w.level(slog.LevelWarn), "rules reload refused", "dir", w.dir, "version", ev.Version, "running", prev, "err", ev.Err)
	} else {
		w.log.Log(context.Background(), w.level(slog.LevelInfo), "rules reloaded", "dir", w.dir, "version", ev.Version, "previous", prev)
	}
	w.onReload(ev)
}

// loadGuarded loads files and turns a panic while doing so into an error,
// so that rules the validator let through by mistake are refused like
// invalid ones instead of ending the process: the running table stays.
func (w *Watcher) loadGuarded(files []ruleFile) (t *Table, err error) {
	defer func() {
		if p := recover(); p != nil {
			t, err = nil, fmt.Errorf("loading the rules failed unexpectedly (a bug in the rules loader; please report it): %v", p)
		}
	}()
	return w.load(w.dir, files)
}

// level is the level of an outcome's log line: def unless OutcomeLevel set one.
func (w *Watcher) level(def slog.Level) slog.Level {
	if w.outcomeLevel != nil {
		return *w.outcomeLevel
	}
	return def
}
