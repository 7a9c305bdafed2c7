package rmq

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"
	"github.com/apache/rocketmq-client-go/v2/producer"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/dedupe"
)

// SinkConfig configures a Sink.
type SinkConfig struct {
	// Brokers are the target brokers; each gets one long-lived producer
	// (transactional when BrokerConfig.Transactional).
	Brokers []BrokerConfig
	// Dedupe is the bridge's idempotency-key store; required when a broker
	// is transactional (local transactions commit it, check-backs read it).
	// The Sink never closes it.
	Dedupe dedupe.Store
	// DedupeTTL is how long Dedupe remembers a committed key. A slot whose
	// half message was certainly not stored is taken again by the key's
	// next attempt only within half of it (and a minute), before its used
	// record could expire. 0: a minute.
	DedupeTTL time.Duration
	// Group is the producer group name; default "cellbridge-<broker>". The
	// broker sends transaction check-backs to any producer of the group, so
	// every replica (and every restart) of one bridge must use the same.
	Group string
	// MaxPending bounds publishes accepted and not yet resolved (queued or
	// being sent); PublishAsync blocks beyond it. Default 4096.
	MaxPending int
	// Workers is the number of goroutines sending (each send waits for the
	// broker's answer). Default 64.
	Workers int
	// Retries is how many more times a failed send is tried, each time as
	// a new message (new unique id) after RetryBackoff. Default 2.
	Retries int
	// RetryBackoff is the pause between attempts. Default 100ms.
	RetryBackoff time.Duration
	// SendTimeout bounds one attempt where the broker's
	// BrokerConfig.SendTimeout is not set. Default 3s.
	SendTimeout time.Duration
	// MaxBatch bounds the messages of one batch request (batch.go); 1
	// sends every message on its own. Default 32.
	MaxBatch int
	// OnRetry, if set, is called (on a sink goroutine; it must not block)
	// for every failed send attempt that is tried again, with the broker's
	// name: the pipeline sees only a job's last result, so the attempts
	// before it are counted through this (cellbridge_sink_publish_errors_total).
	OnRetry func(broker string, err error)
}

func (c *SinkConfig) defaults() error {
	if len(c.Brokers) == 0 {
		return errors.New("rmq: SinkConfig needs at least one broker")
	}
	for _, b := range c.Brokers {
		if err := b.Validate(); err != nil {
			return err
		}
		if b.Transactional && c.Dedupe == nil {
			return fmt.Errorf("rmq: broker %q: exactlyOnce transactional needs the dedupe store", b.Name)
		}
	}
	c.MaxPending = cmp.Or(max(c.MaxPending, 0), 4096)
	c.Workers = cmp.Or(max(c.Workers, 0), 64)
	if c.Retries < 0 {
		c.Retries = 0
	} else if c.Retries == 0 {
		c.Retries = 2
	}
	c.RetryBackoff = cmp.Or(max(c.RetryBackoff, 0), 100*time.Millisecond)
	c.SendTimeout = cmp.Or(max(c.SendTimeout, 0), DefaultSendTimeout)
	c.MaxBatch = cmp.Or(max(c.MaxBatch, 0), 32)
	return nil
}

// target is one producer.
type target struct {
	name        string
	tx          bool
	sendTimeout time.Duration // one attempt (BrokerConfig.SendTimeout or the sink's)
	groups      bool          // set the message group property (BrokerConfig.MessageGroups)
	waits       *txWaits      // transactional targets only
	confirm     *confirmer    // transactional targets only
	listener    *txListener   // transactional targets only
	sel         *orderSelector
	// batch sends one batch (non-transactional targets only).
	batch    func(ctx context.Context, msgs []*primitive.Message) error
	send     func(ctx context.Context, out *bridge.Outgoing) error
	shutdown func() error
	// retrying is set by the first failed attempt of a streak (logged at
	// warn) and cleared by the next successful send (logged at info).
	retrying atomic.Bool
}

type job struct {
	ctx  context.Context
	t    *target
	m    *bridge.Outgoing
	done func(error)
}

// Sink publishes to RocketMQ brokers: Keys = the idempotency key, the
// headers (Cell-* included) as user properties. See the package docs for
// the transactional mode. All methods are safe for concurrent use.
type Sink struct {
	cfg     SinkConfig
	log     *slog.Logger
	targets map[string]*target

	jobs    chan *job
	slots   chan struct{} // one per accepted publish whose done has not returned
	quit    chan struct{}
	workers sync.WaitGroup
	// sends is the parent of every send attempt's context: Close cancels it
	// when its ctx ends, so that sends in progress give up.
	sends       context.Context
	cancelSends context.CancelFunc
	merged      atomic.Pointer[mergedCtx] // see sendCtx

	mu      sync.RWMutex
	closed  bool
	pending sync.WaitGroup // accepted publishes whose done was not called yet
	once    sync.Once
	err     error
}

