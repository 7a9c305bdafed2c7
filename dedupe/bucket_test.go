package dedupe

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// A bucket created ahead of the store is the one the store uses; an
// existing bucket is adapted only by changes that forget nothing.
func TestEnsureAndCheckBucket(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cfg := KVConfig{Bucket: "provisioned", TTL: 10 * time.Minute}
	if err := EnsureBucket(ctx, js, cfg); err != nil {
		t.Fatal(err)
	}
	st, err := js.Stream(ctx, "KV_provisioned")
	if err != nil {
		t.Fatal(err)
	}
	have := st.CachedInfo().Config
	if up, ch, refuse := CheckBucket(have, cfg, false); up != nil || refuse != "" {
		t.Fatalf("a bucket EnsureBucket created: update %v %v, refused %q", up, ch, refuse)
	}
	kv, err := NewJetStream(ctx, js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	kv.Close(ctx)

	longer := cfg
	longer.TTL = time.Hour
	longer.Replicas = 3
	up, ch, refuse := CheckBucket(have, longer, true)
	if refuse != "" || up == nil || up.MaxAge != time.Hour || up.Replicas != 3 || len(ch) != 2 {
		t.Fatalf("raise ttl and replicas: update %+v changes %v refused %q", up, ch, refuse)
	}
	shorter := cfg
	shorter.TTL = time.Minute
	if _, _, refuse := CheckBucket(have, shorter, false); !strings.Contains(refuse, "lowering it forgets the keys") {
		t.Fatalf("lower ttl: refused %q", refuse)
	}
	other := have
	other.Subjects = []string{"elsewhere.>"}
	if _, _, refuse := CheckBucket(other, cfg, false); !strings.Contains(refuse, "is not the key-value bucket") {
		t.Fatalf("not a bucket: refused %q", refuse)
	}
}
