package retry

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Defaults of a Policy's zero fields.
const (
	DefaultTimeout = 2 * time.Second
	DefaultInitial = 100 * time.Millisecond
	DefaultMax     = 2 * time.Second
)

// Policy says how the requests to one broker are bounded, retried and
// reported. The zero value is usable (defaults below, nothing logged or
// reported). A Policy is read only once in use and may be shared.
type Policy struct {
	// Broker names the broker (the configuration's name) in logs, reports
	// and errors.
	Broker string
	// Conn, when set, is the connection the requests go over: an attempt
	// waits (within its timeout) until it is connected, and logs name the
	// server it is connected to (else its server list).
	Conn *nats.Conn
	// URL names the server when Conn is nil or has no server yet (the
	// configured URL list; passwords are redacted).
	URL string
	// Timeout bounds each attempt. Default DefaultTimeout.
	Timeout time.Duration
	// Initial is the wait after the first failed attempt; it doubles up to
	// Max, with up to 25% jitter. Defaults DefaultInitial and DefaultMax.
	Initial, Max time.Duration
	// Retryable tells the failures worth another attempt. Default
	// Transient.
	Retryable func(error) bool
	// Log receives one line per failed attempt that is retried, at warn
	// level (debug with Quiet). nil: nothing is logged.
	Log *slog.Logger
	// Quiet logs failed attempts at debug level: for requests repeated on
	// a timer whose failure the caller reports in another way.
	Quiet bool
	// Report, when set, receives every failed attempt that is retried, and
	// the last one when the caller's context ended first. An error that
	// Retryable refuses is the caller's answer (a consumer not found is
	// how a lookup says "create it"), returned and not reported. Report is
	// called on the requesting goroutine and must not block.
	Report func(*AttemptError)
}

// AttemptError describes one failed attempt of a request.
type AttemptError struct {
	// Broker and URL name where the request went; Op is the kind of
	// request (a metric label: "connect", "consumer_create", ...) and On
	// what it was about ("ORDERS/cellbridge-orders"; may be empty).
	Broker, URL, Op, On string
	// Attempt counts from 1.
	Attempt int
	// Err is the attempt's error.
	Err error
	// RetryIn is the wait before the next attempt; 0 when none follows.
	RetryIn time.Duration
}

// Error reads "broker B (URL): OP ON: attempt N failed: ERR; retrying in
// D", or for a connect "connecting to broker B (URL): attempt N failed:
// ERR; retrying in D"; without "; retrying" when no attempt follows.
func (e *AttemptError) Error() string {
	var b strings.Builder
	if e.Op == OpConnect {
		b.WriteString("connecting to ")
	}
	b.WriteString("broker ")
	b.WriteString(e.Broker)
	if e.URL != "" {
		b.WriteString(" (" + e.URL + ")")
	}
	if e.Op != OpConnect {
		b.WriteString(": " + e.Op)
		if e.On != "" {
			b.WriteString(" " + e.On)
		}
	}
	fmt.Fprintf(&b, ": attempt %d failed: %v", e.Attempt, e.Err)
	if e.RetryIn > 0 {
		b.WriteString("; retrying in " + e.RetryIn.Round(time.Millisecond).String())
	}
	return b.String()
}

// Unwrap returns the attempt's error.
func (e *AttemptError) Unwrap() error { return e.Err }

// Kinds of request (AttemptError.Op), the values of the op label of
// cellbridge_broker_request_errors_total.
const (
	OpConnect        = "connect"
	OpStreamInfo     = "stream_info"
	OpStreamCreate   = "stream_create"
	OpStreamUpdate   = "stream_update"
	OpConsumerInfo   = "consumer_info"
	OpConsumerCreate = "consumer_create"
	OpConsumerReset  = "consumer_reset"
	OpConsumerUnpin  = "consumer_unpin"
	OpConsumerDelete = "consumer_delete"
	OpKVBucket       = "kv_bucket"
)

