package natsjs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/natstest"
)

// leaseClient opens the lease bucket on a connection of its own, as one
// replica would.
func leaseClient(t *testing.T, srv *natstest.Server, cfg LeaseConfig) (*leaseBucket, *nats.Conn) {
	t.Helper()
	nc, js := srv.Connect(t)
	if err := cfg.defaults(); err != nil {
		t.Fatal(err)
	}
	b, err := openLeaseBucket(testCtx(t), js, cfg, quiet)
	if err != nil {
		t.Fatal(err)
	}
	return b, nc
}

// TestLeaseExclusive: five replicas, each on its own connection, race for
// one lease for three seconds, holding it for a few renewals each time;
// at no moment do two of them hold it.
func TestLeaseExclusive(t *testing.T) {
	srv := natstest.Start(t)
	cfg := LeaseConfig{Bucket: "leases-x", TTL: 2 * time.Second}
	var holders atomic.Int32
	var taken [5]atomic.Int32
	var wg sync.WaitGroup
	end := time.Now().Add(3 * time.Second)
	for r := range taken {
		b, _ := leaseClient(t, srv, cfg)
		val := []byte(fmt.Sprintf("replica-%d", r))
		wg.Go(func() {
			ctx := context.Background()
			for time.Now().Before(end) {
				rev, sent, err := b.create(ctx, "rule.n4.p.0", val)
				if errors.Is(err, errHeld) {
					continue
				}
				if err != nil {
					t.Errorf("replica %d: create: %v", r, err)
					return
				}
				if n := holders.Add(1); n != 1 {
					t.Errorf("replica %d took the lease while %d other replicas held it", r, n-1)
				}
				taken[r].Add(1)
				k := b.keep("rule.n4.p.0", val, rev, sent)
				time.Sleep(time.Duration(300+rand.IntN(700)) * time.Millisecond) // one or two renewals
				select {
				case <-k.Lost():
					t.Errorf("replica %d lost a lease nobody else could take", r)
				default:
				}
				rev = k.Stop()
				holders.Add(-1) // before the release: nobody can take it until then
				if err := b.release(ctx, "rule.n4.p.0", val, rev); err != nil {
					t.Errorf("replica %d: release: %v", r, err)
				}
			}
		})
	}
	wg.Wait()
	total := 0
	for r := range taken {
		total += int(taken[r].Load())
	}
	if total < 3 {
		t.Errorf("the lease was taken %d times in 3s; the replicas did not take turns", total)
	}
	t.Logf("lease taken %d times by 5 contending replicas", total)
}

// TestLeaseExpiry: a holder whose connection closes (a replica killed)
// stops renewing; its keeper reports the lease lost, and another replica
// can take the lease only once the bucket's TTL has passed since the last
// renewal, which its watch sees as a purge marker.
func TestLeaseExpiry(t *testing.T) {
	srv := natstest.Start(t)
	cfg := LeaseConfig{Bucket: "leases-e", TTL: 3 * time.Second}
	a, anc := leaseClient(t, srv, cfg)
	b, _ := leaseClient(t, srv, cfg)
	ctx := testCtx(t)
	key := "rule.n4.p.1"
	rev, _, err := a.create(ctx, key, []byte("a"))
	if err != nil {
		t.Fatal(err)
	}
	k := a.keep(key, []byte("a"), rev, time.Now())
	defer k.Stop()
	w, err := b.kv.Watch(ctx, key, jetstream.UpdatesOnly())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Stop() }()

	// Renewals keep it alive well past the TTL.
	lastRenewal := func() time.Time {
		e, err := b.kv.Get(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return e.Created()
	}
	time.Sleep(2 * cfg.TTL)
	if _, _, err := b.create(ctx, key, []byte("b")); !errors.Is(err, errHeld) {
		t.Fatalf("create while a renews = %v, want errHeld", err)
	}
	last := lastRenewal()
	anc.Close()
	killed := time.Now()

	var purged time.Time
	poll := time.NewTimer(3 * cfg.TTL)
	defer poll.Stop()
	for purged.IsZero() {
		select {
		case e := <-w.Updates():
			if e != nil && e.Operation() == jetstream.KeyValuePurge {
				purged = time.Now()
			}
		case <-poll.C:
			t.Fatalf("no expiry marker within %s of the kill", 3*cfg.TTL)
		}
	}
	select {
	case <-k.Lost():
	case <-time.After(cfg.TTL):
		t.Fatal("a's keeper did not report the lease lost")
	}
	got, _, err := b.create(ctx, key, []byte("b"))
	if err != nil {
		t.Fatalf("create after expiry: %v", err)
	}
	taken := time.Now()
	if since := taken.Sub(last); since < cfg.TTL {
		t.Errorf("b took the lease %s after a's last renewal, before the TTL %s", since, cfg.TTL)
	}
	t.Logf("a killed %s after its last renewal; marker %s after the kill, b took the lease (rev %d) %s after the last renewal",
		killed.Sub(last).Round(time.Millisecond), purged.Sub(killed).Round(time.Millisecond), got, taken.Sub(last).Round(time.Millisecond))
}

