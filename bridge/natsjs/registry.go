package natsjs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// RegistryConfig configures a Registry.
type RegistryConfig struct {
	// Leases is the bucket the records live in, with its timings: the
	// lease bucket of partitioned rules (a record is a membership of the
	// deployment, renewed every Heartbeat and gone one TTL after the last
	// renewal).
	Leases LeaseConfig
	// Deployment names the deployment (config deployment.name): its
	// replicas share one highest version.
	Deployment string
	// ReplicaID is this replica's id. Default: the host name and a random
	// suffix, as for partitioned sources.
	ReplicaID string
}

// Registry is one replica's entry in its deployment's registry of rules
// versions, kept in the lease bucket: a record of the replica (its id and
// whatever the caller publishes, renewed every heartbeat and removed by
// the bucket's TTL when the replica vanishes), and the highest rules
// version the deployment has run, which never expires. Keys:
//
//	_rules.<deployment>.max           the highest version (HighWater, JSON)
//	_rules.<deployment>.r.<replica>   a replica's record
//
// The highest version only goes up: Claim raises it with a compare-and-set
// write, and refuses a version below it. Methods are safe for concurrent
// use.
type Registry struct {
	b      *leaseBucket
	depl   string
	js     jetstream.JetStream
	bucket string
	id     string
	key    string // the record
	maxKey string
	log    *slog.Logger

	mu      sync.Mutex
	record  func() []byte
	started bool
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
}

// registryPrefix is the key prefix of a deployment's registry; the leading
// '_' keeps it apart from partition keys, which start with a consumer group.
func registryPrefix(deployment string) string { return "_rules." + deployment + "." }

// HighWater is the highest rules version a deployment has run.
type HighWater struct {
	Version int64 `json:"version"`
	// Fingerprint identifies the rule files of that version
	// (router.Table.Fingerprint).
	Fingerprint string    `json:"fingerprint"`
	Replica     string    `json:"replica"`
	At          time.Time `json:"at"`
}

// LowerVersionError is Claim's refusal of a version below the
// deployment's highest, or of the highest version with other files.
type LowerVersionError struct {
	Deployment string
	Version    int64
	Highest    HighWater
}

func (e *LowerVersionError) Error() string {
	if e.Version == e.Highest.Version {
		return fmt.Sprintf("rules version %d has other content than the version %d deployment %s has run (replica %s, %s): give changed rules a new version; to roll back, write the old content as version %d",
			e.Version, e.Highest.Version, e.Deployment, e.Highest.Replica, e.Highest.At.Format(time.RFC3339), e.Highest.Version+1)
	}
	return fmt.Sprintf("rules version %d is lower than version %d, which deployment %s has already run (replica %s, %s): rules versions only go up; to roll back, write the old content as version %d",
		e.Version, e.Highest.Version, e.Deployment, e.Highest.Replica, e.Highest.At.Format(time.RFC3339), e.Highest.Version+1)
}

// OpenRegistry opens (creating it when missing) the lease bucket for this
// replica's registry entry. Nothing is written before Claim or Start.
func OpenRegistry(ctx context.Context, js jetstream.JetStream, cfg RegistryConfig, log *slog.Logger) (*Registry, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Leases.defaults(); err != nil {
		return nil, err
	}
	if cfg.ReplicaID == "" {
		cfg.ReplicaID = defaultReplicaID()
	}
	if !validReplicaID(cfg.ReplicaID) || !validReplicaID(cfg.Deployment) {
		return nil, fmt.Errorf("natsjs: registry: deployment %q and replica id %q: letters, digits, '_' and '-' only, at most 128", cfg.Deployment, cfg.ReplicaID)
	}
	b, err := openLeaseBucket(ctx, js, cfg.Leases, log)
	if err != nil {
		return nil, err
	}
	p := registryPrefix(cfg.Deployment)
	return &Registry{b: b, depl: cfg.Deployment, js: js, bucket: cfg.Leases.Bucket, id: cfg.ReplicaID, key: p + "r." + cfg.ReplicaID, maxKey: p + "max",
		log:  log.With("component", "registry", "deployment", cfg.Deployment, "replica", cfg.ReplicaID),
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}, nil
}

