package main

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/tidwall/gjson"
)

// faultInjector decides which attempts fail in the fault variants: the first
// attempt of every 1000th order (order % 1000 == 0), exactly once each.
type faultInjector struct {
	mu     sync.Mutex
	failed map[int]bool
	count  atomic.Int64
}

// errInjected is the sink error the harness injects.
var errInjected = errors.New("bench: injected sink failure")

func (f *faultInjector) shouldFail(order int) bool {
	if f == nil || order < 0 || order%1000 != 0 {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.failed == nil {
		f.failed = map[int]bool{}
	}
	if f.failed[order] {
		return false
	}
	f.failed[order] = true
	f.count.Add(1)
	return true
}

func (f *faultInjector) injected() int64 {
	if f == nil {
		return 0
	}
	return f.count.Load()
}

// pending is one forwarded message waiting for its publish ack before the
// source message is acknowledged.
type pending struct {
	f   jetstream.PubAckFuture
	src jetstream.Msg
}

// runPipe is variant A: the minimal correct consume → publish → ack loop with
// nats.go's jetstream API. No rules engine (the cell is computed inline from
// the same table), no dedupe store, no metrics. Tuning (-tune):
//
//	window=N   publishes in flight (WithPublishAsyncMaxPending), default 4000
//	mode=consume|fetch   pull Consume callback, or a Fetch(batch) loop
//	pull=N     PullMaxMessages for Consume / batch size for Fetch
//	ack=async|double   Ack() or DoubleAck() (AckSync) on the source
//	conns=1|2  one connection, or separate consume and publish connections
//	cellhdrs=1 also add cellbridge's six Cell-* headers (an experiment)
//	ackevery=K the consumer with AckPolicy all, one ack per K confirmed
//	           messages (and when nothing more is queued): what
//	           cumulative acks save the server (an experiment)
//	kv=1|2     the KV references A-kv1 and A-kv2 (runPipeKV); the default
//	           follows the variant name
func runPipe(ctx context.Context, e *env) error {
	if w := e.tuneInt("kv", kvWritesOf(e.spec.Variant)); w > 0 {
		return runPipeKV(ctx, e, w)
	}
	mode := e.tuneStr("mode", "consume")
	ackMode := e.tuneStr("ack", "async")
	cellHdrs := e.tuneInt("cellhdrs", 0) == 1
	pc, err := openPipe(ctx, e)
	if err != nil {
		return err
	}
	defer pc.close()
	e.settings = fmt.Sprintf("mode=%s window=%d pull=%d ack=%s conns=%d", mode, pc.window, pc.pull, ackMode, pc.conns)
	if cellHdrs {
		e.settings += " cellhdrs=1"
	}

	forward := func(m jetstream.Msg) (jetstream.PubAckFuture, error) {
		out, err := cellMsg(e, m, cellHdrs)
		if err != nil {
			return nil, err
		}
		if e.faults != nil {
			if order, _, ok := parseEvent(m.Data()); ok && e.faults.shouldFail(order) {
				return nil, errInjected
			}
		}
		return pc.pjs.PublishMsgAsync(out, jetstream.WithStallWait(time.Minute))
	}
	// confirmed waits for p's PubAck; a failed publish is counted.
	confirmed := func(p pending) bool {
		select {
		case <-p.f.Ok():
			return true
		case <-p.f.Err():
			pc.events.pubErrs.Add(1)
			return false
		}
	}
	settle := func(p pending) {
		switch {
		case !confirmed(p):
			_ = p.src.Nak()
		case ackMode == "double":
			_ = p.src.DoubleAck(ctx)
		default:
			_ = p.src.Ack()
		}
	}
	defer func() { e.settings += pc.events.String() }()

	switch mode {
	case "fetch":
		batch := make([]pending, 0, pc.pull)
		for ctx.Err() == nil {
			b, err := pc.cons.Fetch(pc.pull, jetstream.FetchMaxWait(500*time.Millisecond))
			if err != nil {
				return err
			}
			for m := range b.Messages() {
				f, err := forward(m)
				if err != nil {
					_ = m.Nak()
					continue
				}
				batch = append(batch, pending{f, m})
			}
			for _, p := range batch {
				settle(p)
			}
			batch = batch[:0]
		}
		return nil
	default:
		q := make(chan pending, pc.window)
		done := make(chan struct{})
		ackEvery := e.tuneInt("ackevery", 0)
		// With ackevery a cumulative ack would cover a message that was
		// not forwarded: after the first one nothing is acked any more
		// (the run then shows it, and the messages come back after
		// AckWait).
		var refused atomic.Bool
		go func() {
			defer close(done)
			n := 0
			for p := range q {
				if ackEvery == 0 {
					settle(p)
					continue
				}
				if !confirmed(p) {
					refused.Store(true)
				}
				n++
				if !refused.Load() && (n%ackEvery == 0 || len(q) == 0) {
					_ = p.src.Ack()
				}
			}
		}()
		// A message with no usable key (none in the bench's events) or a
		// failed publish call is negatively acknowledged.
		err := pc.consume(ctx, func(m jetstream.Msg) {
			f, err := forward(m)
			if err != nil {
				refused.Store(true)
				_ = m.Nak()
				return
			}
			q <- pending{f, m}
		})
		close(q)
		<-done
		return err
	}
}

// pipeConn is what the pipe loops share: the connections, the JetStream
// context they publish with (at most window publishes in flight) and the
// durable pull consumer on ORDERS.
type pipeConn struct {
	window, pull, conns int
	nc, pnc             *nats.Conn
	pjs                 jetstream.JetStream
	cons                jetstream.Consumer
	events              connEvents
}

// pipeAckTimeout bounds the wait for each PubAck of the pipe loops: a reply
// lost with a dropped connection fails its publish (the source message is
// negatively acknowledged and comes again) instead of holding the window
// for ever.
const pipeAckTimeout = 5 * time.Second

// connEvents counts what happened to a loop's connections, for the run's
// settings line: a run that stalls says why.
type connEvents struct {
	disconnects, reconnects, asyncErrs, pubErrs atomic.Int64
	lastErr                                     atomic.Value // string
}

func (c *connEvents) options() []nats.Option {
	return []nats.Option{
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			c.disconnects.Add(1)
			if err != nil {
				c.lastErr.Store(err.Error())
			}
		}),
		nats.ReconnectHandler(func(*nats.Conn) { c.reconnects.Add(1) }),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			c.asyncErrs.Add(1)
			c.lastErr.Store(err.Error())
		}),
	}
}

