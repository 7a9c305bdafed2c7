package natsjs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// LeaseConfig configures the JetStream KV bucket in which the replicas of
// partitioned rules announce themselves and hold their partitions.
type LeaseConfig struct {
	// Bucket is the KV bucket. Default "cellbridge-leases".
	Bucket string
	// TTL is how long a lease or a membership outlives its last renewal:
	// the partitions of a replica that vanished (kill -9, a lost network)
	// can be taken over this long after its last heartbeat. It is the
	// bucket's TTL (set when the bucket is created); a replica that finds
	// the bucket with another TTL uses the bucket's and logs a warning.
	// Default 6s, at least 2s.
	TTL time.Duration
	// Heartbeat is how often leases and the membership are renewed.
	// Default TTL/3; at most TTL/3, so that two renewals in a row can fail
	// before a lease expires.
	Heartbeat time.Duration
	// CallTimeout bounds each KV request. Default 1s; at most Heartbeat.
	CallTimeout time.Duration
	// Replicas is the bucket's replica count when cellbridge creates it
	// (3 on a 3-node cluster, like the source streams). Default 1.
	Replicas int
}

// DefaultLeaseBucket is LeaseConfig.Bucket's default.
const DefaultLeaseBucket = "cellbridge-leases"

func (c *LeaseConfig) defaults() error {
	if c.Bucket == "" {
		c.Bucket = DefaultLeaseBucket
	}
	if c.TTL == 0 {
		c.TTL = 6 * time.Second
	}
	if c.TTL < 2*time.Second {
		return fmt.Errorf("natsjs: leases: ttl %s is below 2s", c.TTL)
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = c.TTL / 3
	}
	if c.Heartbeat <= 0 || c.Heartbeat > c.TTL/3 {
		return fmt.Errorf("natsjs: leases: heartbeat %s must be positive and at most ttl/3 (%s)", c.Heartbeat, c.TTL/3)
	}
	if c.CallTimeout == 0 {
		c.CallTimeout = min(time.Second, c.Heartbeat)
	}
	if c.CallTimeout <= 0 || c.CallTimeout > c.Heartbeat {
		return fmt.Errorf("natsjs: leases: call timeout %s must be positive and at most the heartbeat (%s)", c.CallTimeout, c.Heartbeat)
	}
	if c.Replicas <= 0 {
		c.Replicas = 1
	}
	return nil
}

// leaseBucket is the KV bucket with the timings of its users. A lease (or
// a membership) is a key whose value names its holder (holderValue: the
// replica id and a nonce of the holding instance): Create takes it
// (exclusive: it fails while the key exists), a compare-and-set Update
// renews it, a Delete that names the last revision gives it up, and the
// bucket's TTL removes it when its holder stops renewing; the server then
// writes a marker (LimitMarkerTTL) that watchers see as a purge. Per-key
// TTLs are not used: an Update would drop them.
type leaseBucket struct {
	kv   jetstream.KeyValue
	nc   *nats.Conn
	ttl  time.Duration // the bucket's
	beat time.Duration
	call time.Duration
}

