//go:build unix

package natsjs

import (
	"bytes"
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/internal/natstest"
)

// cutDialer gives a client connections that the test cuts the way a kill
// -9 of the client's process does: the socket is closed under the client
// library, which sends nothing more (no UNSUB, no clean close) and, with
// nats.NoReconnect, never comes back. The server and its routes learn of
// it only from the closed socket.
type cutDialer struct {
	mu    sync.Mutex
	conns []net.Conn
	// onWrite, when set, is a byte string whose write cuts the connection
	// right after it went out (a request sent, its answer never read).
	onWrite atomic.Pointer[[]byte]
	// cut is closed once the connection was cut; at is when.
	once sync.Once
	cut  chan struct{}
	at   time.Time
}

func newCutDialer() *cutDialer { return &cutDialer{cut: make(chan struct{})} }

func (d *cutDialer) Dial(network, address string) (net.Conn, error) {
	c, err := net.DialTimeout(network, address, 2*time.Second)
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	select {
	case <-d.cut:
		_ = c.Close()
		return nil, errors.New("cut: the process is gone")
	default:
	}
	d.conns = append(d.conns, c)
	return &cutConn{Conn: c, d: d}, nil
}

// cutNow closes every connection of the dialer (once).
func (d *cutDialer) cutNow() {
	d.once.Do(func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		d.at = time.Now()
		for _, c := range d.conns {
			_ = c.Close()
		}
		close(d.cut)
	})
}

// cutAt is when the connection was cut (zero before).
func (d *cutDialer) cutAt() time.Time {
	select {
	case <-d.cut:
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.at
	default:
		return time.Time{}
	}
}

type cutConn struct {
	net.Conn
	d *cutDialer
}

func (c *cutConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if p := c.d.onWrite.Load(); p != nil && bytes.Contains(b, *p) {
		c.d.cutNow()
	}
	return n, err
}

// cutReplica is an in-process replica whose connection goes to one server
// of the cluster only, through a cutDialer.
type cutReplica struct {
	*replica
	name, url string
	d         *cutDialer
}

// startCutReplica starts an ordered replica attached to url alone; onState
// sees each of its states.
func startCutReplica(t *testing.T, name, url string, onState func(*cutReplica, SourceState)) *cutReplica {
	t.Helper()
	d := newCutDialer()
	nc, err := nats.Connect(url, nats.Name("cellbridge/"+name), nats.Timeout(2*time.Second), nats.NoReconnect(), nats.SetCustomDialer(d))
	if err != nil {
		t.Fatalf("%s: connect to %s: %v", name, url, err)
	}
	t.Cleanup(nc.Close)
	cr := &cutReplica{name: name, url: url, d: d}
	cfg := orderedConfig()
	cfg.OnState = func(st SourceState) { onState(cr, st) }
	cr.replica = startReplicaOn(t, nc, mustJS(t, nc), cfg)
	return cr
}

// consumerInfo asks the cluster for the durable's state (nil while no
// leader answers).
func consumerInfo(js jetstream.JetStream) *jetstream.ConsumerInfo {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := js.Consumer(ctx, "ORDERS", "cellbridge-orders")
	if err != nil {
		return nil
	}
	return c.CachedInfo()
}

// TestOrderedOwnerLostRightAfterWinning: on a 3-server cluster, with the
// consumer's leader on a server neither replica is attached to, the
// replica that wins the pin loses its connection the way a kill -9 takes
// it (the socket closed, nothing sent, no reconnect) right after winning:
// once its reset request is written, or 250ms into its epoch. A fresh
// replica is started on the lost one's server at once, as a restarted
// process is.
//
// While events flow, the survivor or the restarted replica takes over
// once the dead pin lapsed (PinnedTTL after its last pull), not after
// AckWait, and every event reaches OUT once, in order per key.
//
// When no event comes after the owner was lost, a standby kicks the
// consumer (a reset) once the pin lapsed and takes over what the lost
// owner left unacknowledged.
//
// When the lost owner had settled everything before it went (the
// single-active end-to-end scenario's last kill once its load was over),
// nobody wins the pin: the server hands it out only with a delivery, and
// the durable has none to make, nothing pending and nothing unacked. That
// is no loss of service (an idle rule has no pinned replica), and the next
// event is taken over at once.
func TestOrderedOwnerLostRightAfterWinning(t *testing.T) {
	c := natstest.StartCluster(t, 3)
	for _, how := range []string{"reset-in-flight", "250ms-after-winning", "idle-unacked", "idle-all-acked"} {
		t.Run(how, func(t *testing.T) { ownerLostRightAfterWinning(t, c, how) })
	}
}

