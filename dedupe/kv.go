package dedupe

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/jspub"
	"github.com/cellbridge/cellbridge/internal/retry"
)

// KVConfig configures NewJetStream. Zero fields take the defaults.
type KVConfig struct {
	// Bucket names the key-value bucket (stream KV_<Bucket>); required,
	// [A-Za-z0-9_-]+. Every replica of the bridge names the same bucket.
	Bucket string
	// TTL is how long a committed key is remembered (the bucket's max age).
	// Default DefaultTTL. It must exceed ReserveTTL.
	TTL time.Duration
	// ReserveTTL is how long a reservation lives without Commit or Release
	// (a per-message TTL, so whole seconds: rounded up, at least 1s).
	// Default DefaultReserveTTL.
	ReserveTTL time.Duration
	// Replicas of the bucket's stream when it is created. Default 1.
	Replicas int
	// Storage of the bucket's stream when it is created. The default,
	// jetstream.FileStorage, keeps the keys across server restarts.
	Storage jetstream.StorageType
	// Timeout fails a request whose reply has not come this long after it
	// was sent (a sweep enforces it: the failure comes between Timeout and
	// Timeout plus three sweeps of at most 1s each); an earlier deadline of
	// ctx ends the wait sooner. It also bounds each attempt of the bucket's
	// set-up in NewJetStream. Default DefaultKVTimeout (2s; at most half of
	// ReserveTTL); it must stay below ReserveTTL: a reservation must outlive
	// the requests of the call that holds it.
	Timeout time.Duration
	// Broker names the broker in logs and in reports of failed attempts.
	Broker string
	// Log receives one line per failed attempt of the bucket's set-up (it
	// is retried); nil: none.
	Log *slog.Logger
	// OnRequestError, when set, receives every failed attempt of the
	// bucket's set-up (an error naming the broker, server, request, attempt
	// and the wait before the next one). It must not block.
	OnRequestError func(error)
	// MaxPending caps the requests in flight on the connection at once;
	// more wait for a free slot (back-pressure). Default
	// jspub.DefaultMaxPending (4096), the bridge's default in-flight limit.
	MaxPending int
}

// KV is a Store in a JetStream key-value bucket shared by every replica of
// the bridge; the package documentation describes its protocol and why it
// is correct. It is safe for concurrent use, and calls from many goroutines
// are pipelined on the one connection. Errors name the operation and the
// bucket, never the key, and wrap the cause (context errors,
// nats.ErrNoResponders when JetStream or the bucket is gone, a
// *jetstream.APIError the stream returned, and for failures of the request
// itself jspub.ErrNotSent — nothing was written — or jspub.ErrNoReply — the
// write may have happened). A request made while the connection is down
// fails at once instead of waiting in the client's reconnect buffer; a
// Commit or Release that fails is written again in the background (see
// owedWrites). It owns one subscription (for replies) and two goroutines
// (timeouts and connection state; the owed writes), ended by Close; the
// connection stays the caller's. A
// direct get may be served by a lagging replica of a clustered stream; a
// stale read can only turn into InFlight (retry later) or into a refused
// conditional write that is retried, because every decision that changes a
// key is a compare-and-set made by the stream leader.
type KV struct {
	bucket    string
	replicas  int    // of the bucket's stream, when the store was opened
	prefix    string // "$KV.<bucket>."
	getPrefix string // direct get of the last message of a subject: + subject
	// directWait bounds a direct get before lookup asks the leader.
	directWait time.Duration
	// lostGrace is how long a lost reservation is left to this store's
	// own Reserve before it is released in the background (see
	// owedWrites): ReserveTTL/10, at least Timeout.
	lostGrace  time.Duration
	msgGet     string // the stream's leader's message get (consistent reads)
	client     *jspub.Client
	reserveHdr nats.Header // shared, read only
	reserveTTL string      // Nats-TTL value
	reserveFor time.Duration
	// ours starts every reservation value this store writes: "r" + the
	// store's random token + "-"; a counter per Reserve call follows.
	ours     []byte
	attempts atomic.Uint64
	// lost remembers the reservation values whose write may have been
	// stored although its reply was lost (see Reserve), per subject.
	lost lostWrites
	// owed are the commits and releases that failed, written again by
	// repayLoop until stop is closed (repayDone closes after it).
	owed      owedWrites
	nc        *nats.Conn
	stop      chan struct{}
	repayDone chan struct{}
	closed    atomic.Bool
	// check batches the reads of Check.
	check *checker
}

