package natsjs

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// failState is what a Source reports through SourceConfig.OnFailing: the
// reason it cannot deliver, or none. Only changes are reported, one at a
// time and in the order they happened; clear costs one atomic load while
// nothing is failing, so the delivery path can call it per message. While
// idle says that nothing waits to be delivered, the reason is reported
// wrapped in bridge.ErrNothingPending.
type failState struct {
	report func(error)
	idle   func() bool // nil: never idle
	on     atomic.Bool
	mu     sync.Mutex
	err    error  // the reason set last
	why    string // the text reported last
}

// set reports err as the reason the source cannot deliver.
func (f *failState) set(err error) {
	if f.report == nil || err == nil {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
	f.reportLocked()
}

// recheck reports the current failure again when idle changed its
// answer since it was reported.
func (f *failState) recheck() {
	if f.report == nil || !f.on.Load() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.on.Load() {
		f.reportLocked()
	}
}

func (f *failState) reportLocked() {
	err := f.err
	if f.idle != nil && f.idle() {
		err = &nothingPending{err: err}
	}
	if f.on.Load() && f.why == err.Error() {
		return
	}
	f.why = err.Error()
	f.on.Store(true)
	f.report(err)
}

// setFirst reports err unless a failure is reported already: a fence
// follows the failure that caused it (missed heartbeats, a failing
// request), whose reason says more.
func (f *failState) setFirst(err error) {
	if f.report == nil || f.on.Load() {
		return
	}
	f.set(err)
}

// clear reports that the source delivers again.
func (f *failState) clear() {
	if !f.on.Load() {
		return
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.on.Load() {
		return
	}
	f.on.Store(false)
	f.why, f.err = "", nil
	f.report(nil)
}

// failingNow reports whether a failure is reported.
func (f *failState) failingNow() bool { return f.on.Load() }

// sharedHeartbeat is the unordered mode's pull heartbeat: the server sends
// one while a pull waits, and the client library reports ErrNoHeartbeat
// after two are missed, so a server that stopped answering is noticed
// within 2s (the library's default would be pullExpiry/2, 2.5s, noticed
// after 5s).
const sharedHeartbeat = time.Second

// missedHeartbeats handles the client library's ErrNoHeartbeat: the source
// reports that it cannot deliver, and checkLink finds out whether the
// connection itself is dead.
func (s *Source) missedHeartbeats(hb time.Duration) {
	nc := s.js.Conn()
	s.failing.set(fmt.Errorf("no pull heartbeats from the server for %s (connected to %s)", 2*hb, serverOf(nc)))
	s.checkLink(hb)
}

// checkLink runs after missed pull heartbeats while the connection claims
// to be up: it pings the server (a flush) and, when no answer comes within
// wait, forces a reconnect. A frozen server (SIGSTOP, a stalled VM) keeps
// its TCP connections open, so the client would otherwise notice only
// after its pings time out (PingInterval×MaxPingsOut, longer when an
// operator raised them); a server that does answer keeps the connection,
// since the heartbeats then stopped elsewhere (the consumer's leader) and a
// reconnect would only disturb the sink and the store on the same link. At
// most one check runs at a time; it does not block the caller.
func (s *Source) checkLink(wait time.Duration) {
	nc := s.js.Conn()
	if !nc.IsConnected() || !s.linkCheck.CompareAndSwap(false, true) {
		return
	}
	go func() {
		defer s.linkCheck.Store(false)
		err := nc.FlushTimeout(wait)
		if err == nil || !nc.IsConnected() || errors.Is(err, nats.ErrConnectionClosed) {
			return
		}
		s.log.Warn("nats server does not answer after missed heartbeats; forcing a reconnect",
			"url", nc.ConnectedUrlRedacted(), "err", err)
		if err := nc.ForceReconnect(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
			s.log.Warn("nats forced reconnect failed", "err", err)
		}
	}()
}

// serverOf names the server nc is connected to, or says it is not.
func serverOf(nc *nats.Conn) string {
	if u := nc.ConnectedUrlRedacted(); u != "" {
		return u
	}
	return "no server"
}
