package bridge

import (
	"errors"
	"fmt"
	"math"
	"runtime"
	"strconv"
	"strings"
	"time"
)

// Config holds the pipeline limits (the `pipeline:` section of the bridge
// configuration). Zero fields take the defaults listed on each field; call
// WithDefaults then Validate (New does both).
type Config struct {
	// MaxInFlight bounds messages accepted and not yet settled, excluding
	// parked (held) messages. Default 4096.
	MaxInFlight int `yaml:"maxInFlight"`
	// Workers is the number of pipeline goroutines that commit, acknowledge and
	// dispatch messages. Default: GOMAXPROCS when the dedupe store is the
	// in-memory store (its calls never wait on I/O, so dispatch runs inline on
	// the caller's goroutine), otherwise 256 (each store round trip occupies
	// one worker).
	Workers int `yaml:"workers"`
	// FetchBatch is passed to sources (messages requested ahead). Default
	// 1024: with 256 a JetStream Consume loop waits for refills and the
	// pipeline idles (measured with cmd/cellbridge-bench).
	FetchBatch int `yaml:"fetchBatch"`
	// HoldDelay is the redelivery delay of a held message that could not be
	// parked (MaxHeld reached) or that cannot be routed yet (no rules, no
	// DLQ). Default 5s.
	HoldDelay time.Duration `yaml:"holdDelay"`
	// MaxHeld bounds parked (held) messages kept in memory. Default 10000.
	// Sources must allow MaxInFlight+MaxHeld unacknowledged messages
	// (JetStream MaxAckPending), or held messages starve other shards.
	MaxHeld int `yaml:"maxHeld"`
	// HeldRecheck is how often parked messages are re-resolved even without
	// a rules change. Default 1s.
	HeldRecheck time.Duration `yaml:"heldRecheck"`
	// Retry is the backoff for sink and dedupe failures.
	Retry RetryConfig `yaml:"retry"`
	// MaxMessageBytes: larger bodies go to the DLQ (too_large). Default 1MiB.
	MaxMessageBytes ByteSize `yaml:"maxMessageBytes"`
	// MaxHops: a message arriving with Cell-Hops >= MaxHops goes to the DLQ
	// (too_many_hops). Default 4.
	MaxHops int `yaml:"maxHops"`
	// DrainTimeout bounds Close when the caller's ctx has no deadline.
	// Default 20s.
	DrainTimeout time.Duration `yaml:"drainTimeout"`
	// ProgressTimeout: /readyz reports not ready when a rule has a backlog
	// but nothing made progress for this long. Default 60s.
	ProgressTimeout time.Duration `yaml:"progressTimeout"`
	// StallTimeout: /readyz reports not ready while a rule's oldest message
	// that is accepted, not parked and not settled is older than this (a
	// target, the dedupe store or a retry holds it up). Default 3s.
	StallTimeout time.Duration `yaml:"stallTimeout"`
	// AckWait is the sources' ack deadline; the pipeline sends ErrInProgress
	// for every message older than AckWait/2 (every AckWait/4). Default 30s.
	AckWait time.Duration `yaml:"ackWait"`
	// Lanes is the number of ordering lanes: messages of one key always use
	// the same lane, and per key one message is between publish and confirm.
	// Keys sharing a lane do not wait for each other; a collision costs a
	// scan of the lane's short lists. Default MaxInFlight/4 (at least 1):
	// about four messages in flight per lane, short scans, and a lane array
	// small enough to stay in the CPU cache (4×MaxInFlight lanes cost ~6%
	// more CPU per message in BenchmarkPipeline, in cache misses on the lane
	// locks).
	Lanes int `yaml:"lanes"`
}

// RetryConfig is a capped exponential backoff.
type RetryConfig struct {
	Initial time.Duration `yaml:"initial"` // default 100ms
	Max     time.Duration `yaml:"max"`     // default 5s
}

// ByteSize is a size in bytes; in YAML it may be written as 1048576, "1MiB",
// "512KiB", "1MB" or "64kB".
type ByteSize int64

// UnmarshalText parses a size with an optional unit suffix.
func (b *ByteSize) UnmarshalText(text []byte) error {
	s := strings.TrimSpace(string(text))
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		n      int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"kB", 1000}, {"KB", 1000}, {"MB", 1000000}, {"GB", 1000000000}, {"B", 1}} {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.n
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64/mult {
		return fmt.Errorf("bad size %q: want a non-negative integer with optional unit B, kB, KiB, MB, MiB, GB, GiB", string(text))
	}
	*b = ByteSize(n * mult)
	return nil
}

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 4096
	}
	if c.FetchBatch == 0 {
		c.FetchBatch = 1024
	}
	if c.HoldDelay == 0 {
		c.HoldDelay = 5 * time.Second
	}
	if c.MaxHeld == 0 {
		c.MaxHeld = 10000
	}
	if c.HeldRecheck == 0 {
		c.HeldRecheck = time.Second
	}
	if c.Retry.Initial == 0 {
		c.Retry.Initial = 100 * time.Millisecond
	}
	if c.Retry.Max == 0 {
		c.Retry.Max = 5 * time.Second
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

// Validate reports every invalid field (after defaults), naming it as in the
// configuration file ("pipeline.maxInFlight: ...").
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, a ...any) {
		errs = append(errs, fmt.Errorf("pipeline.%s: %s", field, fmt.Sprintf(format, a...)))
	}
	if c.MaxInFlight < 1 {
		bad("maxInFlight", "must be at least 1, got %d", c.MaxInFlight)
	}
	if c.Workers < 0 {
		bad("workers", "must not be negative, got %d", c.Workers)
	}
	if c.FetchBatch < 1 {
		bad("fetchBatch", "must be at least 1, got %d", c.FetchBatch)
	}
	if c.HoldDelay < 0 {
		bad("holdDelay", "must not be negative, got %s", c.HoldDelay)
	}
	if c.MaxHeld < 0 {
		bad("maxHeld", "must not be negative, got %d", c.MaxHeld)
	}
	if c.HeldRecheck <= 0 {
		bad("heldRecheck", "must be positive, got %s", c.HeldRecheck)
	}
	if c.Retry.Initial <= 0 {
		bad("retry.initial", "must be positive, got %s", c.Retry.Initial)
	}
	if c.Retry.Max < c.Retry.Initial {
		bad("retry.max", "must be at least retry.initial (%s), got %s", c.Retry.Initial, c.Retry.Max)
	}
	if c.MaxMessageBytes < 1 {
		bad("maxMessageBytes", "must be positive, got %d", c.MaxMessageBytes)
	}
	if c.MaxHops < 1 {
		bad("maxHops", "must be at least 1, got %d", c.MaxHops)
	}
	if c.DrainTimeout <= 0 {
		bad("drainTimeout", "must be positive, got %s", c.DrainTimeout)
	}
	if c.ProgressTimeout <= 0 {
		bad("progressTimeout", "must be positive, got %s", c.ProgressTimeout)
	}
	if c.StallTimeout <= 0 {
		bad("stallTimeout", "must be positive, got %s", c.StallTimeout)
	}
	if c.AckWait < 4*time.Millisecond {
		bad("ackWait", "must be at least 4ms, got %s", c.AckWait)
	}
	if c.Lanes < 1 {
		bad("lanes", "must be at least 1, got %d", c.Lanes)
	}
	return errors.Join(errs...)
}
