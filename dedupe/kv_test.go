package dedupe

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/internal/jspub"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

var bucketSeq atomic.Int64

// newBucket returns a bucket name no other test uses.
func newBucket() string { return fmt.Sprint("dedupe-test-", bucketSeq.Add(1)) }

func openKV(t *testing.T, js jetstream.JetStream, cfg KVConfig) *KV {
	t.Helper()
	kv, err := NewJetStream(context.Background(), js, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = kv.Close(context.Background()) })
	return kv
}

func suiteKVConfig(bucket string) KVConfig {
	return KVConfig{Bucket: bucket, TTL: suiteTTL, ReserveTTL: suiteReserveTTL}
}

func TestKVConformance(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	testStore(t, harness{
		open: func(t *testing.T, ttl, reserveTTL time.Duration) Store {
			return openKV(t, js, KVConfig{Bucket: newBucket(), TTL: ttl, ReserveTTL: reserveTTL})
		},
		tick: func() { time.Sleep(50 * time.Millisecond) }, // poll interval against the server's clock
		now:  time.Now,
	})
}

// TestKVTwoReplicas runs two stores on two connections over one bucket, as
// two bridge replicas do.
func TestKVTwoReplicas(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	bucket := newBucket()
	_, jsA := srv.Connect(t)
	_, jsB := srv.Connect(t)
	a := openKV(t, jsA, suiteKVConfig(bucket))
	b := openKV(t, jsB, suiteKVConfig(bucket))

	t.Run("reservation is seen by the other replica", func(t *testing.T) {
		mustReserve(t, a, "k1", Reserved)
		mustReserve(t, b, "k1", InFlight)
		must(t, b.Release(ctx, "k1")) // not b's: a no-op
		mustReserve(t, b, "k1", InFlight)
		must(t, a.Commit(ctx, "k1"))
		mustReserve(t, b, "k1", Duplicate)
		must(t, b.Release(ctx, "k1")) // never undoes a commit
		mustReserve(t, a, "k1", Duplicate)
	})

	t.Run("release lets the other replica in", func(t *testing.T) {
		mustReserve(t, a, "k2", Reserved)
		must(t, a.Release(ctx, "k2"))
		mustReserve(t, b, "k2", Reserved)
		mustReserve(t, a, "k2", InFlight)
	})

	t.Run("a crashed replica's reservation expires", func(t *testing.T) {
		ncC, jsC := srv.Connect(t)
		c := openKV(t, jsC, suiteKVConfig(bucket))
		mustReserve(t, c, "k3", Reserved)
		ncC.Close() // crash: no Release, no Commit
		mustReserve(t, a, "k3", InFlight)
		h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }}
		h.eventually(t, "the crashed reservation to expire", func() bool {
			o, err := a.Reserve(ctx, "k3")
			must(t, err)
			return o == Reserved
		})
		mustReserve(t, b, "k3", InFlight)
	})

	t.Run("concurrent reserve across replicas has one winner", func(t *testing.T) {
		const workers, keys = 32, 40
		var won [keys]atomic.Int32
		// Long windows: no reservation may expire mid-test on a slow machine.
		long := KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 30 * time.Minute}
		stores := []Store{openKV(t, jsA, long), openKV(t, jsB, long)}
		parallel(t, workers, func(w int) error {
			s := stores[w%2]
			for k := 0; k < keys; k++ {
				i := (k + w) % keys
				o, err := s.Reserve(ctx, fmt.Sprint("race-", i))
				if err != nil {
					return err
				}
				if o == Reserved {
					won[i].Add(1)
				}
			}
			return nil
		})
		expectOnce(t, "race-%d reserved", won[:])
	})
}

// TestKVDirectGetUnanswered makes every direct get of the bucket go
// unanswered (the stream stops serving them and a subscriber that never
// replies takes them, as a frozen replica would): a lookup must then ask the
// stream's leader after Timeout/4 and answer as usual (Duplicate for a
// commit, InFlight for another store's reservation, Reserved over a
// release marker), instead of failing after the request timeout.
func TestKVDirectGetUnanswered(t *testing.T) {
	a, swallowed := frozenDirectGets(t, "$JS.API.DIRECT.GET.KV_%s.>")

	mustReserve(t, a, "committed", Duplicate)
	mustReserve(t, a, "held", InFlight)
	mustReserve(t, a, "released", Reserved)
	if swallowed.Load() == 0 {
		t.Fatal("no direct get was made: the test tests nothing")
	}
}

