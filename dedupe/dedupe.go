package dedupe

import (
	"context"
	"errors"
	"time"
)

// Outcome is the result of Store.Reserve.
type Outcome uint8

const (
	// Reserved: the caller owns the key now. It must publish, then Commit
	// after the sink confirmed, or Release when publishing failed.
	Reserved Outcome = iota + 1
	// Duplicate: the key was committed within the TTL window; the message
	// was forwarded before and must not be published again.
	Duplicate
	// InFlight: another worker or replica holds an unexpired reservation.
	// The caller must not publish; it retries later (the holder either
	// commits, turning the key into a Duplicate, or releases it, or its
	// reservation expires after ReserveTTL).
	InFlight
)

// String returns "reserved", "duplicate", "in_flight" or "unknown".
func (o Outcome) String() string {
	switch o {
	case Reserved:
		return "reserved"
	case Duplicate:
		return "duplicate"
	case InFlight:
		return "in_flight"
	}
	return "unknown"
}

// Store records idempotency keys. Implementations are safe for concurrent
// use by any number of goroutines. Every method returns ErrClosed after
// Close. A nil error from Commit or Release means the change is recorded;
// any other error means it may or may not be (the caller keeps the source
// message unacknowledged and retries).
type Store interface {
	// Reserve claims key for the caller unless it is committed (Duplicate)
	// or reserved by someone else and not yet expired (InFlight). A
	// reservation expires after the store's ReserveTTL, so a crashed
	// holder never blocks a key for good.
	Reserve(ctx context.Context, key string) (Outcome, error)
	// Commit marks key as forwarded for the store's TTL window. It is
	// called only after the sink confirmed the message; it succeeds whether
	// or not the caller's reservation still exists, because the fact it
	// records (the message is stored downstream) is true either way.
	Commit(ctx context.Context, key string) error
	// Release drops the caller's reservation after a failed publish, so
	// the key can be reserved again at once. It never removes a commit
	// and is a no-op when the reservation is gone or held by another
	// replica.
	Release(ctx context.Context, key string) error
	// Close releases the store's resources. It does not close connections
	// the store was given.
	Close(ctx context.Context) error
	// Local reports whether every call completes in-process without
	// waiting on I/O. The bridge then runs a message's route, Reserve and
	// publish on the goroutine that delivered it and completes a
	// confirmation on the sink's goroutine; a store whose calls are round
	// trips (Local false) gets a pool of workers instead. A wrapper that
	// embeds a Store inherits the answer of the store it wraps.
	Local() bool
}

// ErrClosed is returned by every Store method called after Close.
var ErrClosed = errors.New("dedupe: store closed")

// Defaults used when a config field is zero or negative.
const (
	DefaultTTL        = 10 * time.Minute
	DefaultReserveTTL = 30 * time.Second
	DefaultSize       = 1_000_000
)

// Handle names the slot a HandleStore reserved a key in, so that the commit
// after the publish need not look the key up again. The zero Handle names
// nothing (CommitHandle then looks the key up). A Handle is only a hint: a
// store checks that it still names the key's slot before using it.
type Handle struct {
	shard uint32
	idx   int32
	gen   uint32
}

// HandleStore is an optional fast path of a Store. The bridge uses it when
// the store implements it; the outcomes are exactly those of Reserve and
// Commit.
type HandleStore interface {
	Store
	// ReserveHandle is Reserve, also returning a Handle for CommitHandle.
	ReserveHandle(ctx context.Context, key string) (Outcome, Handle, error)
	// CommitHandle is Commit(ctx, key), using h (from ReserveHandle for the
	// same key) to find the key's entry when h still names it.
	CommitHandle(ctx context.Context, key string, h Handle) error
	// ReleaseHandle is Release(ctx, key) for the reservation h names: it
	// drops the key's reservation only if it is still the one h's
	// ReserveHandle took. Once that one expired and another attempt
	// reserved the key again, the later reservation stays (Release, which
	// cannot tell the two apart, would free it, and a third attempt could
	// then publish beside the second). The zero Handle names no
	// reservation: with it, ReleaseHandle is Release.
	ReleaseHandle(ctx context.Context, key string, h Handle) error
}

// Local reports false: every call of the KV store is a round trip to the
// JetStream server.
func (kv *KV) Local() bool { return false }
