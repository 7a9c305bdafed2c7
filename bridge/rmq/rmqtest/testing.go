package rmqtest

import (
	"context"
	"testing"
	"time"
)

// StartTB starts a broker for a test and closes it in t.Cleanup. It fails the test when the broker
// cannot start.
func StartTB(t testing.TB, opts Options) *Broker {
	t.Helper()
	b := New(opts)
	if err := b.Start(context.Background()); err != nil {
		t.Fatalf("rmqtest: start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := b.Close(ctx); err != nil {
			t.Errorf("rmqtest: close: %v", err)
		}
	})
	return b
}
