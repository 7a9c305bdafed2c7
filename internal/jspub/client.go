package jspub

import (
	"context"
	"sync"
	"sync/atomic"

	"github.com/nats-io/nats.go"
)

// Client is the synchronous form of a Pipe, for callers with a goroutine per
// request (the dedupe store): Request sends and waits for the reply, and
// requests from all goroutines are pipelined on the one connection. The
// waiting needs no channel, timer or inbox per request (calls are pooled).
// It is safe for concurrent use.
type Client struct {
	pipe  *Pipe[*call]
	calls sync.Pool
}

// call is one waiting Request. A caller that stops waiting (ctx) leaves the
// call to the completion, which recycles it once the slot resolves, so a
// late reply can never reach another request through it.
type call struct {
	state atomic.Uint32
	ch    chan struct{} // one token: the outcome is in reply, err
	reply *nats.Msg
	err   error
	// done, when set, is a RequestAsync's: the completion hands the
	// outcome to it instead of waking a caller.
	done func(*nats.Msg, error)
}

// call states.
const (
	callWaiting   uint32 = iota // the caller waits on ch
	callDone                    // the completion filled reply, err and sent on ch
	callAbandoned               // the caller left: the completion recycles the call
)

// NewClient returns a Client on nc (see New for cfg). The caller ends it
// with Close.
func NewClient(nc *nats.Conn, cfg Config) (*Client, error) {
	c := &Client{}
	c.calls.New = func() any { return &call{ch: make(chan struct{}, 1)} }
	p, err := New(nc, cfg, c.complete)
	if err != nil {
		return nil, err
	}
	c.pipe = p
	return c, nil
}

func (c *Client) complete(k *call, _ string, m *nats.Msg, err error) {
	if done := k.done; done != nil {
		k.done = nil
		c.calls.Put(k)
		done(m, err)
		return
	}
	k.reply, k.err = m, err
	if k.state.CompareAndSwap(callWaiting, callDone) {
		k.ch <- struct{}{}
		return
	}
	k.reply, k.err = nil, nil
	c.calls.Put(k)
}

// Request sends data with hdr (read only; it may be shared) to subject and
// returns the reply. It sends nothing when ctx has already ended (the error
// then wraps ctx's error and ErrNotSent). Errors are those Send hands to a
// completion, and, when ctx ends while the reply is awaited, one wrapping
// ctx's error and ErrNoReply. A reply is returned as it came: a status
// reply (empty body, Status header) is the caller's to read.
func (c *Client) Request(ctx context.Context, subject string, hdr nats.Header, data []byte) (*nats.Msg, error) {
	if err := ctx.Err(); err != nil {
		return nil, notSent(err) // send nothing that nobody will wait for
	}
	k := c.calls.Get().(*call)
	k.state.Store(callWaiting)
	c.pipe.Send(ctx, subject, hdr, data, k)
	select {
	case <-k.ch:
	case <-ctx.Done():
		if k.state.CompareAndSwap(callWaiting, callAbandoned) {
			return nil, newFailure("gave up waiting for the reply", ErrNoReply, ctx.Err())
		}
		<-k.ch // completed meanwhile
	}
	m, err := k.reply, k.err
	k.reply, k.err = nil, nil
	c.calls.Put(k)
	return m, err
}

// RequestAsync is Request without the wait: it sends and returns, and
// done receives the reply or the error Request would have returned (not
// the ctx-ended-while-waiting one: nothing waits). done runs as a
// Completion does (on the pipe's goroutines, or in RequestAsync itself for
// a request not sent); it must not block, and must not make a request on
// the same Client. RequestAsync blocks only while every slot is taken.
func (c *Client) RequestAsync(ctx context.Context, subject string, hdr nats.Header, data []byte, done func(*nats.Msg, error)) {
	if err := ctx.Err(); err != nil {
		done(nil, notSent(err))
		return
	}
	k := c.calls.Get().(*call)
	k.done = done
	c.pipe.Send(ctx, subject, hdr, data, k)
}

// Publish is Request for a JetStream publish: it returns the reply read by
// ReadAck (the Ack's Stream aliases the reply, which nothing else holds).
func (c *Client) Publish(ctx context.Context, subject string, hdr nats.Header, data []byte) (Ack, error) {
	m, err := c.Request(ctx, subject, hdr, data)
	if err != nil {
		return Ack{}, err
	}
	return ReadAck(m)
}

// Stats returns the load of the Client's Pipe.
func (c *Client) Stats() Stats { return c.pipe.Stats() }

// Close closes the Client's Pipe: see Pipe.Close. Requests waiting when
// ctx ends return an error wrapping ErrClosed and ErrNoReply.
func (c *Client) Close(ctx context.Context) error { return c.pipe.Close(ctx) }
