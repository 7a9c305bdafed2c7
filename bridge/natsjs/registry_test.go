package natsjs

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// The highest version only goes up, outlives the bucket's TTL, and the
// records of live replicas are listed until they leave.
func TestRegistry(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	cfg := RegistryConfig{Leases: LeaseConfig{Bucket: "reg", TTL: 2 * time.Second}, Deployment: "orders-bridge"}
	open := func(id string) *Registry {
		c := cfg
		c.ReplicaID = id
		r, err := OpenRegistry(ctx, js, c, quiet)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = r.Close(ctx) })
		return r
	}
	a, b := open("a"), open("b")
	if err := a.Claim(ctx, 3, "f3"); err != nil {
		t.Fatal(err)
	}
	var lower *LowerVersionError
	if err := b.Claim(ctx, 2, "f2"); !errors.As(err, &lower) || lower.Highest.Version != 3 || lower.Highest.Replica != "a" ||
		!strings.Contains(err.Error(), "to roll back, write the old content as version 4") {
		t.Fatalf("claim of a lower version: %v", err)
	}
	if err := b.Claim(ctx, 3, "other"); !errors.As(err, &lower) || !strings.Contains(err.Error(), "has other content") {
		t.Fatalf("claim of the same version with other files: %v", err)
	}
	if err := b.Claim(ctx, 3, "f3"); err != nil {
		t.Fatalf("claim of the same version and files: %v", err)
	}
	if err := b.Claim(ctx, 5, "f5"); err != nil {
		t.Fatal(err)
	}

	a.Start(func() []byte { return []byte(`{"v":5,"who":"a"}`) })
	b.Start(func() []byte { return []byte(`{"v":5,"who":"b"}`) })
	eventually(t, 10*time.Second, "both records listed", func() bool {
		recs, hw, err := ReadRegistry(ctx, js, "reg", "orders-bridge")
		return err == nil && len(recs) == 2 && recs[0].ID == "a" && recs[1].ID == "b" && hw.Version == 5 && hw.Replica == "b"
	})
	if err := a.Close(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "a's record gone", func() bool {
		recs, _, err := ReadRegistry(ctx, js, "reg", "orders-bridge")
		return err == nil && len(recs) == 1 && recs[0].ID == "b"
	})
	// Three TTLs later the records of the renewing replica stay, and the
	// highest version, which is never renewed, too.
	time.Sleep(3 * cfg.Leases.TTL)
	recs, hw, err := ReadRegistry(ctx, js, "reg", "orders-bridge")
	if err != nil || len(recs) != 1 || hw.Version != 5 {
		t.Fatalf("after 3 TTLs: records %v, highest %+v, err %v", recs, hw, err)
	}
	if _, hw, err := ReadRegistry(ctx, js, "reg", "elsewhere"); err != nil || hw.Version != 0 {
		t.Fatalf("another deployment: highest %+v, err %v", hw, err)
	}
}