var _ bridge.Sink = (*Sink)(nil)

// NewSink starts one producer per broker and the send workers. On error
// nothing is left running.
func NewSink(cfg SinkConfig, log *slog.Logger) (*Sink, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Sink{cfg: cfg, log: log, targets: map[string]*target{},
		jobs: make(chan *job, cfg.MaxPending), slots: make(chan struct{}, cfg.MaxPending), quit: make(chan struct{})}
	s.sends, s.cancelSends = context.WithCancel(context.Background())
	for _, bc := range cfg.Brokers {
		t, err := s.newTarget(bc)
		if err != nil {
			for _, t := range s.targets {
				if t.waits != nil {
					t.confirm.close()
					t.waits.close()
					t.listener.close()
				}
				_ = t.shutdown()
			}
			return nil, err
		}
		s.targets[bc.Name] = t
	}
	s.workers.Add(cfg.Workers)
	for range cfg.Workers {
		go s.worker()
	}
	return s, nil
}

func (s *Sink) newTarget(bc BrokerConfig) (*target, error) {
	group := s.cfg.Group
	if group == "" {
		group = "cellbridge-" + sanitize(bc.Name)
	}
	instance := bc.instanceName("sink")
	sel := &orderSelector{}
	sendTimeout := cmp.Or(max(bc.SendTimeout, 0), s.cfg.SendTimeout)
	opts := []producer.Option{
		producer.WithNsResolver(bc.resolver()),
		producer.WithGroupName(group),
		producer.WithInstanceName(instance),
		producer.WithSendMsgTimeout(sendTimeout),
		// The client's own retry re-sends the same message (same unique
		// id) to another queue after a timeout; the sink retries with a
		// new message instead, so that a transaction id never names two
		// half messages.
		producer.WithRetry(0),
		// The queue follows the copy's order key (order.go).
		producer.WithQueueSelector(sel),
	}
	remotingDefaults()
	if bc.Namespace != "" {
		opts = append(opts, producer.WithNamespace(bc.Namespace))
	}
	if c, ok := bc.credentials(); ok {
		opts = append(opts, producer.WithCredentials(c))
	}
	t := &target{name: bc.Name, tx: bc.Transactional, groups: bc.MessageGroups, sel: sel, sendTimeout: sendTimeout}
	if bc.Transactional {
		log := s.log.With("broker", bc.Name)
		// The waits exist before the producer: its check-backs report to them.
		l := &txListener{store: s.cfg.Dedupe, log: log, timeout: sendTimeout, reuseFor: s.cfg.DedupeTTL / 2}
		l.waits = newTxWaits(bc.checkBackWait(), l, log, s.finish)
		p, err := producer.NewTransactionProducer(l, opts...)
		if err == nil {
			err = p.Start()
		}
		var barrier barrierClient
		if err == nil {
			// After the producer: the barrier client must find the
			// producer's client instance, not create one of its own.
			barrier, err = newBarrier(bc, group, instance)
			if err != nil {
				_ = p.Shutdown()
			}
		}
		if err != nil {
			l.close()
			l.waits.close()
			return nil, fmt.Errorf("rmq: broker %q: start transactional producer: %w", bc.Name, err)
		}
		t.waits, t.listener = l.waits, l
		t.confirm = newConfirmer(barrier, l.waits, log, s.finish)
		t.shutdown = p.Shutdown
		t.send = func(ctx context.Context, out *bridge.Outgoing) error {
			return l.txSend(ctx, p, out, outgoingMessage(out, t.groups))
		}
		return t, nil
	}
	p, err := producer.NewDefaultProducer(opts...)
	if err != nil {
		return nil, fmt.Errorf("rmq: broker %q: new producer: %w", bc.Name, err)
	}
	if err := p.Start(); err != nil {
		return nil, fmt.Errorf("rmq: broker %q: start producer: %w", bc.Name, err)
	}
	t.shutdown = p.Shutdown
	t.batch = sendBatchWith(p)
	t.send = func(ctx context.Context, out *bridge.Outgoing) error {
		res, err := p.SendSync(ctx, outgoingMessage(out, t.groups))
		if err != nil {
			return err
		}
		if res.Status != primitive.SendOK {
			// Flush or replication timeouts: stored on the master but not
			// as durable as asked; sent again, and the copy is told apart
			// by its Keys.
			return fmt.Errorf("send status %d", res.Status)
		}
		return nil
	}
	return t, nil
}

