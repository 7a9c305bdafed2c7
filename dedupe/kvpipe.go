package dedupe

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// pipe sends requests (JetStream publishes and direct gets) and waits for
// their replies over one shared reply subscription, so that any number of
// goroutines keep requests in flight on the connection at once
// (pipelining), at a fraction of the client work of jetstream.PublishMsg:
// no per-request inbox, channel or timer is made (calls are reused), and a
// successful PubAck or a refused create is recognised without decoding JSON.
type pipe struct {
	nc      *nats.Conn
	sub     *nats.Subscription
	prefix  string // reply subject prefix, "<inbox>."
	timeout time.Duration
	done    chan struct{} // closed by close: wakes every waiter
	once    sync.Once

	freeMu sync.Mutex
	free   []*call
	nextID uint64

	callsMu sync.RWMutex
	calls   map[uint64]*call // by id; a call leaves only when abandoned
}

// call is one reusable request slot with its own reply subject. A call whose
// reply might still arrive (timeout, cancellation) is abandoned, never
// reused, so a late reply cannot be taken for another request's.
type call struct {
	id    uint64
	msg   nats.Msg // the outgoing message, reused
	reply chan *nats.Msg
	timer *time.Timer
}

func newPipe(nc *nats.Conn, timeout time.Duration) (*pipe, error) {
	p := &pipe{
		nc:      nc,
		prefix:  nc.NewInbox() + ".",
		timeout: timeout,
		done:    make(chan struct{}),
		calls:   make(map[uint64]*call),
	}
	sub, err := nc.Subscribe(p.prefix+"*", p.onReply)
	if err != nil {
		return nil, err
	}
	// Replies are small and bounded by the number of waiting callers; the
	// default pending limits would only ever drop them.
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		_ = sub.Unsubscribe()
		return nil, err
	}
	p.sub = sub
	return p, nil
}

// onReply runs on the subscription's goroutine and hands the reply to its
// waiter. Replies for abandoned calls are dropped.
func (p *pipe) onReply(m *nats.Msg) {
	id, err := strconv.ParseUint(m.Subject[strings.LastIndexByte(m.Subject, '.')+1:], 36, 64)
	if err != nil {
		return
	}
	p.callsMu.RLock()
	c := p.calls[id]
	p.callsMu.RUnlock()
	if c == nil {
		return
	}
	select {
	case c.reply <- m:
	default: // a second reply to one request: not ours to wait for
	}
}

func (p *pipe) get() *call {
	p.freeMu.Lock()
	if n := len(p.free); n > 0 {
		c := p.free[n-1]
		p.free = p.free[:n-1]
		p.freeMu.Unlock()
		return c
	}
	p.nextID++
	id := p.nextID
	p.freeMu.Unlock()
	c := &call{id: id, reply: make(chan *nats.Msg, 1), timer: time.NewTimer(time.Hour)}
	c.timer.Stop()
	c.msg.Reply = p.prefix + strconv.FormatUint(id, 36)
	p.callsMu.Lock()
	p.calls[id] = c
	p.callsMu.Unlock()
	return c
}

func (p *pipe) put(c *call) {
	c.msg.Subject, c.msg.Header, c.msg.Data = "", nil, nil
	p.freeMu.Lock()
	p.free = append(p.free, c)
	p.freeMu.Unlock()
}

func (p *pipe) abandon(c *call) {
	p.callsMu.Lock()
	delete(p.calls, c.id)
	p.callsMu.Unlock()
}

// errTimeout is returned when no acknowledgement came within the timeout.
var errTimeout = errors.New("no acknowledgement from JetStream")

// publish stores data on subj with hdr (read only; it may be shared) and
// waits for the stream's acknowledgement. It returns nil when the message
// is stored, a *jetstream.APIError when the stream refused it (for example
// a failed expected-sequence check), and another error when the outcome is
// unknown.
func (p *pipe) publish(ctx context.Context, subj string, hdr nats.Header, data []byte) error {
	m, err := p.request(ctx, subj, hdr, data)
	if err != nil {
		return err
	}
	return pubAckError(m)
}

// request sends one message and returns the reply to it.
func (p *pipe) request(ctx context.Context, subj string, hdr nats.Header, data []byte) (*nats.Msg, error) {
	select {
	case <-p.done:
		return nil, ErrClosed
	default:
	}
	if err := ctx.Err(); err != nil {
		return nil, err // send nothing that nobody will wait for
	}
	c := p.get()
	c.msg.Subject, c.msg.Header, c.msg.Data = subj, hdr, data
	if err := p.nc.PublishMsg(&c.msg); err != nil {
		p.put(c)
		return nil, err
	}
	c.timer.Reset(p.timeout)
	var err error
	select {
	case m := <-c.reply:
		c.timer.Stop()
		p.put(c)
		return m, nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-c.timer.C:
		err = errTimeout
	case <-p.done:
		err = ErrClosed
	}
	c.timer.Stop()
	p.abandon(c)
	return nil, err
}

// errWrongLastSeq is the stream's refusal of an expected-sequence check.
var errWrongLastSeq error = &jetstream.APIError{Code: 400, ErrorCode: jetstream.JSErrCodeStreamWrongLastSequence,
	Description: "wrong last sequence"}

// pubAckError reads a publish acknowledgement.
func pubAckError(m *nats.Msg) error {
	if len(m.Data) == 0 {
		if m.Header.Get("Status") == "503" {
			return nats.ErrNoResponders
		}
		return fmt.Errorf("empty acknowledgement (status %q)", m.Header.Get("Status"))
	}
	// A PubAck is {"stream":..,"seq":..} and an error reply carries an
	// "error" object; only the latter needs decoding. (A JetStream domain
	// may be called "error", hence the decode to be sure.)
	if !bytes.Contains(m.Data, []byte(`"error"`)) {
		return nil
	}
	// A refused create is the common error (every Duplicate and InFlight
	// starts with one): recognise it without decoding.
	if bytes.Contains(m.Data, []byte(`"err_code":10071,`)) {
		return errWrongLastSeq
	}
	var r struct {
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return fmt.Errorf("malformed acknowledgement: %w", err)
	}
	if r.Error != nil {
		return r.Error
	}
	return nil
}

// close wakes every waiter with ErrClosed and ends the subscription.
func (p *pipe) close() error {
	var err error
	p.once.Do(func() {
		close(p.done)
		err = p.sub.Unsubscribe()
		if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, nats.ErrBadSubscription) {
			err = nil // the connection is gone, and with it the subscription
		}
	})
	return err
}
