package drill

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/tally"
)

// Arrival is one drill event as found in a cell stream (or the DLQ).
type Arrival = tally.Arrival

// collector follows the cell streams and the DLQ with ordered consumers and
// keeps every drill event that arrives.
type collector struct {
	run string

	mu       sync.Mutex
	arrivals []Arrival
	byID     map[string]int // arrivals per payload id
	foreign  int            // messages of other runs or not from the drill
	errs     []error

	ccs []jetstream.ConsumeContext
}

// startCollector starts consuming streams (cell name → stream; "" for the
// DLQ) from their current end: only what arrives from now on is seen.
func startCollector(ctx context.Context, js jetstream.JetStream, run string, streams map[string]string) (*collector, error) {
	c := &collector{run: run, byID: map[string]int{}}
	for cell, stream := range streams {
		oc, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{DeliverPolicy: jetstream.DeliverNewPolicy})
		if errors.Is(err, jetstream.ErrStreamNotFound) {
			continue
		}
		if err != nil {
			c.stop()
			return nil, fmt.Errorf("drill: following stream %s: %w", stream, err)
		}
		cc, err := oc.Consume(func(m jetstream.Msg) { c.add(cell, stream, m) },
			jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) {
				if errors.Is(err, jetstream.ErrNoHeartbeat) {
					return // the ordered consumer recreates itself
				}
				c.mu.Lock()
				if len(c.errs) < 10 {
					c.errs = append(c.errs, fmt.Errorf("stream %s: %w", stream, err))
				}
				c.mu.Unlock()
			}))
		if err != nil {
			c.stop()
			return nil, fmt.Errorf("drill: following stream %s: %w", stream, err)
		}
		c.ccs = append(c.ccs, cc)
	}
	return c, nil
}

func (c *collector) add(cell, stream string, m jetstream.Msg) {
	a, err := tally.FromMsg(cell, stream, m)
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil || a.Run != c.run {
		c.foreign++
		return
	}
	c.arrivals = append(c.arrivals, a)
	c.byID[a.ID]++
}

// count returns how many distinct payload ids of ids arrived.
func (c *collector) countArrived(ids []string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, id := range ids {
		if c.byID[id] > 0 {
			n++
		}
	}
	return n
}

// distinct is the number of distinct payload ids that arrived.
func (c *collector) distinct() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.byID)
}

// snapshot returns a copy of the arrivals so far.
func (c *collector) snapshot() []Arrival {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Arrival(nil), c.arrivals...)
}

func (c *collector) stop() {
	for _, cc := range c.ccs {
		cc.Stop()
	}
	for _, cc := range c.ccs {
		select {
		case <-cc.Closed():
		case <-time.After(5 * time.Second):
		}
	}
	c.ccs = nil
}

// cellStreams maps every cell of the rules (and "" for the DLQ) to the
// stream the embedded default captures its subjects in.
func cellStreams(cells []string) map[string]string {
	m := map[string]string{"": natsjs.DLQStream}
	for _, c := range cells {
		m[c] = natsjs.CellStream(c)
	}
	return m
}
