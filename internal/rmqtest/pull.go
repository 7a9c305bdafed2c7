// PULL_MESSAGE (11) with long polling.

package rmqtest

import (
	"fmt"
	"strconv"
	"time"
)

type pullArgs struct {
	group, topic string
	queueID      int
	offset       int64
	maxMsgs      int
	sub          *subscription
}

func (b *Broker) handlePull(c *conn, req *command) {
	a := pullArgs{
		group:   req.ext("consumerGroup"),
		topic:   req.ext("topic"),
		queueID: int(req.extIntDefault("queueId", -1)),
		offset:  req.extIntDefault("queueOffset", 0),
		maxMsgs: int(req.extIntDefault("maxMsgNums", 32)),
	}
	sysFlag := req.extIntDefault("sysFlag", 0)
	suspend := time.Duration(req.extIntDefault("suspendTimeoutMillis", 0)) * time.Millisecond
	if b.opts.MaxSuspend > 0 && suspend > b.opts.MaxSuspend {
		suspend = b.opts.MaxSuspend
	}
	if a.maxMsgs <= 0 {
		a.maxMsgs = 1
	}
	a.maxMsgs = min(a.maxMsgs, 1024)

	b.mu.Lock()
	if sysFlag&1 != 0 {
		if off := req.extIntDefault("commitOffset", -1); off >= 0 && b.topics[a.topic] != nil {
			b.offsets[offsetKey{a.group, a.topic, a.queueID}] = off
		}
	}
	if sysFlag&4 != 0 {
		a.sub = parseSubscription(a.topic, req.ext("subscription"), req.ext("expressionType"))
	} else if g := b.groups[a.group]; g != nil {
		a.sub = g.subs[a.topic]
	}
	b.mu.Unlock()
	if a.sub != nil && a.sub.unsupported {
		c.respond(req, response(resSystemError, "only TAG subscriptions are supported by this broker"))
		return
	}

	b.mu.Lock()
	netStop := b.netStop
	b.mu.Unlock()
	if refuseIfStopping(c, req, netStop) {
		return
	}
	resp, notify := b.pullOnce(&a)
	if resp != nil {
		c.respond(req, resp)
		return
	}
	if sysFlag&2 == 0 || suspend <= 0 {
		c.respond(req, b.notFound(&a))
		return
	}
	// Long polling: hold the request until a message arrives in the queue or the suspend time ends.
	b.mu.Lock()
	select {
	case <-netStop:
		b.mu.Unlock()
		c.respond(req, restartingResponse())
		return
	default:
	}
	// Added under b.mu, which stopNetwork holds to close netStop: no Add races with its Wait.
	b.pullWG.Add(1)
	b.mu.Unlock()
	go func() {
		defer b.pullWG.Done()
		timer := time.NewTimer(suspend)
		defer timer.Stop()
		for {
			select {
			case <-notify:
				resp, notify = b.pullOnce(&a)
				if resp != nil && resp.Code == resPullRetryImmediate && notify != nil {
					// Only messages the subscription skips arrived: keep holding past them, as the
					// real broker wakes held pulls for matching tags only.
					a.offset, _ = strconv.ParseInt(resp.ext("nextBeginOffset"), 10, 64)
					continue
				}
				if resp != nil {
					c.respond(req, resp)
					return
				}
			case <-timer.C:
				resp, _ = b.pullOnce(&a)
				if resp == nil {
					resp = b.notFound(&a)
				}
				c.respond(req, resp)
				return
			case <-c.closed:
				return
			case <-netStop:
				// Restart or Close: answer now with a code the client backs off from (3s) instead of
				// leaving the pull to its 30s timeout, as the client never fails a request whose
				// connection closed. The connection closes once every held pull is answered.
				c.respond(req, restartingResponse())
				return
			}
		}
	}()
}

// notFound is the PULL_NOT_FOUND answer at the request's offset.
func (b *Broker) notFound(a *pullArgs) *command {
	b.mu.Lock()
	defer b.mu.Unlock()
	var maxOff int64
	if t := b.topics[a.topic]; t != nil && a.queueID >= 0 && a.queueID < len(t.queues) {
		maxOff = int64(len(t.queues[a.queueID].msgs))
	}
	next := a.offset
	if maxOff == 0 {
		next = 0
	}
	return pullResponse(resPullNotFound, next, maxOff)
}

func pullResponse(code int16, next, maxOff int64) *command {
	r := response(code, "")
	r.ExtFields["nextBeginOffset"] = fmtInt(next)
	r.ExtFields["minOffset"] = "0"
	r.ExtFields["maxOffset"] = fmtInt(maxOff)
	r.ExtFields["suggestWhichBrokerId"] = "0"
	return r
}

// pullOnce answers a pull from the store. It returns nil and the queue's notify channel when there is
// nothing new at the offset (the caller long-polls or answers PULL_NOT_FOUND).
func (b *Broker) pullOnce(a *pullArgs) (*command, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	t := b.topics[a.topic]
	if t == nil {
		return response(resTopicNotExist, "topic["+a.topic+"] not exist, apply first please!"), nil
	}
	if a.queueID < 0 || a.queueID >= len(t.queues) {
		return response(resSystemError, fmt.Sprintf("queueId[%d] is illegal, topic:[%s] read queue nums:[%d]", a.queueID, a.topic, len(t.queues))), nil
	}
	q := t.queues[a.queueID]
	maxOff := int64(len(q.msgs))
	switch {
	case a.offset < 0:
		return pullResponse(resPullOffsetMoved, 0, maxOff), nil
	case maxOff == 0 || a.offset == maxOff:
		return nil, q.notify
	case a.offset > maxOff:
		return pullResponse(resPullOffsetMoved, maxOff, maxOff), nil
	}
	var body []byte
	found := 0
	next := a.offset
	for off := a.offset; off < maxOff && off-a.offset < maxScanPerPull; off++ {
		m := q.msgs[off]
		if found > 0 && (found >= a.maxMsgs || len(body)+int(m.size) > maxPullBytes) {
			break
		}
		next = off + 1
		if !a.sub.matches(m.props[propTags]) {
			continue
		}
		body = m.encode(body)
		found++
	}
	if found == 0 {
		// No match in the scanned range; the notify channel lets a held pull wait past it.
		var notify <-chan struct{}
		if next == maxOff {
			notify = q.notify
		}
		return pullResponse(resPullRetryImmediate, next, maxOff), notify
	}
	r := pullResponse(resSuccess, next, maxOff)
	r.Body = body
	return r, nil
}
