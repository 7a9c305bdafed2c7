package e2etest

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/tally"
	"github.com/cellbridge/cellbridge/router"
)

// LoadConfig describes a load: Events events over Keys at Rate per second
// into the source stream of Rule.
type LoadConfig struct {
	// JetStream publishes; the caller owns its connection, which should
	// know every server of the cluster.
	JetStream jetstream.JetStream
	// Rule is the topic rule whose NATS source the load feeds; the key goes
	// where it reads it (tally.Encode).
	Rule *router.Rule
	// Subject to publish on; default the rule's source subject with its
	// wildcards replaced by "load".
	Subject string
	// Keys are used round robin: event n has key Keys[n % len(Keys)].
	Keys []string
	// Rate is events per second; Events how many in all.
	Rate, Events int
	// Run names the load in every payload; default "load<time>".
	Run string
	// Lanes is how many publishers work in parallel (default 64). A key
	// always goes through the same lane, and a lane publishes its next
	// event only when the previous one is stored, so that each key's
	// events are stored in sequence order even across retries.
	Lanes int
	// AttemptTimeout bounds each publish attempt (default 2s); Backoff is
	// the pause before retrying (default 100ms).
	AttemptTimeout, Backoff time.Duration
	// Header is set on every event (e.g. Cell-Origin, the cell a producer
	// writes from).
	Header map[string]string
}

// Keys returns n distinct 16-digit user ids whose 3rd- and 2nd-to-last
// digits count up from 00 to 99 and round again, so that consecutive keys
// fall in consecutive shards of the example rules (digits [-3:-1]) and any
// n ≥ 100 covers all of them.
func Keys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("2077%09d%02d%d", i/1000, i%100, i/100%10)
	}
	return keys
}

// Event is one event of a load and what became of its publishing.
type Event struct {
	tally.Sent
	// SourceSeq is the sequence the source stream stored it under (0 while
	// not stored).
	SourceSeq uint64
	// Attempts is how many publishes it took.
	Attempts int
	// Scheduled is when its turn came; Acked when the source confirmed it.
	Scheduled, Acked time.Time
}

// LoadStats counts a load's publishing.
type LoadStats struct {
	Scheduled, Stored int
	// Retries is the number of failed attempts (each followed by a retry);
	// Duplicates the retries the source recognised by Nats-Msg-Id as
	// already stored.
	Retries, Duplicates int
	// Errors counts failed attempts by error text.
	Errors map[string]int
	// Behind is how far the schedule was behind the rate at its worst
	// (lanes full while the source did not answer).
	Behind time.Duration
}

// Load publishes events until all are stored or it is stopped. Its methods
// are safe for concurrent use.
type Load struct {
	cfg    LoadConfig
	cancel context.CancelFunc
	wg     sync.WaitGroup
	lanes  []chan *Event

	mu     sync.Mutex
	events []*Event
	stats  LoadStats
	stored chan struct{} // closed when every event is stored
}

// StartLoad starts publishing. Stop it (or let Wait see it finish) before
// the test ends.
func StartLoad(cfg LoadConfig) (*Load, error) {
	if cfg.JetStream == nil || cfg.Rule == nil || !cfg.Rule.Source.IsNATS() {
		return nil, errors.New("e2etest: a load needs a JetStream and a topic rule with a NATS source")
	}
	if len(cfg.Keys) == 0 || cfg.Rate <= 0 || cfg.Events <= 0 {
		return nil, fmt.Errorf("e2etest: a load of %d events over %d keys at %d/s", cfg.Events, len(cfg.Keys), cfg.Rate)
	}
	cfg.Subject = cmp.Or(cfg.Subject, concreteSubject(cfg.Rule.Source.Subject))
	cfg.Run = cmp.Or(cfg.Run, fmt.Sprintf("load%d", time.Now().UnixNano()%1e9))
	cfg.Lanes = cmp.Or(max(cfg.Lanes, 0), 64)
	cfg.AttemptTimeout = cmp.Or(max(cfg.AttemptTimeout, 0), 2*time.Second)
	cfg.Backoff = cmp.Or(max(cfg.Backoff, 0), 100*time.Millisecond)
	ctx, cancel := context.WithCancel(context.Background())
	l := &Load{cfg: cfg, cancel: cancel, stored: make(chan struct{}), stats: LoadStats{Errors: map[string]int{}}}
	// Room for four times a lane's share: the schedule waits on a full
	// lane (and falls behind, see LoadStats.Behind) only after the source
	// has stalled for a good part of the load.
	depth := max(4*(cfg.Events/cfg.Lanes+1), 256)
	for range cfg.Lanes {
		ch := make(chan *Event, depth)
		l.lanes = append(l.lanes, ch)
		l.wg.Add(1)
		go l.lane(ctx, ch)
	}
	l.wg.Add(1)
	go l.schedule(ctx)
	return l, nil
}

// concreteSubject turns a source filter into a subject ("orders.>" →
// "orders.load").
func concreteSubject(filter string) string {
	toks := strings.Split(filter, ".")
	for i, t := range toks {
		if t == "*" || t == ">" {
			toks[i] = "load"
		}
	}
	return strings.Join(toks, ".")
}

