package bridge

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Dedupe protocol per target. With a store that implements dedupe.Checker,
// a target whose sink reports a duplicate window (WindowSink) at least as
// long as the store's CheckWindow gets the check-then-commit protocol (one
// stored write per message); every other target, and every target while
// its window is not known, gets the reservation protocol (Reserve). The
// window is looked up on the first message to the target, on a worker,
// and again every protoRefresh, so that a stream whose window was
// shortened goes back to reservations; a failed lookup keeps the
// reservation protocol and is tried again after protoRetry. Each change is
// logged and shown by Status.DedupeProtocols. The same lookup, made also
// without a checker, tells whether a target's window allows an ordered
// epoch to take a previous owner's reservation over (mayTakeOver).
const (
	protoRefresh = time.Minute
	protoRetry   = 10 * time.Second
)

// Protocol names (Status.DedupeProtocols, logs).
const (
	ProtoReserve = "reserve"
	ProtoCheck   = "check"
)

// targetProto is the dedupe protocol of one target.
type targetProto struct {
	check  atomic.Bool  // use Check
	next   atomic.Int64 // unix ns of the next lookup (0: none yet)
	mu     sync.Mutex   // one lookup at a time (TryLock: others go on)
	window atomic.Int64 // the last window looked up, ns (-1: not a WindowSink)
	state  atomic.Pointer[string]
}

// useCheck reports whether the message for ss uses the store's Check: ss's
// sink drops repeats within a window the store accepts. It looks the
// window up when due (only one caller per target; the others go on with
// the last answer). The lookup waits for the target's broker (two
// requests, up to the sink's ack timeout while that broker is down), so a
// caller that must not wait (mayWait false: intake, or the store's or a
// sink's answers, which carry the messages of every target) gets later
// when it is due, and moves the message to a worker, which looks it up.
func (p *Pipeline) useCheck(ss *targetState, mayWait bool) (check, later bool) {
	if p.lookupDue(ss, mayWait) {
		return false, true
	}
	return ss.proto.check.Load(), false
}

// lookupDue looks ss's window up when it is due (only one caller per
// target; the others go on with the last answer) and reports whether it
// is due but the caller may not wait for it (mayWait false).
func (p *Pipeline) lookupDue(ss *targetState, mayWait bool) (later bool) {
	tp := &ss.proto
	if now := time.Now().UnixNano(); now >= tp.next.Load() {
		if !mayWait {
			return true
		}
		if tp.mu.TryLock() {
			if now >= tp.next.Load() {
				p.lookupProto(ss, now)
			}
			tp.mu.Unlock()
		}
	}
	return false
}

// lookupProto asks ss's sink for its window and sets the protocol (tp.mu
// held). Without a checker only the window is kept (mayTakeOver reads it).
func (p *Pipeline) lookupProto(ss *targetState, now int64) {
	tp := &ss.proto
	ws, ok := ss.sink.(WindowSink)
	if !ok {
		tp.next.Store(1 << 62) // never again: the sink cannot tell
		p.setProto(ss, false, -1, "the sink reports no duplicate window")
		return
	}
	ctx, cancel := context.WithCancel(p.ctx)
	w, err := ws.DuplicateWindow(ctx, ss.tg)
	cancel()
	if err != nil {
		tp.next.Store(now + int64(protoRetry))
		if p.checker != nil && (tp.state.Load() == nil || tp.check.Load()) {
			p.log.Warn("dedupe protocol: cannot look the target's duplicate window up; reservations until it can",
				"target", ss.what, "err", err)
		}
		// Unknown counts as none until a lookup answers: the window last
		// seen may have been shortened (or the stream made again) since,
		// and takeovers (mayTakeOver) rely on it.
		p.setProto(ss, false, 0, "window unknown: "+err.Error())
		return
	}
	tp.next.Store(now + int64(protoRefresh))
	if p.checker != nil {
		if least := p.checker.CheckWindow(); w < least {
			p.setProto(ss, false, int64(w), "duplicate window "+w.String()+" shorter than "+least.String())
			return
		}
	}
	p.setProto(ss, p.checker != nil, int64(w), "duplicate window "+w.String())
}

// setProto records ss's window and, with a checker, its protocol; a change
// of protocol is logged.
func (p *Pipeline) setProto(ss *targetState, check bool, window int64, why string) {
	tp := &ss.proto
	tp.window.Store(window)
	if p.checker == nil {
		return // no protocol to choose: every target reserves
	}
	name := ProtoReserve
	if check {
		name = ProtoCheck
	}
	desc := name + " (" + why + ")"
	old := tp.state.Load()
	tp.check.Store(check)
	tp.state.Store(&desc)
	if old == nil || (*old)[:len(name)] != name {
		p.log.Info("dedupe protocol for target", "target", ss.what, "protocol", name, "why", why)
	}
}

// dedupeProtocols is Status.DedupeProtocols: each target's protocol as far
// as decided.
func (p *Pipeline) dedupeProtocols() map[string]string {
	if p.checker == nil {
		return nil
	}
	out := map[string]string{}
	for _, ss := range p.targetStates.load() {
		if ss == nil {
			continue
		}
		if d := ss.proto.state.Load(); d != nil {
			out[ss.what] = *d
		}
	}
	return out
}
