package bridge

import (
	"fmt"
	"runtime"
	"strings"
	"time"
)

// Config holds the pipeline limits. Zero fields take the defaults listed on
// each field; call WithDefaults then Validate (New does both). The bridge
// configuration file's `pipeline:` section maps onto it field by field
// (package internal/config), and Validate is the one place that bounds
// every field, for that file and for New alike.
type Config struct {
	// MaxInFlight bounds messages accepted and not yet settled, excluding
	// parked (held) messages and lagging broadcast copies. A broadcast
	// message takes one slot per copy. Default 4096.
	MaxInFlight int
	// MaxLagging bounds the broadcast copies kept in memory, outside
	// MaxInFlight, because their cell is failing or slow (a copy whose
	// publish failed or that is not confirmed StallTimeout after its
	// message arrived, and the later copies of its key for that cell), so
	// that one cell does not hold the in-flight slots the other cells need. Beyond it such copies keep their in-flight slots: once
	// MaxInFlight of them wait, intake stops for every rule (back-pressure;
	// nothing is lost or reordered). Sources must allow MaxInFlight +
	// MaxHeld + MaxLagging unacknowledged messages. Default 10000.
	MaxLagging int
	// Workers is the number of pipeline goroutines that commit, acknowledge and
	// dispatch messages. Default: GOMAXPROCS when the dedupe store is the
	// in-memory store (its calls never wait on I/O, so dispatch runs inline on
	// the caller's goroutine), otherwise 256 (each store round trip occupies
	// one worker).
	Workers int
	// FetchBatch is passed to sources (messages requested ahead). Default
	// 2048: a JetStream source asks for more when half of it is taken, and
	// with the server in another process a refill's round trip must fit in
	// the time the other half lasts; with 1024 the source ran dry under
	// load, forwarding fell behind the offered rate in bursts, and every
	// message cost the server more (smaller delivery batches, more pull
	// requests). Measured with cmd/cellbridge-bench, see bench/notes.md.
	FetchBatch int
	// HoldDelay is the redelivery delay of a held message that could not be
	// parked (MaxHeld reached) or that cannot be routed yet (no rules, no
	// DLQ). Default 5s.
	HoldDelay time.Duration
	// MaxHeld bounds parked (held) messages kept in memory. Default 10000.
	// Sources must allow MaxInFlight+MaxHeld unacknowledged messages
	// (JetStream MaxAckPending), or held messages starve other shards.
	MaxHeld int
	// HeldRecheck is how often parked messages are re-resolved even without
	// a rules change. Default 1s.
	HeldRecheck time.Duration
	// Retry is the backoff for sink and dedupe failures.
	Retry RetryConfig
	// MaxMessageBytes: larger bodies go to the DLQ (too_large). Default 1MiB.
	MaxMessageBytes int64
	// MaxHops: a message arriving with Cell-Hops >= MaxHops goes to the DLQ
	// (too_many_hops). Default 4.
	MaxHops int
	// DrainTimeout bounds Close when the caller's ctx has no deadline.
	// Default 20s.
	DrainTimeout time.Duration
	// ProgressTimeout: /readyz reports not ready when a rule has a backlog
	// but nothing made progress for this long. Default 60s.
	ProgressTimeout time.Duration
	// StallTimeout: /readyz reports not ready while a rule's oldest message
	// that is accepted, not parked and not settled is older than this (a
	// target, the dedupe store or a retry holds it up). Default 3s.
	StallTimeout time.Duration
	// AckWait is the sources' ack deadline; the pipeline sends ErrInProgress
	// for every message older than AckWait/2 (every AckWait/4), and every
	// AckWait/4 to one that waits for an in-flight slot. Default 30s.
	AckWait time.Duration
	// Lanes is the number of ordering lanes: messages of one key always use
	// the same lane, and per key one message is between publish and confirm.
	// Keys sharing a lane do not wait for each other; a collision costs a
	// scan of the lane's short lists. Default MaxInFlight/4 (at least 1):
	// about four messages in flight per lane, short scans, and a lane array
	// small enough to stay in the CPU cache (4×MaxInFlight lanes cost ~6%
	// more CPU per message in BenchmarkPipeline, in cache misses on the lane
	// locks).
	Lanes int
}