// PublishAsync queues m for a send worker; it blocks while MaxPending
// publishes are queued or in progress (until ctx ends: done gets ctx's
// error; or Close starts: ErrClosed). done gets nil once the broker stored
// the message (transactional: the half message is committed locally and
// the commit sent), otherwise the last attempt's error.
func (s *Sink) PublishAsync(ctx context.Context, m *bridge.Outgoing, done func(error)) {
	t := s.targets[m.Target.Broker]
	if t == nil {
		done(fmt.Errorf("rmq: no producer for broker %q", m.Target.Broker))
		return
	}
	if m.Target.Topic == "" {
		done(fmt.Errorf("rmq: broker %q: target without topic", m.Target.Broker))
		return
	}
	s.mu.RLock()
	if s.closed {
		s.mu.RUnlock()
		done(ErrClosed)
		return
	}
	s.pending.Add(1)
	s.mu.RUnlock()
	select {
	case s.slots <- struct{}{}:
		// Holding a slot, the job fits in jobs (same capacity): no wait.
		s.jobs <- &job{ctx: ctx, t: t, m: m, done: done}
	case <-ctx.Done():
		s.pending.Done()
		done(ctx.Err())
	case <-s.quit:
		s.pending.Done()
		done(ErrClosed)
	}
}

// finish resolves an accepted publish and frees its slot once done returned.
func (s *Sink) finish(j *job, err error) {
	j.done(err)
	<-s.slots
	s.pending.Done()
}

func (s *Sink) worker() {
	defer s.workers.Done()
	for {
		select {
		case j := <-s.jobs:
			s.run(j)
		case <-s.quit:
			return
		}
	}
}

// handOver gives a transactional job to the barrier (its end-transaction
// was written) or to the wait for an earlier attempt's check-back, and
// reports whether it did; the job is resolved there.
func (s *Sink) handOver(j *job, err error) bool {
	var pe *errPending
	var ee *errEnded
	switch {
	case errors.As(err, &ee):
		j.t.confirm.add(j, ee)
		return true
	case errors.As(err, &pe):
		if j.t.waits.park(pe.ref, j) {
			return true
		}
		s.finish(j, fmt.Errorf("rmq: broker %q: %w", j.t.name, ErrClosed))
		return true
	}
	return false
}

func (s *Sink) publish(j *job) error {
	var err error
	for attempt := 0; attempt <= s.cfg.Retries; attempt++ {
		if attempt > 0 {
			t := time.NewTimer(s.cfg.RetryBackoff)
			select {
			case <-t.C:
			case <-j.ctx.Done():
				t.Stop()
				return fmt.Errorf("rmq: broker %q: %w (after: %w)", j.t.name, j.ctx.Err(), err)
			case <-s.quit:
				t.Stop()
				return fmt.Errorf("rmq: broker %q: %w (after: %w)", j.t.name, ErrClosed, err)
			}
		}
		ctx, done := s.sendCtx(j)
		err = j.t.send(ctx, j.m)
		done()
		if err == nil || settled(err) {
			if j.t.retrying.Swap(false) {
				s.log.Info("rocketmq sends succeed again", "broker", j.t.name, "topic", j.m.Target.Topic)
			}
			return err
		}
		if s.sends.Err() != nil {
			return fmt.Errorf("rmq: broker %q: %w before the broker answered (the message may be stored): %w", j.t.name, ErrClosed, err)
		}
		if attempt < s.cfg.Retries {
			s.retried(j.t, j.m.Target.Topic, attempt+1, err)
		}
	}
	return fmt.Errorf("rmq: broker %q: send to %s: %w", j.t.name, j.m.Target.Topic, err)
}

// retried reports a failed attempt that is tried again: counted through
// OnRetry, logged at warn for the first of a streak on t (a broker down
// fails every send; the later ones go to debug) and at debug after it.
func (s *Sink) retried(t *target, topic string, attempt int, err error) {
	if s.cfg.OnRetry != nil {
		s.cfg.OnRetry(t.name, err)
	}
	lvl := slog.LevelDebug
	if !t.retrying.Swap(true) {
		lvl = slog.LevelWarn
	}
	s.log.Log(context.Background(), lvl, "rocketmq send failed; retrying", "broker", t.name, "topic", topic,
		"attempt", attempt, "retries", s.cfg.Retries, "backoff", s.cfg.RetryBackoff, "err", err)
}

// settled reports whether a send's error ends the job's attempts: a
// duplicate, or a transactional send handed to its wait or barrier.
func settled(err error) bool {
	var pe *errPending
	var ee *errEnded
	return errors.Is(err, bridge.ErrDuplicate) || errors.As(err, &pe) || errors.As(err, &ee)
}

// mergedCtx is a context ended by parent or by the sink's Close.
type mergedCtx struct {
	parent context.Context
	ctx    context.Context
}

