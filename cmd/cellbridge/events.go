package main

import (
	"fmt"
	"math/rand/v2"
	"strconv"

	"github.com/nats-io/nats.go"
)

// Sample events of the example topics (deploy/rules): the demo publishes
// them, and the end-to-end and crash tests publish the same kind of traffic.

// Poison kinds a sample event may have ("" for a routable event). They are
// the cellbridge_dlq_total reason values the bridge reports for them.
const (
	poisonNone       = ""
	poisonMissingKey = "missing_key"
	poisonBadKey     = "bad_key"
	poisonBadBody    = "bad_body"
)

// sampleEvent is one event ready to publish to the source stream.
type sampleEvent struct {
	ID      string // "evt-0000042": in the X-Event-Id header and, when the body is JSON, in "id"
	Topic   string // topic rule: orders | payments
	Subject string
	Key     string // the user id it carries ("" when missing)
	Header  nats.Header
	Body    []byte
	Poison  string // poison kind, "" for a routable event
}

// Msg returns the event as a NATS message.
func (e *sampleEvent) Msg() *nats.Msg {
	return &nats.Msg{Subject: e.Subject, Header: e.Header, Data: e.Body}
}

// pinnedKey is the pinned user of the example rules (pins: → rz10).
const pinnedKey = "2088000000000042"

// eventGen makes a deterministic stream of sample events from a seed: about
// half orders (user id in the JSON body) and half payments (user id in the
// X-User-Id header), one in fifty of the pinned user, and one poison event
// every poisonEvery events (0: none), cycling through the poison kinds.
type eventGen struct {
	rnd         *rand.Rand
	n           int
	poisonEvery int
	// users, when above 0, draws the user ids (other than the pinned
	// user's) from that many users instead of from all of them, so that
	// each user has many events (what a per-key order check needs).
	users int
}

func newEventGen(seed uint64, poisonEvery int) *eventGen {
	return &eventGen{rnd: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), poisonEvery: poisonEvery}
}

var orderActions = []string{"created", "paid", "shipped", "delivered", "cancelled"}
var paymentActions = []string{"authorized", "captured", "refunded"}

// userID is a realistic 16-digit user id: 2088 and 12 digits.
func (g *eventGen) userID() string {
	if g.rnd.IntN(50) == 0 {
		return pinnedKey
	}
	if g.users > 0 {
		// Spread over the id space (and so over the shards) by a prime
		// stride.
		return fmt.Sprintf("2088%012d", int64(g.rnd.IntN(g.users))*7_919_007_919%1_000_000_000_000)
	}
	return fmt.Sprintf("2088%012d", g.rnd.Int64N(1_000_000_000_000))
}

func (g *eventGen) next() sampleEvent {
	g.n++
	e := sampleEvent{ID: fmt.Sprintf("evt-%07d", g.n), Header: nats.Header{}}
	e.Header.Set("X-Event-Id", e.ID)
	poison := poisonNone
	if g.poisonEvery > 0 && g.n%g.poisonEvery == 0 {
		poison = []string{poisonMissingKey, poisonBadKey, poisonBadBody}[(g.n/g.poisonEvery)%3]
	}
	e.Poison = poison
	user := g.userID()
	cents := 100 + g.rnd.IntN(99900)
	orders := g.rnd.IntN(2) == 0
	if poison == poisonBadBody {
		orders = true // only orders parse their body
	}
	if orders {
		e.Topic = "orders"
		e.Subject = "orders." + orderActions[g.rnd.IntN(len(orderActions))]
		userJSON := `{"id":` + user + `,"tier":"gold"}` // a bare number: ids must survive as exact text
		switch poison {
		case poisonMissingKey:
			userJSON, user = `{"tier":"guest"}`, ""
		case poisonBadKey:
			user = "guest-" + strconv.Itoa(g.n) + "-ab" // the shard digits ([-3:-1]) are "-a"
			userJSON = `{"id":"` + user + `","tier":"guest"}`
		}
		e.Body = []byte(`{"id":"` + e.ID + `","order":"o-` + strconv.Itoa(1_000_000+g.n) + `","user":` + userJSON +
			`,"amount":{"cents":` + strconv.Itoa(cents) + `,"currency":"CNY"}}`)
		if poison == poisonBadBody {
			// Truncated before the user: the key cannot be read at all.
			e.Body = []byte(`{"id":"` + e.ID + `","order":"o-` + strconv.Itoa(1_000_000+g.n))
			user = ""
		}
	} else {
		e.Topic = "payments"
		e.Subject = "payments." + paymentActions[g.rnd.IntN(len(paymentActions))]
		switch poison {
		case poisonMissingKey:
			user = ""
		case poisonBadKey:
			user = "u" + strconv.Itoa(g.n) + "-ab"
		}
		if user != "" {
			e.Header.Set("X-User-Id", user)
		}
		e.Body = []byte(`{"id":"` + e.ID + `","payment":"p-` + strconv.Itoa(1_000_000+g.n) + `","cents":` + strconv.Itoa(cents) + `}`)
	}
	e.Key = user
	return e
}
