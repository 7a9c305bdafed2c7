package natsjs

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/router"
)

var _ bridge.WindowSink = (*Sink)(nil)

// DuplicateWindow implements bridge.WindowSink: the duplicate window of the
// stream that captures tg.Subject on tg.Broker (two JetStream API requests:
// the stream by subject, then its configuration), within the broker's
// AckTimeout (DefaultAckTimeout when it is off) and ctx. The sink sets
// Nats-Msg-Id to the message's idempotency key, so that stream drops a
// second copy stored within the window. Errors name the broker and
// subject.
func (s *Sink) DuplicateWindow(ctx context.Context, tg router.Target) (time.Duration, error) {
	js := s.js[tg.Broker]
	if js == nil {
		return 0, fmt.Errorf("%w %q (subject %q)", ErrUnknownBroker, tg.Broker, tg.Subject)
	}
	d := s.timeouts[tg.Broker]
	if d <= 0 {
		d = DefaultAckTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	name, err := js.StreamNameBySubject(ctx, tg.Subject)
	if err != nil {
		return 0, fmt.Errorf("natsjs: broker %q: the stream of subject %q: %w", tg.Broker, tg.Subject, err)
	}
	st, err := js.Stream(ctx, name)
	if err != nil {
		return 0, fmt.Errorf("natsjs: broker %q: stream %s (subject %q): %w", tg.Broker, name, tg.Subject, err)
	}
	return windowOf(st.CachedInfo().Config), nil
}

// windowOf is the duplicate window a stream applies: its configured one;
// the server fills in its default (two minutes) for streams made without
// one, and keeps at most the max age.
func windowOf(c jetstream.StreamConfig) time.Duration {
	w := c.Duplicates
	if c.MaxAge > 0 && c.MaxAge < w {
		w = c.MaxAge
	}
	return w
}