// Ops lists every Op value.
var Ops = []string{OpConnect, OpStreamInfo, OpStreamCreate, OpStreamUpdate, OpConsumerInfo, OpConsumerCreate,
	OpConsumerReset, OpConsumerUnpin, OpConsumerDelete, OpKVBucket}

// Do runs call until it succeeds, fails with an error Retryable refuses, or
// ctx ends. Each attempt gets a context bounded by p.Timeout (and ctx), and
// is made only while p.Conn is connected. op (one of Ops) and on (what the
// request is about, e.g. "ORDERS/cellbridge-orders") describe the request
// in logs and reports. The error returned is the last attempt's; when ctx
// ended it also wraps ctx's error and says how many attempts were made.
func Do[T any](ctx context.Context, p *Policy, op, on string, call func(ctx context.Context) (T, error)) (T, error) {
	timeout, delay, maxDelay := p.Timeout, p.Initial, p.Max
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if delay <= 0 {
		delay = DefaultInitial
	}
	if maxDelay <= 0 {
		maxDelay = DefaultMax
	}
	retryable := p.Retryable
	if retryable == nil {
		retryable = Transient
	}
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, timeout)
		err := connected(actx, p.Conn)
		var v T
		if err == nil {
			v, err = call(actx)
		}
		cancel()
		if err == nil {
			return v, nil
		}
		ae := &AttemptError{Broker: p.Broker, URL: p.where(), Op: op, On: on, Attempt: attempt, Err: err}
		if !retryable(err) {
			return v, err
		}
		if ctx.Err() != nil {
			p.report(ae)
			return v, gaveUp(ctx, err, attempt)
		}
		wait := delay + rand.N(delay/4+1)
		ae.RetryIn = wait
		p.report(ae)
		if p.Log != nil {
			level := slog.LevelWarn
			if p.Quiet {
				level = slog.LevelDebug
			}
			args := []any{"broker", p.Broker, "url", ae.URL, "op", op}
			if on != "" {
				args = append(args, "on", on)
			}
			args = append(args, "err", err.Error(), "attempt", attempt, "retry_in", wait.Round(time.Millisecond).String())
			p.Log.Log(ctx, level, "broker request failed; retrying", args...)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return v, gaveUp(ctx, err, attempt)
		case <-t.C:
		}
		delay = min(2*delay, maxDelay)
	}
}

// gaveUp is the error of the last attempt; once ctx ended it also says how
// many attempts were made and wraps ctx's error.
func gaveUp(ctx context.Context, err error, attempts int) error {
	switch cerr := ctx.Err(); {
	case cerr == nil:
		return err
	case errors.Is(err, cerr):
		return fmt.Errorf("%w (%d attempts; gave up)", err, attempts)
	default:
		return fmt.Errorf("%w (%d attempts; gave up: %w)", err, attempts, cerr)
	}
}

func (p *Policy) report(ae *AttemptError) {
	if p.Report != nil {
		p.Report(ae)
	}
}

// where names the server of the connection (the one it is connected to,
// else its known servers), else the configured URL.
func (p *Policy) where() string {
	if p.Conn != nil {
		if u := p.Conn.ConnectedUrlRedacted(); u != "" {
			return u
		}
		if s := p.Conn.Servers(); len(s) > 0 {
			for i := range s {
				s[i] = Redact(s[i])
			}
			return strings.Join(s, ",")
		}
	}
	return Redact(p.URL)
}

// Redact hides the passwords in a comma-separated list of URLs.
func Redact(s string) string {
	if !strings.Contains(s, "@") {
		return s
	}
	parts := strings.Split(s, ",")
	for i, part := range parts {
		u, err := url.Parse(strings.TrimSpace(part))
		if err == nil && u.User != nil {
			parts[i] = u.Redacted()
		}
	}
	return strings.Join(parts, ",")
}

// errNotConnected fails an attempt that found no connection within its
// timeout; it wraps nats.ErrDisconnected.
var errNotConnected = fmt.Errorf("not connected to any server: %w", nats.ErrDisconnected)