var _ Store = (*KV)(nil)

var bucketName = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

// Header names and values of the KV layout (as written by nats.go's KV).
const (
	hdrExpectLastSubjSeq = "Nats-Expected-Last-Subject-Sequence"
	hdrTTL               = "Nats-TTL"
	hdrKVOperation       = "KV-Operation"
	hdrMarkerReason      = "Nats-Marker-Reason"
	hdrRollup            = "Nats-Rollup"
)

var committedVal = []byte("c")

// NewJetStream opens the bucket cfg.Bucket, creating it when missing, and
// returns a KV store on js's connection (js's domain or API prefix is
// honoured). An existing bucket is adapted: per-message TTLs and direct gets
// are enabled and its max age set to cfg.TTL (the last replica to start
// decides the window); other settings, replicas and storage included, are
// left alone. The connection must support headers. Errors name the bucket.
// The store must be closed with Close.
func NewJetStream(ctx context.Context, js jetstream.JetStream, cfg KVConfig) (*KV, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	nc := js.Conn()
	if !nc.HeadersSupported() {
		return nil, fmt.Errorf("dedupe: bucket %q: %w", cfg.Bucket, nats.ErrHeadersNotSupported)
	}
	replicas, err := ensureBucket(ctx, js, cfg.policy(nc), cfg)
	if err != nil {
		return nil, fmt.Errorf("dedupe: bucket %q: %w", cfg.Bucket, err)
	}
	var token [8]byte
	_, _ = rand.Read(token[:]) // never fails (crypto/rand panics instead)
	c, err := jspub.NewClient(nc, jspub.Config{MaxPending: cfg.MaxPending, Timeout: cfg.Timeout})
	if err != nil {
		return nil, fmt.Errorf("dedupe: bucket %q: %w", cfg.Bucket, err)
	}
	ttl := strconv.FormatInt(int64(cfg.ReserveTTL/time.Second), 10) + "s"
	kv := &KV{
		bucket:     cfg.Bucket,
		replicas:   replicas,
		prefix:     "$KV." + cfg.Bucket + ".",
		getPrefix:  apiPrefix(js.Options()) + "DIRECT.GET.KV_" + cfg.Bucket + ".",
		directWait: max(cfg.Timeout/4, minDirectWait),
		lostGrace:  max(cfg.ReserveTTL/10, cfg.Timeout),
		msgGet:     apiPrefix(js.Options()) + "STREAM.MSG.GET.KV_" + cfg.Bucket,
		client:     c,
		reserveTTL: ttl,
		reserveFor: cfg.ReserveTTL,
		reserveHdr: nats.Header{hdrExpectLastSubjSeq: {"0"}, hdrTTL: {ttl}},
		ours:       []byte("r" + hex.EncodeToString(token[:]) + "-"),
		lost:       lostWrites{m: map[string]*lostWrite{}, ttl: cfg.ReserveTTL},
		owed:       newOwedWrites(cfg.ReserveTTL),
		nc:         nc,
		stop:       make(chan struct{}),
		repayDone:  make(chan struct{}),
	}
	if kv.check, err = newChecker(kv, nc, cfg.Timeout); err != nil {
		_ = c.Close(ctx)
		return nil, fmt.Errorf("dedupe: bucket %q: %w", cfg.Bucket, err)
	}
	go kv.repayLoop()
	return kv, nil
}

// policy bounds, retries, logs and reports the bucket's stream requests.
func (cfg KVConfig) policy(nc *nats.Conn) *retry.Policy {
	pol := &retry.Policy{Broker: cfg.Broker, Conn: nc, Timeout: cfg.Timeout, Log: cfg.Log}
	if f := cfg.OnRequestError; f != nil {
		pol.Report = func(ae *retry.AttemptError) { f(ae) }
	}
	return pol
}

// DefaultKVTimeout is KVConfig.Timeout's default.
const DefaultKVTimeout = 2 * time.Second

