package rmqtest

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Options configure a Broker. The zero value is usable: ephemeral ports on 127.0.0.1, 4 queues for
// auto-created topics, real-time delay levels.
type Options struct {
	// Host is the IP the name server and broker listen on and advertise; default "127.0.0.1". The
	// client rejects host names, so this must be an IP.
	Host string
	// NameServerPort and BrokerPort choose the ports; 0 picks free ones. Restart reuses the ports
	// chosen by the first Start.
	NameServerPort, BrokerPort int
	// BrokerName and ClusterName appear in routes; defaults "broker-a" and "DefaultCluster".
	BrokerName, ClusterName string
	// DefaultQueues is the number of queues of topics created on send (and of the TBW102 default
	// route); default 4.
	DefaultQueues int
	// RetryQueues is the number of queues of %RETRY% topics; default 1 (as the real broker).
	RetryQueues int
	// DisableAutoCreate makes sends to unknown topics fail with code 17 (topic not exist).
	DisableAutoCreate bool
	// DelayScale multiplies the delay of every delay level (1s 5s 10s 30s 1m ... 2h), so tests can run
	// retries fast: 0.01 makes level 1 take 10ms. 0 means 1 (real time).
	DelayScale float64
	// MaxSuspend caps how long a pull is held by long polling; 0 means as long as the client asks
	// (the Go client asks for 20s).
	MaxSuspend time.Duration
	// TransactionCheckDelay is how old a half message must be before a scan checks it back; default
	// 6s (the real broker's transactionTimeOut).
	TransactionCheckDelay time.Duration
	// TransactionCheckInterval is the period of the check-back scan, as the real broker's
	// transactionCheckInterval (60s on 4.x, 30s on 5.x): every scan checks each unresolved half
	// message at least TransactionCheckDelay old, so a half message is first checked between
	// TransactionCheckDelay and TransactionCheckDelay + TransactionCheckInterval after it was
	// stored, and an "unknown" answer waits for the next scan. Default TransactionCheckDelay.
	TransactionCheckInterval time.Duration
	// TransactionCheckMax is how many check-backs a half message gets before it is discarded; default
	// 15 (as the real broker).
	TransactionCheckMax int
	// LockExpiry is how long a queue lock of an orderly consumer lasts without renewal; default 60s.
	LockExpiry time.Duration
	// RestartGrace is how long consumers registered before Restart still count as group members while
	// their clients reconnect (the client heartbeats only every 30s); default 45s. Consumers whose
	// connection closes otherwise are forgotten at once.
	RestartGrace time.Duration
	// Logf, when set, receives one line per notable broker event (connections, faults, check-backs).
	Logf func(format string, args ...any)
}

func (o *Options) withDefaults() Options {
	out := *o
	out.Host = cmp.Or(out.Host, "127.0.0.1")
	out.BrokerName = cmp.Or(out.BrokerName, "broker-a")
	out.ClusterName = cmp.Or(out.ClusterName, "DefaultCluster")
	out.DefaultQueues = cmp.Or(max(out.DefaultQueues, 0), 4)
	out.RetryQueues = cmp.Or(max(out.RetryQueues, 0), 1)
	out.DelayScale = cmp.Or(max(out.DelayScale, 0), 1)
	out.TransactionCheckDelay = cmp.Or(max(out.TransactionCheckDelay, 0), 6*time.Second)
	out.TransactionCheckInterval = cmp.Or(max(out.TransactionCheckInterval, 0), out.TransactionCheckDelay)
	out.TransactionCheckMax = cmp.Or(max(out.TransactionCheckMax, 0), 15)
	out.LockExpiry = cmp.Or(max(out.LockExpiry, 0), 60*time.Second)
	out.RestartGrace = cmp.Or(max(out.RestartGrace, 0), 45*time.Second)
	return out
}

// Well-known topic names.
const (
	defaultTopic    = "TBW102"
	scheduleTopic   = "SCHEDULE_TOPIC_XXXX"
	retryPrefix     = "%RETRY%"
	dlqPrefix       = "%DLQ%"
	maxDelayLevel   = 18
	brokerVersion   = 433 // a 4.9.x version ordinal; the client only checks it is >= V4_1_0
	maxPullBytes    = 256 << 10
	maxScanPerPull  = 16000
	writeTimeout    = 5 * time.Second
	permReadWrite   = 6
	permAll         = 7
	permWrite       = 2
	defaultMaxRetry = 16
	dlqQueues       = 1
	drainTime       = 100 * time.Millisecond
)

// delayLevels are the real broker's default messageDelayLevel.
var delayLevels = [maxDelayLevel]time.Duration{
	time.Second, 5 * time.Second, 10 * time.Second, 30 * time.Second,
	time.Minute, 2 * time.Minute, 3 * time.Minute, 4 * time.Minute, 5 * time.Minute,
	6 * time.Minute, 7 * time.Minute, 8 * time.Minute, 9 * time.Minute, 10 * time.Minute,
	20 * time.Minute, 30 * time.Minute, time.Hour, 2 * time.Hour,
}