// connected returns nil once nc is connected (at once when it is, or nc is
// nil), errNotConnected when ctx ends first, nats.ErrConnectionClosed when nc
// is closed.
func connected(ctx context.Context, nc *nats.Conn) error {
	if nc == nil || nc.IsConnected() {
		return nil
	}
	ch := nc.StatusChanged(nats.CONNECTED, nats.CLOSED)
	defer nc.RemoveStatusListener(ch)
	for !nc.IsConnected() {
		if nc.IsClosed() {
			return nats.ErrConnectionClosed
		}
		select {
		case <-ctx.Done():
			return errNotConnected
		case <-ch:
		}
	}
	return nil
}

// Transient reports whether err is worth another attempt: no answer in time,
// no responders, the connection down or reconnecting, a host that cannot
// be reached or resolved yet (DNS is treated like a refused connection: a
// server's name appears when its pod starts), and JetStream answers that
// say "not now": 408, 429, any 503, 5xx errors of a cluster in an election
// or a restart, and no suitable peers for placement (a cluster with servers
// down). Stream and consumer not found, bad requests and configurations the
// server refuses are not transient, nor are failed authentication and TLS
// verification, nor a closed connection.
func Transient(err error) bool {
	if err == nil {
		return false
	}
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return transientAPI(apiErr)
	}
	switch {
	case errors.Is(err, nats.ErrConnectionClosed), errors.Is(err, jetstream.ErrConnectionClosed):
		return false
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, nats.ErrTimeout),
		errors.Is(err, nats.ErrNoResponders), errors.Is(err, nats.ErrNoServers),
		errors.Is(err, nats.ErrDisconnected), errors.Is(err, nats.ErrConnectionReconnecting),
		errors.Is(err, nats.ErrStaleConnection), errors.Is(err, jetstream.ErrNoHeartbeat):
		return true
	}
	if Permanent(err) {
		return false
	}
	var dnsErr *net.DNSError
	var opErr *net.OpError
	var netErr net.Error
	switch {
	case errors.As(err, &dnsErr), errors.As(err, &opErr):
		return true
	case errors.As(err, &netErr) && netErr.Timeout():
		return true
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return true
	}
	return false
}

// Permanent reports the connect failures that no retry fixes: the server
// refused the credentials, TLS is required on one side only, or the
// server's certificate does not verify. A bridge exits on them at start-up.
func Permanent(err error) bool {
	switch {
	case errors.Is(err, nats.ErrAuthorization), errors.Is(err, nats.ErrAuthExpired),
		errors.Is(err, nats.ErrAuthRevoked), errors.Is(err, nats.ErrAccountAuthExpired),
		errors.Is(err, nats.ErrSecureConnRequired), errors.Is(err, nats.ErrSecureConnWanted),
		errors.Is(err, nats.ErrNkeysNotSupported), errors.Is(err, nats.ErrHeadersNotSupported):
		return true
	}
	var certErr *tls.CertificateVerificationError
	var unknownAuth x509.UnknownAuthorityError
	var hostErr x509.HostnameError
	var invalid x509.CertificateInvalidError
	if errors.As(err, &certErr) || errors.As(err, &unknownAuth) || errors.As(err, &hostErr) || errors.As(err, &invalid) {
		return true
	}
	// The server's TLS alerts (no client certificate, a bad one) reach the
	// client as text only; a handshake that timed out is not one of them.
	var netErr net.Error
	if errors.As(err, &netErr) && netErr.Timeout() {
		return false
	}
	return strings.Contains(err.Error(), "tls: ")
}

// transientAPI classifies the JetStream API's answers (see Transient).
func transientAPI(e *jetstream.APIError) bool {
	switch e.ErrorCode {
	case 10005: // no suitable peers for placement (servers down)
		return true
	case 10052, // invalid stream configuration
		10074, // replicas > 1 not supported in non-clustered mode
		10010, // clustering support required
		10036: // not supported in clustered mode
		return false
	case 10012: // consumer create error: transient ("consumer closed" in an election), but not a refused change
		return !strings.Contains(e.Description, "can not be updated")
	}
	return e.Code == 408 || e.Code == 429 || e.Code >= 500
}