// frozenDirectGets opens a store on a bucket holding a commit ("committed"),
// another store's reservation ("held") and a released key ("released"), then
// makes the bucket's direct gets on subject (a format with the bucket's
// name) go unanswered, as a frozen replica's would: the stream stops
// serving them and a subscriber that never replies takes them. It returns
// the store and the count of swallowed requests.
func frozenDirectGets(t *testing.T, subject string) (*KV, *atomic.Int32) {
	t.Helper()
	ctx := context.Background()
	srv := natstest.Start(t)
	bucket := newBucket()
	nc, js := srv.Connect(t)
	_, jsB := srv.Connect(t)
	cfg := KVConfig{Bucket: bucket, TTL: time.Hour, ReserveTTL: 30 * time.Minute, Timeout: 2 * time.Second}
	a := openKV(t, js, cfg)
	b := openKV(t, jsB, cfg)
	mustReserve(t, a, "committed", Reserved)
	must(t, a.Commit(ctx, "committed"))
	mustReserve(t, b, "held", Reserved)
	mustReserve(t, a, "released", Reserved)
	must(t, a.Release(ctx, "released"))
	swallowed, _ := swallowDirectGets(t, nc, js, bucket, subject)
	return a, swallowed
}

// swallowDirectGets makes the direct gets of bucket on subject (a format
// with the bucket's name) go unanswered (interceptDirectGets). It returns
// the count of swallowed requests and a function that serves them again.
func swallowDirectGets(t *testing.T, nc *nats.Conn, js jetstream.JetStream, bucket, subject string) (*atomic.Int32, func()) {
	t.Helper()
	swallowed := new(atomic.Int32)
	serve := interceptDirectGets(t, nc, js, bucket, subject, func(*nats.Msg) { swallowed.Add(1) })
	return swallowed, serve
}

// interceptDirectGets makes the bucket's stream stop serving direct gets
// and has respond, subscribed on nc to subject (a format with the bucket's
// name), take them instead. It returns a function that serves them again.
func interceptDirectGets(t *testing.T, nc *nats.Conn, js jetstream.JetStream, bucket, subject string, respond nats.MsgHandler) func() {
	t.Helper()
	ctx := context.Background()
	st, err := js.Stream(ctx, "KV_"+bucket)
	must(t, err)
	scfg := st.CachedInfo().Config
	scfg.AllowDirect = false
	_, err = js.UpdateStream(ctx, scfg)
	must(t, err)
	sub, err := nc.Subscribe(fmt.Sprintf(subject, bucket), respond)
	must(t, err)
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	must(t, nc.Flush())
	return func() {
		must(t, sub.Unsubscribe())
		scfg.AllowDirect = true
		_, err := js.UpdateStream(ctx, scfg)
		must(t, err)
	}
}

// TestKVOwedReleaseAndNewReservation: a release is owed for a key (its
// write failed) but the reservation is gone by the time the store reserves
// the key again (it expired, or the write landed after all). The new
// reservation settles the debt, so the background release, which purges a
// reservation of this store, does not take the new one for the old.
func TestKVOwedReleaseAndNewReservation(t *testing.T) {
	srv := natstest.Start(t)
	_, jsA := srv.Connect(t)
	_, jsB := srv.Connect(t)
	cfg := KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 30 * time.Minute}
	a := openKV(t, jsA, cfg)
	b := openKV(t, jsB, cfg)
	subj := a.subject("k")
	a.owed.owe(subj, owedRelease, 0, 0) // as after a Release that failed (its read: no revision)
	mustReserve(t, a, "k", Reserved)
	// Nothing left for the background writes to do.
	if k := a.owed.owes(subj); k != 0 || a.owed.n.Load() != 0 {
		t.Fatalf("still owed (%d, %d debts) after the new reservation", k, a.owed.n.Load())
	}
	mustReserve(t, b, "k", InFlight)
	mustReserve(t, a, "k", InFlight) // a reservation of a's that a's caller holds
}

