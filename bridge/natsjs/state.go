package natsjs

import (
	"context"
	"log/slog"
	"time"
)

// PinState is where a Source stands in its ordering mode (SourceState.State).
type PinState string

// The states of a Source. An ordered Source moves Standby → Acquiring →
// Active and back; an unordered one is Shared while it runs.
const (
	// StateStopped: Run is not running.
	StateStopped PinState = "stopped"
	// StateShared: unordered mode, consuming the shared durable alongside
	// every other replica.
	StateShared PinState = "shared"
	// StateWaiting: the durable is set up for the other ordering mode and
	// other clients pull from it; the source neither pulls nor switches it
	// until they are gone (see SourceConfig.Ordering).
	StateWaiting PinState = "waiting"
	// StateStandby: ordered mode, another replica (or nobody) holds the
	// pin; the source probes for it.
	StateStandby PinState = "standby"
	// StateAcquiring: ordered mode, the source holds the pin and resets the
	// consumer to its ack floor before it takes any delivery.
	StateAcquiring PinState = "acquiring"
	// StateActive: ordered mode, the source holds the pin and forwards;
	// every delivery carries the epoch that a fence revokes.
	StateActive PinState = "active"
)

// SourceState is a snapshot of a Source for /status and metrics (see
// Source.State). Times are zero until the event first happened; counters
// start at zero when the Source is made.
type SourceState struct {
	Rule     string   `json:"rule"`
	Stream   string   `json:"stream"`
	Consumer string   `json:"consumer"`
	Ordering Ordering `json:"ordering"`
	State    PinState `json:"state"`
	// Since is when State was entered.
	Since time.Time `json:"since"`
	// PinID is the server's pin id this source holds (Acquiring, Active),
	// else "".
	PinID string `json:"pinId,omitempty"`
	// EpochStart is when the current epoch started (Active), or the last
	// one.
	EpochStart time.Time `json:"epochStart,omitzero"`
	// Epochs counts epochs started: every entry into Active, including a
	// re-acquisition of a pin the source already held (after a reconnect,
	// a delivery gap, missed heartbeats).
	Epochs uint64 `json:"epochs"`
	// Takeovers counts the epochs started after winning the pin in
	// Standby: the consumer passed to this replica, from another one or
	// from nobody. It is the figure behind cellbridge_takeovers_total.
	Takeovers uint64 `json:"takeovers"`
	// LastTakeover is when the last takeover's epoch started.
	LastTakeover time.Time `json:"lastTakeover,omitzero"`
	// LastTakeoverDuration is the last takeover's own cost: from the probe
	// that won the pin to the epoch start (the consumer reset to its ack
	// floor and the consuming pull started).
	LastTakeoverDuration time.Duration `json:"lastTakeoverDuration"`
	// LastTakeoverGap is how long the consumer was without an owner before
	// the last takeover, as far as the server said: from the last UNPINNED
	// advisory this source received in Standby (the previous holder's pin
	// timed out or was released) to the epoch start. Zero when no advisory
	// came (an account not allowed to read advisories, a first start).
	LastTakeoverGap time.Duration `json:"lastTakeoverGap"`
	// Fences counts epochs ended by a fence (pin lost or changed, leader
	// change, disconnect, missed heartbeats, delivery gap, full intake);
	// a graceful Release or Close is not a fence.
	Fences uint64 `json:"fences"`
	// LastFence is the last fence's reason and LastFenceAt its time.
	LastFence   string    `json:"lastFence,omitempty"`
	LastFenceAt time.Time `json:"lastFenceAt,omitzero"`
	// LastWithheld is why the last stall hand-over was withheld (the
	// re-read would reach past the duplicate window:
	// SourceConfig.HandOverWindow), and LastWithheldAt when; at most once
	// per epoch.
	LastWithheld   string    `json:"lastWithheld,omitempty"`
	LastWithheldAt time.Time `json:"lastWithheldAt,omitzero"`
}

// setWithheld records a withheld stall hand-over and reports the state
// through SourceConfig.OnState.
func (s *Source) setWithheld(why string) {
	s.mu.Lock()
	s.st.LastWithheld, s.st.LastWithheldAt = why, time.Now()
	snap := s.st
	s.mu.Unlock()
	if s.cfg.OnState != nil {
		s.cfg.OnState(snap)
	}
}

// State returns a snapshot of the source's state. It is safe to call from
// any goroutine.
func (s *Source) State() SourceState {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// transition is one change of state and what caused it.
type transition struct {
	to     PinState
	pin    string
	reason string
	// fence marks the end of an epoch by a fence (counted, logged at warn).
	fence bool
	// epoch, when set, starts an epoch at epochStart; takeover marks one
	// won in Standby (pinnedAt: when the probe won the pin; unpinnedAt:
	// the last UNPINNED advisory before it, or zero).
	epoch                bool
	takeover             bool
	epochStart           time.Time
	pinnedAt, unpinnedAt time.Time
}

// setState records tr, logs one line and reports the new state through
// SourceConfig.OnState. Staying in the same state with the same pin is not a
// change and is neither logged nor reported.
func (s *Source) setState(tr transition) {
	now := time.Now()
	s.mu.Lock()
	prev := s.st
	if prev.State == tr.to && prev.PinID == tr.pin && !tr.fence && !tr.epoch {
		s.mu.Unlock()
		return
	}
	st := &s.st
	st.State, st.PinID, st.Since = tr.to, tr.pin, now
	if tr.fence {
		st.Fences++
		st.LastFence, st.LastFenceAt = tr.reason, now
	}
	if tr.epoch {
		st.Epochs++
		st.EpochStart = tr.epochStart
		if tr.takeover {
			st.Takeovers++
			st.LastTakeover = tr.epochStart
			st.LastTakeoverDuration = tr.epochStart.Sub(tr.pinnedAt)
			st.LastTakeoverGap = 0
			if !tr.unpinnedAt.IsZero() {
				st.LastTakeoverGap = tr.epochStart.Sub(tr.unpinnedAt)
			}
		}
	}
	snap := s.st
	s.mu.Unlock()

	args := []any{"state", tr.to, "from", prev.State, "after", now.Sub(prev.Since).Round(time.Millisecond)}
	if tr.pin != "" {
		args = append(args, "pin", tr.pin)
	} else if prev.PinID != "" {
		args = append(args, "pin", prev.PinID)
	}
	if tr.reason != "" {
		args = append(args, "reason", tr.reason)
	}
	if tr.takeover {
		args = append(args, "takeover", snap.LastTakeoverDuration.Round(time.Millisecond))
		if snap.LastTakeoverGap > 0 {
			args = append(args, "unowned", snap.LastTakeoverGap.Round(time.Millisecond))
		}
	}
	level := slog.LevelInfo
	if tr.fence || tr.to == StateWaiting {
		level = slog.LevelWarn
	}
	s.log.Log(context.Background(), level, "nats source "+string(tr.to), args...)
	if s.cfg.OnState != nil {
		s.cfg.OnState(snap)
	}
}
