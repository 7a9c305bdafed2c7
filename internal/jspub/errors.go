package jspub

import (
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Classes of failure. Every error the pipe itself reports (as opposed to a
// reply the server sent) wraps exactly one of ErrNotSent and ErrNoReply, so
// that a caller deciding whether to retry knows whether the request can have
// taken effect.
var (
	// ErrNotSent: the request was not handed to the connection (the pipe
	// was closed, the connection was down, the context ended while the
	// request waited for a slot, or the client refused it). It cannot take
	// effect; repeating it is always safe.
	ErrNotSent = errors.New("jspub: not sent")
	// ErrNoReply: the request was sent but its reply did not come (timeout,
	// the connection dropped, the pipe was closed, the caller stopped
	// waiting). It may or may not have taken effect: a repeat must be
	// idempotent (a JetStream publish with Nats-Msg-Id, an
	// expected-sequence write that recognises its own earlier success).
	ErrNoReply = errors.New("jspub: no reply")
)

// Causes, wrapped alongside the class.
var (
	// ErrClosed: the pipe was closed. With ErrNotSent for a request made
	// (or still waiting for a slot) when Stop or Close came; with
	// ErrNoReply for one cut short by Close's deadline.
	ErrClosed = errors.New("jspub: closed")
	// ErrTimeout: no reply within Config.Timeout (with ErrNoReply).
	ErrTimeout = errors.New("jspub: timed out")
	// ErrNoStream is what ReadAck returns when nothing captured the
	// subject: no stream listens on it, or its stream has no leader. It
	// wraps jetstream.ErrNoStreamResponse and nats.ErrNoResponders.
	ErrNoStream = fmt.Errorf("%w (%w)", jetstream.ErrNoStreamResponse, nats.ErrNoResponders)
)

// failure is an error of the pipe: a message, a class and a cause. The
// common ones are made once, so that failing many requests at once (a
// disconnect, a timeout sweep) allocates nothing per request.
type failure struct {
	msg  string
	errs []error
}

func (f *failure) Error() string   { return f.msg }
func (f *failure) Unwrap() []error { return f.errs }

func newFailure(msg string, class, cause error) *failure {
	if cause == nil {
		return &failure{msg: msg, errs: []error{class}}
	}
	return &failure{msg: msg + ": " + cause.Error(), errs: []error{class, cause}}
}

var (
	errClosed     = newFailure("pipe closed, not sent", ErrNotSent, ErrClosed)
	errLinkDown   = newFailure("connection down, not sent", ErrNotSent, nats.ErrDisconnected)
	errLost       = newFailure("reply lost with the connection", ErrNoReply, nats.ErrDisconnected)
	errLostClosed = newFailure("reply lost with the connection", ErrNoReply, nats.ErrConnectionClosed)
	errCutShort   = newFailure("pipe closed before the reply arrived", ErrNoReply, ErrClosed)
)

// notSent wraps an error that kept a request from being sent.
func notSent(err error) error { return newFailure("not sent", ErrNotSent, err) }