// TestLeaseLostOnConflict: a renewal that finds another holder's write
// reports the lease lost at once.
func TestLeaseLostOnConflict(t *testing.T) {
	srv := natstest.Start(t)
	cfg := LeaseConfig{Bucket: "leases-c", TTL: 3 * time.Second}
	a, _ := leaseClient(t, srv, cfg)
	ctx := testCtx(t)
	rev, sent, err := a.create(ctx, "k", []byte("a"))
	if err != nil {
		t.Fatal(err)
	}
	k := a.keep("k", []byte("a"), rev, sent)
	defer k.Stop()
	if _, err := a.kv.Put(ctx, "k", []byte("b")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-k.Lost():
	case <-time.After(2 * a.beat):
		t.Fatal("the keeper did not notice another holder's write")
	}
	// Releasing with the stale revision leaves b's lease alone.
	if err := a.release(ctx, "k", []byte("a"), k.Stop()); err != nil {
		t.Fatal(err)
	}
	if e, err := a.kv.Get(ctx, "k"); err != nil || string(e.Value()) != "b" {
		t.Fatalf("after a stale release: %v, %v; want b's lease intact", e, err)
	}
}

// TestLeaseReleaseOwnLaterRevision: a renewal that reached the server after
// the keeper stopped (or whose answer was lost) moved the key to a later
// revision that still holds this replica's value: the release deletes it
// all the same, so that the next holder need not wait for the TTL.
func TestLeaseReleaseOwnLaterRevision(t *testing.T) {
	srv := natstest.Start(t)
	a, _ := leaseClient(t, srv, LeaseConfig{Bucket: "leases-r", TTL: 3 * time.Second})
	ctx := testCtx(t)
	r1, _, err := a.create(ctx, "k", []byte("a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.kv.Update(ctx, "k", []byte("a"), r1); err != nil {
		t.Fatal(err)
	}
	if err := a.release(ctx, "k", []byte("a"), r1); err != nil {
		t.Fatal(err)
	}
	if e, err := a.kv.Get(ctx, "k"); !errors.Is(err, jetstream.ErrKeyNotFound) && !errors.Is(err, jetstream.ErrKeyDeleted) {
		t.Fatalf("after the release: %v, %v; want the key gone", e, err)
	}
}

// TestLeaseCreateAdopts: a key that already holds exactly this holder's
// value is its own (a Create whose answer was lost) and is adopted with a
// renewal, so that it counts as written when the adoption was sent, not
// when it was first written; another value (another holder, or another
// instance with the same replica id) is errHeld, with the revision it held.
func TestLeaseCreateAdopts(t *testing.T) {
	srv := natstest.Start(t)
	a, _ := leaseClient(t, srv, LeaseConfig{Bucket: "leases-a", TTL: 3 * time.Second})
	ctx := testCtx(t)
	mine, other := holderValue("a", "n1"), holderValue("a", "n2")
	r1, s1, err := a.create(ctx, "k", mine)
	if err != nil {
		t.Fatal(err)
	}
	r2, s2, err := a.create(ctx, "k", mine)
	if err != nil || r2 <= r1 || !s2.After(s1) {
		t.Errorf("second create by the holder = revision %d sent %s, %v; want a renewal after revision %d sent %s", r2, s2, err, r1, s1)
	}
	if e, err := a.kv.Get(ctx, "k"); err != nil || e.Revision() != r2 {
		t.Errorf("after the adoption: %v, %v; want revision %d", e, err, r2)
	}
	var held *heldError
	if _, _, err := a.create(ctx, "k", other); !errors.As(err, &held) || !errors.Is(err, errHeld) || held.rev != r2 || holderID(held.value) != "a" {
		t.Errorf("create by another instance with the same id = %v, want errHeld at revision %d", err, r2)
	}
	// Another instance with the same id, releasing with a revision of its
	// own that is no longer current, leaves the key alone.
	if err := a.release(ctx, "k", other, r1); err != nil {
		t.Fatal(err)
	}
	if e, err := a.kv.Get(ctx, "k"); err != nil || !bytes.Equal(e.Value(), mine) {
		t.Fatalf("after another instance's release: %v, %v; want the holder's key intact", e, err)
	}
	if err := a.release(ctx, "k", mine, r2); err != nil {
		t.Fatal(err)
	}
	if _, _, err := a.create(ctx, "k", other); err != nil {
		t.Errorf("create after release: %v", err)
	}
}

func TestLeaseBucketChecks(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	ctx := testCtx(t)
	for _, c := range []struct {
		cfg  jetstream.KeyValueConfig
		want string
	}{
		{jetstream.KeyValueConfig{Bucket: "no-ttl"}, "natsjs: lease bucket no-ttl has no TTL: leases of a vanished replica would never expire; recreate it with a TTL (e.g. `nats kv add no-ttl --ttl 6s --marker-ttl 6s --history 1`) or let cellbridge create it"},
		{jetstream.KeyValueConfig{Bucket: "no-markers", TTL: 5 * time.Second}, "natsjs: lease bucket no-markers writes no markers when keys expire (limit marker TTL 0): replicas would not notice a vanished one; recreate it with a marker TTL (e.g. `nats kv add no-markers --ttl 5s --marker-ttl 5s --history 1`) or let cellbridge create it"},
	} {
		if _, err := js.CreateKeyValue(ctx, c.cfg); err != nil {
			t.Fatal(err)
		}
		cfg := LeaseConfig{Bucket: c.cfg.Bucket}
		if err := cfg.defaults(); err != nil {
			t.Fatal(err)
		}
		if _, err := openLeaseBucket(ctx, js, cfg, quiet); err == nil || err.Error() != c.want {
			t.Errorf("open %s:\n got %v\nwant %s", c.cfg.Bucket, err, c.want)
		}
	}
	// A bucket with another TTL is used with its own TTL.
	if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "other-ttl", TTL: 9 * time.Second, LimitMarkerTTL: time.Second}); err != nil {
		t.Fatal(err)
	}
	cfg := LeaseConfig{Bucket: "other-ttl"}
	if err := cfg.defaults(); err != nil {
		t.Fatal(err)
	}
	b, err := openLeaseBucket(ctx, js, cfg, quiet)
	if err != nil || b.ttl != 9*time.Second || b.beat != 2*time.Second {
		t.Fatalf("open other-ttl = %+v, %v; want the bucket's 9s TTL and a 2s heartbeat", b, err)
	}
	// Configuration bounds.
	for _, c := range []struct {
		cfg  LeaseConfig
		want string
	}{
		{LeaseConfig{TTL: time.Second}, "ttl 1s is below 2s"},
		{LeaseConfig{Heartbeat: 3 * time.Second}, "heartbeat 3s must be positive and at most ttl/3 (2s)"},
		{LeaseConfig{CallTimeout: 3 * time.Second}, "call timeout 3s must be positive and at most the heartbeat (2s)"},
	} {
		if err := c.cfg.defaults(); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: %v, want %q", c.cfg, err, c.want)
		}
	}
}