// TestKVOwedReleaseTakesLostValue: a reservation of this store whose
// write's reply was lost (no caller holds it) while a release of the key is
// owed. The next Reserve takes it over through the owed release; the lost
// value must be forgotten then, or a later Reserve would take the same
// reservation over a second time, and two callers would publish.
func TestKVOwedReleaseTakesLostValue(t *testing.T) {
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	a := openKV(t, js, KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 30 * time.Minute})
	subj := a.subject("k")
	mustReserve(t, a, "k", Reserved)
	st, _, cur, err := a.lookup(context.Background(), subj)
	if err != nil || st != kvOurs {
		t.Fatalf("lookup after Reserve: state %v, err %v", st, err)
	}
	a.lostReply(subj, cur)                      // as if that write's reply had been lost
	a.owed.owe(subj, owedRelease, time.Hour, 0) // and a release of the key failed before it (not repaid during the test)
	mustReserve(t, a, "k", Reserved)            // taken over once, through the owed release
	mustReserve(t, a, "k", InFlight)            // and not a second time through the lost value
}

// releasedAndReservedAgain opens two stores a and b on one bucket; a
// reserves key "k", purges that reservation as a Release does (old is its
// revision), and reserves the key again over the purge's marker.
func releasedAndReservedAgain(t *testing.T) (a, b *KV, subj string, old uint64) {
	t.Helper()
	ctx := context.Background()
	srv := natstest.Start(t)
	_, jsA := srv.Connect(t)
	_, jsB := srv.Connect(t)
	cfg := KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 30 * time.Minute}
	a, b = openKV(t, jsA, cfg), openKV(t, jsB, cfg)
	subj = a.subject("k")
	mustReserve(t, a, "k", Reserved)
	_, old, _, err := a.lookup(ctx, subj)
	if err != nil {
		t.Fatal(err)
	}
	must(t, a.purge(ctx, subj, old))
	mustReserve(t, a, "k", Reserved)
	return a, b, subj, old
}

// TestKVOwedReleaseOnlyForItsRevision: a Release's purge was stored but
// its reply lost, and before the Release gave up, a Reserve of the key in
// the same store made a new reservation over the marker. The release owed
// then is for the old reservation's revision only: neither the store's
// next Reserve nor the background write may take or remove the new one.
func TestKVOwedReleaseOnlyForItsRevision(t *testing.T) {
	ctx := context.Background()
	a, b, subj, old := releasedAndReservedAgain(t)
	st, cur, _, err := a.lookup(ctx, subj)
	if err != nil || st != kvOurs || cur == old {
		t.Fatalf("after the new reservation: state %v, revision %d (old %d), err %v", st, cur, old, err)
	}
	a.owed.owe(subj, owedRelease, 0, old) // the Release then reports its purge unanswered
	mustReserve(t, a, "k", InFlight)      // held by the new reservation's caller
	h := harness{tick: func() { time.Sleep(20 * time.Millisecond) }}
	h.eventually(t, "the owed release settled", func() bool { return a.owed.n.Load() == 0 })
	if st, rev, _, err := a.lookupLeader(ctx, subj); err != nil || st != kvOurs || rev != cur {
		t.Fatalf("after the background release: state %v, revision %d, err %v; want the new reservation at %d", st, rev, err, cur)
	}
	mustReserve(t, b, "k", InFlight)
}

// TestKVOwedReleaseAndLostReservation: a release owed for one revision,
// then a reservation this store wrote over the purge's marker and whose
// reply was lost. The debt keeps the larger kind, a release; the
// background write still releases the lost reservation, so that other
// replicas need not wait ReserveTTL for the key.
func TestKVOwedReleaseAndLostReservation(t *testing.T) {
	ctx := context.Background()
	a, b, subj, old := releasedAndReservedAgain(t) // a reservation over the purge's marker...
	_, _, cur, err := a.lookup(ctx, subj)
	if err != nil {
		t.Fatal(err)
	}
	// ...whose reply was lost, after the Release had reported its purge
	// unanswered: the state these calls leave when they overlap.
	a.owed.owe(subj, owedRelease, time.Hour, old)
	a.lostReply(subj, cur)
	if k := a.owed.owes(subj); k != owedRelease {
		t.Fatalf("owed %v, want a release", k)
	}
	a.owed.mu.Lock()
	a.owed.m[subj].after = time.Now() // the background write may go now
	a.owed.mu.Unlock()
	a.owed.wake <- struct{}{}
	h := harness{tick: func() { time.Sleep(20 * time.Millisecond) }}
	h.eventually(t, "the lost reservation released in the background", func() bool {
		o, err := b.Reserve(ctx, "k")
		return err == nil && o == Reserved
	})
}

