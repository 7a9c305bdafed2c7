package dedupe

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// withDefaults checks the bucket name and the TTLs and fills in the
// defaults KVConfig documents.
func (cfg KVConfig) withDefaults() (KVConfig, error) {
	if !bucketName.MatchString(cfg.Bucket) {
		return cfg, fmt.Errorf("dedupe: bucket %q: invalid name, want [A-Za-z0-9_-]+", cfg.Bucket)
	}
	if cfg.TTL <= 0 {
		cfg.TTL = DefaultTTL
	}
	if cfg.ReserveTTL <= 0 {
		cfg.ReserveTTL = DefaultReserveTTL
	}
	// The server's per-message TTL counts whole seconds.
	cfg.ReserveTTL = (cfg.ReserveTTL + time.Second - 1).Truncate(time.Second)
	if cfg.TTL <= cfg.ReserveTTL {
		return cfg, fmt.Errorf("dedupe: bucket %q: ttl %v must exceed reserveTTL %v", cfg.Bucket, cfg.TTL, cfg.ReserveTTL)
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = min(DefaultKVTimeout, cfg.ReserveTTL/2)
	}
	if cfg.Timeout >= cfg.ReserveTTL {
		return cfg, fmt.Errorf("dedupe: bucket %q: timeout %v must stay below reserveTTL %v", cfg.Bucket, cfg.Timeout, cfg.ReserveTTL)
	}
	return cfg, nil
}

// bucketStream is the configuration of the bucket's stream, KV_<bucket>,
// as ensureBucket creates it (cfg has its defaults).
func bucketStream(cfg KVConfig) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:              "KV_" + cfg.Bucket,
		Subjects:          []string{"$KV." + cfg.Bucket + ".>"},
		MaxMsgsPerSubject: 1,
		MaxBytes:          -1,
		MaxMsgs:           -1,
		MaxMsgSize:        -1,
		MaxAge:            cfg.TTL,
		Storage:           cfg.Storage,
		Replicas:          cfg.Replicas,
		AllowRollup:       true,
		DenyDelete:        true,
		Duplicates:        min(2*time.Minute, cfg.TTL),
		MaxConsumers:      -1,
		AllowDirect:       true,
		Discard:           jetstream.DiscardNew,
		AllowMsgTTL:       true,
	}
}

// EnsureBucket creates the store's bucket, or adapts an existing one, as
// NewJetStream does; `cellbridge streams -apply` uses it to create the
// bucket ahead of the bridge.
func EnsureBucket(ctx context.Context, js jetstream.JetStream, cfg KVConfig) error {
	cfg, err := cfg.withDefaults()
	if err == nil {
		_, err = ensureBucket(ctx, js, cfg.policy(js.Conn()), cfg)
	}
	if err != nil {
		return fmt.Errorf("dedupe: bucket %q: %w", cfg.Bucket, err)
	}
	return nil
}

// CheckBucket judges an existing bucket stream against cfg for
// provisioning: nil update when it serves as is; an update, with one line
// per change, when a change that forgets nothing makes it serve (per-message
// TTLs and direct gets allowed, the TTL raised to cfg.TTL, the duplicate
// window within the TTL, replicas raised to cfg.Replicas when raise is
// set); a refusal when the stream is not a key-value bucket, or when its
// TTL is longer than cfg.TTL, because lowering it forgets the keys in
// between (set dedupe.ttl to the bucket's, or lower it by hand).
func CheckBucket(have jetstream.StreamConfig, cfg KVConfig, raise bool) (update *jetstream.StreamConfig, changes []string, refuse string) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, nil, err.Error()
	}
	want := bucketStream(cfg)
	if len(have.Subjects) != 1 || have.Subjects[0] != want.Subjects[0] {
		return nil, nil, fmt.Sprintf("stream %s is not the key-value bucket %s (subjects %v)", have.Name, cfg.Bucket, have.Subjects)
	}
	if have.MaxAge > cfg.TTL || have.MaxAge == 0 {
		return nil, nil, fmt.Sprintf("the bucket keeps keys for %v, the configuration for %v (dedupe.ttl): lowering it forgets the keys in between; set dedupe.ttl to %v, or lower the bucket's TTL by hand", ageText(have.MaxAge), cfg.TTL, ageText(have.MaxAge))
	}
	up := have
	if !have.AllowMsgTTL {
		up.AllowMsgTTL = true
		changes = append(changes, "allow per-message TTLs (reservations expire by them)")
	}
	if !have.AllowDirect {
		up.AllowDirect = true
		changes = append(changes, "allow direct gets (lookups use them)")
	}
	if have.MaxAge < cfg.TTL {
		up.MaxAge = cfg.TTL
		changes = append(changes, fmt.Sprintf("ttl %v → %v", have.MaxAge, cfg.TTL))
	}
	if have.Duplicates > up.MaxAge {
		up.Duplicates = up.MaxAge
		changes = append(changes, fmt.Sprintf("duplicate window %v → %v (within the ttl)", have.Duplicates, up.MaxAge))
	}
	if raise && have.Replicas < cfg.Replicas {
		up.Replicas = cfg.Replicas
		changes = append(changes, fmt.Sprintf("replicas %d → %d", have.Replicas, cfg.Replicas))
	}
	if len(changes) == 0 {
		return nil, nil, ""
	}
	return &up, changes, ""
}

func ageText(d time.Duration) string {
	if d == 0 {
		return "ever"
	}
	return d.String()
}
