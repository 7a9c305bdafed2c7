package app

import (
	"context"
	"errors"
	"fmt"
	"syscall"
	"testing"

	"github.com/nats-io/nats.go"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
)

// TestRefusedConnect checks which failed connects `run -check` reports as
// a refusal (exit 1, as `run` exits) and which as a broker it could not
// reach yet (exit 0: `run` waits for it).
func TestRefusedConnect(t *testing.T) {
	connect := func(err error) error {
		return fmt.Errorf("natsjs: connect to broker %q at %s: %w", "nats", "nats://x:4222", err)
	}
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"authorization", connect(fmt.Errorf("%w (check the broker's creds, user/password or token)", nats.ErrAuthorization)), true},
		{"tls wanted by the server", connect(nats.ErrSecureConnRequired), true},
		{"tls alert", connect(errors.New("remote error: tls: certificate required")), true},
		{"settings", fmt.Errorf("%w: broker %q: url is empty", natsjs.ErrConfig, "nats"), true},
		{"timed out", connect(fmt.Errorf("%w (3 attempts; gave up: %w)", nats.ErrNoServers, context.DeadlineExceeded)), false},
		{"connection refused", connect(syscall.ECONNREFUSED), false},
		{"nil", nil, false},
	} {
		if got := RefusedConnect(tc.err); got != tc.want {
			t.Errorf("%s: RefusedConnect(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}
