package rmq

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apache/rocketmq-client-go/v2/consumer"
	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
)

// SourceConfig configures the consumer of one topic rule.
type SourceConfig struct {
	// Rule is the topic rule name, copied into every bridge.Message.
	Rule string
	// Topic is the source topic; Tags an optional tag expression
	// ("TagA || TagB"; "" or "*" = all).
	Topic, Tags string
	// Group is the consumer group: replicas sharing it share the queues
	// (clustering mode). Required.
	Group string
	// FetchBatch is the number of messages per pull request. Default 128,
	// at most 1024. The client buffers up to 36 pulled batches per queue,
	// and a batch is acknowledged whole (a crash re-reads what was settled
	// of an unfinished batch).
	FetchBatch int
	// Redeliver is the delay before a message negatively acknowledged
	// without a delay (not a bridge.Hold) is handed to the pipeline again.
	// Default 1s.
	Redeliver time.Duration
	// StartRetry is how often Run retries starting the consumer while the
	// topic does not exist yet. Default 2s.
	StartRetry time.Duration
	// OnFailing, when set, is told why the consumer cannot start (err
	// non-nil, on every failed attempt: the topic has no route, the name
	// servers do not answer) and, with nil, that it started. It must not
	// block. A started consumer's own pull failures are not reported: the
	// client retries them itself and only logs them.
	OnFailing func(err error)
	// Backlog, when set, receives the number of messages stored in the
	// assigned queues beyond the last one pulled, after every pull.
	Backlog func(n int64)
	// PersistInterval bounds how long an acknowledgement waits before the
	// consumer offsets go to the broker: the source sends them at once
	// after an acknowledgement, then at most every PersistInterval (the
	// client alone sends them 10 s after start, then every 5 s). After a
	// crash, what was acknowledged since the last persist is read again.
	// Default DefaultPersistInterval.
	PersistInterval time.Duration
}

// DefaultPersistInterval is SourceConfig.PersistInterval's default.
const DefaultPersistInterval = 200 * time.Millisecond

func (c *SourceConfig) defaults() error {
	if c.Rule == "" || c.Topic == "" || c.Group == "" {
		return errors.New("rmq: SourceConfig needs Rule, Topic and Group")
	}
	c.FetchBatch = min(cmp.Or(max(c.FetchBatch, 0), 128), 1024)
	c.Redeliver = cmp.Or(max(c.Redeliver, 0), time.Second)
	c.StartRetry = cmp.Or(max(c.StartRetry, 0), 2*time.Second)
	c.PersistInterval = cmp.Or(max(c.PersistInterval, 0), DefaultPersistInterval)
	c.Tags = cmp.Or(c.Tags, "*")
	return nil
}

// startSettle is how long after Start Close waits before shutting the
// client down (see Close).
const startSettle = time.Second

// pullConsumer is the part of the client's pull consumer the Source uses.
type pullConsumer interface {
	Subscribe(topic string, selector consumer.MessageSelector) error
	Start() error
	Poll(ctx context.Context, timeout time.Duration) (*consumer.ConsumeRequest, error)
	ACK(ctx context.Context, cr *consumer.ConsumeRequest, result consumer.ConsumeResult)
	PersistOffset(ctx context.Context, topic string) error
	OffsetForTimestamp(mq *primitive.MessageQueue, timestamp int64) (int64, error)
	Shutdown() error
}

// Source consumes one topic rule with a clustering-mode pull consumer and
// hands each message to the bridge pipeline; see the package documentation
// for how acknowledgements map onto offsets. Create it with NewSource, call
// Run once, then Close.
type Source struct {
	bc     BrokerConfig
	cfg    SourceConfig
	log    *slog.Logger
	source string

	pc      pullConsumer // set by Run before the first message
	started time.Time    // when pc started
	runCtx  context.Context
	handler bridge.Handler

	acked chan struct{} // a batch was acknowledged since the last persist (buffer 1)

	mu      sync.Mutex
	stopped bool // Run returned: no more redeliveries
	timers  map[*time.Timer]struct{}
	wg      sync.WaitGroup // redelivery goroutines
	closed  atomic.Bool

	backlog map[primitive.MessageQueue]queueBacklog // Run goroutine only
	sent    int64                                   // the backlog last reported (-1: none yet)
	brokers map[string]primitive.MessageQueue       // a queue per broker name seen (guarded by mu)
}