// openLeaseBucket opens cfg.Bucket, creating it when it does not exist.
// An existing bucket must expire keys (TTL) and write expiry markers; one
// that does not is refused, with what to change.
func openLeaseBucket(ctx context.Context, js jetstream.JetStream, cfg LeaseConfig, log *slog.Logger) (*leaseBucket, error) {
	b := &leaseBucket{nc: js.Conn(), ttl: cfg.TTL, beat: cfg.Heartbeat, call: cfg.CallTimeout}
	var kv jetstream.KeyValue
	err := b.retry(ctx, 10, func(ctx context.Context) error {
		var err error
		kv, err = js.KeyValue(ctx, cfg.Bucket)
		if errors.Is(err, jetstream.ErrBucketNotFound) {
			kv, err = js.CreateKeyValue(ctx, leaseKVConfig(cfg))
			if errors.Is(err, jetstream.ErrBucketExists) {
				kv, err = js.KeyValue(ctx, cfg.Bucket)
				if errors.Is(err, jetstream.ErrBucketNotFound) || errors.Is(err, jetstream.ErrStreamNotFound) {
					// Another replica is creating it (replicas of a
					// Deployment start together): its stream is not
					// visible yet; look again.
					err = fmt.Errorf("%w: %w", errBucketForming, err)
				}
			}
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("natsjs: lease bucket %s: %w", cfg.Bucket, err)
	}
	var st jetstream.KeyValueStatus
	if err := b.retryFor(ctx, startPatience, func(ctx context.Context) (err error) { st, err = kv.Status(ctx); return err }); err != nil {
		return nil, fmt.Errorf("natsjs: lease bucket %s: %w", cfg.Bucket, err)
	}
	if why := leaseBucketProblem(cfg, st.TTL(), st.LimitMarkerTTL()); why != "" {
		return nil, fmt.Errorf("natsjs: lease bucket %s %s", cfg.Bucket, why)
	}
	if st.TTL() != cfg.TTL {
		log.Warn("lease bucket has another TTL than configured; using the bucket's", "bucket", cfg.Bucket, "bucket_ttl", st.TTL(), "configured_ttl", cfg.TTL)
		b.ttl = st.TTL()
		b.beat = min(b.beat, b.ttl/3)
		b.call = min(b.call, b.beat)
	}
	b.kv = kv
	return b, nil
}

// leaseKVConfig is the lease bucket as cellbridge creates it.
func leaseKVConfig(cfg LeaseConfig) jetstream.KeyValueConfig {
	return jetstream.KeyValueConfig{
		Bucket:      cfg.Bucket,
		Description: "cellbridge partition leases, replica memberships and rules versions",
		History:     1,
		TTL:         cfg.TTL,
		// Markers live as long as a lease, so that a watcher whose
		// consumer was recreated after a reconnect still sees them.
		LimitMarkerTTL: max(time.Second, cfg.TTL),
		Replicas:       cfg.Replicas,
	}
}

// leaseBucketProblem says what makes an existing lease bucket with these
// TTLs unusable, and how to fix it; "" when it serves.
func leaseBucketProblem(cfg LeaseConfig, ttl, markerTTL time.Duration) string {
	switch {
	case ttl <= 0:
		return fmt.Sprintf("has no TTL: leases of a vanished replica would never expire; recreate it with a TTL (e.g. `nats kv add %s --ttl %s --marker-ttl %s --history 1`) or let cellbridge create it",
			cfg.Bucket, cfg.TTL, max(time.Second, cfg.TTL))
	case markerTTL <= 0:
		return fmt.Sprintf("writes no markers when keys expire (limit marker TTL 0): replicas would not notice a vanished one; recreate it with a marker TTL (e.g. `nats kv add %s --ttl %s --marker-ttl %s --history 1`) or let cellbridge create it",
			cfg.Bucket, ttl, max(time.Second, ttl))
	case ttl < 2*time.Second:
		return fmt.Sprintf("has TTL %s, below 2s", ttl)
	}
	return ""
}

// LeaseBucketPlan is the lease bucket of cfg as provisioning plans it:
// created as a partitioned source or the rules-version registry would
// create it; an existing one without a TTL or expiry markers is refused
// (it must be recreated), one with another TTL is kept and noted.
func LeaseBucketPlan(cfg LeaseConfig, uses []string) (BucketPlan, error) {
	if err := cfg.defaults(); err != nil {
		return BucketPlan{}, err
	}
	kc := leaseKVConfig(cfg)
	return BucketPlan{
		Bucket: cfg.Bucket, Uses: uses,
		Settings: fmt.Sprintf("ttl %s, expiry markers %s, history 1, replicas %d", fmtDur(kc.TTL), fmtDur(kc.LimitMarkerTTL), kc.Replicas),
		Create: func(ctx context.Context, js jetstream.JetStream) error {
			_, err := js.CreateKeyValue(ctx, kc)
			if errors.Is(err, jetstream.ErrBucketExists) {
				return nil
			}
			return err
		},
		Check: func(have jetstream.StreamConfig) (*jetstream.StreamConfig, []string, string) {
			if why := leaseBucketProblem(cfg, have.MaxAge, have.SubjectDeleteMarkerTTL); why != "" {
				return nil, nil, "the bucket " + why
			}
			return nil, nil, ""
		},
	}, nil
}

// errDisconnected fails a KV request at once while the connection is down:
// a request parked in the client's reconnect buffer could reach the server
// long after its caller gave up on it.
var errDisconnected = errors.New("natsjs: not connected")

// try runs one KV request with its own timeout (at most d).
func (b *leaseBucket) try(ctx context.Context, d time.Duration, f func(context.Context) error) error {
	if !b.nc.IsConnected() {
		return errDisconnected
	}
	cctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return f(cctx)
}

// retry runs f up to attempts times (each with CallTimeout) while it fails
// with a transient error: a timeout, no responders, a lost connection.
func (b *leaseBucket) retry(ctx context.Context, attempts int, f func(context.Context) error) error {
	var err error
	for i := range attempts {
		if err = b.try(ctx, b.call, f); err == nil || !kvTransient(err) || ctx.Err() != nil {
			return err
		}
		if i+1 < attempts {
			if !sleepCtx(ctx, retryPause(b.beat)) {
				return err
			}
		}
	}
	return err
}

// startPatience bounds the retries of a start-up request of the bucket
// (its status, the deployment registry's claim) while it fails
// transiently. The bucket may just have been created, and on a cluster its
// stream elects a leader first, the server answering "no responders"
// meanwhile: on a busy node that took longer than three quick attempts
// (half a second), and the process exited.
const startPatience = 10 * time.Second

// retryFor runs f like retry, for as long as d (or ctx) allows.
func (b *leaseBucket) retryFor(ctx context.Context, d time.Duration, f func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return b.retry(ctx, math.MaxInt, f)
}

// kvTransient reports whether a KV request may succeed when repeated: a
// transient API failure, or the connection down (also as found before
// sending), or a key released between two steps of a Create.
func kvTransient(err error) bool {
	return transient(err) || errors.Is(err, errDisconnected) || errors.Is(err, errFreed) || errors.Is(err, errBucketForming) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected)
}

// retryPause is the wait between two attempts of a failed request.
func retryPause(beat time.Duration) time.Duration { return min(beat/4, 250*time.Millisecond) }

// errBucketForming marks a lease bucket that exists but cannot be read
// yet: another replica is creating it.
var errBucketForming = errors.New("natsjs: lease bucket being created by another replica")

// errHeld is returned by create when another replica holds the key.
var errHeld = errors.New("natsjs: held by another replica")

// heldError is create's errHeld with what the key held: its value and
// revision (a holder that renews moves the revision).
type heldError struct {
	value string
	rev   uint64
}

func (e *heldError) Error() string { return fmt.Sprintf("%v (%s)", errHeld, e.value) }

func (e *heldError) Is(target error) bool { return target == errHeld }

// holderValue is the value of every key a holder writes: its replica id
// and a nonce of the holding instance ("<id>@<nonce>"). Only a key that
// holds exactly this value is the holder's own, so that two live instances
// configured with one replica id never take each other's leases for their
// own; holderID reads the id back.
func holderValue(id, nonce string) []byte { return []byte(id + "@" + nonce) }

// holderID is the replica id in a key's value (the whole value when it has
// no nonce).
func holderID(v string) string {
	id, _, _ := strings.Cut(v, "@")
	return id
}

// errFreed: the key was released between a failed Create and the look at
// its holder; the Create is worth repeating at once.
var errFreed = errors.New("natsjs: released meanwhile")

// create takes key for val and returns its revision and when the write
// that made it so was sent (the key lives at least the TTL from then), a
// *heldError (errHeld) when another holder has it, or the last error after
// a few attempts. A key that already holds exactly val is this holder's
// own (a Create of this instance whose answer was lost) and is adopted: it
// is renewed at once, because its last write may be nearly a TTL old.
func (b *leaseBucket) create(ctx context.Context, key string, val []byte) (uint64, time.Time, error) {
	var (
		rev  uint64
		sent time.Time
		held *heldError
	)
	err := b.retry(ctx, 3, func(ctx context.Context) error {
		held = nil
		at := time.Now()
		r, err := b.kv.Create(ctx, key, val)
		if errors.Is(err, jetstream.ErrKeyExists) {
			e, gerr := b.kv.Get(ctx, key)
			if errors.Is(gerr, jetstream.ErrKeyNotFound) || errors.Is(gerr, jetstream.ErrKeyDeleted) {
				return errFreed
			}
			if gerr != nil {
				return gerr
			}
			if e.Operation() != jetstream.KeyValuePut || !bytes.Equal(e.Value(), val) {
				held = &heldError{value: string(e.Value()), rev: e.Revision()}
				return held
			}
			at = time.Now()
			r, err = b.kv.Update(ctx, key, val, e.Revision())
			if errors.Is(err, jetstream.ErrKeyRevisionMismatch) || isWrongLastSeq(err) {
				return errFreed // it moved meanwhile: look again
			}
		}
		if err != nil {
			return err
		}
		rev, sent = r, at
		return nil
	})
	if errors.Is(err, errFreed) {
		// Taken by another, or moving, each time it was looked at.
		err = &heldError{value: "(changing)"}
		if held != nil {
			err = held
		}
	}
	return rev, sent, err
}

// release deletes key if its last revision is rev (so that it never
// deletes a later holder's lease). A key at another revision that still
// holds exactly val (this instance's id and nonce) is this holder's own: a
// renewal that the keeper's Stop cut off reached the server anyway, or its
// answer was lost; it is deleted at that revision. A key holding another
// value (another holder, or another instance with the same replica id), or
// none, is not ours any more: nothing to give up.
func (b *leaseBucket) release(ctx context.Context, key string, val []byte, rev uint64) error {
	for range 3 {
		moved := false
		err := b.retry(ctx, 3, func(ctx context.Context) error {
			err := b.kv.Delete(ctx, key, jetstream.LastRevision(rev))
			if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) && !isWrongLastSeq(err) {
				return err
			}
			e, gerr := b.kv.Get(ctx, key)
			switch {
			case gerr == nil && e.Operation() == jetstream.KeyValuePut && bytes.Equal(e.Value(), val):
				rev, moved = e.Revision(), true
				return nil
			case gerr == nil, errors.Is(gerr, jetstream.ErrKeyNotFound), errors.Is(gerr, jetstream.ErrKeyDeleted):
				return nil
			}
			return gerr
		})
		if err != nil || !moved {
			return err
		}
	}
	return fmt.Errorf("natsjs: lease %s: still moving after three releases; it expires after the TTL", key)
}