// ReplicaID returns this replica's id.
func (r *Registry) ReplicaID() string { return r.id }

// Claim checks version against the deployment's highest version and
// raises the highest to it: a lower version, or the highest with another
// fingerprint, is refused with a *LowerVersionError. Requests are retried
// while they fail transiently, within ctx.
func (r *Registry) Claim(ctx context.Context, version int64, fingerprint string) error {
	for range 10 {
		hw, rev, err := r.highest(ctx)
		if err != nil {
			return err
		}
		if hw.Version > version || (hw.Version == version && hw.Fingerprint != "" && hw.Fingerprint != fingerprint) {
			return &LowerVersionError{Deployment: r.depl, Version: version, Highest: hw}
		}
		if hw.Version == version {
			return nil
		}
		val, _ := json.Marshal(HighWater{Version: version, Fingerprint: fingerprint, Replica: r.id, At: time.Now().UTC()})
		err = r.b.retryFor(ctx, startPatience, func(ctx context.Context) error {
			m := nats.NewMsg("$KV." + r.bucket + "." + r.maxKey)
			m.Data = val
			// The highest version outlives the bucket's TTL: it is the
			// deployment's memory across restarts.
			m.Header.Set(jetstream.MsgTTLHeader, "never")
			m.Header.Set(jetstream.ExpectedLastSubjSeqHeader, strconv.FormatUint(rev, 10))
			_, err := r.js.PublishMsg(ctx, m)
			return err
		})
		if isWrongLastSeq(err) {
			continue // another replica raised it meanwhile: look again
		}
		if err != nil {
			return fmt.Errorf("natsjs: registry: raising the highest rules version of %s to %d: %w", r.maxKey, version, err)
		}
		r.log.Info("deployment's highest rules version raised", "from", hw.Version, "to", version)
		return nil
	}
	return fmt.Errorf("natsjs: registry: raising %s to %d: too many concurrent changes", r.maxKey, version)
}

// highest reads the highest version and its revision (0: none yet).
func (r *Registry) highest(ctx context.Context) (HighWater, uint64, error) {
	var hw HighWater
	var e jetstream.KeyValueEntry
	err := r.b.retryFor(ctx, startPatience, func(ctx context.Context) (err error) { e, err = r.b.kv.Get(ctx, r.maxKey); return err })
	switch {
	case errors.Is(err, jetstream.ErrKeyNotFound):
		return hw, 0, nil
	case err != nil:
		return hw, 0, fmt.Errorf("natsjs: registry: reading %s: %w", r.maxKey, err)
	}
	if err := json.Unmarshal(e.Value(), &hw); err != nil {
		return hw, 0, fmt.Errorf("natsjs: registry: %s holds no version: %w", r.maxKey, err)
	}
	return hw, e.Revision(), nil
}

// Start publishes record() as this replica's record now and then every
// heartbeat until Close; Refresh publishes it at once. record must be
// safe to call from another goroutine. A failed write is logged and
// retried at the next heartbeat.
func (r *Registry) Start(record func() []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.started {
		return
	}
	r.started, r.record = true, record
	go r.run()
}

// Refresh publishes the record at once (after a rules reload), without
// waiting for the write.
func (r *Registry) Refresh() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