// ensureBucket creates the bucket's stream or adapts an existing one, and
// returns the stream's replica count.
//
// The stream is laid out exactly as nats.go lays out a KV bucket (so `nats
// kv` and jetstream.KeyValue work on it) with per-message TTLs allowed but
// without subject delete markers: nothing here reads markers left by
// expiry, and writing one per expired key would double the server's writes.
func ensureBucket(ctx context.Context, js jetstream.JetStream, pol *retry.Policy, cfg KVConfig) (int, error) {
	name := "KV_" + cfg.Bucket
	scfg := bucketStream(cfg)
	_, err := retry.Do(ctx, pol, retry.OpKVBucket, "create "+name, func(ctx context.Context) (jetstream.Stream, error) {
		return js.CreateStream(ctx, scfg)
	})
	if err == nil {
		return max(scfg.Replicas, 1), nil
	}
	if !errors.Is(err, jetstream.ErrStreamNameAlreadyInUse) {
		return 0, fmt.Errorf("create stream: %w", err)
	}
	s, err := retry.Do(ctx, pol, retry.OpKVBucket, "open "+name, func(ctx context.Context) (jetstream.Stream, error) {
		return js.Stream(ctx, name)
	})
	if err != nil {
		return 0, fmt.Errorf("open stream: %w", err)
	}
	have := s.CachedInfo().Config
	if len(have.Subjects) != 1 || have.Subjects[0] != scfg.Subjects[0] {
		return 0, fmt.Errorf("stream %s is not a key-value bucket (subjects %v)", name, have.Subjects)
	}
	replicas := max(have.Replicas, 1)
	if have.AllowMsgTTL && have.AllowDirect && have.MaxAge == cfg.TTL && have.Duplicates <= cfg.TTL {
		return replicas, nil
	}
	have.AllowMsgTTL = true
	have.AllowDirect = true // lookups are direct gets
	have.MaxAge = cfg.TTL
	if have.Duplicates > cfg.TTL {
		have.Duplicates = cfg.TTL
	}
	if _, err := retry.Do(ctx, pol, retry.OpKVBucket, "update "+name, func(ctx context.Context) (jetstream.Stream, error) {
		return js.UpdateStream(ctx, have)
	}); err != nil {
		return 0, fmt.Errorf("update stream: %w", err)
	}
	return replicas, nil
}

// apiPrefix is the JetStream API prefix js sends requests to, as nats.go
// derives it from a domain or a custom prefix.
func apiPrefix(o jetstream.JetStreamOptions) string {
	switch {
	case o.Domain != "":
		return "$JS." + o.Domain + ".API."
	case o.APIPrefix != "":
		return strings.TrimSuffix(o.APIPrefix, ".") + "."
	}
	return jetstream.DefaultAPIPrefix
}

// subject returns the bucket subject of key; one allocation.
func (kv *KV) subject(key string) string {
	var b strings.Builder
	b.Grow(len(kv.prefix) + encodedKeyLen(key))
	b.WriteString(kv.prefix)
	appendKey(&b, key)
	return b.String()
}

// opErr wraps err with the operation and bucket (never the key: callers
// log these errors). A request refused or cut short by Close also wraps
// ErrClosed, as the Store contract promises.
func (kv *KV) opErr(op string, err error) error {
	if errors.Is(err, jspub.ErrClosed) && !errors.Is(err, ErrClosed) {
		return fmt.Errorf("dedupe: %s in bucket %q: %w (%w)", op, kv.bucket, err, ErrClosed)
	}
	return fmt.Errorf("dedupe: %s in bucket %q: %w", op, kv.bucket, err)
}

