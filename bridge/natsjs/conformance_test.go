package natsjs

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/bridgetest"
	"github.com/cellbridge/cellbridge/internal/natstest"
	"github.com/cellbridge/cellbridge/router"
)

// suiteAckWait is the sources' AckWait in the conformance suite: short, so
// that the suite's ErrInProgress check outlasts it quickly.
const suiteAckWait = time.Second

// TestSourceConformance runs the suite in both ordering modes. An ordered
// source's next owner resets the consumer to its ack floor, so a message
// acknowledged behind an unsettled one is read again (same SourceID, which
// deduplication drops): what the suite calls OffsetCommit.
func TestSourceConformance(t *testing.T) {
	for _, o := range []Ordering{Ordered, Unordered} {
		t.Run(string(o), func(t *testing.T) { sourceConformance(t, o) })
	}
}

func sourceConformance(t *testing.T, o Ordering) {
	bridgetest.TestSource(t, bridgetest.SourceHarness{
		AckDeadline:  suiteAckWait,
		OffsetCommit: o == Ordered,
		Open: func(t *testing.T) bridgetest.SourceFixture {
			srv := natstest.Start(t)
			_, js := srv.Connect(t)
			createStream(t, js, "SUITE", "suite.>")
			return bridgetest.SourceFixture{
				Rule: "suite",
				Publish: func(t *testing.T, msgs ...bridgetest.Raw) {
					t.Helper()
					for _, m := range msgs {
						var h nats.Header
						for k, v := range m.Header {
							if h == nil {
								h = nats.Header{}
							}
							h.Set(k, v)
						}
						if _, err := js.PublishMsg(testCtx(t), &nats.Msg{Subject: "suite.in", Header: h, Data: m.Body}); err != nil {
							t.Fatalf("publish: %v", err)
						}
					}
				},
				NewSource: func(t *testing.T, group string) bridge.Source {
					t.Helper()
					src, err := NewSource(testCtx(t), js, SourceConfig{
						Rule: "suite", Broker: "nats", Stream: "SUITE", Subject: "suite.>", Durable: group, AckWait: suiteAckWait,
						Ordering: o,
					}, quiet)
					if err != nil {
						t.Fatalf("new source: %v", err)
					}
					return src
				},
			}
		},
	})
}

func TestSinkConformance(t *testing.T) {
	bridgetest.TestSink(t, bridgetest.SinkHarness{
		DropsDuplicates: true,
		Open: func(t *testing.T) bridgetest.SinkFixture {
			srv := natstest.Start(t)
			nc, js := srv.Connect(t)
			var streams atomic.Int64
			return bridgetest.SinkFixture{
				NewSink: func(t *testing.T, maxPending int) bridge.Sink {
					t.Helper()
					// No AckTimeout within the suite's waits: an unconfirmed
					// publish stays pending until Close cuts it short.
					s, err := NewSink(map[string]jetstream.JetStream{"nats": js}, SinkConfig{MaxPending: maxPending, AckTimeout: 2 * time.Minute}, quiet)
					if err != nil {
						t.Fatalf("new sink: %v", err)
					}
					return s
				},
				Target: func(t *testing.T) router.Target {
					n := streams.Add(1)
					createStream(t, js, fmt.Sprint("CELL", n), fmt.Sprintf("cell%d.>", n))
					return router.Target{Broker: "nats", Subject: fmt.Sprintf("cell%d.orders", n)}
				},
				Stored: func(t *testing.T, target router.Target) []bridgetest.Stored {
					t.Helper()
					name, err := js.StreamNameBySubject(testCtx(t), target.Subject)
					if err != nil {
						t.Fatalf("stream of %s: %v", target.Subject, err)
					}
					st, err := js.Stream(testCtx(t), name)
					if err != nil {
						t.Fatal(err)
					}
					var out []bridgetest.Stored
					for seq := uint64(1); seq <= st.CachedInfo().State.LastSeq; seq++ {
						m, err := st.GetMsg(testCtx(t), seq)
						if err != nil {
							t.Fatalf("stream %s seq %d: %v", name, seq, err)
						}
						h := map[string]string{}
						for k := range m.Header {
							h[k] = m.Header.Get(k)
						}
						out = append(out, bridgetest.Stored{MsgID: h[jetstream.MsgIDHeader], Header: h, Body: m.Data})
					}
					return out
				},
				Unconfirmed: func(t *testing.T) router.Target {
					t.Helper()
					// A plain subscriber takes the subject and never answers:
					// no stream stores it, and no "no responders" comes back.
					sub, err := nc.SubscribeSync("lost.>")
					if err != nil {
						t.Fatal(err)
					}
					t.Cleanup(func() { _ = sub.Unsubscribe() })
					if err := nc.Flush(); err != nil {
						t.Fatal(err)
					}
					return router.Target{Broker: "nats", Subject: "lost.orders"}
				},
			}
		},
	})
}