// TestKVServerRestart checks that the bucket's state survives a server
// restart (file storage) and that a store keeps working across the
// client's reconnect.
func TestKVServerRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	srv := natstest.StartDir(t, dir)
	_, js := srv.Connect(t, nats.ReconnectWait(50*time.Millisecond), nats.MaxReconnects(-1))
	cfg := KVConfig{Bucket: newBucket(), TTL: time.Hour, ReserveTTL: 30 * time.Minute}
	kv := openKV(t, js, cfg)
	mustReserve(t, kv, "committed", Reserved)
	must(t, kv.Commit(ctx, "committed"))
	mustReserve(t, kv, "reserved", Reserved)

	srv.Shutdown()
	srv.WaitForShutdown()
	h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }}
	// While the link is down a call fails at once, and nothing of it waits
	// in the client's reconnect buffer to be written later.
	h.eventually(t, "the store to see the link down", func() bool { return kv.client.Stats().Down })
	_, err := kv.Reserve(ctx, "during")
	if !errors.Is(err, jspub.ErrNotSent) || !errors.Is(err, nats.ErrDisconnected) {
		t.Fatalf("Reserve while disconnected: %v, want jspub.ErrNotSent and nats.ErrDisconnected", err)
	}
	srv2 := srv.Restart(t)

	h.eventually(t, "the store to work after the reconnect", func() bool {
		o, err := kv.Reserve(ctx, "committed")
		return err == nil && o == Duplicate
	})
	mustReserve(t, kv, "reserved", InFlight)
	mustReserve(t, kv, "new", Reserved)
	mustReserve(t, kv, "during", Reserved)

	// A replica started after the restart opens the existing bucket.
	_, js2 := srv2.Connect(t)
	kv2 := openKV(t, js2, cfg)
	mustReserve(t, kv2, "committed", Duplicate)
	mustReserve(t, kv2, "reserved", InFlight)
	mustReserve(t, kv2, "new", InFlight)
}

func TestKVConfigErrors(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	if _, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: "KV_taken", Subjects: []string{"taken.>"}}); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name string
		cfg  KVConfig
		want string
	}{
		{"empty bucket", KVConfig{}, "invalid name"},
		{"bad bucket", KVConfig{Bucket: "a.b"}, "invalid name"},
		{"ttl not above reserveTTL", KVConfig{Bucket: "b", TTL: time.Second, ReserveTTL: time.Second}, "must exceed"},
		{"reserveTTL rounds up to a second", KVConfig{Bucket: "b", TTL: time.Second, ReserveTTL: time.Millisecond}, "must exceed"},
		{"stream is not a bucket", KVConfig{Bucket: "taken"}, "not a key-value bucket"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			kv, err := NewJetStream(ctx, js, tc.cfg)
			if err == nil {
				_ = kv.Close(ctx)
				t.Fatal("no error")
			}
			if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "bucket") {
				t.Fatalf("error %q, want it to name the bucket and say %q", err, tc.want)
			}
		})
	}
}

// TestKVExistingBucket opens buckets made by nats.go's KeyValue API: one
// without per-key TTLs (adapted on open) and one with limit markers (whose
// expiry markers Reserve must write over).
func TestKVExistingBucket(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	_, js := srv.Connect(t)

	t.Run("plain bucket is adapted", func(t *testing.T) {
		bucket := newBucket()
		lib, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, TTL: time.Hour})
		if err != nil {
			t.Fatal(err)
		}
		kv := openKV(t, js, suiteKVConfig(bucket))
		mustReserve(t, kv, "ORDERS:1", Reserved)
		must(t, kv.Commit(ctx, "ORDERS:1"))
		e, err := lib.Get(ctx, EncodeKey("ORDERS:1"))
		if err != nil || string(e.Value()) != "c" {
			t.Fatalf("library view of the commit: %v, %v", e, err)
		}
		st, err := lib.Status(ctx)
		must(t, err)
		if st.TTL() != suiteTTL {
			t.Fatalf("bucket TTL %v, want %v", st.TTL(), suiteTTL)
		}
	})

	t.Run("bucket with limit markers", func(t *testing.T) {
		bucket := newBucket()
		if _, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, TTL: suiteTTL, LimitMarkerTTL: 5 * time.Second}); err != nil {
			t.Fatal(err)
		}
		kv := openKV(t, js, suiteKVConfig(bucket))
		mustReserve(t, kv, "k", Reserved)
		// Expiry leaves a marker; the next Reserve writes over it.
		h := harness{tick: func() { time.Sleep(50 * time.Millisecond) }}
		h.eventually(t, "the reservation to expire into a marker", func() bool {
			o, err := kv.Reserve(ctx, "k")
			must(t, err)
			return o == Reserved
		})
		mustReserve(t, kv, "k", InFlight)
	})
}