// isWrongLastSeq reports a failed expected-sequence check (10164 on
// replicated streams).
func isWrongLastSeq(err error) bool {
	var ae *jetstream.APIError
	return errors.As(err, &ae) && (ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// maxReserveAttempts bounds the create-read-create loop: each failed
// attempt means another writer changed the key in between, and after a few
// the key is busy enough to call InFlight.
const maxReserveAttempts = 4

// Reserve implements Store: one round trip for a new key, two or three for
// a key that exists (one or two after a lost reply of this store's).
//
// Each call writes its own value (the store's token and a counter). When
// the reply to that write is lost (jspub.ErrNoReply: a timeout, a dropped
// connection) the write may still have been stored, and the call fails; the
// value is remembered for ReserveTTL. A later Reserve of the key that finds
// a remembered value of its own store there takes the reservation over and
// returns Reserved at once, instead of waiting ReserveTTL for a reservation
// nobody holds; only one call can take a remembered value over. Any other
// reservation of this store (a concurrent call for the same key) is
// InFlight, as another replica's is.
//
// A key whose Commit by this store failed is a Duplicate without a round
// trip (the message is stored downstream; the commit is written in the
// background); a reservation of this store whose Release failed is taken
// over like a lost one, unless the background write is removing it (then
// InFlight, see owedWrites).
func (kv *KV) Reserve(ctx context.Context, key string) (Outcome, error) {
	if kv.closed.Load() {
		return 0, kv.opErr("reserve", ErrClosed)
	}
	subj := kv.subject(key)
	owed := kv.owed.owes(subj)
	if owed == owedCommit {
		return Duplicate, nil
	}
	hdr := kv.reserveHdr
	val := kv.newValue()
	// After a lost reply or a failed release the key most likely holds a
	// reservation of this store: read first (one round trip) instead of a
	// create that would be refused.
	read := owed == owedRelease || kv.lost.has(subj)
	// claimed: this call holds the owed release of subj (claimRelease), so
	// that the background release leaves the key alone while it reserves;
	// whatever the outcome, the claim is settled before returning.
	claimed := false
	settle := func(took bool) {
		switch {
		case !claimed:
		case took:
			kv.owed.paid(subj, 0)
		default:
			kv.owed.unclaimRelease(subj)
		}
	}
	for range maxReserveAttempts {
		if !read {
			// A new reservation while a release is owed: claim the debt
			// first, so that the background release cannot take the new
			// reservation for the old one (when it claimed first, it is
			// purging the old one: wait for it).
			if !claimed && kv.owed.owes(subj) == owedRelease {
				if !kv.owed.claimRelease(subj, 0) {
					return InFlight, nil
				}
				claimed = true
			}
			_, err := kv.client.Publish(ctx, subj, hdr, val)
			if err == nil {
				settle(true)
				return Reserved, nil
			}
			if errors.Is(err, jspub.ErrNoReply) {
				settle(false)
				kv.lostReply(subj, val)
				return 0, kv.opErr("reserve", err)
			}
			if !isWrongLastSeq(err) {
				settle(false)
				return 0, kv.opErr("reserve", err)
			}
		}
		read = false
		st, rev, cur, err := kv.lookup(ctx, subj)
		if err != nil {
			settle(false)
			return 0, kv.opErr("reserve", err)
		}
		switch st {
		case kvCommitted:
			settle(true) // nothing to release any more
			return Duplicate, nil
		case kvOurs:
			// A reservation of this store that no caller holds (its
			// holder gave it up and the release failed, or its write's
			// reply was lost) is taken over, by one call only.
			if !claimed && kv.owed.owes(subj) == owedRelease && kv.owed.releaseFor(subj, rev) {
				if !kv.owed.claimRelease(subj, rev) {
					return InFlight, nil // the background release is purging it
				}
				claimed = true
			}
			// A release claimed before the read (the create path) whose
			// reservation is not this one (a concurrent Reserve of this
			// store wrote it over the released one's marker) is not a
			// licence to take it over: given back.
			if claimed && !kv.owed.releaseFor(subj, rev) {
				settle(false)
				claimed = false
			}
			// The lost value is forgotten in either case: once this call
			// holds the reservation, no later call may take it over.
			took := kv.lost.claim(subj, cur)
			if claimed || took {
				settle(true)
				return Reserved, nil
			}
			return InFlight, nil
		case kvReserved:
			settle(false)
			return InFlight, nil
		case kvAbsent: // expired between the create and the read, or never written
			hdr = kv.reserveHdr
		case kvMarker: // released or deleted: create on top of the marker
			hdr = kv.reserveOver(rev)
		}
	}
	settle(false)
	return InFlight, nil
}

// newValue is a reservation value of this store: its prefix and a counter.
func (kv *KV) newValue() []byte {
	return strconv.AppendUint(append(make([]byte, 0, len(kv.ours)+13), kv.ours...), kv.attempts.Add(1), 36)
}

// reserveOver is the header of a reservation written on top of the key's
// message at revision rev (a release marker, another holder's
// reservation): refused if the key changed since.
func (kv *KV) reserveOver(rev uint64) nats.Header {
	return nats.Header{hdrExpectLastSubjSeq: {strconv.FormatUint(rev, 10)}, hdrTTL: {kv.reserveTTL}}
}

// lostReply records a reservation write of val on subj whose reply was
// lost: it may be stored; this store's next Reserve of the key takes it
// over, or the background release removes it (owedWrites).
func (kv *KV) lostReply(subj string, val []byte) {
	kv.lost.remember(subj, val)
	kv.owed.owe(subj, owedLost, kv.lostGrace, 0)
}

// lostWrites remembers, per key subject, the reservation values whose
// write got no reply, for ReserveTTL after the last one (a value stored
// then is gone by then: the server removes it after ReserveTTL). Entries
// are made only on failures, so the map stays small; an insertion sweeps
// expired entries once the map holds many.
type lostWrites struct {
	mu  sync.Mutex
	m   map[string]*lostWrite
	ttl time.Duration
}

type lostWrite struct {
	vals  [][]byte
	until time.Time
}

// maxLostPerKey bounds the values remembered per key (the oldest goes).
const maxLostPerKey = 8

func (l *lostWrites) remember(subj string, val []byte) {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.m) >= 1024 {
		for k, w := range l.m {
			if now.After(w.until) {
				delete(l.m, k)
			}
		}
	}
	w := l.m[subj]
	if w == nil || now.After(w.until) {
		w = &lostWrite{}
		l.m[subj] = w
	}
	if len(w.vals) == maxLostPerKey {
		w.vals = w.vals[1:]
	}
	w.vals = append(w.vals, val)
	w.until = now.Add(l.ttl)
}

// has reports whether subj has remembered lost writes.
func (l *lostWrites) has(subj string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.m[subj]
	return w != nil && time.Now().Before(w.until)
}

// claim reports whether val is a remembered lost write of subj, and forgets
// it if so: the caller holds that reservation now. The key's other lost
// writes stay remembered: each is conditional on the key having no message,
// so it can be stored only after this reservation is gone, and then nobody
// holds it either.
func (l *lostWrites) claim(subj string, val []byte) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	w := l.m[subj]
	if w == nil || time.Now().After(w.until) {
		return false
	}
	for i, v := range w.vals {
		if bytes.Equal(v, val) {
			w.vals = append(w.vals[:i], w.vals[i+1:]...)
			if len(w.vals) == 0 {
				delete(l.m, subj)
			}
			return true
		}
	}
	return false
}