// Broker is an in-memory RocketMQ name server and broker. Create it with New, then Start; Close
// releases everything. All methods are safe for concurrent use.
type Broker struct {
	opts Options

	// lifeMu serializes Start, Restart and Close.
	lifeMu sync.Mutex

	mu sync.Mutex // guards everything below

	state     int // 0 new, 1 running, 2 restarting, 3 closed
	nsLn      net.Listener
	brLn      net.Listener
	nsAddr    string
	brAddr    string
	storeHost *net.TCPAddr
	conns     map[*conn]struct{}
	netStop   chan struct{} // closed when the current listeners stop (Restart, Close)
	stop      chan struct{} // closed by Close
	wake      chan struct{} // pokes the housekeeping goroutine

	topics     map[string]*topic
	byCommit   map[int64]*stored
	nextCommit int64
	offsets    map[offsetKey]int64
	half       map[int64]*halfMsg // by commit log offset
	halfOffset int64
	discarded  []*stored          // half messages dropped after TransactionCheckMax check-backs
	nextScan   time.Time          // the next transaction check-back scan
	schedule   [maxDelayLevel]int // delivered count per delay level queue of SCHEDULE_TOPIC_XXXX
	groups     map[string]*group
	producers  map[string]map[*conn]struct{}
	locks      map[lockKey]*lockState

	sendDelay time.Duration
	failN     int
	failCode  int16
	requests  map[int16]int64

	opaque atomic.Int32
	netWG  sync.WaitGroup // accept loops, connections and their helpers
	bgWG   sync.WaitGroup // housekeeping
	pullWG sync.WaitGroup // held pulls; counted apart so that stopNetwork can wait for their answers
	rr     uint64         // round-robin counter for queue and producer choice
}

type offsetKey struct {
	group, topic string
	queue        int
}

type topic struct {
	name   string
	perm   int
	queues []*queue
}

type queue struct {
	msgs   []*stored
	notify chan struct{} // closed and replaced whenever a message is appended
}

type halfMsg struct {
	m      *stored
	group  string
	checks int
	stored time.Time
}

type lockKey struct {
	group, topic, broker string
	queue                int
}

type lockState struct {
	clientID string
	until    time.Time
}

// ErrClosed is returned by Start and Restart on a closed Broker.
var ErrClosed = errors.New("rmqtest: broker closed")

// New creates a broker that does not listen yet. The TBW102 default topic exists from the start.
func New(opts Options) *Broker {
	o := opts.withDefaults()
	b := &Broker{
		opts:      o,
		conns:     map[*conn]struct{}{},
		stop:      make(chan struct{}),
		wake:      make(chan struct{}, 1),
		topics:    map[string]*topic{},
		byCommit:  map[int64]*stored{},
		offsets:   map[offsetKey]int64{},
		half:      map[int64]*halfMsg{},
		groups:    map[string]*group{},
		producers: map[string]map[*conn]struct{}{},
		locks:     map[lockKey]*lockState{},
		requests:  map[int16]int64{},
	}
	b.createTopicLocked(defaultTopic, o.DefaultQueues, permAll)
	return b
}

// Start listens on the name server and broker ports and starts serving. It returns an error when a
// port cannot be bound or the broker was started before, and ErrClosed after Close. Binding does not
// block, so ctx is only checked on entry.
func (b *Broker) Start(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	b.lifeMu.Lock()
	defer b.lifeMu.Unlock()
	b.mu.Lock()
	st := b.state
	b.mu.Unlock()
	switch st {
	case 0:
	case 3:
		return ErrClosed
	default:
		return errors.New("rmqtest: Start called twice")
	}
	if err := b.listen(b.opts.NameServerPort, b.opts.BrokerPort); err != nil {
		return err
	}
	b.bgWG.Add(1)
	go b.housekeeping()
	return nil
}

// listen binds both listeners and starts the accept loops; b.state becomes running.
func (b *Broker) listen(nsPort, brPort int) error {
	var lc net.ListenConfig
	ns, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(b.opts.Host, strconv.Itoa(nsPort)))
	if err != nil {
		return fmt.Errorf("rmqtest: name server listen: %w", err)
	}
	br, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(b.opts.Host, strconv.Itoa(brPort)))
	if err != nil {
		ns.Close()
		return fmt.Errorf("rmqtest: broker listen: %w", err)
	}
	b.mu.Lock()
	b.nsLn, b.brLn = ns, br
	b.nsAddr = ns.Addr().String()
	b.brAddr = br.Addr().String()
	b.storeHost = br.Addr().(*net.TCPAddr)
	b.netStop = make(chan struct{})
	b.state = 1
	b.mu.Unlock()
	b.netWG.Add(2)
	go b.accept(ns, true)
	go b.accept(br, false)
	b.logf("listening: nameserver %s broker %s", b.nsAddr, b.brAddr)
	return nil
}