// isWrongLastSeq recognises a compare-and-set conflict of a publish.
func isWrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// keeper renews one key every Heartbeat until stopped, and reports the key
// lost when a renewal finds another revision (expired and maybe taken) or
// when no renewal succeeded for TTL - TTL/6: from then on the server may
// expire it at any moment, and its holder must behave as if it had.
type keeper struct {
	b    *leaseBucket
	key  string
	val  []byte
	lost chan struct{} // closed when the key is lost
	stop chan struct{} // closed by Stop
	done chan struct{} // closed when the goroutine ends
	once sync.Once

	mu  sync.Mutex
	rev uint64
}

// keep starts renewing key, last written at revision rev by a request
// sent at sent. Renewals are due a heartbeat after the last successful one
// was sent (the first a heartbeat after sent), not a heartbeat after the
// keeper started: a slow Create must not eat into the lease.
func (b *leaseBucket) keep(key string, val []byte, rev uint64, sent time.Time) *keeper {
	k := &keeper{b: b, key: key, val: val, rev: rev, lost: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	go k.run(sent)
	return k
}

// Lost is closed when the key is lost.
func (k *keeper) Lost() <-chan struct{} { return k.lost }

// Stop ends the renewals, waits for the goroutine and returns the last
// revision written. It is idempotent.
func (k *keeper) Stop() uint64 {
	k.once.Do(func() { close(k.stop) })
	<-k.done
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.rev
}

func (k *keeper) run(renewed time.Time) {
	defer close(k.done)
	b := k.b
	guard := b.ttl / 6
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-k.stop:
			cancel()
		case <-k.done:
		}
	}()
	t := time.NewTimer(time.Until(renewed.Add(b.beat)))
	defer t.Stop()
	for {
		select {
		case <-k.stop:
			return
		case <-t.C:
		}
		for {
			left := time.Until(renewed.Add(b.ttl - guard))
			if left <= 0 {
				close(k.lost)
				return
			}
			sent := time.Now()
			k.mu.Lock()
			rev := k.rev
			k.mu.Unlock()
			var nrev uint64
			err := b.try(ctx, min(b.call, left), func(ctx context.Context) (err error) {
				nrev, err = b.kv.Update(ctx, k.key, k.val, rev)
				return err
			})
			if err == nil {
				k.mu.Lock()
				k.rev = nrev
				k.mu.Unlock()
				renewed = sent
				break
			}
			if errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
				// Ours only if it still holds our value: an earlier
				// renewal whose answer was lost moved the revision.
				var e jetstream.KeyValueEntry
				gerr := b.try(ctx, min(b.call, left), func(ctx context.Context) (err error) {
					e, err = b.kv.Get(ctx, k.key)
					return err
				})
				switch {
				case gerr == nil && e.Operation() == jetstream.KeyValuePut && bytes.Equal(e.Value(), k.val):
					k.mu.Lock()
					k.rev = e.Revision()
					k.mu.Unlock()
					// The same revision again: the read came from a
					// replica of the bucket that is behind; pause
					// instead of asking again at once.
					if e.Revision() == rev && !sleepCtx(ctx, retryPause(b.beat)) {
						return
					}
					continue
				case gerr == nil || errors.Is(gerr, jetstream.ErrKeyNotFound) || errors.Is(gerr, jetstream.ErrKeyDeleted):
					close(k.lost)
					return
				}
			}
			if ctx.Err() != nil {
				return
			}
			if !sleepCtx(ctx, retryPause(b.beat)) {
				return
			}
		}
		t.Reset(time.Until(renewed.Add(b.beat)))
	}
}