// Commit implements Store: one round trip, awaited. When it fails (and ctx
// has not ended: the caller did not give the write up) the store goes on
// writing the commit in the background (see owedWrites) for up to
// ReserveTTL, and the error is returned all the same.
func (kv *KV) Commit(ctx context.Context, key string) error {
	if kv.closed.Load() {
		return kv.opErr("commit", ErrClosed)
	}
	subj := kv.subject(key)
	return kv.write(ctx, "commit", owedCommit, subj, func() (uint64, error) {
		_, err := kv.client.Publish(ctx, subj, nil, committedVal)
		return 0, err
	})
}

// Release implements Store: a read, then (if the reservation is still this
// replica's) a purge marker conditional on its revision. The marker carries
// a short TTL so that it does not outlive its use. When it fails (and ctx
// has not ended) the store goes on releasing in the background (see
// owedWrites) for up to ReserveTTL, and the error is returned all the same.
func (kv *KV) Release(ctx context.Context, key string) error {
	if kv.closed.Load() {
		return kv.opErr("release", ErrClosed)
	}
	subj := kv.subject(key)
	if kv.owed.owes(subj) == owedCommit {
		return nil // a commit is on its way: nothing to release
	}
	return kv.write(ctx, "release", owedRelease, subj, func() (uint64, error) { return kv.release(ctx, subj) })
}

// write runs Commit's or Release's request for subj: on success any debt
// of the key is paid; on failure, unless ctx ended, the store owes the
// write and repeats it in the background (owedWrites).
func (kv *KV) write(ctx context.Context, op string, kind owedKind, subj string, req func() (uint64, error)) error {
	if rev, err := req(); err != nil {
		if ctx.Err() == nil {
			kv.owed.owe(subj, kind, 0, rev)
		}
		return kv.opErr(op, err)
	}
	kv.owed.paid(subj, 0)
	return nil
}

