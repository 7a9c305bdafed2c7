package rmq

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
	"github.com/cellbridge/cellbridge/bridge/bridgetest"
	"github.com/cellbridge/cellbridge/internal/rmqtest"
	"github.com/cellbridge/cellbridge/router"
)

func TestSourceConformance(t *testing.T) {
	bridgetest.TestSource(t, bridgetest.SourceHarness{
		AckDeadline: 0, // a pull consumer has no ack deadline
		// Gap: a nil ack behind an unsettled message is not final once the source closes (offsets are a prefix).
		OffsetCommit: true,
		Open: func(t *testing.T) bridgetest.SourceFixture {
			b := startBroker(t, rmqtest.Options{})
			const topic = "suite"
			// One queue: the suite's order checks need one partition.
			if err := b.CreateTopic(topic, 1); err != nil {
				t.Fatal(err)
			}
			return bridgetest.SourceFixture{
				Rule: "suite",
				Publish: func(t *testing.T, msgs ...bridgetest.Raw) {
					t.Helper()
					var ms []*primitive.Message
					for _, m := range msgs {
						pm := primitive.NewMessage(topic, m.Body)
						for k, v := range m.Header {
							pm.WithProperty(k, v)
						}
						ms = append(ms, pm)
					}
					send(t, b, ms...)
				},
				NewSource: func(t *testing.T, group string) bridge.Source {
					t.Helper()
					src, err := NewSource(brokerConfig(b), SourceConfig{
						Rule: "suite", Topic: topic, Group: group, Redeliver: 20 * time.Millisecond,
					}, testLog(t))
					if err != nil {
						t.Fatalf("new source: %v", err)
					}
					return quiescingSource{src, b}
				},
			}
		},
	})
}

// quiescingSource waits for the group's rebalances to settle before Close
// shuts the client down: the client's Shutdown races with a running
// rebalance (a data race inside the client; see quiesce).
type quiescingSource struct {
	*Source
	b *rmqtest.Broker
}

func (s quiescingSource) Close(ctx context.Context) error {
	quiesce(s.b)
	return s.Source.Close(ctx)
}

func TestSinkConformance(t *testing.T) {
	bridgetest.TestSink(t, bridgetest.SinkHarness{
		DropsDuplicates: false, // RocketMQ stores every send; Keys identify the repeats
		Open: func(t *testing.T) bridgetest.SinkFixture {
			b := startBroker(t, rmqtest.Options{})
			var topics atomic.Int64
			return bridgetest.SinkFixture{
				NewSink: func(t *testing.T, maxPending int) bridge.Sink {
					t.Helper()
					s, err := NewSink(SinkConfig{
						Brokers: []BrokerConfig{brokerConfig(b)}, MaxPending: maxPending,
						// An unconfirmed send stays pending until Close cuts it short.
						SendTimeout: 2 * time.Minute,
					}, testLog(t))
					if err != nil {
						t.Fatalf("new sink: %v", err)
					}
					return s
				},
				Target: func(t *testing.T) router.Target {
					t.Helper()
					name := fmt.Sprint("suite-", topics.Add(1))
					// One queue, so that the broker's store order is the send order.
					if err := b.CreateTopic(name, 1); err != nil {
						t.Fatal(err)
					}
					return router.Target{Broker: brokerConfig(b).Name, Topic: name}
				},
				Stored: func(t *testing.T, target router.Target) []bridgetest.Stored {
					var out []bridgetest.Stored
					for _, m := range b.Messages(target.Topic) {
						out = append(out, bridgetest.Stored{MsgID: m.Keys, Header: m.Properties, Body: m.Body})
					}
					return out
				},
				Unconfirmed: func(t *testing.T) router.Target {
					// The broker holds every send's answer from now on.
					b.DelaySends(time.Hour)
					return router.Target{Broker: brokerConfig(b).Name, Topic: "suite-unconfirmed"}
				},
			}
		},
	})
}