func ownerLostRightAfterWinning(t *testing.T, c *natstest.Cluster, how string) {
	js := c.JetStream()
	for _, name := range []string{"ORDERS", "OUT"} {
		if err := js.DeleteStream(testCtx(t), name); err != nil && !errors.Is(err, jetstream.ErrStreamNotFound) {
			t.Fatal(err)
		}
	}
	c.AddStream(jetstream.StreamConfig{Name: "ORDERS", Subjects: []string{"orders.>"}})
	c.AddStream(jetstream.StreamConfig{Name: "OUT", Subjects: []string{"out.>"}})

	// The first replica to win the pin is the one lost.
	var (
		mu     sync.Mutex
		victim *cutReplica
		wonAt  time.Time
	)
	won := func(cr *cutReplica, st SourceState) bool {
		mu.Lock()
		defer mu.Unlock()
		if victim == nil {
			victim, wonAt = cr, st.Since
		}
		return victim == cr
	}
	lost := func() (*cutReplica, time.Time) {
		mu.Lock()
		defer mu.Unlock()
		return victim, wonAt
	}
	onState := func(cr *cutReplica, st SourceState) {
		if st.State != StateAcquiring || !won(cr, st) || !cr.d.cutAt().IsZero() {
			return
		}
		switch how {
		case "reset-in-flight":
			// The reset is the next request the replica writes.
			reset := []byte("$JS.API.CONSUMER.RESET.ORDERS.cellbridge-orders")
			cr.d.onWrite.Store(&reset)
		case "250ms-after-winning", "idle-unacked":
			time.AfterFunc(250*time.Millisecond, cr.d.cutNow)
		}
	}
	// The durable is made before the replicas attach (the first replica
	// would make it on its own server), so that its leader can be placed
	// away from both.
	made := newSource(t, js, orderedConfig())
	if err := made.Close(testCtx(t)); err != nil {
		t.Fatal(err)
	}
	c.MoveConsumerLeader("ORDERS", "cellbridge-orders", 0)
	urls := c.URLs()
	a := startCutReplica(t, "r1", urls[1], onState)
	b := startCutReplica(t, "r2", urls[2], onState)
	for _, r := range []*cutReplica{a, b} {
		eventually(t, 20*time.Second, r.name+" in standby", func() bool { return r.state() == StateStandby })
	}
	if how == "idle-unacked" {
		// The lost owner settles nothing: what it was given stays
		// unacknowledged.
		hold := make(chan struct{})
		for _, r := range []*cutReplica{a, b} {
			r.f.mu.Lock()
			r.f.block = func(*bridge.Message) {
				if v, _ := lost(); v == r {
					<-hold
				}
			}
			r.f.mu.Unlock()
		}
		t.Cleanup(func() { close(hold) })
	}

	var fd *feed
	var restarted *cutReplica
	restart := func(v *cutReplica) {
		restarted = startCutReplica(t, v.name+"-restarted", v.url, onState)
	}
	if how == "idle-all-acked" {
		fd = newFeed(21, 20)
		fd.publish(t, js, 0)
		eventually(t, 20*time.Second, "one replica won the pin", func() bool { v, _ := lost(); return v != nil })
		// The owner settles all there is; it is cut 250ms after it won,
		// once the server counts the event acked.
		eventually(t, 20*time.Second, "the event acked", func() bool {
			ci := consumerInfo(js)
			return ci != nil && ci.NumPending == 0 && ci.NumAckPending == 0 && ci.AckFloor.Stream == 1
		})
		v, at := lost()
		time.Sleep(time.Until(at.Add(250 * time.Millisecond)))
		v.d.cutNow()
		restart(v)
		// The dead pin lapses PinnedTTL after the last pull that carried
		// it. Then the server holds no pin and has nothing to deliver: no
		// probe can win, whatever the replicas do.
		var ci *jetstream.ConsumerInfo
		eventually(t, 20*time.Second, "the dead owner's pin lapsed", func() bool {
			ci = consumerInfo(js)
			return ci != nil && pinnedID(ci, DefaultGroup) == ""
		})
		lapsed := time.Now()
		if ci.NumPending != 0 || ci.NumAckPending != 0 {
			t.Fatalf("after the cut: %d pending, %d unacked; want nothing left to deliver", ci.NumPending, ci.NumAckPending)
		}
		// A while later still: no owner, and the replicas wait as
		// standbys (a takeover here would need a delivery to win the pin
		// with).
		time.Sleep(2 * testPinnedTTL)
		survivor := a
		if v == a {
			survivor = b
		}
		ci = consumerInfo(js)
		if ci == nil || pinnedID(ci, DefaultGroup) != "" || survivor.state() != StateStandby || restarted.state() != StateStandby {
			t.Fatalf("%s after the pin lapsed with nothing to deliver: server pin %q, %s %s, %s %s; want no pin and two standbys",
				time.Since(lapsed).Round(time.Millisecond), pinnedID(ci, DefaultGroup), survivor.name, survivor.state(), restarted.name, restarted.state())
		}
		t.Logf("%s: cut %s after winning; pin lapsed %s after the cut; idle, acked to %d: no replica pinned for %s after that (%s and %s standby)",
			how, v.d.cutAt().Sub(at).Round(time.Millisecond), lapsed.Sub(v.d.cutAt()).Round(time.Millisecond), ci.AckFloor.Stream,
			time.Since(lapsed).Round(time.Millisecond), survivor.name, restarted.name)
		next := time.Now()
		for i := 1; i < fd.n; i++ {
			fd.publish(t, js, i)
		}
		checkOut(t, js, fd)
		owner := activeAfter(t, next, survivor, restarted)
		t.Logf("%s: the next events taken over by %s %s after they were published", how, owner.name,
			owner.src.State().EpochStart.Sub(next).Round(time.Millisecond))
		return
	}

	if how == "idle-unacked" {
		// A few events, then none: the lost owner holds them unacked, and
		// no new one comes for a probe to win the pin with.
		fd = newFeed(5, 5)
		for i := range fd.n {
			fd.publish(t, js, i)
		}
		eventually(t, 20*time.Second, "the owner cut", func() bool { v, _ := lost(); return v != nil && !v.d.cutAt().IsZero() })
	} else {
		fd = newFeed(1000, 20)
		fd.publish(t, js, 0)
		fd.run(t, js, 1, 5*time.Millisecond, func(int) {
			if v, _ := lost(); v != nil && restarted == nil && !v.d.cutAt().IsZero() {
				restart(v)
			}
		})
	}
	v, at := lost()
	if v == nil || v.d.cutAt().IsZero() {
		t.Fatal("no replica won the pin and was cut while the events were published")
	}
	if restarted == nil {
		restart(v)
	}
	cut := v.d.cutAt()
	survivor := a
	if v == a {
		survivor = b
	}
	o := checkOut(t, js, fd)
	owner := activeAfter(t, cut, survivor, restarted)
	st := owner.src.State()
	t.Logf("%s: %s cut %s after winning the pin; %s took over, epoch start %s after the cut (its own cost %s, unowned %s by the advisories); max lateness %s",
		how, v.name, cut.Sub(at).Round(time.Millisecond), owner.name, st.EpochStart.Sub(cut).Round(time.Millisecond),
		st.LastTakeoverDuration.Round(time.Millisecond), st.LastTakeoverGap.Round(time.Millisecond), o.maxLate.Round(time.Millisecond))
	if o.maxLate >= testAckWait {
		t.Errorf("an event waited %s: the lost owner's deliveries came back only after AckWait", o.maxLate)
	}
}

// activeAfter waits until exactly one of rs is active in an epoch started
// after t0 and holds the pin the server names, and returns it.
func activeAfter(t *testing.T, t0 time.Time, rs ...*cutReplica) *cutReplica {
	t.Helper()
	var owner *cutReplica
	eventually(t, 30*time.Second, "one replica active since "+t0.Format(time.StampMilli)+" with the server's pin", func() bool {
		owner = nil
		n := 0
		for _, r := range rs {
			if st := r.src.State(); st.State == StateActive && st.EpochStart.After(t0) {
				owner = r
				n++
			}
		}
		if n != 1 {
			return false
		}
		ci := consumerInfo(owner.js)
		return ci != nil && pinnedID(ci, DefaultGroup) == owner.src.State().PinID
	})
	return owner
}