// stopNetwork closes the listeners and every connection and waits for their goroutines.
func (b *Broker) stopNetwork() {
	b.mu.Lock()
	if b.netStop != nil {
		select {
		case <-b.netStop:
		default:
			close(b.netStop)
		}
	}
	lns := []net.Listener{b.nsLn, b.brLn}
	conns := make([]*conn, 0, len(b.conns))
	for c := range b.conns {
		conns = append(conns, c)
	}
	b.mu.Unlock()
	for _, ln := range lns {
		if ln != nil {
			ln.Close()
		}
	}
	// Held pulls answer "service not available" now. The client never fails a request whose
	// connection closed (it waits for the request's own timeout, 30s for pulls), so for a moment every
	// request still arriving gets the same answer before the connections close: the client then
	// backs off 3s and reconnects instead of hanging.
	b.pullWG.Wait()
	time.Sleep(drainTime)
	for _, c := range conns {
		c.close()
	}
	b.netWG.Wait()
}

// Close stops listening, closes every connection and stops every goroutine of the broker. Stored
// data stays readable through the inspection methods. Close is idempotent; it returns ctx.Err() when
// ctx ends before the goroutines stopped.
func (b *Broker) Close(ctx context.Context) error {
	b.lifeMu.Lock()
	defer b.lifeMu.Unlock()
	b.mu.Lock()
	if b.state == 3 {
		b.mu.Unlock()
		return nil
	}
	b.state = 3
	close(b.stop)
	b.mu.Unlock()
	done := make(chan struct{})
	go func() {
		b.stopNetwork()
		b.bgWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("rmqtest: close: %w", ctx.Err())
	}
}

// Restart simulates a broker and name server restart: it closes the listeners and every client
// connection, keeps stored messages, committed offsets, half messages and scheduled messages, and
// listens again on the same ports. Consumers known before count as group members for
// Options.RestartGrace unless they heartbeat again sooner. Pending long polls are dropped (the client
// sees a connection error and retries after its 3s back-off).
func (b *Broker) Restart(ctx context.Context) error {
	b.lifeMu.Lock()
	defer b.lifeMu.Unlock()
	b.mu.Lock()
	switch b.state {
	case 1:
	case 3:
		b.mu.Unlock()
		return ErrClosed
	default:
		b.mu.Unlock()
		return errors.New("rmqtest: Restart needs a started broker")
	}
	b.state = 2
	nsPort := b.nsLn.Addr().(*net.TCPAddr).Port
	brPort := b.brLn.Addr().(*net.TCPAddr).Port
	b.mu.Unlock()
	b.stopNetwork()
	b.logf("restart: connections closed, listening again")
	var err error
	// The ports were ours a moment ago; a retry loop covers a slow kernel release.
	for {
		if err = b.listen(nsPort, brPort); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("rmqtest: restart: %w (last: %v)", ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// NameServerAddr returns the name server address "IP:port" (valid after Start; stable across
// Restart).
func (b *Broker) NameServerAddr() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.nsAddr
}

// BrokerAddr returns the broker address "IP:port" (valid after Start; stable across Restart).
func (b *Broker) BrokerAddr() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.brAddr
}

// BrokerName returns the broker name used in routes and message queues.
func (b *Broker) BrokerName() string { return b.opts.BrokerName }

func (b *Broker) logf(format string, args ...any) {
	if b.opts.Logf != nil {
		b.opts.Logf(format, args...)
	}
}

func (b *Broker) accept(ln net.Listener, nameServer bool) {
	defer b.netWG.Done()
	for {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		c := &conn{b: b, nc: nc, nameServer: nameServer, closed: make(chan struct{})}
		if a, ok := nc.RemoteAddr().(*net.TCPAddr); ok {
			c.remote = a
		}
		b.mu.Lock()
		if b.state != 1 {
			b.mu.Unlock()
			nc.Close()
			continue
		}
		b.conns[c] = struct{}{}
		b.netWG.Add(1)
		b.mu.Unlock()
		go c.serve()
	}
}

// nextOpaque numbers requests the broker sends to clients.
func (b *Broker) nextOpaque() int32 { return b.opaque.Add(1) }

// poke wakes the housekeeping goroutine to recompute its next deadline.
func (b *Broker) poke() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// housekeeping delivers scheduled messages, sends transaction check-backs and expires consumers kept
// over a Restart. It sleeps until the earliest of those deadlines.
func (b *Broker) housekeeping() {
	defer b.bgWG.Done()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		now := time.Now()
		next := now.Add(time.Hour)
		if t := b.deliverScheduled(now); t.Before(next) {
			next = t
		}
		if t := b.checkTransactions(now); t.Before(next) {
			next = t
		}
		if t := b.expireDetached(now); t.Before(next) {
			next = t
		}
		timer.Reset(time.Until(next))
		select {
		case <-b.stop:
			return
		case <-b.wake:
			// Go 1.23+ timers: Reset at the top of the loop discards any pending expiry.
		case <-timer.C:
		}
	}
}