var _ bridge.Source = (*Source)(nil)

// NewSource validates the configuration; the consumer starts in Run.
func NewSource(bc BrokerConfig, cfg SourceConfig, log *slog.Logger) (*Source, error) {
	if err := bc.Validate(); err != nil {
		return nil, err
	}
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Source{
		bc: bc, cfg: cfg, source: bc.Name + "/" + cfg.Topic,
		log:     log.With("rule", cfg.Rule, "topic", cfg.Topic, "group", cfg.Group),
		timers:  map[*time.Timer]struct{}{},
		acked:   make(chan struct{}, 1),
		backlog: map[primitive.MessageQueue]queueBacklog{}, sent: -1,
		brokers: map[string]primitive.MessageQueue{},
	}, nil
}

// start creates and starts the pull consumer, retrying while the topic has
// no route yet (it may be created after the bridge). It returns nil when
// ctx ends first.
func (s *Source) start(ctx context.Context) (pullConsumer, error) {
	for {
		opts := []consumer.Option{
			consumer.WithNsResolver(s.bc.resolver()),
			consumer.WithGroupName(s.cfg.Group),
			consumer.WithInstance(s.bc.instanceName("source")),
			consumer.WithConsumerModel(consumer.Clustering),
			// A new group starts at the oldest message: a bridge that
			// starts after its producers must not skip their messages.
			consumer.WithConsumeFromWhere(consumer.ConsumeFromFirstOffset),
			consumer.WithPullBatchSize(int32(s.cfg.FetchBatch)),
		}
		remotingDefaults()
		if s.bc.Namespace != "" {
			opts = append(opts, consumer.WithNamespace(s.bc.Namespace))
		}
		if c, ok := s.bc.credentials(); ok {
			opts = append(opts, consumer.WithCredentials(c))
		}
		pc, err := consumer.NewPullConsumer(opts...)
		if err != nil {
			return nil, fmt.Errorf("rmq: rule %s: new consumer: %w", s.cfg.Rule, err)
		}
		if err := pc.Subscribe(s.cfg.Topic, consumer.MessageSelector{Type: consumer.TAG, Expression: s.cfg.Tags}); err != nil {
			_ = pc.Shutdown()
			return nil, fmt.Errorf("rmq: rule %s: subscribe %s: %w", s.cfg.Rule, s.cfg.Topic, err)
		}
		err = pc.Start() // shuts itself down on failure
		if err == nil {
			s.log.Info("rocketmq consumer started", "broker", s.bc.Name)
			if s.cfg.OnFailing != nil {
				s.cfg.OnFailing(nil)
			}
			return pc, nil
		}
		s.log.Warn("rocketmq consumer cannot start yet; retrying", "err", err, "retry_in", s.cfg.StartRetry)
		if s.cfg.OnFailing != nil {
			s.cfg.OnFailing(fmt.Errorf("rocketmq consumer cannot start (topic %s, group %s; retrying every %s): %w",
				s.cfg.Topic, s.cfg.Group, s.cfg.StartRetry, err))
		}
		t := time.NewTimer(s.cfg.StartRetry)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, nil
		case <-t.C:
		}
	}
}

// Run starts the consumer and hands messages to h, in queue order, until
// ctx is cancelled. It returns an error only when the consumer cannot be
// created at all (bad options).
func (s *Source) Run(ctx context.Context, h bridge.Handler) error {
	pc, err := s.start(ctx)
	if err != nil || pc == nil {
		s.stop()
		return err
	}
	s.mu.Lock()
	s.pc, s.runCtx, s.handler, s.started = pc, ctx, h, time.Now()
	s.mu.Unlock()
	defer s.stop()
	persisted := make(chan struct{})
	defer func() { <-persisted }()
	go s.persistLoop(ctx, pc, persisted)
	for ctx.Err() == nil {
		cr, err := pc.Poll(ctx, time.Second)
		if err != nil || cr == nil {
			s.reportBacklog() // a queue may have gone in a rebalance meanwhile
			continue          // ErrNoNewMsg: nothing buffered within the timeout
		}
		msgs := cr.GetMsgList()
		b := &batch{cr: cr}
		if p := cr.GetPQ(); p != nil {
			b.pq = p
		}
		b.left.Store(int32(len(msgs)))
		s.trackBacklog(cr.GetMQ(), b.pq, msgs)
		if mq := cr.GetMQ(); mq != nil {
			s.mu.Lock()
			if _, ok := s.brokers[mq.BrokerName]; !ok {
				s.brokers[mq.BrokerName] = *mq
			}
			s.mu.Unlock()
		}
		for _, ext := range msgs {
			d := &delivery{s: s, b: b, ext: ext}
			if err := s.hand(ctx, d); err != nil {
				return nil // ctx done; the rest of the batch stays unacknowledged
			}
		}
	}
	return nil
}

