package app

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge/natsjs"
	"github.com/cellbridge/cellbridge/internal/config"
	"github.com/cellbridge/cellbridge/internal/poll"
)

// The deployment's registry lives in the lease bucket the partitions:
// section configures (its name, TTL and replicas), also for a bridge with
// no partitioned rule: on a cluster the bucket must be replicated like the
// leases, and there is one bucket, not a default one beside the configured
// one. RegistrySource reads the records from the same bucket.
func TestRegistryUsesTheLeaseBucketConfig(t *testing.T) {
	e := newReplicaEnv(t, ruleSingle("ordering: ordered"), "")
	e.cfg = writeConfig(t, e.dir, fmt.Sprintf(`rules: ./rules
brokers:
  nats: {type: nats, url: %q}
http: {listen: "127.0.0.1:0"}
partitions: {bucket: registry-leases, leaseTTL: 3s}
`, e.srv.URL))
	e.start(t, "a")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	kv, err := e.js.KeyValue(ctx, "registry-leases")
	if err != nil {
		t.Fatalf("the configured lease bucket: %v", err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.TTL() != 3*time.Second {
		t.Errorf("bucket TTL %v, want the configured leaseTTL 3s", st.TTL())
	}
	if _, err := e.js.KeyValue(ctx, natsjs.DefaultLeaseBucket); !errors.Is(err, jetstream.ErrBucketNotFound) {
		t.Errorf("the default bucket %s: %v, want none", natsjs.DefaultLeaseBucket, err)
	}
	cfg, err := config.Load(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	poll.Eventually(t, 10*time.Second, "the replica's record in the configured bucket", func() bool {
		recs, err := RegistrySource(cfg, e.js).Replicas(ctx)
		return err == nil && len(recs) == 1 && recs[0].Replica != ""
	})
}