// TestLeaseKeeperRenewsFromLastWrite: a keeper counts its renewals from
// the last write of the key, not from when it started: a lease whose
// creation took long (retries) is renewed at once instead of a heartbeat
// later, when the server may already have expired it.
func TestLeaseKeeperRenewsFromLastWrite(t *testing.T) {
	srv := natstest.Start(t)
	// A 6 s TTL: a 2 s heartbeat, so that "at once" (within half of it)
	// and "a heartbeat later" stay apart on a loaded machine.
	cfg := LeaseConfig{Bucket: "leases-k", TTL: 6 * time.Second}
	a, _ := leaseClient(t, srv, cfg)
	ctx := testCtx(t)
	rev, _, err := a.create(ctx, "k", []byte("a"))
	if err != nil {
		t.Fatal(err)
	}
	// As if the write had been sent almost a heartbeat and a half ago: a
	// keeper that waits a heartbeat from now renews after the key's guard.
	sent := time.Now().Add(-a.beat * 3 / 2)
	k := a.keep("k", []byte("a"), rev, sent)
	defer k.Stop()
	eventually(t, a.beat/2, "the key renewed at once", func() bool {
		e, err := a.kv.Get(ctx, "k")
		return err == nil && e.Revision() > rev
	})
	select {
	case <-k.Lost():
		t.Fatal("the keeper lost a lease it could renew")
	case <-time.After(2 * a.beat):
	}
}
