package app

import (
	"context"
	"errors"
	"sync"

	"go.uber.org/fx"
)

// resources closes what the constructors of one bridge opened. Each close
// function is registered as an OnStop hook, so that a started bridge closes
// it in reverse order of construction; and it is remembered, because fx runs
// no OnStop hook when the graph cannot be built (a later constructor failed)
// and only the hooks it started when a start fails: Start then calls
// rollback. Every close function runs at most once.
type resources struct {
	mu      sync.Mutex
	closers []func(context.Context) error
}

// add registers close for a resource just opened.
func (r *resources) add(lc fx.Lifecycle, close func(context.Context) error) {
	var once sync.Once
	var err error
	f := func(ctx context.Context) error {
		once.Do(func() { err = close(ctx) })
		return err
	}
	r.mu.Lock()
	r.closers = append(r.closers, f)
	r.mu.Unlock()
	lc.Append(fx.StopHook(f))
}

// rollback closes every resource not closed yet, newest first.
func (r *resources) rollback(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	var errs []error
	for i := len(r.closers) - 1; i >= 0; i-- {
		errs = append(errs, r.closers[i](ctx))
	}
	r.closers = nil
	return errors.Join(errs...)
}