// sendCtx returns the context of one send attempt, ended by the job's ctx
// or by Close, and what releases it. The pipeline passes the same ctx to
// every publish: one merged context, made once, serves them all (the
// client bounds each request by SendTimeout itself). A transactional send
// also makes store calls, bounded by SendTimeout here.
func (s *Sink) sendCtx(j *job) (context.Context, func()) {
	ctx := context.Context(nil)
	release := func() {}
	if m := s.merged.Load(); m != nil && m.parent == j.ctx {
		ctx = m.ctx
	} else if m == nil && j.ctx.Err() == nil {
		c, cancel := context.WithCancel(j.ctx)
		context.AfterFunc(s.sends, cancel)
		if s.merged.CompareAndSwap(nil, &mergedCtx{parent: j.ctx, ctx: c}) {
			ctx = c
		} else {
			cancel()
		}
	}
	if ctx == nil {
		c, cancel := context.WithCancel(j.ctx)
		stop := context.AfterFunc(s.sends, cancel)
		ctx, release = c, func() { stop(); cancel() }
	}
	if !j.t.tx {
		return ctx, release
	}
	c, cancel := context.WithTimeout(ctx, j.t.sendTimeout)
	return c, func() { cancel(); release() }
}

// outgoingMessage builds a new client message (and so a new unique id):
// every header with a usable name and value as a user property (first
// value only: properties hold one value), except the headers TAGS and KEYS,
// which become the copy's tag and keys (a RocketMQ source passes its
// message's tag and keys under these names), with the idempotency key
// appended to the keys. With groups, the message group property is set to
// the copy's order key (see orderKey).
func outgoingMessage(m *bridge.Outgoing, groups bool) *primitive.Message {
	// One map, set at once: WithProperty locks the message for every call.
	props := make(map[string]string, len(m.Header)+2)
	for k, vs := range m.Header {
		if len(vs) == 0 || vs[0] == "" || k == "" || k == HeaderTxSlot || systemProps[k] || !validProp(k) || !validProp(vs[0]) {
			continue
		}
		props[k] = vs[0]
	}
	if vs := m.Header[primitive.PropertyTags]; len(vs) > 0 && vs[0] != "" && validProp(vs[0]) {
		props[primitive.PropertyTags] = vs[0]
	}
	if keys := copyKeys(m.Header[primitive.PropertyKeys], m.MsgID); keys != "" {
		props[primitive.PropertyKeys] = keys
	}
	if groups {
		if k, _ := orderKey(m.Header, m.MsgID); k != "" && validProp(k) {
			props[PropertyMessageGroup] = k
		}
	}
	msg := primitive.NewMessage(m.Target.Topic, m.Body)
	msg.WithProperties(props)
	return msg
}

// copyKeys is the Keys of a copy: the source's keys (space separated) and
// the idempotency key, added last unless it is one of them already.
func copyKeys(src []string, msgID string) string {
	var keys string
	if len(src) > 0 && validProp(src[0]) {
		keys = strings.TrimSpace(src[0])
	}
	if msgID == "" || !validProp(msgID) {
		return keys
	}
	if keys == "" {
		return msgID
	}
	for _, k := range strings.Fields(keys) {
		if k == msgID {
			return keys
		}
	}
	return keys + primitive.PropertyKeySeparator + msgID
}

// Close stops accepting publishes, waits (within ctx) for the pending ones
// to call done, and shuts the producers down. When ctx ends first, sends in
// progress are abandoned and they and the publishes still queued get an
// error wrapping ErrClosed (an abandoned send may or may not be stored).
func (s *Sink) Close(ctx context.Context) error {
	s.once.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		// Sends waiting for an earlier attempt's check-back fail at once
		// (the source delivers them again, and the next bridge waits)
		// instead of holding Close up for the rest of their wait.
		for _, t := range s.targets {
			if t.waits != nil {
				for _, j := range t.waits.close() {
					s.finish(j, ErrClosed)
				}
			}
		}
		idle := make(chan struct{})
		go func() { s.pending.Wait(); close(idle) }()
		var errs []error
		select {
		case <-idle:
		case <-ctx.Done():
			errs = append(errs, fmt.Errorf("rmq: sink close: pending publishes: %w", ctx.Err()))
		}
		s.cancelSends()
		close(s.quit)
		s.workers.Wait()
		for _, t := range s.targets {
			if t.confirm != nil {
				t.confirm.close()
				t.listener.close()
			}
		}
		for drained := false; !drained; {
			select {
			case j := <-s.jobs:
				s.finish(j, ErrClosed)
			case <-idle:
				drained = true
			}
		}
		for _, t := range s.targets {
			if err := t.shutdown(); err != nil {
				errs = append(errs, fmt.Errorf("rmq: broker %q: shutdown: %w", t.name, err))
			}
		}
		s.err = errors.Join(errs...)
	})
	return s.err
}