func (r *Registry) run() {
	defer close(r.done)
	t := time.NewTicker(r.b.beat)
	defer t.Stop()
	failing := false
	for {
		ctx, cancel := context.WithCancel(context.Background())
		go func() {
			select {
			case <-r.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		err := r.b.try(ctx, r.b.call, func(ctx context.Context) error {
			_, err := r.b.kv.Put(ctx, r.key, r.record())
			return err
		})
		cancel()
		switch {
		case err != nil && !failing:
			r.log.Warn("cannot publish this replica's rules version; retrying", "bucket", r.bucket, "err", err)
			failing = true
		case err == nil && failing:
			r.log.Info("publishing this replica's rules version again", "bucket", r.bucket)
			failing = false
		}
		select {
		case <-r.stop:
			return
		case <-t.C:
		case <-r.kick:
		}
	}
}

// Close stops the heartbeat and removes the record, so that the others
// see at once that this replica left. A removal that fails (the bucket's
// leader is being elected, the cluster is unreachable) is logged and leaves
// the record to the bucket's TTL; it is not an error of Close, so that a
// replica stopped during an election still stops cleanly. It is idempotent
// and returns nil.
func (r *Registry) Close(ctx context.Context) error {
	r.mu.Lock()
	started := r.started
	select {
	case <-r.stop:
		r.mu.Unlock()
		return nil
	default:
		close(r.stop)
	}
	r.mu.Unlock()
	if !started {
		return nil
	}
	<-r.done
	if err := r.b.retry(ctx, 2, func(ctx context.Context) error { return r.b.kv.Delete(ctx, r.key) }); err != nil {
		r.log.Warn("could not remove this replica's record; it expires by itself", "bucket", r.bucket, "err", err)
	}
	return nil
}

// ReplicaRecord is one live replica's record as ReadRegistry finds it.
type ReplicaRecord struct {
	ID string
	// Value is what the replica published (Registry.Start).
	Value []byte
	// Updated is when the server stored it (the last heartbeat).
	Updated time.Time
}

// ReadRegistry reads a deployment's registry from the lease bucket: every
// record not older than the bucket's TTL (a replica that stopped renewing
// is gone even before the server removes its key), sorted by replica id,
// and the highest version (zero when the deployment never ran). The bucket
// must exist.
func ReadRegistry(ctx context.Context, js jetstream.JetStream, bucket, deployment string) ([]ReplicaRecord, HighWater, error) {
	var hw HighWater
	if bucket == "" {
		bucket = DefaultLeaseBucket
	}
	kv, err := call(ctx, func(ctx context.Context) (jetstream.KeyValue, error) { return js.KeyValue(ctx, bucket) })
	if err != nil {
		return nil, hw, fmt.Errorf("natsjs: registry: bucket %s: %w", bucket, err)
	}
	st, err := call(ctx, func(ctx context.Context) (jetstream.KeyValueStatus, error) { return kv.Status(ctx) })
	if err != nil {
		return nil, hw, fmt.Errorf("natsjs: registry: bucket %s: %w", bucket, err)
	}
	prefix := registryPrefix(deployment)
	if e, err := call(ctx, func(ctx context.Context) (jetstream.KeyValueEntry, error) { return kv.Get(ctx, prefix+"max") }); err == nil {
		if err := json.Unmarshal(e.Value(), &hw); err != nil {
			return nil, hw, fmt.Errorf("natsjs: registry: %smax holds no version: %w", prefix, err)
		}
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, hw, fmt.Errorf("natsjs: registry: reading %smax: %w", prefix, err)
	}
	lctx, cancel := context.WithTimeout(ctx, streamCallTimeout)
	defer cancel()
	w, err := kv.WatchFiltered(lctx, []string{prefix + "r.*"}, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, hw, fmt.Errorf("natsjs: registry: listing %sr.*: %w", prefix, err)
	}
	defer func() { _ = w.Stop() }()
	var out []ReplicaRecord
	for {
		var e jetstream.KeyValueEntry
		select {
		case e = <-w.Updates():
		case <-lctx.Done():
			return nil, hw, fmt.Errorf("natsjs: registry: listing %sr.*: %w", prefix, lctx.Err())
		}
		if e == nil {
			break // the initial values are done
		}
		if ttl := st.TTL(); ttl > 0 && time.Since(e.Created()) > ttl {
			continue
		}
		out = append(out, ReplicaRecord{ID: strings.TrimPrefix(e.Key(), prefix+"r."), Value: e.Value(), Updated: e.Created()})
	}
	return out, hw, nil
}