// String is empty when nothing happened.
func (c *connEvents) String() string {
	d, r, a, p := c.disconnects.Load(), c.reconnects.Load(), c.asyncErrs.Load(), c.pubErrs.Load()
	if d+r+a+p == 0 {
		return ""
	}
	last, _ := c.lastErr.Load().(string)
	return fmt.Sprintf(" disconnects=%d reconnects=%d async_errors=%d failed_publishes=%d last_error=%q", d, r, a, p, last)
}

// openPipe connects and creates the consumer, tuned by window, pull and
// conns (see runPipe).
func openPipe(ctx context.Context, e *env) (*pipeConn, error) {
	pc := &pipeConn{window: e.tuneInt("window", 4000), pull: e.tuneInt("pull", 2000), conns: e.tuneInt("conns", 1)}
	var err error
	if pc.nc, err = nats.Connect(e.url, pc.events.options()...); err != nil {
		return nil, err
	}
	pc.pnc = pc.nc
	if pc.conns > 1 {
		if pc.pnc, err = nats.Connect(e.url, pc.events.options()...); err != nil {
			pc.close()
			return nil, err
		}
	}
	js, err := jetstream.New(pc.nc)
	if err == nil {
		pc.pjs, err = jetstream.New(pc.pnc, jetstream.WithPublishAsyncMaxPending(pc.window), jetstream.WithPublishAsyncTimeout(pipeAckTimeout))
	}
	if err == nil {
		pc.cons, err = js.CreateOrUpdateConsumer(ctx, "ORDERS", jetstream.ConsumerConfig{
			Durable:       "pipe",
			AckPolicy:     ackPolicy(e),
			MaxAckPending: 4 * (pc.window + pc.pull),
			AckWait:       30 * time.Second,
		})
	}
	if err != nil {
		pc.close()
		return nil, err
	}
	return pc, nil
}

func (pc *pipeConn) close() {
	if pc.pnc != nil && pc.pnc != pc.nc {
		pc.pnc.Close()
	}
	if pc.nc != nil {
		pc.nc.Close()
	}
}

// consume runs a pull Consume with handler until ctx is cancelled, then
// drains it: when consume returns, handler is not running and will not run
// again.
func (pc *pipeConn) consume(ctx context.Context, handler func(jetstream.Msg)) error {
	cc, err := pc.cons.Consume(handler, jetstream.PullMaxMessages(pc.pull))
	if err != nil {
		return err
	}
	<-ctx.Done()
	cc.Drain()
	<-cc.Closed()
	return nil
}

// cellMsg is the message the pipe publishes for source message m: its body
// to the cell subject of its key (computed inline with gjson and the same
// digits rule), the original headers kept, the producer's Nats-Msg-Id (else
// "ORDERS:<stream seq>") as the idempotency key, and with cellHdrs the six
// routing headers cellbridge adds.
func cellMsg(e *env, m jetstream.Msg, cellHdrs bool) (*nats.Msg, error) {
	id := gjson.GetBytes(m.Data(), "user.id")
	sh, ok := shardOf([]byte(id.Str))
	if !ok {
		return nil, errors.New("no usable key")
	}
	hdr := m.Headers()
	if hdr.Get(nats.MsgIdHdr) == "" {
		md, err := m.Metadata()
		if err != nil {
			return nil, err
		}
		hdr = nats.Header{nats.MsgIdHdr: []string{fmt.Sprintf("ORDERS:%d", md.Sequence.Stream)}}
		for k, v := range m.Headers() {
			hdr[k] = v
		}
	}
	if cellHdrs {
		// Experiment only: the same routing headers cellbridge adds, to
		// separate the cost of bigger messages from the pipeline's own.
		hdr["Cell-Msg-Id"] = hdr[nats.MsgIdHdr]
		hdr["Cell-Name"] = []string{e.table.byShard[sh]}
		hdr["Cell-Shard"] = []string{strconv.Itoa(sh)}
		hdr["Cell-Rules-Version"] = []string{"1"}
		hdr["Cell-Source"] = []string{"nats/ORDERS"}
		hdr["Cell-Hops"] = []string{"1"}
	}
	return &nats.Msg{Subject: e.table.subject[sh], Data: m.Data(), Header: hdr}, nil
}

// latencySummary reduces latency samples (ms) to p50/p90/p99/max.
func latencySummary(v []float64) map[string]float64 {
	sort.Float64s(v)
	q := func(p float64) float64 {
		i := int(p * float64(len(v)-1))
		return v[i]
	}
	return map[string]float64{"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": v[len(v)-1], "samples": float64(len(v))}
}

// ackPolicy is the pipe consumer's: all with ackevery, else explicit.
func ackPolicy(e *env) jetstream.AckPolicy {
	if e.tuneInt("ackevery", 0) > 0 {
		return jetstream.AckAllPolicy
	}
	return jetstream.AckExplicitPolicy
}