func (l *Load) laneOf(key string) chan *Event {
	h := fnv.New32a()
	h.Write([]byte(key))
	return l.lanes[h.Sum32()%uint32(len(l.lanes))]
}

// schedule hands event n to its lane at start + n/Rate.
func (l *Load) schedule(ctx context.Context) {
	defer l.wg.Done()
	defer func() {
		for _, ch := range l.lanes {
			close(ch)
		}
	}()
	seq := map[string]int{}
	start := time.Now()
	tick := time.NewTicker(2 * time.Millisecond)
	defer tick.Stop()
	for n := 0; n < l.cfg.Events; {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		due := min(int(time.Since(start).Seconds()*float64(l.cfg.Rate)), l.cfg.Events)
		for ; n < due; n++ {
			key := l.cfg.Keys[n%len(l.cfg.Keys)]
			seq[key]++
			e := &Event{Sent: tally.Sent{ID: fmt.Sprintf("%s-%07d", l.cfg.Run, n+1), Key: key, Seq: seq[key]}, Scheduled: time.Now()}
			// The bridge takes the producer's Nats-Msg-Id as the
			// idempotency key.
			e.MsgID = e.ID
			l.mu.Lock()
			l.events = append(l.events, e)
			l.stats.Scheduled++
			l.stats.Behind = max(l.stats.Behind, time.Since(start.Add(time.Duration(float64(n)/float64(l.cfg.Rate)*float64(time.Second)))))
			l.mu.Unlock()
			select {
			case l.laneOf(key) <- e:
			case <-ctx.Done():
				return
			}
		}
	}
}

// lane publishes its events one after the other, each until stored.
func (l *Load) lane(ctx context.Context, ch <-chan *Event) {
	defer l.wg.Done()
	for e := range ch {
		if !l.publish(ctx, e) {
			return
		}
	}
}

// publish sends e until the source stores it (true) or ctx ends (false).
// Every attempt carries the same Nats-Msg-Id, so an attempt whose answer
// was lost but which was stored is recognised as a duplicate by the source
// stream and not stored twice.
func (l *Load) publish(ctx context.Context, e *Event) bool {
	header, body, err := tally.Encode(l.cfg.Rule, tally.Payload{ID: e.ID, Key: e.Key, Seq: e.Seq, Run: l.cfg.Run, Sent: e.Scheduled.UnixNano()})
	if err != nil {
		l.fail(err)
		return false
	}
	m := &nats.Msg{Subject: l.cfg.Subject, Header: nats.Header(header), Data: body}
	m.Header.Set(jetstream.MsgIDHeader, e.ID)
	for k, v := range l.cfg.Header {
		m.Header.Set(k, v)
	}
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, l.cfg.AttemptTimeout)
		ack, err := l.cfg.JetStream.PublishMsg(actx, m)
		cancel()
		if err == nil {
			l.mu.Lock()
			e.SourceSeq, e.Attempts, e.Acked = ack.Sequence, attempt, time.Now()
			l.stats.Stored++
			if ack.Duplicate {
				l.stats.Duplicates++
			}
			if l.stats.Stored == l.cfg.Events {
				close(l.stored)
			}
			l.mu.Unlock()
			return true
		}
		if ctx.Err() != nil {
			return false
		}
		l.mu.Lock()
		l.stats.Retries++
		l.stats.Errors[err.Error()]++
		l.mu.Unlock()
		select {
		case <-ctx.Done():
			return false
		case <-time.After(l.cfg.Backoff):
		}
	}
}

func (l *Load) fail(err error) {
	l.mu.Lock()
	l.stats.Errors[err.Error()]++
	l.mu.Unlock()
	l.cancel()
}

// Wait returns when every event is stored at the source, or ctx ends (its
// error).
func (l *Load) Wait(ctx context.Context) error {
	select {
	case <-l.stored:
		return nil
	case <-ctx.Done():
		l.mu.Lock()
		defer l.mu.Unlock()
		return fmt.Errorf("e2etest: load: %d of %d events stored: %w (errors %v)", l.stats.Stored, l.cfg.Events, ctx.Err(), l.stats.Errors)
	}
}

// Stop stops publishing and waits for the publishers; events not stored by
// then are not in Sent.
func (l *Load) Stop() {
	l.cancel()
	l.wg.Wait()
}

// Stats returns the counts so far.
func (l *Load) Stats() LoadStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.stats
	s.Errors = make(map[string]int, len(l.stats.Errors))
	for k, v := range l.stats.Errors {
		s.Errors[k] = v
	}
	return s
}

// Events returns a copy of every event scheduled so far, in schedule order.
func (l *Load) Events() []Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]Event, len(l.events))
	for i, e := range l.events {
		out[i] = *e
	}
	return out
}

// Sent returns the events the source stored, in schedule order, for Verify
// (their Stored time is filled there, from the source stream).
func (l *Load) Sent() []tally.Sent {
	var out []tally.Sent
	for _, e := range l.Events() {
		if e.SourceSeq != 0 {
			out = append(out, e.Sent)
		}
	}
	return out
}