func TestKVErrors(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t)
	_, js := srv.Connect(t)
	bucket := newBucket()
	kv := openKV(t, js, suiteKVConfig(bucket))
	const secret = "user-2088000000000042"

	checkErr := func(t *testing.T, err error, op string, target error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", op)
		}
		if target != nil && !errors.Is(err, target) {
			t.Fatalf("%s: %v does not wrap %v", op, err, target)
		}
		msg := err.Error()
		if !strings.Contains(msg, op) || !strings.Contains(msg, bucket) {
			t.Fatalf("error %q does not name op %q and bucket %q", msg, op, bucket)
		}
		if strings.Contains(msg, secret) || strings.Contains(msg, EncodeKey(secret)) {
			t.Fatalf("error %q contains the key", msg)
		}
	}

	t.Run("cancelled context", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		_, err := kv.Reserve(cctx, secret)
		checkErr(t, err, "reserve", context.Canceled)
		checkErr(t, kv.Commit(cctx, secret), "commit", context.Canceled)
		checkErr(t, kv.Release(cctx, secret), "release", context.Canceled)
	})

	t.Run("value not written by this package", func(t *testing.T) {
		lib, err := js.KeyValue(ctx, bucket)
		must(t, err)
		_, err = lib.PutString(ctx, EncodeKey(secret), "something else")
		must(t, err)
		_, err = kv.Reserve(ctx, secret)
		checkErr(t, err, "reserve", nil)
	})

	t.Run("bucket deleted", func(t *testing.T) {
		must(t, js.DeleteKeyValue(ctx, bucket))
		_, err := kv.Reserve(ctx, secret)
		checkErr(t, err, "reserve", nats.ErrNoResponders)
		checkErr(t, kv.Commit(ctx, secret), "commit", nats.ErrNoResponders)
	})
}

// TestKVDomain uses a JetStream domain, whose API subjects differ
// ($JS.<domain>.API.…): lookups must follow js's prefix.
func TestKVDomain(t *testing.T) {
	ctx := context.Background()
	srv := natstest.Start(t, func(o *server.Options) { o.JetStreamDomain = "hub" })
	nc, _ := srv.Connect(t)
	js, err := jetstream.NewWithDomain(nc, "hub")
	must(t, err)
	kv := openKV(t, js, suiteKVConfig(newBucket()))
	mustReserve(t, kv, "k", Reserved)
	mustReserve(t, kv, "k", InFlight) // needs a lookup
	must(t, kv.Release(ctx, "k"))
	mustReserve(t, kv, "k", Reserved)
	must(t, kv.Commit(ctx, "k"))
	mustReserve(t, kv, "k", Duplicate)
}

// The refusals a KV write can get, as the shared reply reader returns them:
// only a failed expected-sequence check (either code) is a lost race that
// Reserve and Release handle; everything else is an error.
func TestIsWrongLastSeq(t *testing.T) {
	status := func(code string) nats.Header { return nats.Header{"Status": {code}} }
	cases := []struct {
		name string
		hdr  nats.Header
		data string
		want bool
	}{
		{"ack", nil, `{"stream":"KV_b","seq":12}`, false},
		{"ack in a domain called error", nil, `{"stream":"KV_b","domain":"error","seq":12}`, false},
		{"wrong last sequence", nil, `{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 5"},"stream":"KV_b","seq":0}`, true},
		{"wrong last sequence, replicated", nil, `{"error":{"code":400,"err_code":10164,"description":"wrong last sequence"}}`, true},
		{"other API error", nil, `{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}`, false},
		{"no responders", status("503"), "", false},
		{"other status", status("408"), "", false},
		{"malformed", nil, `{"error":`, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := jspub.ReadAck(&nats.Msg{Header: tc.hdr, Data: []byte(tc.data)})
			if got := isWrongLastSeq(err); got != tc.want {
				t.Fatalf("isWrongLastSeq(%v) = %v, want %v", err, got, tc.want)
			}
			if strings.HasPrefix(tc.name, "ack") != (err == nil) {
				t.Fatalf("ReadAck: %v", err)
			}
		})
	}
}
