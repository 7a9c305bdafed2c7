package main

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/ThreeDotsLabs/watermill"
	wmnats "github.com/ThreeDotsLabs/watermill-nats/v2/pkg/nats"
	"github.com/ThreeDotsLabs/watermill/message"
	"github.com/ThreeDotsLabs/watermill/message/router/middleware"
	"github.com/nats-io/nats.go"
	"github.com/tidwall/gjson"
)

// eventIDField is the watermill metadata field holding the producer's event
// id (its Nats-Msg-Id), which the Deduplicator keys on and which becomes the
// forwarded message's UUID and hence its Nats-Msg-Id (TrackMsgId).
const eventIDField = "event_id"

// idUnmarshaler is watermill-nats' NATSMarshaler plus the producer's
// Nats-Msg-Id in metadata: the stock unmarshaler drops that header, and the
// Deduplicator can only key on metadata or payload.
type idUnmarshaler struct{ wmnats.NATSMarshaler }

func (u *idUnmarshaler) Unmarshal(m *nats.Msg) (*message.Message, error) {
	wm, err := u.NATSMarshaler.Unmarshal(m)
	if err != nil {
		return nil, err
	}
	id := m.Header.Get(nats.MsgIdHdr)
	wm.Metadata.Set(eventIDField, id)
	wm.UUID = id
	return wm, nil
}

// faultPublisher fails the first attempt of every 1000th order (fault runs).
type faultPublisher struct {
	message.Publisher
	f *faultInjector
}

func (p *faultPublisher) Publish(topic string, msgs ...*message.Message) error {
	for _, m := range msgs {
		if order, _, ok := parseEvent(m.Payload); ok && p.f.shouldFail(order) {
			return errInjected
		}
	}
	return p.Publisher.Publish(topic, msgs...)
}

// runWatermill is variant D: watermill v1.5.1 with watermill-nats/v2 v2.1.3.
//
// watermill-nats v2.1.3 has two JetStream APIs: pkg/jetstream (marked beta by
// its authors; one Consume callback that blocks until each message is acked,
// i.e. one message in flight) and pkg/nats with JetStream enabled (the one its
// docs recommend for production, with SubscribersCount parallel push
// subscriptions in a queue group). pkg/nats is used, tuned as far as its own
// options allow. Tuning (-tune): subs=N (SubscribersCount, default 128),
// maxack=N (consumer MaxAckPending, default 8192), ackasync=0|1 (default 1).
func runWatermill(ctx context.Context, e *env) error {
	subs := e.tuneInt("subs", 128)
	maxAck := e.tuneInt("maxack", 8192)
	ackAsync := e.tuneInt("ackasync", 1) == 1
	dedupWindow := 10 * time.Minute
	e.settings = fmt.Sprintf("pkg/nats JetStream push queue subscription; SubscribersCount=%d, JetStream.AckAsync=%v, "+
		"MaxAckPending=%d, AckWaitTimeout=30s, DeliverAll, ManualAck, durable+queue group; publisher TrackMsgId=true "+
		"(sync JetStream publish per message); router NopLogger, no Retry middleware; "+
		"middleware.Deduplicator{KeyFactory: NewMessageHasherFromMetadataField(%q), Repository: NewMapExpiringKeyRepository(%s)}",
		subs, ackAsync, maxAck, eventIDField, dedupWindow)

	logger := watermill.NopLogger{}
	sub, err := wmnats.NewSubscriber(wmnats.SubscriberConfig{
		URL:              e.url,
		QueueGroupPrefix: "watermill",
		SubscribersCount: subs,
		AckWaitTimeout:   30 * time.Second,
		CloseTimeout:     10 * time.Second,
		Unmarshaler:      &idUnmarshaler{},
		JetStream: wmnats.JetStreamConfig{
			AckAsync:      ackAsync,
			DurablePrefix: "watermill",
			SubscribeOptions: []nats.SubOpt{
				nats.BindStream("ORDERS"),
				nats.DeliverAll(),
				nats.AckExplicit(),
				nats.ManualAck(),
				nats.MaxAckPending(maxAck),
				nats.AckWait(30 * time.Second),
			},
		},
	}, logger)
	if err != nil {
		return fmt.Errorf("watermill subscriber: %w", err)
	}
	pubBase, err := wmnats.NewPublisher(wmnats.PublisherConfig{
		URL:       e.url,
		Marshaler: &wmnats.NATSMarshaler{},
		JetStream: wmnats.JetStreamConfig{TrackMsgId: true},
	}, logger)
	if err != nil {
		return fmt.Errorf("watermill publisher: %w", err)
	}
	var pub message.Publisher = pubBase
	if e.faults != nil {
		pub = &faultPublisher{Publisher: pubBase, f: e.faults}
	}
	repo, err := middleware.NewMapExpiringKeyRepository(dedupWindow)
	if err != nil {
		return err
	}
	dedup := &middleware.Deduplicator{
		KeyFactory: middleware.NewMessageHasherFromMetadataField(eventIDField),
		Repository: repo,
		Timeout:    time.Second,
	}
	router, err := message.NewRouter(message.RouterConfig{CloseTimeout: 10 * time.Second}, logger)
	if err != nil {
		return err
	}
	router.AddMiddleware(dedup.Middleware)
	router.AddConsumerHandler("orders-to-cells", "orders.>", sub, func(msg *message.Message) error {
		id := gjson.GetBytes(msg.Payload, "user.id")
		sh, ok := shardOf([]byte(id.Str))
		if !ok {
			return errors.New("no usable key")
		}
		out := message.NewMessage(msg.UUID, msg.Payload)
		out.Metadata = msg.Metadata
		return pub.Publish(e.table.subject[sh], out)
	})
	errc := make(chan error, 1)
	go func() { errc <- router.Run(ctx) }()
	select {
	case err := <-errc:
		_ = pub.Close()
		return err
	case <-ctx.Done():
	}
	_ = router.Close()
	err = <-errc
	_ = sub.Close()
	_ = pub.Close()
	return err
}