// release is Release's read and conditional purge of subj; on failure it
// returns the revision it purged at (0: the read failed, nothing was sent).
func (kv *KV) release(ctx context.Context, subj string) (uint64, error) {
	// Read from the stream's leader: a direct get may be answered by a
	// replica that has not applied the reservation yet (right after a
	// leader change, a server catching up), and a release that believed it
	// would leave the reservation in place, blocking the key's next
	// Reserve (InFlight) until it expires after ReserveTTL.
	st, rev, _, err := kv.lookupLeader(ctx, subj)
	if err != nil {
		return 0, err
	}
	if st != kvOurs {
		return 0, nil
	}
	return rev, kv.purge(ctx, subj, rev)
}

// purge writes a purge marker on subj if its last message is still rev (a
// 1s TTL, so that the marker does not linger); a refusal means the key
// changed meanwhile and is no longer this store's: not an error.
func (kv *KV) purge(ctx context.Context, subj string, rev uint64) error {
	hdr := nats.Header{
		hdrKVOperation:       {"PURGE"},
		hdrRollup:            {"sub"},
		hdrExpectLastSubjSeq: {strconv.FormatUint(rev, 10)},
		hdrTTL:               {"1s"},
	}
	_, err := kv.client.Publish(ctx, subj, hdr, nil)
	if err != nil && !isWrongLastSeq(err) {
		return err
	}
	return nil
}

// Close makes later calls return ErrClosed, makes one last attempt (within
// ctx) at the commits and releases that failed and are still owed, waits
// for the requests in flight until ctx ends (those still unanswered then
// return an error wrapping ErrClosed), and ends the store's subscription and
// goroutines. The connection is left open. Close is idempotent.
func (kv *KV) Close(ctx context.Context) error {
	if !kv.closed.Swap(true) {
		close(kv.stop)
		<-kv.repayDone
		// One last attempt at the owed writes (within ctx): another
		// replica meets a reservation left here as InFlight until it
		// expires.
		kv.repay(ctx)
		kv.check.close()
	}
	if err := kv.client.Close(ctx); err != nil {
		return kv.opErr("close", err)
	}
	return nil
}

// lookupLeader is lookup answered by the stream's leader (the message get
// API: a JSON request and answer), for a read that must see every write
// the leader confirmed.
func (kv *KV) lookupLeader(ctx context.Context, subj string) (kvState, uint64, []byte, error) {
	m, err := kv.client.Request(ctx, kv.msgGet, nil, leaderGetReq(subj))
	if err != nil {
		return 0, 0, nil, err
	}
	return kv.leaderAnswer(m)
}

// leaderGetReq is the message get request for subj's last message.
func leaderGetReq(subj string) []byte {
	req, _ := json.Marshal(map[string]string{"last_by_subj": subj})
	return req
}