// RetryConfig is a capped exponential backoff.
type RetryConfig struct {
	Initial time.Duration // default 100ms
	Max     time.Duration // default 1s
}

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 4096
	}
	if c.FetchBatch == 0 {
		c.FetchBatch = 2048
	}
	if c.HoldDelay == 0 {
		c.HoldDelay = 5 * time.Second
	}
	if c.MaxHeld == 0 {
		c.MaxHeld = 10000
	}
	if c.MaxLagging == 0 {
		c.MaxLagging = 10000
	}
	if c.HeldRecheck == 0 {
		c.HeldRecheck = time.Second
	}
	if c.Retry.Initial == 0 {
		c.Retry.Initial = 100 * time.Millisecond
	}
	if c.Retry.Max == 0 {
		c.Retry.Max = time.Second
	}
	if c.MaxMessageBytes == 0 {
		c.MaxMessageBytes = 1 << 20
	}
	if c.MaxHops == 0 {
		c.MaxHops = 4
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 20 * time.Second
	}
	if c.ProgressTimeout == 0 {
		c.ProgressTimeout = 60 * time.Second
	}
	if c.StallTimeout == 0 {
		c.StallTimeout = 3 * time.Second
	}
	if c.AckWait == 0 {
		c.AckWait = 30 * time.Second
	}
	if c.Lanes == 0 {
		c.Lanes = max(1, c.MaxInFlight/4)
	}
	return c
}

// defaultWorkers is the Workers default for a store kind.
func defaultWorkers(localStore bool) int {
	if localStore {
		return max(2, runtime.GOMAXPROCS(0))
	}
	return 256
}

// FieldError is one invalid field of a Config. Field is named as in the
// configuration file's pipeline section ("maxInFlight", "retry.initial"), so
// that the configuration can locate it in the file.
type FieldError struct {
	Field string
	Msg   string
}

// Error returns "pipeline.<field>: <message>".
func (e FieldError) Error() string { return "pipeline." + e.Field + ": " + e.Msg }

// ConfigErrors lists every invalid field of a Config, in field order.
type ConfigErrors []FieldError

// Error returns one field error per line.
func (e ConfigErrors) Error() string {
	s := make([]string, len(e))
	for i, f := range e {
		s[i] = f.Error()
	}
	return strings.Join(s, "\n")
}

// Validate reports every invalid field as ConfigErrors, or returns nil. It
// checks the values as given: zero means "default" only for Workers and
// Lanes (computed by New); call WithDefaults first to fill the others.
//
// The lower bounds of the durations are what the pipeline needs to work, not
// what a deployment should use: the sweeper ticks every min(100ms,
// AckWait/4, HeldRecheck), so AckWait/4 and HeldRecheck must be at least a
// millisecond, and tests run the pipeline with short timeouts.
func (c Config) Validate() error {
	var errs ConfigErrors
	bad := func(field, format string, a ...any) {
		errs = append(errs, FieldError{Field: field, Msg: fmt.Sprintf(format, a...)})
	}
	positive := func(field string, v int) {
		if v < 1 {
			bad(field, "must be positive, got %d", v)
		}
	}
	automatic := func(field string, v int) {
		if v < 0 {
			bad(field, "must not be negative (0: automatic), got %d", v)
		}
	}
	atLeast := func(field string, v, lo time.Duration) {
		if v < lo {
			bad(field, "must be at least %s, got %s", lo, v)
		}
	}
	positive("maxInFlight", c.MaxInFlight)
	if c.MaxInFlight > maxInFlightLimit {
		bad("maxInFlight", "must be at most %d, got %d", maxInFlightLimit, c.MaxInFlight)
	}
	automatic("workers", c.Workers)
	automatic("lanes", c.Lanes)
	positive("fetchBatch", c.FetchBatch)
	positive("maxHops", c.MaxHops)
	positive("maxHeld", c.MaxHeld)
	positive("maxLagging", c.MaxLagging)
	// A shorter hold delay turns a held message into a redelivery loop.
	atLeast("holdDelay", c.HoldDelay, 10*time.Millisecond)
	atLeast("retry.initial", c.Retry.Initial, time.Millisecond)
	atLeast("retry.max", c.Retry.Max, time.Millisecond)
	if c.Retry.Initial > c.Retry.Max {
		bad("retry.initial", "must not exceed pipeline.retry.max (%s), got %s", c.Retry.Max, c.Retry.Initial)
	}
	atLeast("drainTimeout", c.DrainTimeout, time.Millisecond)
	atLeast("heldRecheck", c.HeldRecheck, time.Millisecond)
	atLeast("progressTimeout", c.ProgressTimeout, time.Millisecond)
	atLeast("stallTimeout", c.StallTimeout, time.Millisecond)
	atLeast("ackWait", c.AckWait, 4*time.Millisecond)
	if c.MaxMessageBytes < 1 || c.MaxMessageBytes > maxMessageBytesLimit {
		bad("maxMessageBytes", "must be between 1 byte and 64MiB, got %d", c.MaxMessageBytes)
	}
	if len(errs) == 0 {
		return nil
	}
	return errs
}

// Upper bounds of Config fields: beyond them memory use is unreasonable
// (the budget, the job queue and the lane table grow with MaxInFlight).
const (
	maxInFlightLimit     = 1_000_000
	maxMessageBytesLimit = 64 << 20
)
