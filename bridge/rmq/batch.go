package rmq

import (
	"context"
	"fmt"

	"github.com/apache/rocketmq-client-go/v2/primitive"

	"github.com/cellbridge/cellbridge/bridge"
)

// Batches: a send worker that takes a publish also takes the publishes
// already queued behind it (without waiting for more, so a lone message is
// never delayed), and sends those bound for one queue of one topic of a
// non-transactional target as one batch request: one round trip, one
// request header, one stored batch instead of one of each per message. A
// batch holds at most one message per key (the pipeline publishes a key's
// next message only after the previous one was confirmed), so batching
// changes no key's order; its messages keep their own properties, Keys and
// unique ids. A batch that fails, or that found the topic's queue count
// changed since it was made (the selector then refuses it), is sent again
// message by message, with the usual retries. Transactional sends are
// never batched (a half message is a single message).

// batchHint is the queue a batch was made for: index idx of n queues.
type batchHint struct{ idx, n int }

// maxBatchBytes bounds the bodies of one batch (a broker takes 4 MiB per
// request by default).
const maxBatchBytes = 1 << 20

// built is a publish with its client message, grouped by target queue.
type built struct {
	j   *job
	msg *primitive.Message
}

// run resolves j and, for non-transactional targets, the publishes queued
// behind it, batching those bound for one queue.
func (s *Sink) run(j *job) {
	if j.t.batch == nil || s.cfg.MaxBatch <= 1 {
		s.single(j)
		return
	}
	jobs := []*job{j}
gather:
	for len(jobs) < s.cfg.MaxBatch {
		select {
		case k := <-s.jobs:
			jobs = append(jobs, k)
		default:
			break gather
		}
	}
	// A group's queue index and the queue count it was computed with
	// travel together: the count may change (another worker's send saw a
	// new route) before the batch goes out, and the selector then refuses
	// the hint instead of pairing the index with another count.
	type key struct {
		t     *target
		topic string
		idx   int
		n     int
	}
	var order []key
	groups := map[key][]built{}
	for _, k := range jobs {
		n, ok := 0, false
		if k.t.batch != nil {
			n, ok = k.t.sel.queues(k.m.Target.Topic)
		}
		if !ok {
			s.single(k) // transactional, or no route seen yet
			continue
		}
		msg := outgoingMessage(k.m, k.t.groups)
		gk := key{k.t, k.m.Target.Topic, queueIndex(msg.GetProperty(bridge.HeaderShard), msg.GetProperty(bridge.HeaderError) != "",
			msg.GetProperty(bridge.HeaderMsgID), msg.GetProperty(primitive.PropertyKeys), n), n}
		if _, seen := groups[gk]; !seen {
			order = append(order, gk)
		}
		groups[gk] = append(groups[gk], built{k, msg})
	}
	for _, gk := range order {
		g := groups[gk]
		for len(g) > 0 {
			size, end := 0, 0
			for end < len(g) && (end == 0 || size+len(g[end].msg.Body) <= maxBatchBytes) {
				size += len(g[end].msg.Body)
				end++
			}
			s.sendBatch(gk.t, batchHint{idx: gk.idx, n: gk.n}, g[:end])
			g = g[end:]
		}
	}
}

// single publishes j on its own, with retries.
func (s *Sink) single(j *job) {
	if err := s.publish(j); err == nil || !s.handOver(j, err) {
		s.finish(j, err)
	}
}

// sendBatch sends g as one batch to the queue of hint; on any failure its
// publishes are sent one by one.
func (s *Sink) sendBatch(t *target, hint batchHint, g []built) {
	if len(g) == 1 {
		s.single(g[0].j)
		return
	}
	msgs := make([]*primitive.Message, len(g))
	for i, b := range g {
		// The client gives a batch's messages no unique id of their own.
		b.msg.WithProperty(primitive.PropertyUniqueClientMessageIdKeyIndex, primitive.CreateUniqID())
		msgs[i] = b.msg
	}
	mark := &primitive.MessageQueue{Topic: msgs[0].Topic}
	msgs[0].Queue = mark
	t.sel.hints.Store(mark, hint)
	ctx, done := s.sendCtx(g[0].j)
	err := t.batch(ctx, msgs)
	done()
	t.sel.hints.Delete(mark)
	if err == nil {
		if t.retrying.Swap(false) {
			s.log.Info("rocketmq sends succeed again", "broker", t.name, "topic", msgs[0].Topic)
		}
		for _, b := range g {
			s.finish(b.j, nil)
		}
		return
	}
	// Each message is tried again on its own: a failed attempt like any.
	s.retried(t, msgs[0].Topic, 1, fmt.Errorf("batch of %d messages (sending them one by one): %w", len(msgs), err))
	for _, b := range g {
		s.single(b.j)
	}
}

// sendBatchWith is a target's batch send through p.
func sendBatchWith(p interface {
	SendSync(ctx context.Context, msgs ...*primitive.Message) (*primitive.SendResult, error)
}) func(ctx context.Context, msgs []*primitive.Message) error {
	return func(ctx context.Context, msgs []*primitive.Message) error {
		res, err := p.SendSync(ctx, msgs...)
		if err != nil {
			return err
		}
		if res.Status != primitive.SendOK {
			return fmt.Errorf("send status %d", res.Status)
		}
		return nil
	}
}
