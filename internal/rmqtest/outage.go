package rmqtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"
)

// Down takes the name server and broker off the network until Up: like the first half of Restart,
// it closes the listeners and every client connection (held pulls are answered "service not
// available" first, as in Restart) and keeps everything stored; connection attempts are refused
// meanwhile, as for a broker whose process or host is down. Consumers registered before stay members
// for Options.RestartGrace. It returns ErrClosed after Close and an error when the broker is not
// running (not started, or already down).
func (b *Broker) Down() error {
	b.lifeMu.Lock()
	defer b.lifeMu.Unlock()
	if err := b.down("Down"); err != nil {
		return err
	}
	b.logf("down: connections closed, not listening")
	return nil
}

// Up ends Down: the name server and broker listen again on the same ports. It returns ErrClosed
// after Close, an error when the broker is not down, and ctx's error (with the last listen error)
// when a port cannot be bound again before ctx ends.
func (b *Broker) Up(ctx context.Context) error {
	b.lifeMu.Lock()
	defer b.lifeMu.Unlock()
	b.mu.Lock()
	switch {
	case b.state == 3:
		b.mu.Unlock()
		return ErrClosed
	case b.state != 2 || b.nsLn == nil:
		b.mu.Unlock()
		return errors.New("rmqtest: Up needs a broker taken Down")
	}
	b.mu.Unlock()
	if err := b.up(ctx, "up"); err != nil {
		return err
	}
	b.logf("up: listening again")
	return nil
}

// down takes a running broker off the network (lifeMu held); op names
// the caller in its error.
func (b *Broker) down(op string) error {
	b.mu.Lock()
	switch b.state {
	case 1:
	case 3:
		b.mu.Unlock()
		return ErrClosed
	default:
		b.mu.Unlock()
		return fmt.Errorf("rmqtest: %s needs a running broker", op)
	}
	b.state = 2
	b.mu.Unlock()
	b.stopNetwork()
	return nil
}

// up listens again on the ports the broker had (lifeMu held). The ports
// were ours a moment ago; a retry loop covers a slow kernel release.
func (b *Broker) up(ctx context.Context, op string) error {
	b.mu.Lock()
	nsPort := b.nsLn.Addr().(*net.TCPAddr).Port
	brPort := b.brLn.Addr().(*net.TCPAddr).Port
	b.mu.Unlock()
	for {
		err := b.listen(nsPort, brPort)
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("rmqtest: %s: %w (last: %v)", op, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}