// leaderAnswer reads the stream leader's answer to leaderGetReq.
func (kv *KV) leaderAnswer(m *nats.Msg) (kvState, uint64, []byte, error) {
	if len(m.Data) == 0 {
		if m.Header.Get("Status") == "503" {
			return 0, 0, nil, jspub.ErrNoStream // wraps nats.ErrNoResponders
		}
		return 0, 0, nil, fmt.Errorf("message get: empty answer (status %s %s)", m.Header.Get("Status"), m.Header.Get("Description"))
	}
	var resp struct {
		Error *struct {
			Code        int    `json:"code"`
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
		Message *struct {
			Seq  uint64 `json:"seq"`
			Hdrs []byte `json:"hdrs"`
			Data []byte `json:"data"`
		} `json:"message"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return 0, 0, nil, fmt.Errorf("message get: %w", err)
	}
	switch {
	case resp.Error != nil && resp.Error.ErrCode == int(jetstream.JSErrCodeMessageNotFound):
		return kvAbsent, 0, nil, nil
	case resp.Error != nil:
		return 0, 0, nil, fmt.Errorf("message get: %s (code %d, error code %d)", resp.Error.Description, resp.Error.Code, resp.Error.ErrCode)
	case resp.Message == nil:
		return 0, 0, nil, errors.New("message get: no message in the answer")
	}
	msg := resp.Message
	var hdr nats.Header
	if len(msg.Hdrs) > 0 {
		h, err := nats.DecodeHeadersMsg(msg.Hdrs)
		if err != nil {
			return 0, 0, nil, fmt.Errorf("message get: headers: %w", err)
		}
		hdr = h
	}
	st, val, err := kv.classify(hdr, msg.Data)
	if err != nil {
		return 0, 0, nil, fmt.Errorf("%w at revision %d", err, msg.Seq)
	}
	return st, msg.Seq, val, nil
}

// errUnexpectedValue is classify's answer for a value this package did not
// write: it refuses to guess. Calling it a duplicate could drop a message;
// an error keeps it unacknowledged and counted.
var errUnexpectedValue = errors.New("unexpected value")

// classify tells the state of a key from its last message (headers and
// value); for a reservation of this store it returns the value. Direct
// gets, batched ones and the leader's message get all answer through it.
func (kv *KV) classify(h nats.Header, data []byte) (kvState, []byte, error) {
	if h.Get(hdrKVOperation) != "" || h.Get(hdrMarkerReason) != "" {
		return kvMarker, nil, nil
	}
	switch {
	case bytes.Equal(data, committedVal):
		return kvCommitted, nil, nil
	case bytes.HasPrefix(data, kv.ours):
		return kvOurs, data, nil
	case len(data) > 0 && data[0] == 'r':
		return kvReserved, nil, nil
	}
	return 0, nil, errUnexpectedValue
}

type kvState uint8

const (
	kvAbsent kvState = iota
	kvMarker
	kvCommitted
	kvReserved // by another replica
	kvOurs     // reserved by this store (any of its Reserve calls)
)

// minDirectWait is the shortest wait for a direct get before the leader is
// asked (KVConfig.Timeout/4 otherwise).
const minDirectWait = 50 * time.Millisecond

// lookup reads the latest message of a key with a direct get (through the
// same pipe: one round trip, no per-request subscription or JSON). For a
// reservation of this store it also returns the value.
//
// Any replica of the bucket's stream may answer a direct get. While a
// server of the cluster is frozen (SIGSTOP, a stalled VM) its routes stay
// open and its subscriptions known, and the fault tests measured about one
// lookup in three left unanswered until the request timeout, key after key
// (the stream's leader, which answers the writes, was not affected). A
// direct get without an answer within Timeout/4 is therefore asked again of
// the stream's leader (lookupLeader) with what is left of ctx.
func (kv *KV) lookup(ctx context.Context, subj string) (kvState, uint64, []byte, error) {
	dctx, cancel := context.WithTimeout(ctx, kv.directWait)
	st, seq, val, err := kv.directGet(dctx, subj)
	cancel()
	if err != nil && ctx.Err() == nil && errors.Is(err, jspub.ErrNoReply) && errors.Is(err, context.DeadlineExceeded) {
		return kv.lookupLeader(ctx, subj)
	}
	return st, seq, val, err
}

// directGet is lookup's direct get.
func (kv *KV) directGet(ctx context.Context, subj string) (kvState, uint64, []byte, error) {
	m, err := kv.client.Request(ctx, kv.getPrefix+subj, nil, nil)
	if err != nil {
		return 0, 0, nil, err
	}
	if len(m.Data) == 0 {
		switch status := m.Header.Get("Status"); status {
		case "":
		case "404":
			return kvAbsent, 0, nil, nil
		case "503":
			return 0, 0, nil, jspub.ErrNoStream // wraps nats.ErrNoResponders
		default:
			return 0, 0, nil, fmt.Errorf("direct get: status %s %s", status, m.Header.Get("Description"))
		}
	}
	seq, err := strconv.ParseUint(m.Header.Get(jetstream.SequenceHeader), 10, 64)
	if err != nil {
		return 0, 0, nil, fmt.Errorf("direct get: bad %s header: %w", jetstream.SequenceHeader, err)
	}
	st, val, err := kv.classify(m.Header, m.Data)
	if err != nil {
		return 0, 0, nil, fmt.Errorf("%w at revision %d", err, seq)
	}
	return st, seq, val, nil
}