// persistLoop sends the consumer offsets to the broker when batches were
// acknowledged: at once after the first acknowledgement, then at most
// every PersistInterval, so an acknowledgement reaches the broker within
// PersistInterval (plus the send). The client's persist sends one oneway
// request per assigned queue.
func (s *Source) persistLoop(ctx context.Context, pc pullConsumer, done chan<- struct{}) {
	defer close(done)
	t := time.NewTimer(s.cfg.PersistInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.acked:
		}
		if err := pc.PersistOffset(ctx, s.cfg.Topic); err != nil {
			s.log.Debug("rocketmq consumer offsets not persisted", "err", err)
		}
		t.Reset(s.cfg.PersistInterval)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// stop ends redeliveries: pending timers are cancelled and running ones
// awaited (they return once ctx is done).
func (s *Source) stop() {
	s.mu.Lock()
	s.stopped = true
	for t := range s.timers {
		t.Stop()
		delete(s.timers, t)
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// Close persists the consumer offsets (the acknowledged prefix of every
// queue) and shuts the client down. Call it after Run returned and the
// pipeline drained, so that every settled message is counted.
func (s *Source) Close(ctx context.Context) error {
	if s.closed.Swap(true) {
		return nil
	}
	s.stop()
	s.mu.Lock()
	pc, started := s.pc, s.started
	s.mu.Unlock()
	if pc == nil {
		return nil
	}
	// The client runs its first rebalance on a goroutine of its own after
	// Start, and Shutdown races with a running rebalance (the client's
	// closed flag is unsynchronized): give that rebalance time to finish.
	if d := time.Until(started.Add(startSettle)); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
	// Shutdown persists too, but only after it stopped the client's
	// loops; persisting first keeps the last acknowledgements even when
	// Shutdown's own attempt finds the connection gone.
	perr := pc.PersistOffset(ctx, s.cfg.Topic)
	// Offsets go out as oneway requests, and Shutdown closes the
	// connections right after: a close with unread data resets the
	// connection, and the broker may lose the frames it had not read yet.
	// A synchronous request to each broker behind them is a barrier.
	s.mu.Lock()
	for _, mq := range s.brokers {
		_, _ = pc.OffsetForTimestamp(&mq, time.Now().UnixMilli())
	}
	s.mu.Unlock()
	serr := pc.Shutdown()
	if err := errors.Join(perr, serr); err != nil {
		return fmt.Errorf("rmq: rule %s: close consumer: %w", s.cfg.Rule, err)
	}
	return nil
}

func (s *Source) trackBacklog(mq *primitive.MessageQueue, pq droppable, msgs []*primitive.MessageExt) {
	if s.cfg.Backlog == nil || mq == nil || len(msgs) == 0 {
		return
	}
	last := msgs[len(msgs)-1]
	maxOff, err := strconv.ParseInt(last.GetProperty(primitive.PropertyMaxOffset), 10, 64)
	if err != nil {
		return
	}
	s.backlog[*mq] = queueBacklog{n: max(0, maxOff-last.QueueOffset-1), pq: pq}
	s.reportBacklog()
}

// droppable is the client's process queue of a pulled batch: dropped once
// a rebalance gave its queue to another consumer of the group.
type droppable interface{ IsDroppd() bool }

// queueBacklog is what one queue held beyond its last pulled batch.
type queueBacklog struct {
	n  int64
	pq droppable // nil: unknown, kept
}

// reportBacklog reports the sum over the queues this consumer still holds
// (Run goroutine, after every pull and every empty poll): a queue a
// rebalance took away counts no more, instead of its last value for good.
func (s *Source) reportBacklog() {
	if s.cfg.Backlog == nil {
		return
	}
	var n int64
	for mq, q := range s.backlog {
		if q.pq != nil && q.pq.IsDroppd() {
			delete(s.backlog, mq)
			continue
		}
		n += q.n
	}
	if n != s.sent {
		s.sent = n
		s.cfg.Backlog(n)
	}
}

// batch is one pulled ConsumeRequest; the client acknowledges whole
// requests, so it is acknowledged when its last message settled.
type batch struct {
	cr   *consumer.ConsumeRequest
	pq   droppable // cr's process queue; nil: unknown
	left atomic.Int32
}

// delivery is one message of a batch, handed to the pipeline once or more
// (local redelivery after a negative acknowledgement).
type delivery struct {
	s     *Source
	b     *batch
	ext   *primitive.MessageExt
	n     int // deliveries so far
	final atomic.Bool
}

// queueDropped reports whether d's queue was taken from this consumer (a
// rebalance gave it to another member of the group).
func (d *delivery) queueDropped() bool {
	return d.b != nil && d.b.pq != nil && d.b.pq.IsDroppd()
}

// message builds a fresh bridge.Message for each delivery: the pipeline
// adds the Cell-* headers to the map it is given.
func (d *delivery) message() *bridge.Message {
	ext, s := d.ext, d.s
	m := &bridge.Message{Rule: s.cfg.Rule, Source: s.source, Deliveries: int(ext.ReconsumeTimes) + d.n}
	m.Subject = s.cfg.Topic
	m.Body = ext.Body
	m.Keys = ext.GetProperty(primitive.PropertyKeys)
	m.Header = userHeader(ext.GetProperties())
	m.SourceID = ext.GetProperty(primitive.PropertyUniqueClientMessageIdKeyIndex)
	if m.SourceID == "" {
		var broker, queue string
		if ext.Queue != nil {
			broker, queue = ext.Queue.BrokerName, strconv.Itoa(ext.Queue.QueueId)
		}
		m.SourceID = strings.Join([]string{s.cfg.Topic, broker, queue, strconv.FormatInt(ext.QueueOffset, 10)}, "/")
	}
	switch {
	case ext.StoreTimestamp > 0:
		m.Time = time.UnixMilli(ext.StoreTimestamp)
	case ext.BornTimestamp > 0:
		m.Time = time.UnixMilli(ext.BornTimestamp)
	}
	return m
}

func (s *Source) hand(ctx context.Context, d *delivery) error {
	d.n++
	d.final.Store(false)
	return s.handler(ctx, d.message(), d.ack)
}

// ack maps the pipeline's result onto the consumer: see the package docs.
func (d *delivery) ack(_ context.Context, err error) error {
	if errors.Is(err, bridge.ErrInProgress) {
		return nil // no ack deadline on a pull consumer: offsets wait anyway
	}
	if d.final.Swap(true) {
		return nil
	}
	s := d.s
	if err == nil {
		if d.b.left.Add(-1) == 0 {
			if s.closed.Load() {
				return ErrClosed
			}
			s.pc.ACK(context.Background(), d.b.cr, consumer.ConsumeSuccess)
			select {
			case s.acked <- struct{}{}:
			default:
			}
		}
		return nil
	}
	delay, ok := bridge.HoldDelay(err)
	if !ok {
		delay = s.cfg.Redeliver
	}
	s.redeliver(d, delay)
	return nil
}

// redeliver hands d to the pipeline again after delay, unless the source
// stopped or its queue was rebalanced to another consumer of the group:
// then d stays unacknowledged, the queue's offset stays before it, and the
// queue's owner reads it again (this replica handing it over too would
// forward it twice at once).
func (s *Source) redeliver(d *delivery, delay time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.runCtx.Err() != nil || d.queueDropped() {
		return
	}
	var t *time.Timer
	t = time.AfterFunc(delay, func() {
		s.mu.Lock()
		if s.stopped {
			s.mu.Unlock()
			return
		}
		if d.queueDropped() {
			delete(s.timers, t)
			s.mu.Unlock()
			return
		}
		delete(s.timers, t)
		s.wg.Add(1)
		s.mu.Unlock()
		defer s.wg.Done()
		_ = s.hand(s.runCtx, d) // an error means ctx ended; d was negatively acknowledged
	})
	s.timers[t] = struct{}{}
}
