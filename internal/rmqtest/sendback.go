// CONSUMER_SEND_MSG_BACK (36): a consumer's failed message goes to %RETRY%<group> (or %DLQ%).

package rmqtest

import (
	"fmt"
	"strconv"
	"time"
)

func (b *Broker) handleSendBack(req *command) *command {
	group := req.ext("group")
	off, err := req.extInt("offset")
	if err != nil || group == "" {
		return response(resSystemError, "send back: missing group or offset")
	}
	delayLevel := int(req.extIntDefault("delayLevel", 0))
	maxRe := int(req.extIntDefault("maxReconsumeTimes", defaultMaxRetry))
	if maxRe <= 0 {
		maxRe = defaultMaxRetry
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	orig := b.byCommit[off]
	if orig == nil {
		return response(resSystemError, fmt.Sprintf("look message by offset failed, %d", off))
	}
	props := cloneProps(orig.props)
	if _, ok := props[propRetryTopic]; !ok {
		props[propRetryTopic] = orig.topic
	}
	if props[propOriginMsgID] == "" {
		props[propOriginMsgID] = offsetMsgID(orig.storeHost, orig.commitOffset)
	}
	m := &stored{
		sysFlag: orig.sysFlag, flag: orig.flag, body: orig.body, props: props,
		bornTimestamp: orig.bornTimestamp, bornHost: orig.bornHost, reconsumeTimes: orig.reconsumeTimes + 1,
		storeTimestamp: time.Now().UnixMilli(),
	}
	if int(orig.reconsumeTimes) >= maxRe || delayLevel < 0 {
		t := b.createTopicLocked(dlqPrefix+group, dlqQueues, permWrite)
		delete(props, propDelayLevel)
		m.queueID = 0
		b.appendLocked(t, m)
		return response(resSuccess, "")
	}
	if delayLevel == 0 {
		delayLevel = 3 + int(orig.reconsumeTimes)
	}
	delayLevel = min(delayLevel, maxDelayLevel)
	props[propDelayLevel] = strconv.Itoa(delayLevel)
	t := b.createTopicLocked(retryPrefix+group, b.opts.RetryQueues, permReadWrite)
	b.rr++
	m.topic = t.name
	m.queueID = int(b.rr % uint64(len(t.queues)))
	b.scheduleLocked(m, delayLevel)
	return response(resSuccess, "")
}
